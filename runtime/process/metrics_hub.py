"""One Prometheus endpoint for a supervisor and all its worker processes.

``taskloom worker APP --processes N --metrics-port P``: the supervisor makes a
fresh directory, gives it to each child as ``PROMETHEUS_MULTIPROC_DIR`` (so
prometheus-client's metrics in the child write to memory-mapped files there;
see its "multiprocess mode"), and serves http://127.0.0.1:P/metrics itself with
a ``MultiProcessCollector`` over that directory: the sum over every child,
live or gone. Counters and histograms of a child that died or recycled stay in
the sum (a counter never goes back); ``child_gone(pid)`` is
``mark_process_dead``, which drops its live gauges (``in_flight`` is summed over
live processes only). The directory is removed when the supervisor stops.

The children see ``AGGREGATED_ENV`` and serve no port of their own.

prometheus-client and uvicorn come with the dashboard extra; they are imported
when a supervisor is asked for metrics, never otherwise.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import structlog

from runtime.errors import ConfigError

__all__ = ["AGGREGATED_ENV", "MULTIPROC_ENV", "MetricsHub", "bind_metrics", "metrics_port_in",
           "quiet_server"]

log = structlog.get_logger("taskloom.metrics")

#: where prometheus-client's multiprocess mode keeps each process's values
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: set for a supervised child whose supervisor serves the sum: the child serves no port
AGGREGATED_ENV = "TASKLOOM_METRICS_AGGREGATED"


def metrics_port_in(command: Sequence[str]) -> int | None:
    """The ``--metrics-port`` a child command names (None: no metrics)."""
    for i, arg in enumerate(command):
        if arg == "--metrics-port" and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith("--metrics-port="):
            value = arg.partition("=")[2]
        else:
            continue
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"--metrics-port must be a port number, got {value!r}") from None
    return None


def bind_metrics(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port``, or a ConfigError saying what to do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot serve metrics on 127.0.0.1:{port} ({e.strerror or e}); "
                          "pass a free --metrics-port") from None
    sock.setblocking(False)
    return sock


def quiet_server(app: Any) -> Any:
    """A uvicorn server that leaves signals and logging to its host process (the
    worker or the supervisor owns SIGTERM/SIGINT)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                 lifespan="off", timeout_graceful_shutdown=1))


class MetricsHub:
    """The supervisor's side: ``open(env)`` (binds the port, makes the directory,
    puts it in the children's ``env``), ``serve()`` in a task, ``child_gone(pid)``
    after each child exits, ``close()`` at the end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.path: str | None = None
        self._sock: socket.socket | None = None
        self._server: Any = None

    def open(self, env: MutableMapping[str, str]) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_asgi_app
            from prometheus_client.multiprocess import MultiProcessCollector
        except ImportError as e:
            raise ConfigError(f"--metrics-port needs the dashboard extra ({e}); install it: "
                              "pip install 'taskloom[dashboard]'") from None
        self._sock = bind_metrics(self.port)
        self.path = tempfile.mkdtemp(prefix="taskloom-metrics-")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.path)  # type: ignore[no-untyped-call]
        self._server = quiet_server(make_asgi_app(registry=registry))
        env[MULTIPROC_ENV] = self.path
        env[AGGREGATED_ENV] = "1"

    async def serve(self) -> None:
        """Serve until cancelled (the supervisor's task group ends)."""
        if self._server is None or self._sock is None:
            return
        log.info("metrics serving", url=f"http://127.0.0.1:{self.port}/metrics",
                 aggregated_dir=self.path)
        try:
            await self._server.serve([self._sock])
        finally:
            self._server.should_exit = True

    def child_gone(self, pid: int) -> None:
        if self.path is None or pid <= 0:
            return
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, path=self.path)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
