"""arq's side of the benchmark (runs in benchmarks/venvs/arq). Redis only.

Worker: ``arq arq_app.WorkerSettings`` with ``max_jobs`` and ``poll_delay`` for
the workload from ``BENCH_SETTINGS`` (JSON). arq keeps results in the same Redis
(``arq:result:<id>``), in a database the benchmark owns. Per-job INFO logging
is turned down to WARNING (``--custom-log-dict arq_app.LOG_CONFIG``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, ClassVar

from arq import create_pool
from arq.connections import RedisSettings
from work import burn, rss_kb

QUEUE = os.environ.get("BENCH_QUEUE", "bench")
SETTINGS: dict[str, Any] = json.loads(os.environ.get("BENCH_SETTINGS") or "{}")
REDIS = RedisSettings.from_dsn(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/5"))


async def noop(ctx: dict[str, Any], i: int) -> None:
    return None


async def sleep(ctx: dict[str, Any], seconds: float) -> None:
    await asyncio.sleep(seconds)


async def cpu(ctx: dict[str, Any], loops: int) -> int:
    return burn(loops)  # arq runs coroutines only; the loop is blocked, max_jobs=1


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop, sleep, cpu]
    redis_settings = REDIS
    queue_name = QUEUE
    max_jobs = int(SETTINGS.get("max_jobs", 100))
    poll_delay = float(SETTINGS.get("poll_delay", 0.01))
    keep_result = 3600
    log_results = False


LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def enqueue(task: str, arg: Any, n: int, batch: int) -> dict[str, Any]:
    """arq has no batch API: enqueue_job() calls, ``batch`` at a time with gather."""

    async def go() -> dict[str, Any]:
        redis = await create_pool(REDIS, default_queue_name=QUEUE)
        try:
            await redis.ping()
            baseline = rss_kb()
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                await asyncio.gather(*(redis.enqueue_job(task, i if arg is None else arg)
                                       for i in range(start, min(n, start + batch))))
            seconds = time.perf_counter() - t0
            return {"seconds": seconds, "baseline_rss_kb": baseline, "peak_now_kb": rss_kb()}
        finally:
            await redis.aclose()

    result: dict[str, Any] = _run(go())
    return result


def latency(n: int, warmup: int, timeout: float) -> dict[str, Any]:
    """enqueue_job() then job.result(): arq polls for the result; at 1 ms here."""

    async def go() -> dict[str, Any]:
        redis = await create_pool(REDIS, default_queue_name=QUEUE)
        try:
            async def once(i: int) -> None:
                job = await redis.enqueue_job("noop", i)
                assert job is not None
                await job.result(timeout=timeout, poll_delay=0.001)

            for i in range(warmup):
                await once(i)
            took = []
            for i in range(n):
                t0 = time.perf_counter()
                await once(i)
                took.append((time.perf_counter() - t0) * 1000)
            return {"latencies_ms": took}
        finally:
            await redis.aclose()

    result: dict[str, Any] = _run(go())
    return result
