"""The app of the cross-process end-to-end test (``tests/limits/test_e2e.py``):
a task limited by the decorator, recording its start time in a ledger file
outside the runtime (one ``os.write`` of an O_APPEND line per start)."""

from __future__ import annotations

import os
import time

from runtime import Runtime
from tests.conftest import REDIS_URL

RATE = "20/s"
LEDGER = os.environ.get("LIMITS_LEDGER", "")

rt = Runtime(broker=REDIS_URL, namespace=os.environ.get("LIMITS_NS", "limits-e2e"))


@rt.task(name="e2e.api", rate_limit=RATE)
async def api(n: int) -> None:
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():.6f} {n}\n".encode())
    finally:
        os.close(fd)
