"""A pool of processes for CPU-bound tasks (``kind="process"``).

    async with ProcessPool("app.tasks:rt", size=2) as pool:
        async with rt.worker(processes=pool):
            ...

Each pool process is a fresh interpreter (``python -m runtime.process.pool_child``)
that imports the application itself; nothing is pickled. A call sends the
task's *name* and its arguments as MessagePack; the pool process looks the
function up by that name in its own registry. Results come back the same way,
errors as type name, message and traceback (:class:`RemoteTaskError`).

Progress a task reports (``current_task().progress_sync``) comes back while it
runs, coalesced in the pool process, and is recorded on the worker's context
(so ``handle.updates()`` sees it live). A task's ``soft_timeout`` is raised in
its body by the pool process itself (``SIGUSR1`` to its main thread, see
:mod:`runtime.process.pool_live`). Time limits are hard: a call past its limit
has its process killed (SIGKILL) and raises
:class:`runtime.execution.TimeLimit`; a replacement is started in the
background. A call whose process dies raises :class:`PoolProcessDied` and is
replaced the same way.
"""

from __future__ import annotations

import builtins
import contextlib
import math
import os
import signal
import struct
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runtime.context import current
from runtime.errors import ConfigError, Reject, Retry
from runtime.execution import TimeLimit
from runtime.messages import ChordRef
from runtime.process.pool_child import MAX_FRAME, Call, Done, Failed, Progressed, Ready, Reply

__all__ = ["PoolProcessDied", "ProcessPool", "RemoteTaskError"]

log = structlog.get_logger("taskloom.pool")

_HEADER = struct.Struct(">I")
_FnKey = tuple[str, str, int]


class PoolProcessDied(Exception):
    """The pool process running a task died (killed, crashed, ``os._exit``)."""


class RemoteTaskError(Exception):
    """A task raised in a pool process. Its class carries the remote type's
    module and qualified name (so results name ``ValueError``, not this
    class), and subclasses the real type where it is a built-in or already
    imported here, so ``retry_on=(ValueError,)`` still matches."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        Exception.__init__(self, message)
        self.message = message
        self.remote_traceback = remote_traceback
        if remote_traceback:
            self.add_note(f"raised in a pool process:\n{remote_traceback.rstrip()}")

    def __str__(self) -> str:
        return self.message


_remote_classes: dict[str, type[RemoteTaskError]] = {}


def _known_class(type_name: str) -> type[BaseException] | None:
    """The class named ``type_name`` if it is a built-in or its module is
    already imported here; never imports anything."""
    module_name, _, qualname = type_name.rpartition(".")
    found: Any
    if not module_name:
        found = getattr(builtins, type_name, None)
    else:
        found = sys.modules.get(module_name)
        while found is None and "." in module_name:  # a nested class: module.Outer.Inner
            module_name, _, outer = module_name.rpartition(".")
            qualname = f"{outer}.{qualname}"
            found = sys.modules.get(module_name)
        for part in qualname.split("."):
            found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def remote_error(type_name: str, message: str, remote_traceback: str = "") -> RemoteTaskError:
    """An exception standing for one raised in another process."""
    cls = _remote_classes.get(type_name)
    if cls is None:
        module_name, _, qualname = type_name.rpartition(".")
        namespace = {"__module__": module_name or "builtins", "__qualname__": qualname}
        real = _known_class(type_name)
        made: type[RemoteTaskError] | None = None
        if real is not None and not issubclass(real, RemoteTaskError):
            try:
                made = type(qualname.rpartition(".")[2], (RemoteTaskError, real), namespace)
            except TypeError:  # incompatible layouts: keep the name only
                made = None
        if made is None:
            made = type(qualname.rpartition(".")[2], (RemoteTaskError,), namespace)
        cls = _remote_classes[type_name] = made
    # the real class's __init__ may want other arguments: build without it
    exc: RemoteTaskError = cls.__new__(cls, message)
    RemoteTaskError.__init__(exc, message, remote_traceback)
    return exc


def _fn_key(fn: Callable[..., Any]) -> _FnKey | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return (getattr(fn, "__qualname__", ""), code.co_filename, code.co_firstlineno)


class _Proc:
    """One pool process and its pipes."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin: anyio.abc.ByteSendStream = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.pid = process.pid

    async def receive(self) -> Reply:
        header = await self.stdout.receive_exactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise PoolProcessDied(f"pool process {self.pid} sent a frame of {size} bytes")
        reply: Reply = _decoder.decode(await self.stdout.receive_exactly(size))
        return reply

    async def send(self, body: bytes) -> None:
        await self.stdin.send(_HEADER.pack(len(body)) + body)

    async def kill(self) -> None:
        """SIGKILL and reap; safe to call twice."""
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            await self.process.wait()
            await self.process.aclose()

    async def close(self, timeout: float) -> None:
        """EOF on stdin; SIGKILL if it has not exited within ``timeout``."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self.stdin.aclose()
            with anyio.move_on_after(timeout):
                await self.process.wait()
            await self.kill()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Reply)


class ProcessPool:
    """Runs ``kind="process"`` tasks of the application ``app_spec``
    (``module:attr`` naming its Runtime) in ``size`` processes. Implements
    :class:`runtime.execution.ProcessRunner`."""

    def __init__(self, app_spec: str, size: int | None = None, *, start_timeout_s: float = 60.0,
                 respawn_max_s: float = 5.0) -> None:
        module_name, _, attr = app_spec.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"ProcessPool needs the application as module:attribute "
                              f"(e.g. app.tasks:rt), got {app_spec!r}")
        size = size if size is not None else (os.cpu_count() or 1)
        if size < 1:
            raise ConfigError(f"a process pool needs at least one process, got size={size}")
        self.app_spec = app_spec
        self.size = size
        self.start_timeout_s = start_timeout_s
        self.respawn_max_s = respawn_max_s
        self.started = 0
        """How many pool processes were started, replacements included."""
        self.progress_frames = 0
        """How many progress reports came from running tasks (after coalescing)."""
        self._procs: set[_Proc] = set()
        self._names: dict[Callable[..., Any], str] = {}
        self._keys: dict[_FnKey, str] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._idle_send: MemoryObjectSendStream[_Proc] | None = None
        self._idle_recv: MemoryObjectReceiveStream[_Proc] | None = None

    @property
    def pids(self) -> list[int]:
        """The pids of the live pool processes."""
        return sorted(p.pid for p in self._procs)

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._index_tasks()
        self._idle_send, self._idle_recv = anyio.create_memory_object_stream[_Proc](self.size)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            with anyio.fail_after(self.start_timeout_s):
                async with anyio.create_task_group() as starting:
                    for _ in range(self.size):
                        starting.start_soon(self._start_into_idle)
        except BaseException as e:
            await self._shutdown()
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            self._tg = None
            if isinstance(e, TimeoutError):
                raise ConfigError(f"the process pool for {self.app_spec} did not start within "
                                  f"{self.start_timeout_s:g}s") from None
            if isinstance(e, ExceptionGroup) and len(e.exceptions) == 1:
                raise e.exceptions[0] from None
            raise
        log.info("process pool started", app=self.app_spec, size=self.size, pids=self.pids)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._shutdown()
        finally:
            await self._tg.__aexit__(None, None, None)
            self._tg = None

    async def _shutdown(self) -> None:
        if self._idle_send is not None:
            self._idle_send.close()
        procs = list(self._procs)
        self._procs.clear()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for proc in procs:
                    tg.start_soon(proc.close, 5.0)

    async def _start(self) -> _Proc:
        env = dict(os.environ, TASKLOOM_POOL_PARENT_PID=str(os.getpid()))
        process = await anyio.open_process(
            [sys.executable, "-m", "runtime.process.pool_child", self.app_spec],
            stdin=-1, stdout=-1, stderr=None, env=env, start_new_session=True)
        proc = _Proc(process)
        self._procs.add(proc)
        self.started += 1
        try:
            ready = await proc.receive()
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            self._procs.discard(proc)
            await proc.kill()
            raise ConfigError(
                f"a pool process could not load {self.app_spec} (exit code "
                f"{process.returncode}); its error is printed above") from None
        except BaseException:
            self._procs.discard(proc)
            await proc.kill()
            raise
        if not isinstance(ready, Ready):
            self._procs.discard(proc)
            await proc.kill()
            raise ConfigError(f"a pool process for {self.app_spec} sent {ready!r} before ready")
        return proc

    async def _start_into_idle(self) -> None:
        proc = await self._start()
        assert self._idle_send is not None
        try:
            self._idle_send.send_nowait(proc)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._procs.discard(proc)
            await proc.close(1.0)
            raise

    async def _replace(self) -> None:
        """Start a replacement, retrying with backoff while it fails."""
        delay = 0.1
        while True:
            try:
                await self._start_into_idle()
                return
            except ConfigError as e:
                log.error("could not replace a pool process; retrying", error=str(e),
                          retry_in_s=delay)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, self.respawn_max_s)

    async def _discard(self, proc: _Proc) -> None:
        self._procs.discard(proc)
        await proc.kill()
        if self._tg is not None and self._idle_send is not None:
            self._tg.start_soon(self._replace)

    # -- calls ---------------------------------------------------------------------

    def _index_tasks(self) -> None:
        from runtime.process.loading import load_runtime

        rt = load_runtime(self.app_spec)
        for task in rt.registry:
            self._names[task.fn] = task.name
            key = _fn_key(task.fn)
            if key is not None:
                self._keys[key] = task.name

    def _name_of(self, fn: Callable[..., Any]) -> str:
        name = self._names.get(fn)
        if name is None:
            key = _fn_key(fn)
            name = self._keys.get(key) if key is not None else None
        if name is None:
            raise ConfigError(
                f"{getattr(fn, '__qualname__', fn)!r} is not a task of {self.app_spec}; a process "
                "pool runs the tasks of the application it was made for")
        return name

    async def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  timeout: float | None) -> Any:
        """Run the task whose function is ``fn`` in a pool process."""
        if self._idle_recv is None:
            raise RuntimeError("the process pool is not started; use `async with ProcessPool(...)`")
        name = self._name_of(fn)
        ctx = current.get()
        if ctx is None:
            body = _encoder.encode(Call(task=name, args=list(args), kwargs=kwargs))
        else:  # the child's current_task(): the message without its payload and canvas
            m = ctx.message
            chord = m.chord and ChordRef(id=m.chord.id, index=m.chord.index, size=m.chord.size)
            slim = msgspec.structs.replace(m, args=[], kwargs={}, links=[], errbacks=[],
                                           downstream=[], chord=chord)
            body = _encoder.encode(Call(task=name, args=list(args), kwargs=kwargs, context=slim,
                                        delivery_count=ctx.delivery_count, worker=ctx.worker))
        try:
            proc = await self._idle_recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise RuntimeError(f"the process pool is closed; task {name!r} was not run") from None
        reusable = False
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
                try:
                    await proc.send(body)
                    reply = await proc.receive()
                    while isinstance(reply, Progressed):  # reported while the task runs
                        self.progress_frames += 1
                        if ctx is not None:
                            if reply.meta:
                                ctx.meta.update(reply.meta)
                            ctx.report(reply.progress)
                        reply = await proc.receive()
                except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError,
                        anyio.ClosedResourceError, OSError):
                    with anyio.CancelScope(shield=True):
                        code = await proc.process.wait()
                    how = (f"signal {signal.Signals(-code).name}" if code < 0
                           else f"exit code {code}")
                    raise PoolProcessDied(
                        f"the pool process (pid {proc.pid}) running task {name!r} died "
                        f"({how}); it was replaced") from None
            if scope.cancelled_caught:
                log.warning("killing a pool process past a task's time limit", task=name,
                            pid=proc.pid, limit_s=timeout)
                assert timeout is not None
                raise TimeLimit(timeout)
            reusable = True
        finally:
            if reusable:
                assert self._idle_send is not None
                try:
                    self._idle_send.send_nowait(proc)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    await proc.close(1.0)
            else:
                await self._discard(proc)
        if ctx is not None and isinstance(reply, (Done, Failed)):
            if reply.meta:
                ctx.meta.update(reply.meta)
            if reply.progress is not None:
                ctx.last_progress = reply.progress
        return _outcome(reply)


def _outcome(reply: Reply) -> Any:
    if isinstance(reply, Done):
        return reply.value
    if isinstance(reply, Failed):
        if reply.type == "runtime.errors.Retry":
            raise Retry(reply.delay_s, reply.reason)
        if reply.type == "runtime.errors.Reject":
            raise Reject(reply.reason)
        raise remote_error(reply.type, reply.message, reply.traceback)
    raise PoolProcessDied(f"a pool process sent {reply!r} in reply to a call")
