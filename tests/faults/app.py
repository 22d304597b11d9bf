"""The app the fault tests run in worker processes.

    python -m runtime.cli worker tests.faults.app:rt --concurrency 4

with ``TASKLOOM_FAULT_BROKER``, ``TASKLOOM_FAULT_NS``, ``TASKLOOM_FAULT_LEDGER`` (a
directory) and optionally ``TASKLOOM_FAULT_RESULTS`` in the environment. ``rt`` is
built from them on first access; the test process builds its own producer with
:func:`build` (same task names) without those variables.

The ledger records ``task_id`` (the ``key`` argument, also used as the task id),
the process and an execution id; ``faults.counted`` and ``faults.hog`` also record
the delivery count and attempt the body was given (``current_task()``).
``TASKLOOM_FAULT_TASK_TIMEOUT`` sets the tasks' time limit (default
``TASK_TIMEOUT_S``) for a broker whose consumer timeout is shorter.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Any

import anyio

from runtime.app import Runtime
from runtime.context import current_task
from tests.faults.ledger import LedgerWriter, new_exec_id

__all__ = ["COUNTED", "HOG", "POISON", "TASK_TIMEOUT_S", "WORK", "build"]

WORK = "faults.work"
POISON = "faults.poison"
#: like WORK, and its START records the delivery count (n) and attempt (a)
COUNTED = "faults.counted"
#: allocates far more than a worker under ``prlimit --as`` may (RELIABILITY A5)
HOG = "faults.hog"
#: Below the test RabbitMQ's consumer_timeout (60 s), as the runtime requires.
TASK_TIMEOUT_S = 30.0


@functools.cache
def ledger() -> LedgerWriter:
    """This process's ledger file (one per worker process)."""
    directory = Path(os.environ["TASKLOOM_FAULT_LEDGER"])
    return LedgerWriter(directory / f"worker-{os.getpid()}.jsonl")


def build(broker: str, results: str | None = None, namespace: str = "",
          task_timeout_s: float = TASK_TIMEOUT_S) -> Runtime:
    """The fault-test runtime: ``faults.work``, ``faults.poison``, ``faults.counted``
    and ``faults.hog``, each with the time limit ``task_timeout_s`` (below the
    broker's consumer timeout, as the runtime requires)."""
    rt = Runtime(broker=broker, results=results, namespace=namespace)

    @rt.task(name=WORK, timeout=task_timeout_s)
    async def work(key: str, sleep_s: float = 0.0) -> str:
        x = new_exec_id()
        ledger().write("START", id=key, x=x)
        if sleep_s > 0:
            await anyio.sleep(sleep_s)
        ledger().write("END", id=key, x=x, ok=True)
        return key

    @rt.task(name=POISON, timeout=task_timeout_s)
    async def poison(key: str) -> None:
        """Kills its own worker process, every time it runs."""
        x = new_exec_id()
        ledger().write("START", id=key, x=x)
        ledger().write("END", id=key, x=x, ok=False, err="crash")
        os.kill(os.getpid(), signal.SIGKILL)

    @rt.task(name=COUNTED, timeout=task_timeout_s)
    async def counted(key: str, sleep_s: float = 0.0) -> str:
        """WORK, with what the runtime told the body (delivery count, attempt);
        a run cancelled from outside (a drain past its grace) ends with
        END(ok=False, err="cancelled"), so the checker sees when it stopped."""
        ctx = current_task()
        x = new_exec_id()
        ledger().write("START", id=key, x=x, n=ctx.delivery_count, a=ctx.attempt)
        try:
            if sleep_s > 0:
                await anyio.sleep(sleep_s)
        except anyio.get_cancelled_exc_class():
            ledger().write("END", id=key, x=x, ok=False, err="cancelled")
            raise
        ledger().write("END", id=key, x=x, ok=True)
        return key

    @rt.task(name=HOG, timeout=task_timeout_s, retries=1, retry_intervals=[0.1])
    async def hog(key: str, mib: int) -> int:
        """Allocates ``mib`` MiB at once: under an address-space limit smaller
        than that, the allocation raises MemoryError (what a capped worker sees
        instead of the kernel's OOM kill, which is a SIGKILL: row A1)."""
        ctx = current_task()
        x = new_exec_id()
        ledger().write("START", id=key, x=x, n=ctx.delivery_count, a=ctx.attempt)
        try:
            block = bytearray(mib * 1024 * 1024)
        except MemoryError:
            ledger().write("END", id=key, x=x, ok=False, err="MemoryError")
            raise
        ledger().write("END", id=key, x=x, ok=True)
        return len(block)

    return rt


def __getattr__(name: str) -> Any:
    if name == "rt":
        rt = build(os.environ["TASKLOOM_FAULT_BROKER"],
                   os.environ.get("TASKLOOM_FAULT_RESULTS") or None,
                   os.environ["TASKLOOM_FAULT_NS"],
                   float(os.environ.get("TASKLOOM_FAULT_TASK_TIMEOUT") or TASK_TIMEOUT_S))
        globals()["rt"] = rt
        return rt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
