"""StoreRetry: result-store calls retried in place, one warning per outage."""

from __future__ import annotations

import random
from types import SimpleNamespace

import anyio
import pytest
from structlog.testing import capture_logs

from runtime.errors import ConfigError, EncodeError, ResultStoreUnavailable
from runtime.persist import StoreRetry
from runtime.retry import Backoff


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "stored"

    return calls, op


@pytest.mark.parametrize("error", [ResultStoreUnavailable("down"), RuntimeError(
    "unable to perform operation on <TCPTransport closed=True>"), OSError("reset"), KeyError("x")],
    ids=["unavailable", "uvloop-closed-transport", "oserror", "unexpected"])
async def test_any_store_failure_is_retried_until_it_succeeds_with_one_warning(
        error: Exception) -> None:
    retry = StoreRetry(cap_s=0.02, warn_after_s=0.0)
    calls, op = failing(6, error)
    with capture_logs() as logs, anyio.fail_after(10):
        assert await retry("store a result", op) == "stored"  # type: ignore[arg-type]
    assert len(calls) == 7
    assert [e["log_level"] for e in logs] == ["warning", "info"]
    assert logs[1]["retries"] == 6


@pytest.mark.parametrize("error", [EncodeError("no"), ConfigError("bad")], ids=["encode", "config"])
async def test_what_no_retry_changes_is_raised_at_once(error: Exception) -> None:
    calls, op = failing(1, error)
    with pytest.raises(type(error)):
        await StoreRetry()("store a result", op)  # type: ignore[arg-type]
    assert len(calls) == 1


async def test_a_blip_that_heals_at_once_is_not_an_outage() -> None:
    retry = StoreRetry(warn_after_s=60.0)
    calls, op = failing(1, ResultStoreUnavailable("stale pooled connection"))
    with capture_logs() as logs, anyio.fail_after(10):
        assert await retry("store a result", op) == "stored"  # type: ignore[arg-type]
    assert [e for e in logs if e["log_level"] != "debug"] == []  # debug may be filtered
    assert retry.since is None
    assert len(calls) == 2


def test_the_backoff_grows_to_its_cap_with_jitter_and_never_spins() -> None:
    backoff = Backoff(0.05, 1.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    assert all(0.025 <= d <= 1.0 for d in delays)
    assert max(delays[-4:]) > 0.5  # at the cap
    assert len(set(delays)) == len(delays)  # jittered


async def test_a_call_that_hangs_before_failing_counts_its_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled store: the first call hangs for a socket timeout (10 s here, on a
    clock the test moves) and fails; the outage began when that call did, so it
    is logged (it was not: the outage was counted from the failure)."""
    clock = [1000.0]
    monkeypatch.setattr("runtime.persist.time", SimpleNamespace(monotonic=lambda: clock[0]))
    calls: list[int] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) == 1:
            clock[0] += 10.0  # hung for the socket timeout, then failed
            raise ResultStoreUnavailable("timed out")
        return "stored"

    retry = StoreRetry(cap_s=0.02, warn_after_s=1.0)
    with capture_logs() as logs, anyio.fail_after(10):
        assert await retry("store a result", op) == "stored"
    assert [e["log_level"] for e in logs] == ["warning", "info"]
    assert logs[1]["down_s"] == 10.0
