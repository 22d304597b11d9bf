"""The application of the process-task soft limit and live progress tests
(imported fresh by each pool process; the tests copy its tasks onto a runtime
on memory or Redis)."""

from __future__ import annotations

import time

from runtime import Runtime, current_task
from runtime.errors import SoftTimeLimitExceeded

rt = Runtime()

#: what a body blocks in while it "works": far past every test's bound, so
#: only a signal (the soft limit) or SIGKILL (the hard limit) ends it
LONG_WORK_S = 600.0


def _wait_for(fifo: str) -> str:
    """Block until the test writes to the named pipe ``fifo`` (no polling)."""
    with open(fifo) as f:
        return f.read()


@rt.task(kind="process", soft_timeout=0.3, timeout=120)
def cleans_up() -> str:
    try:
        time.sleep(LONG_WORK_S)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@rt.task(kind="process", soft_timeout=0.3, timeout=120)
def ignores_soft() -> None:
    time.sleep(LONG_WORK_S)


@rt.task(kind="process", soft_timeout=0.2, timeout=1.5)
def swallows_soft() -> None:
    try:
        time.sleep(LONG_WORK_S)
    except SoftTimeLimitExceeded:
        time.sleep(LONG_WORK_S)  # the hard limit kills the process


@rt.task(kind="process", soft_timeout=60, timeout=120)
def quick(x: int) -> int:
    return x * 2


@rt.task(kind="process")
def reports_then_waits(fifo: str) -> str:
    ctx = current_task()
    ctx.meta["stage"] = "waiting"
    ctx.progress_sync(1, total=2, message="half", phase="one")
    got = _wait_for(fifo)
    ctx.progress_sync(2, total=2, message="done")
    return got


@rt.task(kind="process")
def tight_loop_then_waits(n: int, looped: str, go: str) -> str:
    ctx = current_task()
    for i in range(n):
        ctx.progress_sync(i + 1, total=n)
    with open(looped, "w") as f:  # tell the test the loop is over
        f.write("looped")
    return _wait_for(go)
