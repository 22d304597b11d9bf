"""One scheduler process of the leadership tests::

    python -m tests.scheduler.proc REDIS_URL NAMESPACE LEDGER_DIR LEASE_S

It declares the code schedule ``beat`` (every second) and runs
``run_scheduler(rt, multiprocess=True)``. Outside the scheduler, it appends to its
own ledger file: ``PUB(id)`` for every message it publishes (a ``before_publish``
middleware) and ``VIEW(leading, names)`` whenever its leadership or view changes.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import anyio

from runtime.app import Runtime
from runtime.messages import TaskMessage
from runtime.middleware import Middleware
from runtime.ops.scheduler import Scheduler, every, run_scheduler, schedules_for
from tests.faults.ledger import Ledger, LedgerWriter

TASK = "sched.beat"
#: How late a tick may be and still be published: generous on a loaded machine.
GRACE_S = 3.0


class Published(Middleware):
    def __init__(self, ledger: LedgerWriter) -> None:
        self.ledger = ledger

    def before_publish(self, message: TaskMessage) -> TaskMessage:
        self.ledger.write("PUB", id=message.id)
        return message


def build(url: str, namespace: str, middleware: list[Middleware] | None = None) -> Runtime:
    rt = Runtime(broker=url, namespace=namespace, middleware=middleware or [])

    @rt.task(name=TASK)
    async def beat(name: str) -> str:
        return name

    return rt


async def main(url: str, namespace: str, ledger_dir: str, lease_s: float) -> None:
    ledger = Ledger(Path(ledger_dir)).writer(f"sched-{__import__('os').getpid()}")
    rt = build(url, namespace, [Published(ledger)])
    schedules_for(rt).declare("beat", rt.signature(TASK, "beat"), every(1))
    async with anyio.create_task_group() as tg:
        scheduler: Scheduler = await tg.start(functools.partial(
            run_scheduler, rt, lease_s=lease_s, grace_s=GRACE_S, multiprocess=True))
        last: tuple[bool, list[str]] | None = None
        while True:  # a test probe, not part of the scheduler: sampling is fine here
            snap = (scheduler.leading, sorted(n for n in scheduler.view
                                              if n not in scheduler.paused))
            if snap != last:
                ledger.write("VIEW", leading=snap[0], names=snap[1])
                last = snap
            await anyio.sleep(0.05)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
