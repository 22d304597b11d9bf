"""The application of the CLI test: on the shared Redis, under LIMITS_NS."""

from __future__ import annotations

import os

from runtime.app import Runtime
from runtime.ops.limits import Limits
from tests.conftest import REDIS_URL

rt = Runtime(broker=REDIS_URL, namespace=os.environ.get("LIMITS_NS", "limits-cli"))


@rt.task(name="send")
async def send(user_id: str) -> None: ...


send.limits = Limits.of(rate_limit="5/m", rate_key="user_id", fn=send.fn)  # type: ignore[attr-defined]
