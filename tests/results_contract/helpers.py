"""Small helpers shared by the result-store tests."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from runtime.messages import ErrorInfo, Result, State


def ok(task_id: str, value: Any = None, **fields: Any) -> Result:
    return Result(id=task_id, state=State.SUCCESS, value=value,
                  finished_ms=int(time.time() * 1000), **fields)


def failed(task_id: str, message: str = "boom") -> Result:
    return Result(id=task_id, state=State.FAILURE,
                  error=ErrorInfo(type="ValueError", message=message))


def started(task_id: str) -> Result:
    return Result(id=task_id, state=State.STARTED, started_ms=int(time.time() * 1000))


async def eventually(probe: Callable[[], Awaitable[bool] | bool], *, timeout: float = 5.0,
                     what: str = "the condition") -> None:
    """Until ``probe()`` is true, checked every 20 ms; fails after ``timeout`` s.

    For time-based or remote state with no event to wait on (a TTL passing, a
    revocation reaching another store)."""
    try:
        with anyio.fail_after(timeout):
            while True:
                outcome = probe()
                if not isinstance(outcome, bool):
                    outcome = await outcome
                if outcome:
                    return
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {timeout:g}s") from None
