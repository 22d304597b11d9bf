"""One vocabulary for task options: the task decorator, ``.set()`` and
``enqueue()`` check priority, time limits, expiries, countdowns and retries in
one place (runtime.options), with the same words, within the wire format's
bounds; the retry policy's errors are ConfigErrors."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime import ConfigError, EnqueueError, Runtime
from runtime.messages import MAX_COUNT, MAX_TIMEOUT_S
from runtime.retry import RetryPolicy, next_delay

#: generous: the memory broker answers at once, but the machine may be loaded
LIMIT = 30


def _decorator_error(**kwargs: Any) -> str:
    rt = Runtime()
    with pytest.raises(ConfigError) as info:

        @rt.task(name="opts.t", **kwargs)
        async def t() -> None:
            pass

    return str(info.value)


def _set_error(**kwargs: Any) -> str:
    rt = Runtime()

    @rt.task(name="opts.t")
    async def t() -> None:
        pass

    with pytest.raises(EnqueueError) as info:
        t.s().set(**kwargs)
    return str(info.value)


async def _enqueue_error(**kwargs: Any) -> str:
    rt = Runtime()

    @rt.task(name="opts.t")
    async def t() -> None:
        pass

    with anyio.fail_after(LIMIT):
        async with rt:
            with pytest.raises(EnqueueError) as info:
                await rt.enqueue(t.s(), **kwargs)
            assert (await rt.broker.stats("default")).ready == 0  # nothing was sent
    return str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("priority", 10, "priority must be an int within 0..9"),
        ("expires", 0, "expires must be a positive, finite number of seconds"),
    ],
)
async def test_the_three_entry_points_say_the_same(field: str, value: Any, words: str) -> None:
    assert words in _decorator_error(**{field: value})
    assert words in _set_error(**{field: value})
    assert words in await _enqueue_error(**{field: value})


async def test_a_negative_countdown_reads_the_same_from_set_and_enqueue() -> None:
    words = "countdown must not be negative"
    assert words in _set_error(countdown=-1)
    assert words in await _enqueue_error(countdown=-1)


async def test_a_boolean_priority_is_refused_at_enqueue() -> None:
    # a bool is no priority: a worker refuses to decode such a message
    assert "priority" in await _enqueue_error(priority=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(retries=MAX_COUNT + 1), "retries"),  # the wire format's bound
        (dict(timeout=MAX_TIMEOUT_S * 2), "timeout"),
    ],
    ids=["retries", "timeout"],
)
def test_set_refuses_what_a_worker_could_not_decode(kwargs: dict[str, Any], field: str) -> None:
    assert field in _set_error(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(retries=-1), dict(backoff_s=-1.0), dict(factor=0.5), dict(jitter=2.0),
     dict(backoff_s=float("nan"))],
    ids=["retries", "backoff", "factor", "jitter", "backoff-nan"],
)
def test_a_bad_retry_policy_is_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


def test_attempt_zero_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="attempt counts from 1"):
        next_delay(0, RetryPolicy(retries=1, jitter=0.0))
