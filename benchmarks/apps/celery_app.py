"""Celery's side of the benchmark (runs in benchmarks/venvs/celery).

Worker: ``celery -A celery_app worker ...`` with the pool and prefetch chosen
per workload by benchmarks/frameworks.py. Broker and results come from the
``BENCH_*`` environment; results go to Redis (the backend Celery documents for
both brokers), in a database the benchmark owns.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from work import burn, rss_kb

QUEUE = os.environ.get("BENCH_QUEUE", "bench")
SETTINGS: dict[str, Any] = json.loads(os.environ.get("BENCH_SETTINGS") or "{}")
POOL = int(SETTINGS.get("redis_pool", 0)) or None  # Redis connections for 1,000 greenlets

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL"),
             backend=os.environ.get("BENCH_RESULT_URL"))
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_ignore_result=False,  # results are stored, as every framework here does
    result_expires=3600,
    worker_enable_remote_control=False,  # no pidbox queues or exchanges on the shared server
    worker_send_task_events=False,
    task_send_sent_event=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if POOL:
    app.conf.update(redis_max_connections=POOL, broker_transport_options={"max_connections": POOL})


@app.task(name="bench.noop")
def noop(i: int) -> None:
    return None


@app.task(name="bench.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)  # cooperative under -P gevent (monkey-patched)


@app.task(name="bench.cpu")
def cpu(loops: int) -> int:
    return burn(loops)


TASKS: dict[str, Any] = {"noop": noop, "sleep": sleep, "cpu": cpu}


def enqueue(task: str, arg: Any, n: int, batch: int) -> dict[str, Any]:
    """Celery has no batch publish: apply_async in a loop on one producer
    (what ``group().apply_async()`` does)."""
    t = TASKS[task]
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection()
        baseline = rss_kb()
        t0 = time.perf_counter()
        for i in range(n):
            t.apply_async((i if arg is None else arg,), producer=producer)
        if os.environ.get("BENCH_BROKER") == "amqp":
            # publishing is unconfirmed by default: one round trip on the same channel
            # so that the broker has processed every publish before the clock stops
            producer.channel.queue_declare(QUEUE, passive=True)
        seconds = time.perf_counter() - t0
    app.close()  # close the connections cleanly (the driver exits right after)
    return {"seconds": seconds, "baseline_rss_kb": baseline, "peak_now_kb": rss_kb()}


def latency(n: int, warmup: int, timeout: float) -> dict[str, Any]:
    for i in range(warmup):  # the first also waits for the worker to be up
        noop.delay(i).get(timeout=timeout)
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        noop.delay(i).get(timeout=timeout)
        took.append((time.perf_counter() - t0) * 1000)
    return {"latencies_ms": took}
