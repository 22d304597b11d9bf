"""Worker benchmark: CPU-bound tasks across two cores, I/O-bound tasks on one loop.

    .venv/bin/python -m benchmarks.bench_workers            # memory broker (+ Redis if up)
    .venv/bin/python -m benchmarks.bench_workers --no-redis

CPU-bound: 400 tasks of ~20 ms of pure-Python work.
  - ``pool of 2``: one embedded worker, ``kind="process"`` tasks in a
    ProcessPool of 2 (memory broker);
  - ``2 worker processes`` (Redis): ``taskloom worker --processes 2
    --concurrency 1`` running the same work as ``kind="thread"`` tasks.
  Efficiency = ideal two-core time (400 x the task's serial cost / 2) / wall.

I/O-bound: 5,000 tasks each awaiting a 50 ms sleep, one worker process,
concurrency 1,000 (ideal: 5 waves x 50 ms = 0.25 s).
  - embedded worker on the memory broker;
  - ``taskloom worker`` subprocess on Redis (wall from its first task start
    to the queue being empty, measured by the producer).

Wall times include enqueueing for the embedded runs (everything enqueued
first, then the worker starts), and exclude process start-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import psutil

from runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
SPEC = "benchmarks.bench_workers:rt"
REDIS_URL = os.environ.get("TASKLOOM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

rt = Runtime(
    broker=os.environ.get("TASKLOOM_BENCH_BROKER", "memory://"),
    results="memory://",
    namespace=os.environ.get("TASKLOOM_BENCH_NS", ""),
)


def work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


@rt.task(name="bench.cpu_process", kind="process")
def cpu_process(n: int) -> int:
    return work(n)


@rt.task(name="bench.cpu_thread")
def cpu_thread(n: int) -> int:
    return work(n)


@rt.task(name="bench.io")
async def io(seconds: float) -> None:
    await anyio.sleep(seconds)


def calibrate(target_s: float = 0.020) -> tuple[int, float]:
    """Loop count for ~target_s of work, and its serial cost (best of 5), in CPU
    time of this process: other load on the machine does not inflate it."""
    n = 50_000
    dt = min(_timed(work, n) for _ in range(3))
    n = int(n * target_s / dt)
    return n, min(_timed(work, n) for _ in range(5))


def _timed(fn: object, n: int) -> float:
    t0 = time.process_time()
    fn(n)  # type: ignore[operator]
    return time.process_time() - t0


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


async def bench_cpu_pool(n: int, tasks: int) -> tuple[float, float]:
    """Wall time and CPU seconds (this process + the pool)."""
    from runtime.process.pool import ProcessPool

    async with ProcessPool(SPEC, size=2) as pool:
        procs = [psutil.Process(), *(psutil.Process(p) for p in pool.pids)]
        async with rt:
            await rt.enqueue_many([cpu_process.s(n) for _ in range(tasks)])
            cpu0, t0 = _cpu(procs), time.perf_counter()
            async with rt.worker(processes=pool, concurrency=2) as worker:
                await worker.idle()
            return time.perf_counter() - t0, _cpu(procs) - cpu0


async def bench_io_embedded(tasks: int, concurrency: int, sleep_s: float) -> tuple[float, float]:
    me = [psutil.Process()]
    async with rt:
        cpu0, t0 = _cpu(me), time.perf_counter()
        await rt.enqueue_many([io.s(sleep_s) for _ in range(tasks)])
        async with rt.worker(concurrency=concurrency) as worker:
            await worker.idle()
        return time.perf_counter() - t0, _cpu(me) - cpu0


async def _redis_up() -> bool:
    import brokers

    try:
        broker = brokers.from_url(REDIS_URL, namespace="bench-probe")
        async with broker:
            return True
    except Exception:
        return False


async def bench_redis(sig_task: str, arg: float | int, tasks: int,
                      worker_args: list[str]) -> tuple[float, float]:
    """Enqueue on Redis, start `taskloom worker`, time until the queue is empty."""
    ns = f"bench{uuid.uuid4().hex[:8]}"
    producer = Runtime(broker=REDIS_URL, results="memory://", namespace=ns)
    producer.registry.add(cpu_thread)
    producer.registry.add(io)
    env = dict(os.environ, TASKLOOM_BENCH_BROKER=REDIS_URL, TASKLOOM_BENCH_NS=ns)
    async with producer:
        broker = producer.broker
        await producer.enqueue_many([producer.signature(sig_task, arg) for _ in range(tasks)])
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "--log-level", "WARNING", "worker", SPEC,
             "--pool-size", "0", "--heartbeat", "0", *worker_args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        try:
            with anyio.fail_after(600):
                while (await broker.stats("default")).ready == tasks:
                    await anyio.sleep(0.002)
                top = psutil.Process(proc.pid)
                procs = [top, *top.children(recursive=True)]
                cpu0, t0 = _cpu(procs), time.perf_counter()
                while True:
                    s = await broker.stats("default")
                    if not (s.ready or s.in_flight or s.delayed):
                        break
                    await anyio.sleep(0.005)
                wall = time.perf_counter() - t0
                cpu = _cpu(procs) - cpu0
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            purge = getattr(broker, "purge_namespace", None)
            if purge is not None:
                await purge()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-redis", action="store_true", help="memory broker only")
    parser.add_argument("--cpu-tasks", type=int, default=400)
    parser.add_argument("--io-tasks", type=int, default=5000)
    args = parser.parse_args()
    from runtime.logs import configure_logging

    configure_logging("WARNING")
    rows: list[tuple[str, ...]] = []

    n, serial = calibrate()
    ideal = args.cpu_tasks * serial / 2
    cpu_setup = f"{args.cpu_tasks} x {serial * 1000:.1f} ms"
    wall, cpu = anyio.run(bench_cpu_pool, n, args.cpu_tasks, backend_options={"use_uvloop": True})
    work_s = args.cpu_tasks * serial
    rows.append(("CPU-bound", f"{cpu_setup}, pool of 2 (memory)", f"{wall:.2f} s",
                 f"{ideal:.2f} s", f"{ideal / wall:.0%}", f"{cpu:.2f} s",
                 f"task work = {work_s / cpu:.0%} of it"))

    io_ideal = -(-args.io_tasks // 1000) * 0.05
    io_setup = f"{args.io_tasks} x sleep 50 ms, c=1000"
    wall, cpu = anyio.run(bench_io_embedded, args.io_tasks, 1000, 0.05,
                          backend_options={"use_uvloop": True})
    rows.append(("I/O-bound", f"{io_setup}, 1 process (memory)", f"{wall:.2f} s",
                 f"{io_ideal:.2f} s", f"{io_ideal / wall:.0%}", f"{cpu:.2f} s",
                 f"{cpu / args.io_tasks * 1e6:.0f} us/task (incl. enqueue)"))

    if not args.no_redis and anyio.run(_redis_up):
        wall, cpu = anyio.run(bench_redis, "bench.cpu_thread", n, args.cpu_tasks,
                              ["--processes", "2", "--concurrency", "1"])
        rows.append(("CPU-bound", f"{cpu_setup}, 2 worker processes (redis)", f"{wall:.2f} s",
                     f"{ideal:.2f} s", f"{ideal / wall:.0%}", f"{cpu:.2f} s",
                     f"task work = {work_s / cpu:.0%} of it"))
        wall, cpu = anyio.run(bench_redis, "bench.io", 0.05, args.io_tasks,
                              ["--concurrency", "1000"])
        rows.append(("I/O-bound", f"{io_setup}, 1 process (redis)", f"{wall:.2f} s",
                     f"{io_ideal:.2f} s", f"{io_ideal / wall:.0%}", f"{cpu:.2f} s",
                     f"{cpu / args.io_tasks * 1e6:.0f} us/task (worker)"))

    from rich.console import Console
    from rich.table import Table

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = Table(title=f"taskloom workers ({os.cpu_count()} CPUs, Python "
                        f"{sys.version.split()[0]}, load average {load})",
                  caption="efficiency = ideal / wall; CPU = CPU seconds of the worker "
                          "processes during the run (for CPU-bound: ideal x 2 is the work)")
    for column in ("workload", "setup", "wall", "ideal", "efficiency", "CPU", "CPU note"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
