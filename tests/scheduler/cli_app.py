"""The application of the scheduler's command-line tests: a task that appends
one line per run to the file named by SCHED_LEDGER (outside the system under
test), on the Redis named by SCHED_REDIS in namespace SCHED_NS."""

from __future__ import annotations

import os

from runtime import Runtime

rt = Runtime(broker=os.environ["SCHED_REDIS"], namespace=os.environ["SCHED_NS"])


@rt.task(name="sched_cli.beat")
def beat(tag: str) -> str:
    fd = os.open(os.environ["SCHED_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)
    return tag
