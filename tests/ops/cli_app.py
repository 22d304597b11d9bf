"""An application for the CLI tests: Redis broker and results, the namespace from
``TASKLOOM_NAMESPACE`` (set by the test)."""

from __future__ import annotations

from runtime import Runtime
from tests.conftest import REDIS_URL

rt = Runtime(REDIS_URL, results=REDIS_URL)


@rt.task(name="cli.flaky", queue="cq")
async def flaky(x: int) -> int:
    raise ValueError(f"broken for {x}")
