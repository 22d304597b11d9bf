"""taskloom's side of the benchmark: the app the worker command loads and the client roles.

Worker: ``python -m runtime.cli worker taskloom_app:rt --concurrency C --prefetch P``
(the ``taskloom worker`` command, on uvloop). Client roles run on uvloop too.
The memory broker lives in one process, so on ``memory://`` the roles
``inproc_drain`` and ``inproc_latency`` run producer and worker together.
"""

from __future__ import annotations

import contextlib
import json
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


#: the limits workload only (issue 16): ``{"rate": "5/s", "concurrency": 2}``. Tasks with
#: limits make the worker install its LimitsGate, so the plain runs leave them out.
LIMITS: dict[str, Any] | None = json.loads(os.environ.get("BENCH_LIMITS") or "null")
LIMITED_QUEUE = "limited"
#: where the limited tasks record their runs: a Redis list under the run's namespace
#: (deleted with it), one line per run: "rate START" or "KEY START END" (epoch seconds)
LEDGER = f"{NAMESPACE}:bench:limited-ledger"
_ledger: list[Any] = []  # the worker's Redis client for the ledger, made on first use

if LIMITS:
    async def _record(line: str) -> None:
        if not _ledger:
            import redis.asyncio as aredis

            _ledger.append(aredis.Redis.from_url(BROKER_URL))
        await _ledger[0].rpush(LEDGER, line)

    @rt.task(name="bench.rate_limited", queue=LIMITED_QUEUE, rate_limit=LIMITS["rate"],
             timeout=_TIMEOUT)
    async def rate_limited(i: int) -> None:
        await _record(f"rate {time.time():.6f}")

    @rt.task(name="bench.concurrency_limited", queue=LIMITED_QUEUE,
             concurrency_limit=LIMITS["concurrency"], concurrency_key="key", timeout=_TIMEOUT)
    async def concurrency_limited(key: str, hold_s: float) -> None:
        start = time.time()
        await anyio.sleep(hold_s)
        await _record(f"{key} {start:.6f} {time.time():.6f}")

    TASKS["rate_limited"] = rate_limited
    TASKS["concurrency_limited"] = concurrency_limited


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


def enqueue_limited(kind: str, m: int, keys: int, hold_s: float) -> dict[str, Any]:
    """The limits workload: ``m`` tasks of the rate- or the concurrency-limited task
    (``keys`` keys round robin, each run holding its permit ``hold_s``)."""
    if kind == "rate":
        sigs = [TASKS["rate_limited"].s(i) for i in range(m)]
    else:
        sigs = [TASKS["concurrency_limited"].s(f"k{i % keys}", hold_s) for i in range(m)]

    async def go() -> dict[str, Any]:
        async with rt:
            t0 = time.perf_counter()
            await rt.enqueue_many(sigs)
            return {"seconds": time.perf_counter() - t0}

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
