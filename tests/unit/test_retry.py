"""retry.next_delay and RetryPolicy: pure, no loop."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import ConfigError, Runtime
from runtime.retry import RetryPolicy, next_delay


def test_without_jitter_the_delay_is_exact() -> None:
    policy = RetryPolicy(retries=10, backoff_s=0.5, factor=3.0, max_delay_s=1000.0, jitter=0.0)
    assert [next_delay(n, policy) for n in range(1, 6)] == [0.5, 1.5, 4.5, 13.5, 40.5]


def test_factor_one_is_a_constant_delay() -> None:
    policy = RetryPolicy(retries=5, backoff_s=2.0, factor=1.0, jitter=0.0)
    assert {next_delay(n, policy) for n in range(1, 6)} == {2.0}


def test_the_cap_applies() -> None:
    policy = RetryPolicy(retries=100, backoff_s=1.0, factor=2.0, max_delay_s=10.0, jitter=0.0)
    assert next_delay(4, policy) == 8.0
    assert next_delay(5, policy) == 10.0
    assert next_delay(60, policy) == 10.0


def test_zero_backoff_is_zero_delay() -> None:
    policy = RetryPolicy(retries=3, backoff_s=0.0, jitter=0.5)
    assert next_delay(3, policy) == 0.0


def test_full_jitter_stays_within_zero_and_the_raw_delay() -> None:
    policy = RetryPolicy(retries=3, backoff_s=4.0, factor=2.0, jitter=1.0)
    rng = random.Random(1)
    draws = [next_delay(2, policy, rng) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in draws)
    assert len(set(draws)) > 100  # it really is random


def test_the_rng_makes_delays_reproducible() -> None:
    policy = RetryPolicy(retries=3, backoff_s=1.0, jitter=0.5)
    a = [next_delay(n, policy, random.Random(7)) for n in range(1, 4)]
    b = [next_delay(n, policy, random.Random(7)) for n in range(1, 4)]
    assert a == b


# deadline=None: the property is about values, not speed; Hypothesis's 200 ms default
# deadline fails it whenever the shared CI machine stalls the process.
@settings(deadline=None)
@given(
    attempt=st.integers(1, 60),
    backoff=st.floats(0.0, 100.0),
    factor=st.floats(1.0, 4.0),
    cap=st.floats(0.0, 1000.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_delay_bounds(attempt: int, backoff: float, factor: float, cap: float, jitter: float,
                      seed: int) -> None:
    policy = RetryPolicy(retries=100, backoff_s=backoff, factor=factor, max_delay_s=cap, jitter=jitter)
    raw = min(backoff * factor ** (attempt - 1), cap)
    delay = next_delay(attempt, policy, random.Random(seed))
    assert raw * (1.0 - jitter) - 1e-9 <= delay <= raw + 1e-9
    assert 0.0 <= delay <= cap + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(retries=-1),
        dict(backoff_s=-0.1),
        dict(max_delay_s=-1.0),
        dict(jitter=-0.01),
        dict(jitter=1.01),
        dict(jitter=float("nan")),
    ],
    ids=["retries", "backoff", "cap", "jitter-low", "jitter-high", "jitter-nan"],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("factor", [0.0, -2.0])
def test_a_non_positive_factor_is_refused(factor: float) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retries=3, factor=factor)


def test_a_very_high_attempt_is_capped_not_an_overflow() -> None:
    policy = RetryPolicy(retries=100_000, backoff_s=1.0, factor=2.0, max_delay_s=60.0, jitter=0.0)
    assert next_delay(5000, policy) == 60.0


def test_attempt_zero_is_refused() -> None:
    with pytest.raises(ValueError):
        next_delay(0, RetryPolicy(retries=1, jitter=0.0))


@pytest.mark.parametrize(
    "kwargs",
    [dict(retries=-1), dict(backoff=-1.0), dict(max_backoff=-1.0), dict(jitter=2.0)],
    ids=["retries", "backoff", "max_backoff", "jitter"],
)
def test_the_task_decorator_reports_bad_policies_as_config_errors(kwargs: dict[str, float]) -> None:
    rt = Runtime()
    with pytest.raises(ConfigError, match="noop"):

        @rt.task(**kwargs)  # type: ignore[call-overload]
        async def noop() -> None:
            pass

    assert len(rt.registry) == 0
