"""dramatiq's side of the benchmark (runs in benchmarks/venvs/dramatiq).

Worker: ``dramatiq dramatiq_app --processes P --threads T`` (or
``dramatiq-gevent`` for the I/O workload). Results: the Results middleware
with its RedisBackend, in a Redis database the benchmark owns.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from work import burn, rss_kb

KIND = os.environ.get("BENCH_BROKER", "redis")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
SETTINGS: dict[str, Any] = json.loads(os.environ.get("BENCH_SETTINGS") or "{}")
POOL = int(SETTINGS.get("redis_pool", 0))  # Redis connections for 1,000 greenlets


def _url(name: str, default: str) -> str:
    url = os.environ.get(name, default)
    return f"{url}{'&' if '?' in url else '?'}max_connections={POOL}" if POOL else url

if KIND == "amqp":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: Any = RabbitmqBroker(url=os.environ.get("BENCH_BROKER_URL"))
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=_url("BENCH_BROKER_URL", "redis://127.0.0.1:6379/5"))

backend = RedisBackend(url=_url("BENCH_RESULT_URL", "redis://127.0.0.1:6379/6"))
broker.add_middleware(Results(backend=backend, store_results=True, result_ttl=3_600_000))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_noop", queue_name=QUEUE, max_retries=0)
def noop(i: int) -> None:
    return None


@dramatiq.actor(actor_name="bench_sleep", queue_name=QUEUE, max_retries=0)
def sleep(seconds: float) -> None:
    time.sleep(seconds)  # cooperative under dramatiq-gevent (monkey-patched)


@dramatiq.actor(actor_name="bench_cpu", queue_name=QUEUE, max_retries=0)
def cpu(loops: int) -> int:
    return burn(loops)


TASKS: dict[str, Any] = {"noop": noop, "sleep": sleep, "cpu": cpu}


def enqueue(task: str, arg: Any, n: int, batch: int) -> dict[str, Any]:
    """dramatiq has no batch publish (``group().run()`` loops too): send() in a loop."""
    t = TASKS[task]
    broker.declare_queue(QUEUE)
    if KIND != "amqp":
        broker.client.ping()  # connect before the clock starts
    baseline = rss_kb()
    t0 = time.perf_counter()
    for i in range(n):
        t.send(i if arg is None else arg)
    if KIND == "amqp":
        # publishing is unconfirmed by default: one round trip on the same channel
        # so that the broker has processed every publish before the clock stops
        broker.channel.queue_declare(QUEUE, passive=True)
    seconds = time.perf_counter() - t0
    broker.close()  # close the connections cleanly (the driver exits right after)
    return {"seconds": seconds, "baseline_rss_kb": baseline, "peak_now_kb": rss_kb()}


def latency(n: int, warmup: int, timeout: float) -> dict[str, Any]:
    ms = int(timeout * 1000)
    for i in range(warmup):  # the first also waits for the worker to be up
        noop.send(i).get_result(block=True, timeout=ms)
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        noop.send(i).get_result(block=True, timeout=ms)
        took.append((time.perf_counter() - t0) * 1000)
    return {"latencies_ms": took}
