"""One caller process of the cross-process limit tests::

    python -m tests.limits.proc rate REDIS_URL NAMESPACE OUT SECONDS
    python -m tests.limits.proc sem  REDIS_URL NAMESPACE OUT SECONDS
    python -m tests.limits.proc hold REDIS_URL NAMESPACE OUT LEASE_S

Each process builds the app below, with a ``LimitsGate`` on the shared Redis,
and calls ``admit``/``done`` as a worker would. Outside the limiter it appends
JSON lines to its own file (``tests.faults.ledger.LedgerWriter``, times from
CLOCK_MONOTONIC, system-wide): ``START``/``END`` around each admitted call,
``HELD`` once the ``hold`` mode holds its permit.
"""

from __future__ import annotations

import random
import sys
import uuid
from pathlib import Path

import anyio

from runtime.app import Runtime
from runtime.messages import TaskMessage
from runtime.ops.limits import Limits, LimitsGate
from tests.faults.ledger import LedgerWriter

RATE = "20/s"
CALLERS = 8  # concurrent callers per process (like a worker's runners)


def build(url: str, namespace: str, lease_s: float = 30.0) -> Runtime:
    rt = Runtime(broker=url, namespace=namespace)

    @rt.task(name="limits.api")
    async def api(n: int) -> None: ...

    @rt.task(name="limits.rebuild")
    async def rebuild(tenant: str) -> None: ...

    api.limits = Limits.of(task=api.name, rate_limit=RATE)  # type: ignore[attr-defined]
    rebuild.limits = Limits.of(  # type: ignore[attr-defined]
        task=rebuild.name, concurrency_limit=2, concurrency_key="tenant", lease=lease_s)
    return rt


def message(task: str, *args: object) -> TaskMessage:
    return TaskMessage(id=uuid.uuid4().hex, task=task, args=list(args))


async def rate(gate: LimitsGate, out: LedgerWriter, seconds: float) -> None:
    async def caller(i: int) -> None:
        while True:
            msg = message("limits.api", i)
            while (delay := await gate.admit(msg)) is not None:
                await anyio.sleep(delay)
            out.write("START", id=msg.id)

    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            for i in range(CALLERS):
                tg.start_soon(caller, i)


async def sem(gate: LimitsGate, out: LedgerWriter, seconds: float) -> None:
    async def caller(tenant: str) -> None:
        while True:
            msg = message("limits.rebuild", tenant)
            while (delay := await gate.admit(msg)) is not None:
                await anyio.sleep(delay)
            out.write("START", id=msg.id, key=tenant)
            await anyio.sleep(random.uniform(0.02, 0.1))
            out.write("END", id=msg.id, key=tenant)
            await gate.done(msg)

    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            for i in range(CALLERS):
                tg.start_soon(caller, "a" if i % 2 else "b")


async def hold(gate: LimitsGate, out: LedgerWriter) -> None:
    msg = message("limits.rebuild", "k")
    while (delay := await gate.admit(msg)) is not None:
        await anyio.sleep(delay)
    out.write("HELD", id=msg.id)
    await gate.serve()  # renews the lease until this process is killed


async def main(mode: str, url: str, namespace: str, path: str, number: float) -> None:
    rt = build(url, namespace, lease_s=number if mode == "hold" else 30.0)
    gate = LimitsGate(rt, retry_s=0.05)
    out = LedgerWriter(Path(path))
    if mode == "rate":
        await rate(gate, out, number)
    elif mode == "sem":
        await sem(gate, out, number)
    else:
        await hold(gate, out)
    await gate.store.aclose()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
