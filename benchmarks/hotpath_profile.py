"""The Redis hot path of one taskloom worker: CPU per task, and a py-spy profile.

    python -m benchmarks.hotpath_profile throughput --n 10000 [--spy drain.txt]
    python -m benchmarks.hotpath_profile latency --n 500 [--spy rt.txt]
    python -m benchmarks.hotpath_profile enqueue --n 20000 [--spy enq.txt]
    python -m benchmarks.hotpath_profile summary drain.txt [--top 30]

``throughput`` queues ``n`` no-op tasks (the bench app, ``benchmarks/apps``),
then starts one ``taskloom worker`` (concurrency and prefetch 100, as the
bench) and prints its user + system CPU per task over the drain (psutil, from
a second after the first completion seen, start-up done, to the last). ``latency`` runs ``n`` sequential
``run()`` round trips against such a worker and prints p50 / p99 and the
worker's CPU per trip. ``enqueue`` times ``enqueue_many`` in batches of 1,000
in this process and prints its CPU per task. With ``--spy FILE``, ``py-spy record --pid
PID --format raw`` (``--native`` with ``--native``) attaches to the
worker (the producer, for ``enqueue``) once it is running, start-up left out,
and writes collapsed stacks to FILE (CPU figures taken under py-spy are inflated:
measure without it).
``summary`` prints the share of samples per frame, self and inclusive.

Everything lives under a fresh namespace (``hotpath-...``) on Redis database 0
(``--url``), deleted after (SCAN + DEL of that namespace only).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import psutil

APPS = Path(__file__).resolve().parent / "apps"
ROOT = Path(__file__).resolve().parent.parent


def _env(url: str, ns: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BENCH_BROKER_URL=url, BENCH_RESULT_URL="", BENCH_NAMESPACE=ns,
               BENCH_QUEUE="bench", BENCH_LOG_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join((str(APPS), str(ROOT))))
    return env


def _attach(pid: int, out: str | None, rate: int, native: bool) -> subprocess.Popen[bytes] | None:
    """py-spy on a running worker (start-up is left out): the thread holding the
    GIL only, collapsed stacks to ``out``; stopped by :func:`_detach`."""
    if out is None:
        return None
    spy = str(Path(sys.executable).with_name("py-spy"))
    cmd = [spy, "record", "--pid", str(pid), "-r", str(rate),
           "--format", "raw", "-o", out, *(["--native"] if native else [])]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def _detach(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


#: ``--concurrency`` and ``--prefetch`` of the worker (the bench's: 100 and 100)
WORKER_ARGS = ["--concurrency", "100", "--prefetch", "100"]


def _worker(url: str, ns: str) -> psutil.Process:
    cmd = [sys.executable, "-m", "runtime.cli", "--log-level", "WARNING",
           "worker", "taskloom_app:rt", *WORKER_ARGS]
    proc = subprocess.Popen(cmd, env=_env(url, ns), start_new_session=True)
    print(f"worker pid {proc.pid}", file=sys.stderr, flush=True)
    return psutil.Process(proc.pid)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _stop(worker: psutil.Process) -> None:
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)


def _cleanup(url: str, ns: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])


def throughput(url: str, n: int, spy: str | None, rate: int, native: bool,
               settle_s: float = 1.0) -> None:
    ns = f"hotpath-{uuid.uuid4().hex[:8]}"
    env = _env(url, ns)
    subprocess.run([sys.executable, str(APPS / "driver.py"), "taskloom", "enqueue",
                    f'{{"task": "noop", "arg": null, "n": {n}, "batch": 1000}}'],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    import brokers

    async def drain() -> dict[str, float]:
        broker = brokers.from_url(url, namespace=ns)
        async with broker:
            worker = _worker(url, ns)
            profiler = None
            try:
                first_done = last_done = 0
                seen = t0 = c0 = t1 = c1 = 0.0
                with anyio.fail_after(600):
                    while last_done < n:
                        s = await broker.stats("bench")
                        done = n - (s.ready + s.delayed + s.in_flight)
                        if done and not seen:
                            seen = time.perf_counter()
                        if seen and not first_done and time.perf_counter() - seen > settle_s:
                            # start-up is over (imports, gc.freeze): measure from here
                            first_done, t0, c0 = done, time.perf_counter(), _cpu(worker)
                            profiler = _attach(worker.pid, spy, rate, native)
                        if done > last_done:
                            last_done, t1, c1 = done, time.perf_counter(), _cpu(worker)
                        await anyio.sleep(0.005)
            finally:
                _detach(profiler)
                _stop(worker)
        tasks = last_done - first_done
        return {"tasks_per_s": tasks / (t1 - t0), "cpu_us_per_task": (c1 - c0) / tasks * 1e6}

    try:
        out = anyio.run(drain, backend_options={"use_uvloop": True})
    finally:
        _cleanup(url, ns)
    print(f"throughput n={n}: {out['tasks_per_s']:.0f} tasks/s, "
          f"worker CPU {out['cpu_us_per_task']:.1f} us/task")


def _app(url: str) -> tuple[str, Any]:
    ns = f"hotpath-{uuid.uuid4().hex[:8]}"
    os.environ.update(_env(url, ns))
    sys.path[:0] = [str(APPS)]
    import taskloom_app as app  # type: ignore[import-not-found]

    return ns, app


def latency(url: str, n: int, spy: str | None, rate: int, native: bool) -> None:
    ns, app = _app(url)

    async def go() -> tuple[list[float], float]:
        worker = _worker(url, ns)
        profiler = None
        try:
            async with app.rt:
                for i in range(50):
                    await app.rt.run(app.noop.s(i), timeout=60)
                profiler = _attach(worker.pid, spy, rate, native)
                took = []
                c0 = _cpu(worker)
                for i in range(n):
                    t0 = time.perf_counter()
                    await app.rt.run(app.noop.s(i), timeout=60)
                    took.append((time.perf_counter() - t0) * 1000)
                return took, (_cpu(worker) - c0) / n * 1e6
        finally:
            _detach(profiler)
            _stop(worker)

    try:
        took, cpu = anyio.run(go, backend_options={"use_uvloop": True})
    finally:
        _cleanup(url, ns)
    took.sort()
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    print(f"latency n={n}: p50 {statistics.median(took):.3f} ms, p99 {p99:.3f} ms, "
          f"worker CPU {cpu:.1f} us/trip")


def enqueue(url: str, n: int, spy: str | None, rate: int, native: bool) -> None:
    ns, app = _app(url)

    async def go() -> tuple[float, float]:
        async with app.rt:
            await app.rt.enqueue_many([app.noop.s(i) for i in range(100)])
            me = psutil.Process()
            profiler = _attach(me.pid, spy, rate, native)
            try:
                c0, t0 = _cpu(me), time.perf_counter()
                await app._enqueue_all("noop", None, n, 1000)
                return time.perf_counter() - t0, _cpu(me) - c0
            finally:
                _detach(profiler)

    try:
        wall, cpu = anyio.run(go, backend_options={"use_uvloop": True})
    finally:
        _cleanup(url, ns)
    print(f"enqueue n={n}: {n / wall:.0f} tasks/s, producer CPU {cpu / n * 1e6:.1f} us/task")


#: Where a worker's (or producer's) time goes: a sample counts under every
#: label whose frame is on its stack (so the shares overlap).
BUCKETS = (
    ("runner: take, decode, screen, run, hand over (Worker._runner)", "Worker._runner"),
    ("  of which the task's own bookkeeping (Worker._start)", "Worker._start"),
    ("  of which anyio cancel scopes (enter/exit/new)", "CancelScope."),
    ("settler: store the batch, then conclude each (Settler.serve)", "Settler.serve"),
    ("  of which the result write (RedisResultStore.put_many)", "RedisResultStore.put_many"),
    ("  of which concluding: listeners + ack (Concluder.conclude)", "Concluder.conclude"),
    ("consumer: fetch + settle script calls (RedisConsumer._fetch_loop)",
     "RedisConsumer._fetch_loop"),
    ("consumer: settlements flushed on their own (RedisConsumer._flush_loop)",
     "RedisConsumer._flush_loop"),
    ("task index and events: transitions (Runtime.transition)", "Runtime.transition"),
    ("task index and events: their writer (runtime/ops/writer.py)", "ops/writer.py"),
    ("Redis wire: one exchange (brokers/redis/scripts.py exchange)", "exchange (brokers"),
    ("asyncio.current_task (a getpid syscall on 3.11)", "current_task ("),
    ("enqueue_many (Runtime.enqueue_many)", "Runtime.enqueue_many"),
    ("  of which compiling messages (canvas.message_for)", "message_for ("),
    ("  of which task ids (canvas.new_id: uuid4)", "new_id ("),
    ("  of which publishing (Runtime.publish)", "Runtime.publish ("),
    ("run(): the client side (Runtime.run)", "Runtime.run ("),
)


def summary(path: str, top: int) -> None:
    """Share of the event loop thread's busy samples (idle ``epoll_wait``
    samples of ``--native`` profiles left out) per bucket, then per frame:
    self (the leaf) and inclusive (anywhere on the stack)."""
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        if "Runner.run" not in stack:
            continue  # the event loop's thread only
        raw = stack.split(";")
        if "epoll" in raw[-1]:
            idle += k
            continue
        frames = [f.split(" (")[0] + (" " + f.split("/")[-1].rstrip(")") if "(" in f else "")
                  for f in raw]
        total += k
        selfs[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
        for label, needle in BUCKETS:
            if needle in stack:
                buckets[label] += k
    print(f"{total} busy samples of the event loop thread ({idle} idle in epoll left out)")
    print("-- buckets")
    for label, _ in BUCKETS:
        if buckets[label]:
            print(f"{buckets[label] / total * 100:5.1f}%  {label}")
    print("-- self")
    for f, k in selfs.most_common(top):
        print(f"{k / total * 100:5.1f}%  {f}")
    print("-- inclusive")
    for f, k in incl.most_common(top):
        print(f"{k / total * 100:5.1f}%  {f}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hotpath_profile")
    ap.add_argument("what", choices=("throughput", "latency", "enqueue", "summary"))
    ap.add_argument("file", nargs="?")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--spy", default=None, help="py-spy's collapsed stacks to this file")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=100, help="the worker's (default 100)")
    ap.add_argument("--prefetch", type=int, default=100, help="the worker's (default 100)")
    a = ap.parse_args(argv)
    WORKER_ARGS[:] = ["--concurrency", str(a.concurrency), "--prefetch", str(a.prefetch)]
    if a.what == "summary":
        summary(a.file or a.spy, a.top)
        return 0
    {"throughput": throughput, "latency": latency, "enqueue": enqueue}[a.what](
        a.url, a.n, a.spy, a.rate, a.native)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
