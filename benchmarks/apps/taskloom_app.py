"""taskloom's side of the benchmark: the app the worker command loads and the client roles.

Worker: ``python -m runtime.cli worker taskloom_app:rt --concurrency C --prefetch P``
(the ``taskloom worker`` command, on uvloop). Client roles run on uvloop too.
The memory broker lives in one process, so on ``memory://`` the roles
``inproc_drain`` and ``inproc_latency`` run producer and worker together.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import anyio
from work import burn, rss_kb

from runtime import Runtime
from runtime.logs import configure_logging

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "memory://")
RESULT_URL = os.environ.get("BENCH_RESULT_URL") or None
NAMESPACE = os.environ.get("BENCH_NAMESPACE", "")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")

configure_logging(os.environ.get("BENCH_LOG_LEVEL", "WARNING"))
rt = Runtime(broker=BROKER_URL, results=RESULT_URL, namespace=NAMESPACE, default_queue=QUEUE)

# a broker that takes back long-held deliveries (RabbitMQ's consumer_timeout)
# needs every task to have a time limit below it
_TIMEOUT = 300.0 if rt.broker.capabilities.consumer_timeout_s else None


@rt.task(name="bench.noop", timeout=_TIMEOUT)
async def noop(i: int) -> None:
    return None


@rt.task(name="bench.sleep", timeout=_TIMEOUT)
async def sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


@rt.task(name="bench.cpu", timeout=_TIMEOUT)
def cpu(loops: int) -> int:
    return burn(loops)


TASKS: dict[str, Any] = {"noop": noop, "sleep": sleep, "cpu": cpu}

if os.environ.get("BENCH_PROCESS_TASKS"):
    # only for the memory broker's cpu run: an app with kind="process" tasks makes
    # `taskloom worker` start a process pool beside every worker process
    @rt.task(name="bench.cpu_process", kind="process", timeout=_TIMEOUT)
    def cpu_process(loops: int) -> int:
        return burn(loops)

    TASKS["cpu_process"] = cpu_process


def _run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args, backend_options={"use_uvloop": True})


def _sigs(task: str, arg: Any, start: int, stop: int) -> list[Any]:
    t = TASKS[task]
    return [t.s(i if arg is None else arg) for i in range(start, stop)]


async def _enqueue_all(task: str, arg: Any, n: int, batch: int) -> float:
    """Publish n tasks with enqueue_many in batches; seconds from first to last."""
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        await rt.enqueue_many(_sigs(task, arg, start, min(n, start + batch)))
    return time.perf_counter() - t0


def enqueue(task: str, arg: Any, n: int, batch: int) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with rt:
            baseline = rss_kb()
            seconds = await _enqueue_all(task, arg, n, batch)
            return {"seconds": seconds, "baseline_rss_kb": baseline, "peak_now_kb": rss_kb()}

    result: dict[str, Any] = _run(go)
    return result


def latency(n: int, warmup: int, timeout: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with rt:
            for i in range(warmup):  # the first also waits for the worker to be up
                await rt.run(noop.s(i), timeout=timeout)
            took = []
            for i in range(n):
                t0 = time.perf_counter()
                await rt.run(noop.s(i), timeout=timeout)
                took.append((time.perf_counter() - t0) * 1000)
            return {"latencies_ms": took}

    result: dict[str, Any] = _run(go)
    return result


def inproc_drain(task: str, arg: Any, n: int, batch: int, concurrency: int,
                 prefetch: int, pool: int = 0) -> dict[str, Any]:
    """Memory broker: enqueue n, then start a worker in this process and time
    it until the queue is empty and nothing is in flight. With ``pool``, CPU
    tasks run as ``kind="process"`` tasks in a ProcessPool of that size."""

    async def go() -> dict[str, Any]:
        async with rt, contextlib.AsyncExitStack() as stack:
            processes = None
            pool_startup = 0.0
            name = task
            if pool:
                if "cpu_process" not in TASKS:
                    raise RuntimeError("set BENCH_PROCESS_TASKS=1 for a process pool")
                from runtime.process.pool import ProcessPool

                t_pool = time.perf_counter()
                processes = await stack.enter_async_context(
                    ProcessPool("taskloom_app:rt", size=pool))
                pool_startup = time.perf_counter() - t_pool
                name = "cpu_process"
            baseline = rss_kb()
            enqueue_s = await _enqueue_all(name, arg, n, batch)
            t0 = time.perf_counter()
            async with rt.worker(concurrency=concurrency, prefetch=prefetch,
                                 processes=processes) as w:
                started = time.perf_counter()
                await w.idle()
                done = time.perf_counter()
            return {"enqueue_seconds": enqueue_s, "startup_seconds": started - t0,
                    "drain_seconds": done - started, "processed": w.processed,
                    "failed": w.failed, "baseline_rss_kb": baseline,
                    "pool_startup_seconds": pool_startup}

    result: dict[str, Any] = _run(go)
    return result


def inproc_latency(n: int, warmup: int, timeout: float, concurrency: int) -> dict[str, Any]:
    """Memory broker: sequential run() round trips against a worker in this process."""

    async def go() -> dict[str, Any]:
        async with rt, rt.worker(concurrency=concurrency):
            for i in range(warmup):
                await rt.run(noop.s(i), timeout=timeout)
            took = []
            for i in range(n):
                t0 = time.perf_counter()
                await rt.run(noop.s(i), timeout=timeout)
                took.append((time.perf_counter() - t0) * 1000)
            return {"latencies_ms": took}

    result: dict[str, Any] = _run(go)
    return result
