"""The application of the process-task context tests (imported fresh by pool processes)."""

from __future__ import annotations

import time
from typing import Any

from runtime import Runtime, current_task

rt = Runtime()


@rt.task(kind="process")
def whoami(x: int) -> dict[str, Any]:
    ctx = current_task()
    ctx.meta["pid_seen"] = True
    ctx.progress_sync(1, total=1, message="done")
    return {"id": ctx.id, "name": ctx.name, "attempt": ctx.attempt, "queue": ctx.queue,
            "x": x}


@rt.task(kind="process")
def forever(marker: str) -> None:
    with open(marker, "w") as f:
        f.write("started")
    while True:
        time.sleep(0.05)
