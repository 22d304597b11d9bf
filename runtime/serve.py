"""Running one worker process until a signal: SIGTERM/SIGINT drain, a second
one stops at once (unfinished tasks return to the broker)."""

from __future__ import annotations

import signal
from collections.abc import Sequence

import anyio
import structlog

from runtime.app import Runtime
from runtime.worker import Worker

__all__ = ["EXIT_OK", "EXIT_SIGNAL_TWICE", "serve_worker"]

log = structlog.get_logger("taskloom.serve")

EXIT_OK = 0
EXIT_SIGNAL_TWICE = 130


async def serve_worker(
    rt: Runtime,
    queues: Sequence[str] | None,
    concurrency: int,
    prefetch: int | None,
    shutdown_grace_s: float,
) -> int:
    """Serve until signalled; returns the process exit code."""
    code = EXIT_OK
    async with rt:
        worker = Worker(rt, queues=queues, concurrency=concurrency, prefetch=prefetch,
                        shutdown_grace_s=shutdown_grace_s)
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                nonlocal code
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        if not worker_stopping.is_set():
                            log.info("draining on signal", signal=signal.Signals(signum).name,
                                     grace_s=shutdown_grace_s)
                            worker_stopping.set()
                            worker.stop()
                        else:
                            log.warning("second signal: stopping now; unfinished tasks return "
                                        "to the broker", signal=signal.Signals(signum).name)
                            code = EXIT_SIGNAL_TWICE
                            tg.cancel_scope.cancel()
                            return

            worker_stopping = anyio.Event()
            tg.start_soon(on_signals)
            await worker.serve()
            tg.cancel_scope.cancel()
    return code



