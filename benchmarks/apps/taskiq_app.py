"""taskiq's side of the benchmark (runs in benchmarks/venvs/taskiq).

Worker: ``taskiq worker taskiq_app:broker --workers W --max-async-tasks C``.
Redis: taskiq-redis's RedisStreamBroker (the acknowledging broker its README
recommends). AMQP: taskiq-aio-pika's AioPikaBroker with classic durable queues.
Results: RedisAsyncResultBackend in a Redis database the benchmark owns.
``BENCH_SETTINGS`` (JSON) carries the prefetch for the workload.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker
from work import burn, rss_kb

KIND = os.environ.get("BENCH_BROKER", "redis")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
SETTINGS: dict[str, Any] = json.loads(os.environ.get("BENCH_SETTINGS") or "{}")
PREFETCH = int(SETTINGS.get("prefetch", 100))
POOL = int(SETTINGS.get("redis_pool", 0)) or None  # Redis connections for 1,000 tasks

results: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
    os.environ.get("BENCH_RESULT_URL", "redis://127.0.0.1:6379/6"), result_ex_time=3600,
    max_connection_pool_size=POOL)

if KIND == "amqp":
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue, QueueType

    broker: Any = AioPikaBroker(
        os.environ.get("BENCH_BROKER_URL"),
        qos=PREFETCH,
        exchange=Exchange(name=QUEUE),
        task_queues=[Queue(name=QUEUE, type=QueueType.CLASSIC)],
        dead_letter_queue=Queue(name=f"{QUEUE}.dead_letter", type=QueueType.CLASSIC),
    ).with_result_backend(results)
else:
    broker = RedisStreamBroker(
        os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/5"),
        queue_name=QUEUE,
        xread_count=PREFETCH,
        max_connection_pool_size=POOL,
    ).with_result_backend(results)


@broker.task(task_name="bench.noop")
async def noop(i: int) -> None:
    return None


@broker.task(task_name="bench.sleep")
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@broker.task(task_name="bench.cpu")
def cpu(loops: int) -> int:
    return burn(loops)


TASKS: dict[str, Any] = {"noop": noop, "sleep": sleep, "cpu": cpu}


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def enqueue(task: str, arg: Any, n: int, batch: int) -> dict[str, Any]:
    """taskiq has no batch API: kiq() calls, ``batch`` at a time with gather."""
    t = TASKS[task]

    async def go() -> dict[str, Any]:
        await broker.startup()
        try:
            baseline = rss_kb()
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                await asyncio.gather(*(t.kiq(i if arg is None else arg)
                                       for i in range(start, min(n, start + batch))))
            seconds = time.perf_counter() - t0
            return {"seconds": seconds, "baseline_rss_kb": baseline, "peak_now_kb": rss_kb()}
        finally:
            await broker.shutdown()

    result: dict[str, Any] = _run(go())
    return result


def latency(n: int, warmup: int, timeout: float) -> dict[str, Any]:
    """kiq() then wait_result(): taskiq polls the result backend; at 1 ms here."""

    async def once(i: int) -> None:
        handle = await noop.kiq(i)
        res = await handle.wait_result(check_interval=0.001, timeout=timeout)
        if res.is_err:
            raise RuntimeError(f"noop failed: {res.error!r}")

    async def go() -> dict[str, Any]:
        await broker.startup()
        try:
            for i in range(warmup):
                await once(i)
            took = []
            for i in range(n):
                t0 = time.perf_counter()
                await once(i)
                took.append((time.perf_counter() - t0) * 1000)
            return {"latencies_ms": took}
        finally:
            await broker.shutdown()

    result: dict[str, Any] = _run(go())
    return result
