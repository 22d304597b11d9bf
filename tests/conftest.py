"""Shared test configuration: server URLs, the CI rule for missing servers."""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("TASKLOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TASKLOOM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = bool(os.environ.get("CI"))


def server_missing(what: str, error: BaseException) -> None:
    """A test needs a server that is not reachable: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but not reachable: {error!r}")
    pytest.skip(f"{what} not reachable: {error!r}")


@pytest.fixture
def namespace() -> str:
    """A unique key/queue prefix per test, so tests never meet on a shared server."""
    return f"t{uuid.uuid4().hex[:10]}"
