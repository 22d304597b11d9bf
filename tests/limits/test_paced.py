"""``enqueue_paced``: a batch reaches the broker no faster than its rate."""

from __future__ import annotations

import time

import pytest

from runtime.app import Runtime
from runtime.errors import ConfigError
from runtime.messages import TaskMessage
from runtime.middleware import Middleware
from runtime.ops.limits import enqueue_paced, parse_rate


class Stamps(Middleware):
    def __init__(self) -> None:
        self.at: list[float] = []

    def before_publish(self, message: TaskMessage) -> TaskMessage:
        self.at.append(time.monotonic())
        return message


async def test_a_batch_is_published_at_its_rate() -> None:
    stamps = Stamps()
    rt = Runtime(middleware=[stamps])

    @rt.task(name="noop")
    async def noop(n: int) -> None: ...

    rate = "20/s:burst=5"
    async with rt:
        handles = await enqueue_paced(rt, (noop.s(n) for n in range(45)), rate=rate)
    assert len({h.id for h in handles}) == 45
    r = parse_rate(rate)
    worst = max(sum(1 for s in stamps.at if t <= s < t + 1.0) for t in stamps.at)
    assert worst <= r.window_max, (worst, r.window_max)
    # the pacing is the point: 45 starts at 20/s after a burst of 5 need 2 s
    assert stamps.at[-1] - stamps.at[0] >= (45 - r.burst) / 20 - 0.01


async def test_a_bad_rate_is_refused_before_anything_is_sent() -> None:
    rt = Runtime()
    with pytest.raises(ConfigError, match="is not a rate"):
        await enqueue_paced(rt, [], rate="fast")
