"""The app the fault tests run in worker processes.

    python -m runtime.cli worker tests.faults.app:rt --concurrency 4

with ``TASKLOOM_FAULT_BROKER``, ``TASKLOOM_FAULT_NS``, ``TASKLOOM_FAULT_LEDGER`` (a
directory) and optionally ``TASKLOOM_FAULT_RESULTS`` in the environment. ``rt`` is
built from them on first access; the test process builds its own producer with
:func:`build` (same task names) without those variables.

Task bodies cannot see their attempt or delivery count, so the ledger records
``task_id`` (the ``key`` argument, also used as the task id), the process and an
execution id; the delivery count is read from the stored result afterwards.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Any

import anyio

from runtime.app import Runtime
from tests.faults.ledger import LedgerWriter, new_exec_id

__all__ = ["POISON", "TASK_TIMEOUT_S", "WORK", "build"]

WORK = "faults.work"
POISON = "faults.poison"
#: Below the test RabbitMQ's consumer_timeout (60 s), as the runtime requires.
TASK_TIMEOUT_S = 30.0


@functools.cache
def ledger() -> LedgerWriter:
    """This process's ledger file (one per worker process)."""
    directory = Path(os.environ["TASKLOOM_FAULT_LEDGER"])
    return LedgerWriter(directory / f"worker-{os.getpid()}.jsonl")


def build(broker: str, results: str | None = None, namespace: str = "") -> Runtime:
    """The fault-test runtime: ``faults.work`` and ``faults.poison``."""
    rt = Runtime(broker=broker, results=results, namespace=namespace)

    @rt.task(name=WORK, timeout=TASK_TIMEOUT_S)
    async def work(key: str, sleep_s: float = 0.0) -> str:
        x = new_exec_id()
        ledger().write("START", id=key, x=x)
        if sleep_s > 0:
            await anyio.sleep(sleep_s)
        ledger().write("END", id=key, x=x, ok=True)
        return key

    @rt.task(name=POISON, timeout=TASK_TIMEOUT_S)
    async def poison(key: str) -> None:
        """Kills its own worker process, every time it runs."""
        x = new_exec_id()
        ledger().write("START", id=key, x=x)
        ledger().write("END", id=key, x=x, ok=False, err="crash")
        os.kill(os.getpid(), signal.SIGKILL)

    return rt


def __getattr__(name: str) -> Any:
    if name == "rt":
        rt = build(os.environ["TASKLOOM_FAULT_BROKER"],
                   os.environ.get("TASKLOOM_FAULT_RESULTS") or None,
                   os.environ["TASKLOOM_FAULT_NS"])
        globals()["rt"] = rt
        return rt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
