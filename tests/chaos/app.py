"""The app the chaos soak runs in its worker processes (``tests.chaos.app:rt``).

Built from the same environment variables as ``tests/faults/app.py``
(``TASKLOOM_FAULT_BROKER``, ``TASKLOOM_FAULT_NS``, ``TASKLOOM_FAULT_LEDGER``,
``TASKLOOM_FAULT_RESULTS``). Every task that carries a ledger id writes
START/END records (the checker's input); the head of a canvas writes HEAD only,
the tail writes START/END under the chain's id.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from runtime import Reject, Runtime
from tests.faults.ledger import LedgerWriter, new_exec_id

__all__ = ["CPU", "HEAD", "NOOP", "REJECT", "SLEEP", "TAIL", "build"]

NOOP = "chaos.noop"
SLEEP = "chaos.sleep"
CPU = "chaos.cpu"
HEAD = "chaos.head"
TAIL = "chaos.tail"
REJECT = "chaos.reject"
#: Below the test RabbitMQ's consumer_timeout (60 s), as the runtime requires.
TASK_TIMEOUT_S = 30.0


@functools.cache
def ledger() -> LedgerWriter:
    return LedgerWriter(Path(os.environ["TASKLOOM_FAULT_LEDGER"]) / f"worker-{os.getpid()}.jsonl")


def build(broker: str, results: str | None = None, namespace: str = "") -> Runtime:
    rt = Runtime(broker=broker, results=results, namespace=namespace)

    Body = Callable[[float], Awaitable[None]]

    def traced(name: str) -> Callable[[Body], Any]:
        def wrap(body: Body) -> Any:
            @rt.task(name=name, timeout=TASK_TIMEOUT_S)
            async def task(key: str, arg: float = 0.0) -> str:
                x = new_exec_id()
                ledger().write("START", id=key, x=x)
                await body(arg)
                ledger().write("END", id=key, x=x, ok=True)
                return key
            return task
        return wrap

    @traced(NOOP)
    async def noop(arg: float) -> None:
        return None

    @traced(SLEEP)
    async def sleep(arg: float) -> None:
        await anyio.sleep(arg)

    @traced(CPU)
    async def cpu(arg: float) -> None:
        data = b"x"
        for _ in range(int(arg)):
            data = hashlib.sha256(data).digest()

    @traced(TAIL)
    async def tail(arg: float) -> None:
        return None

    @rt.task(name=HEAD, timeout=TASK_TIMEOUT_S)
    async def head(key: str) -> str:
        ledger().write("HEAD", id=key)
        return key

    @rt.task(name=REJECT, timeout=TASK_TIMEOUT_S)
    async def reject(key: str) -> None:
        x = new_exec_id()
        ledger().write("START", id=key, x=x)
        ledger().write("END", id=key, x=x, ok=False, err="reject by design")
        raise Reject("chaos: dead-lettered by design")

    return rt


def __getattr__(name: str) -> Any:
    if name == "rt":
        rt = build(os.environ["TASKLOOM_FAULT_BROKER"],
                   os.environ.get("TASKLOOM_FAULT_RESULTS") or None,
                   os.environ["TASKLOOM_FAULT_NS"])
        globals()["rt"] = rt
        return rt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
