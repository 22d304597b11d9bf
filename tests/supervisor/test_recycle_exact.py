"""``--max-tasks-per-child N`` recycles a worker process after exactly N tasks
(issue 12, item 7): the worker takes at most N deliveries, drains and exits
with EXIT_RECYCLED; it used to poll its count and overshoot (13 and 17 for 10)."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from runtime.process.serve import EXIT_OK
from tests.supervisor.conftest import APP, Env, wait_until
from tests.supervisor.test_redis_workers import FAST, ended, enqueue_work, producer

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.fault]

RECYCLED = "worker process recycled; starting a replacement"


async def test_a_child_recycles_after_exactly_max_tasks(redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--max-tasks-per-child", "10", "--concurrency", "4",
                          *FAST)
    await wait_until(cmd.ready_pids, what="a ready child")
    keys = [f"x{i}" for i in range(45)]
    async with producer(redis_env) as rt:
        await enqueue_work(rt, keys, 0.02)
    await wait_until(lambda: ended(redis_env) == set(keys), what="every task to end")
    per_pid = Counter(r["pid"] for r in redis_env.ledger.records("START"))
    await wait_until(lambda: len(cmd.logs(RECYCLED)) >= len(per_pid) - 1,
                     what="every child but the last to recycle")
    recycled = {r["pid"] for r in cmd.logs(RECYCLED)}
    assert len(recycled) >= 3  # 45 tasks, 10 per child
    assert {pid: per_pid[pid] for pid in recycled} == dict.fromkeys(recycled, 10)
    assert all(r["reason"] == "took 10 tasks (max 10)" for r in cmd.logs(RECYCLED))
    assert sum(per_pid.values()) == len(keys)  # nothing ran twice, nothing was lost
    assert cmd.deaths() == []
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK
