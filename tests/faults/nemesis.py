"""A network nemesis owned by the tests: a TCP proxy between the runtime and a server.

It runs its own event loop in a daemon thread, so a test (or a worker process
pointed at it) can switch its mode at any moment, even while the test's own
loop is busy. Modes (RELIABILITY.md §2.1):

- ``pass``: bytes flow both ways;
- ``blackhole``: sockets stay open, no byte moves in either direction (a
  partition without RST: only heartbeats and timeouts can notice). Bytes read
  before the switch are held, not dropped, and flow again when the mode goes
  back to ``pass`` — like TCP retransmitting across a healed partition;
- ``drop``: sockets stay open, every byte read (both directions) is discarded
  (a partition that *loses* bytes: frames sent during it are gone, and after
  the heal the stream resumes in whole reads, usually still in step, so only a
  watchdog or an application-level timeout notices what was lost);
- ``reset``: every open connection is closed with an RST (SO_LINGER 0), and
  new ones are reset as soon as they are accepted, until the mode changes;
- ``half_open``: client → server flows, server → client is held;
- ``latency``: each chunk waits ``delay_ms`` before it is forwarded;
- ``throttle``: each direction forwards at most ``bytes_per_s``.

Usage::

    with TcpProxy(target_port=server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        ...
        proxy.set_mode("reset")
        ...
        proxy.set_mode("pass")
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Self

Mode = Literal["pass", "blackhole", "drop", "reset", "half_open", "latency", "throttle"]
MODES: tuple[Mode, ...] = ("pass", "blackhole", "drop", "reset", "half_open", "latency", "throttle")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        _rst(self.client)
        if self.server is not None:
            _rst(self.server)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 whose behaviour a test switches at run time."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._want_port = port
        self.port = 0
        self.mode: Mode = "pass"
        self.delay_ms = 0.0
        self.bytes_per_s = 0
        self.connections_total = 0
        self.resets_total = 0
        #: Bytes discarded in ``drop`` mode (both directions).
        self.dropped_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flow_up: asyncio.Event | None = None     # client -> server may flow
        self._flow_down: asyncio.Event | None = None   # server -> client may flow
        self._ready = threading.Event()

    # -- control (any thread) ------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=f"nemesis:{self.target_port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the nemesis proxy did not start within 10 s")
        return self

    def set_mode(self, mode: Mode, *, delay_ms: float = 0.0, bytes_per_s: int = 0) -> None:
        """Switch the mode; returns once the switch has taken effect."""
        if mode not in MODES:
            raise ValueError(f"unknown nemesis mode {mode!r}: use one of {', '.join(MODES)}")
        loop = self._loop
        if loop is None:
            raise RuntimeError("the nemesis proxy is not started: call start() first")
        done = threading.Event()

        def apply() -> None:
            self.mode = mode
            self.delay_ms = delay_ms
            self.bytes_per_s = bytes_per_s
            assert self._flow_up is not None and self._flow_down is not None
            up = mode not in ("blackhole", "reset")
            down = mode not in ("blackhole", "reset", "half_open")
            (self._flow_up.set if up else self._flow_up.clear)()
            (self._flow_down.set if down else self._flow_down.clear)()
            if mode == "reset":
                for conn in list(self._conns):
                    self.resets_total += 1
                    conn.reset()
                self._conns.clear()
            done.set()

        loop.call_soon_threadsafe(apply)
        if not done.wait(10):
            raise RuntimeError(f"the nemesis proxy did not switch to {mode!r} within 10 s")

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def fault(self, mode: Mode, **options: float) -> Iterator[None]:
        """``with proxy.fault("blackhole"): ...`` — the mode for the block, then ``pass``."""
        self.set_mode(mode, **options)  # type: ignore[arg-type]
        try:
            yield
        finally:
            self.set_mode("pass")

    # -- the proxy's own loop --------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    def _shutdown(self) -> None:
        for conn in list(self._conns):
            conn.reset()
        self._conns.clear()
        if self._server is not None:
            self._server.close()
        assert self._stopped is not None
        self._stopped.set()

    async def _serve(self) -> None:
        self._flow_up = asyncio.Event()
        self._flow_down = asyncio.Event()
        self._flow_up.set()
        self._flow_down.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._want_port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopped.wait()

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.mode == "reset":
            self.resets_total += 1
            _rst(cwriter)
            return
        conn = _Conn(client=cwriter)
        self._conns.add(conn)
        try:
            sreader, swriter = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._conns.discard(conn)
            _rst(cwriter)
            return
        conn.server = swriter
        if conn not in self._conns:  # reset while connecting
            _rst(swriter)
            return
        assert self._flow_up is not None and self._flow_down is not None
        conn.pumps = [
            asyncio.ensure_future(self._pump(creader, swriter, self._flow_up, conn)),
            asyncio.ensure_future(self._pump(sreader, cwriter, self._flow_down, conn)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    flow: asyncio.Event, conn: _Conn) -> None:
        try:
            while True:
                await flow.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await flow.wait()  # bytes read just before a blackhole are held, not dropped
                if self.mode == "drop":
                    self.dropped_bytes += len(data)
                    continue
                if self.mode == "latency" and self.delay_ms:
                    await asyncio.sleep(self.delay_ms / 1000)
                if self.mode == "throttle" and self.bytes_per_s:
                    await asyncio.sleep(len(data) / self.bytes_per_s)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        # one side closed: close both (a FIN, as the peer did)
        if conn in self._conns:
            self._conns.discard(conn)
            for pump in conn.pumps:
                if pump is not asyncio.current_task():
                    pump.cancel()
            conn.client.close()
            if conn.server is not None:
                conn.server.close()
