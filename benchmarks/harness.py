"""Measuring one run: producer and worker as subprocesses, the clock in here.

Workloads that drain a queue (throughput, io, cpu) all go the same way: the
framework's own producer puts N tasks in (timed: that is the enqueue figure),
then its worker command is started and this process polls the framework's
result store (``Framework.counter``) until every task is done. The rate is
taken from the first completion seen to the last, so worker start-up (imports,
connecting) is reported apart (``startup_s``), not mixed into tasks/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import psutil

from benchmarks import flow
from benchmarks.config import APPS_DIR, BASELINE, BENCH_DIR, Run
from benchmarks.frameworks import Framework, RunContext, WorkerPlan

__all__ = ["BenchError", "Workers", "measure"]

RESULT_PREFIX = "BENCH-RESULT "
_MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A run failed: the message says where and why."""


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Timeout|Interrupt)\b.*")


def _tail(text: str, lines: int = 4) -> str:
    """The gist of a log: its last exception line, else its last lines."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(kept):
        if _EXCEPTION_LINE.match(line):
            return line[:600]
    return " | ".join(kept[-lines:])[-600:]


async def run_driver(fw: Framework, ctx: RunContext, role: str, config: dict[str, Any],
                     plan: WorkerPlan | None = None) -> dict[str, Any]:
    """Run ``apps/driver.py`` for one role in the framework's environment."""
    env = {**os.environ, **fw.env(ctx, plan)}
    cmd = [fw.python, str(APPS_DIR / "driver.py"), fw.name, role, json.dumps(config)]
    timeout = ctx.params.timeout_s
    try:
        with anyio.fail_after(timeout):
            done = await anyio.run_process(cmd, env=env, cwd=APPS_DIR, check=False)
    except TimeoutError:
        raise BenchError(f"{fw.name} {role} did not finish within {timeout:.0f}s") from None
    out = done.stdout.decode(errors="replace")
    err = done.stderr.decode(errors="replace")
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX) and done.returncode == 0:
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return result
    raise BenchError(f"{fw.name} {role} exited with {done.returncode}: {_tail(err or out)}")


class Workers:
    """A framework's worker processes, each in its own session (process group),
    so that stopping them reaches their pool children and nothing else."""

    def __init__(self, plan: WorkerPlan, env: dict[str, str]) -> None:
        self.plan = plan
        self.env = {**os.environ, **env}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._handles: list[psutil.Process] = []

    def __enter__(self) -> Workers:
        for cmd in self.plan.commands:
            log = Path(tempfile.mkstemp(prefix="taskloom-bench-worker-", suffix=".log")[1])
            self.logs.append(log)
            with log.open("wb") as sink:
                proc = subprocess.Popen(cmd, cwd=APPS_DIR, env=self.env, stdout=sink,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            self._handles.append(psutil.Process(proc.pid))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for log in self.logs:
            log.unlink(missing_ok=True)

    def exited(self) -> str | None:
        """Why a worker stopped early, if one did."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            code = proc.poll()
            if code is not None:
                return f"the worker exited with {code}: {_tail(log.read_text(errors='replace'))}"
        return None

    def log_tail(self) -> str:
        return " || ".join(_tail(log.read_text(errors="replace"), 3) for log in self.logs)

    def rss_bytes(self) -> int:
        """Resident memory of the worker processes and all their children."""
        total = 0
        for handle in self._handles:
            try:
                tree = [handle, *handle.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        return total

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the worker processes and their children so far."""
        total = 0.0
        for handle in self._handles:
            try:
                tree = [handle, *handle.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each worker's process group, then SIGKILL what outlives ``grace_s``."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # the group this harness created
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of that same group
            if proc.poll() is None:
                proc.wait(timeout=10)


def _latency_metrics(latencies_ms: Sequence[float]) -> dict[str, float]:
    xs = sorted(latencies_ms)
    if not xs:
        raise BenchError("no round trip was measured")

    def q(p: float) -> float:
        rank = max(1, min(len(xs), int(-(-p * len(xs) // 1))))
        return xs[rank - 1]

    return {"p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99),
            "mean_ms": sum(xs) / len(xs), "max_ms": xs[-1], "min_ms": xs[0],
            "round_trips": float(len(xs))}


def _task_arg(ctx: RunContext) -> Any:
    return {"noop": None, "sleep": ctx.params.io_sleep_s, "cpu": ctx.cpu_loops}[ctx.task_kind]


def _drain_n(ctx: RunContext) -> int:
    p = ctx.params
    return {"io": p.io_n, "cpu": p.cpu_n, "pool": p.pool_n,
            "memory": p.producer_n}.get(ctx.workload, p.throughput_n)


#: called once every task is done, the workers still running, with the epoch seconds
#: of the workers' start, the first completion seen and the last
After = Callable[[float, float, float], Awaitable[None]]


async def _drain(fw: Framework, ctx: RunContext, *, drain: bool, cpu_task_s: float,
                 after: After | None = None) -> dict[str, float]:
    p = ctx.params
    n = _drain_n(ctx)
    plan = fw.worker(ctx)
    config = {"task": ctx.task_kind, "arg": _task_arg(ctx), "n": n, "batch": p.batch}
    if plan is None:  # in-process (taskloom on the memory broker)
        processes, concurrency, prefetch = fw.options(ctx)
        # kind="process" tasks in a pool
        pool = processes if ctx.workload in ("cpu", "pool") else 0
        if pool:
            concurrency = prefetch = pool
        out = await run_driver(fw, ctx, "inproc_drain",
                               {**config, "concurrency": concurrency, "prefetch": prefetch,
                                "pool": pool})
        if out["processed"] != n or out["failed"]:
            raise BenchError(f"the worker processed {out['processed']} of {n} tasks, "
                             f"{out['failed']} failed")
        # from the call that starts the worker: it may run tasks before it returns
        took = out["startup_seconds"] + out["drain_seconds"]
        metrics = {"enqueue_per_s": n / out["enqueue_seconds"],
                   "tasks_per_s": n / took,
                   "startup_s": out["startup_seconds"],
                   "worker_rss_mib": out["maxrss_kb"] / 1024,
                   "drain_s": took, "n": float(n)}
        if ctx.workload == "pool":  # the pool's start-up apart: it is not in ``took``
            metrics.update({"startup_s": out["pool_startup_seconds"], "wall_s": took,
                            "worker_startup_s": out["startup_seconds"]})
        return _with_efficiency(ctx, metrics, concurrency, cpu_task_s)
    produced = await run_driver(fw, ctx, "enqueue", config, plan)
    metrics = {"enqueue_per_s": n / produced["seconds"], "n": float(n),
               "producer_rss_mib": produced["maxrss_kb"] / 1024}
    if not drain:
        return metrics
    async with fw.counter(ctx, n) as counting:
        done = counting.done
        before = await done()
        if before != 0:
            raise BenchError(f"{before} tasks counted as done before the worker started; "
                             "the result store was not empty")
        with Workers(plan, fw.env(ctx, plan)) as workers:
            t_spawn = time.perf_counter()
            first: tuple[float, int] | None = None
            cpu_first = 0.0
            peak = 0
            sampled = 0.0
            count = 0
            # CPU tasks take 20 ms and compete with the poller for the cores: look less often
            poll_s = max(p.poll_s, 0.02) if ctx.workload == "cpu" else p.poll_s
            while True:
                await anyio.sleep(poll_s)
                count = await done()
                now = time.perf_counter()
                if first is None and count > 0:
                    count = await counting.exact()  # the cheap count may run ahead
                    if count > 0:
                        first = (now, count)
                        cpu_first = workers.cpu_s()
                if count >= n:
                    count = await counting.exact()
                    if count >= n:
                        break
                if now - sampled >= 0.05:
                    peak = max(peak, workers.rss_bytes())
                    sampled = now
                    failure = workers.exited()
                    if failure:
                        raise BenchError(f"{count}/{n} tasks done when {failure}")
                if now - t_spawn > p.timeout_s:
                    raise BenchError(f"timed out after {p.timeout_s:.0f}s with {count}/{n} "
                                     f"tasks done; worker log: {workers.log_tail()}")
            t_done = time.perf_counter()
            cpu_done = workers.cpu_s()
            peak = max(peak, workers.rss_bytes())
            if after is not None:
                epoch = time.time() - t_done
                await after(t_spawn + epoch, (first or (t_done, 0))[0] + epoch, t_done + epoch)
    if count > n:
        raise BenchError(f"{count} results for {n} tasks: some ran twice")
    assert first is not None
    t1, d1 = first
    # the worker processes' CPU per task from the first completion to the last; where all
    # were done before the first look (tiny runs), from the start, start-up included
    metrics["cpu_us_per_task"] = ((cpu_done - cpu_first) / (n - d1) if d1 < n
                                  else cpu_done / n) * 1e6
    task_s = {"io": p.io_sleep_s, "cpu": cpu_task_s}.get(ctx.workload, 0.0)
    if task_s:
        # tasks that take time: from when the first finished ones started
        rate = n / (t_done - max(t_spawn, t1 - task_s))
    elif d1 < n and t_done > t1:
        rate = (n - d1) / (t_done - t1)  # no-ops: from the first completion seen
    else:  # everything finished before the first look: from the start
        rate = n / (t_done - t_spawn)
    metrics.update({"tasks_per_s": rate, "startup_s": t1 - t_spawn,
                    "with_startup_per_s": n / (t_done - t_spawn),
                    "worker_rss_mib": peak / _MIB, "drain_s": t_done - t_spawn})
    return _with_efficiency(ctx, metrics, plan.concurrency, cpu_task_s)


def _with_efficiency(ctx: RunContext, metrics: dict[str, float], concurrency: int,
                     cpu_task_s: float) -> dict[str, float]:
    p = ctx.params
    if ctx.workload == "io":
        ideal = p.io_concurrency / p.io_sleep_s
        metrics["ideal_per_s"] = ideal
        metrics["efficiency"] = 100 * metrics["tasks_per_s"] / ideal
        metrics["concurrency"] = float(concurrency)
    elif ctx.workload == "pool":  # wall for n tasks on the pool's processes, start-up apart
        ideal_s = ctx.params.pool_n * cpu_task_s / p.cpu_processes
        metrics["ideal_s"] = ideal_s
        metrics["efficiency"] = 100 * ideal_s / metrics["wall_s"]
        metrics["task_ms"] = cpu_task_s * 1000
    elif ctx.workload == "cpu":
        ideal = p.cpu_processes / cpu_task_s
        metrics["ideal_per_s"] = ideal
        metrics["efficiency"] = 100 * metrics["tasks_per_s"] / ideal
        metrics["task_ms"] = cpu_task_s * 1000
    return metrics


async def _latency(fw: Framework, ctx: RunContext) -> dict[str, float]:
    p = ctx.params
    plan = fw.worker(ctx)
    config: dict[str, Any] = {"n": p.latency_n, "warmup": p.latency_warmup, "timeout": 60.0}
    if plan is None:
        out = await run_driver(fw, ctx, "inproc_latency", {**config, "concurrency": 100})
    else:
        with Workers(plan, fw.env(ctx, plan)) as workers:
            try:
                out = await run_driver(fw, ctx, "latency", config, plan)
            except BenchError as e:
                raise BenchError(f"{e}; worker: {workers.exited() or workers.log_tail()}") from None
    return _latency_metrics(out["latencies_ms"])


async def _producer_memory(fw: Framework, ctx: RunContext, cpu_task_s: float
                           ) -> dict[str, float]:
    p = ctx.params
    if fw.worker(ctx) is not None:
        # a network broker: the producer queues producer_n tasks, then one worker
        # drains them all while its peak RSS is sampled
        metrics = await _drain(fw, ctx, drain=True, cpu_task_s=cpu_task_s)
        out = {"producer_rss_mib": metrics["producer_rss_mib"],
               "enqueue_per_s": metrics["enqueue_per_s"], "n": metrics["n"],
               "queued_worker_rss_mib": metrics["worker_rss_mib"],
               "queued_drain_per_s": metrics["tasks_per_s"]}
        return out
    config = {"task": "noop", "arg": None, "n": p.producer_n, "batch": p.batch}
    out = await run_driver(fw, ctx, "enqueue", config)
    return {"producer_rss_mib": out["maxrss_kb"] / 1024,
            "producer_baseline_mib": out["baseline_rss_kb"] / 1024,
            "enqueue_per_s": p.producer_n / out["seconds"], "n": float(p.producer_n)}


async def _scale(fw: Framework, ctx: RunContext, cpu_task_s: float) -> dict[str, float]:
    """The same no-op drain with 1 worker process, then with 2 (``ctx.workload`` "scale"
    makes the framework start 2), each under a namespace of its own."""
    one_ctx = dataclasses.replace(ctx, workload="throughput", namespace=f"{ctx.namespace}p1")
    two_ctx = dataclasses.replace(ctx, namespace=f"{ctx.namespace}p2")
    rates = []
    for sub in (one_ctx, two_ctx):
        # prepare and cleanup run event loops of their own (amqp_delete): in a thread
        await anyio.to_thread.run_sync(fw.prepare, sub)
        try:
            rates.append((await _drain(fw, sub, drain=True, cpu_task_s=cpu_task_s))["tasks_per_s"])
        finally:
            await anyio.to_thread.run_sync(fw.cleanup, sub)
    return {"one_process_per_s": rates[0], "tasks_per_s": rates[1],
            "speedup": rates[1] / rates[0], "n": float(_drain_n(ctx))}


async def _limited(fw: Framework, ctx: RunContext, kind: str, cpu_task_s: float
                   ) -> dict[str, float]:
    """One drain of no-op tasks with ``limits_m`` tasks of the ``kind`` ("rate" or
    "conc") limited task queued beside them; the worker is kept until
    ``limits_observe_s`` after its start, then the limited tasks' ledger is read."""
    p = ctx.params
    await run_driver(fw, ctx, "enqueue_limited", {"kind": kind, "m": p.limits_m,
                                                  "keys": p.limits_keys, "hold_s": p.limits_hold_s})
    seen: list[flow.Window] = []

    async def observe(spawn: float, first: float, last: float) -> None:
        await anyio.sleep(max(0.0, spawn + p.limits_observe_s - time.time()))
        seen.append(flow.Window(spawn, first, last, time.time()))

    drained = await _drain(fw, ctx, drain=True, cpu_task_s=cpu_task_s, after=observe)
    entries = await flow.read_ledger(ctx.servers.redis_url, ctx.namespace)
    return {f"{kind}_noop_per_s": drained["tasks_per_s"], **flow.figures(kind, entries, seen[0])}


async def _limits(fw: Framework, ctx: RunContext, cpu_task_s: float) -> dict[str, float]:
    """The no-op drain alone, then with rate-limited, then with concurrency-limited
    tasks waiting on their limits in the same worker (``benchmarks/flow.py``), each
    under a namespace of its own; the ratios are of this measurement's own drains."""
    p = dataclasses.replace(ctx.params, throughput_n=ctx.params.limits_n)  # every run's no-ops
    ctx = dataclasses.replace(ctx, params=p)
    metrics = {"n": float(p.throughput_n), "m": float(p.limits_m)}
    for kind in flow.KINDS:
        sub = dataclasses.replace(ctx, workload="throughput" if kind == "alone" else "limits",
                                  namespace=f"{ctx.namespace}{kind[0]}")
        await anyio.to_thread.run_sync(fw.prepare, sub)
        try:
            if kind == "alone":
                drained = await _drain(fw, sub, drain=True, cpu_task_s=cpu_task_s)
                metrics["alone_per_s"] = drained["tasks_per_s"]
            else:
                metrics.update(await _limited(fw, sub, kind, cpu_task_s))
                metrics[f"{kind}_ratio"] = metrics[f"{kind}_noop_per_s"] / metrics["alone_per_s"]
        finally:
            await anyio.to_thread.run_sync(fw.cleanup, sub)
    return metrics


def _raw_role(ctx: RunContext, job: str) -> tuple[str, dict[str, Any]]:
    p = ctx.params
    redis = ctx.servers.redis_url
    if job == "drain":
        if ctx.broker == "redis":
            return "redis_throughput", {"url": redis, "ns": ctx.namespace, "n": p.throughput_n,
                                        "batch": p.batch, "streams": p.raw_streams}
        return "amqp_throughput", {"amqp_url": ctx.servers.amqp_url,
                                   "redis_url": ctx.servers.peer_result_url,
                                   "ns": ctx.namespace, "n": p.throughput_n, "batch": p.batch}
    if job == "latency":
        common = {"ns": ctx.namespace, "n": p.latency_n, "warmup": p.latency_warmup}
        if ctx.broker == "redis":
            return "redis_latency", {"url": redis, **common}
        return "amqp_latency", {"amqp_url": ctx.servers.amqp_url,
                                "redis_url": ctx.servers.peer_result_url, **common}
    raise BenchError(f"no raw baseline for the {job} job")


async def _raw(ctx: RunContext, job: str) -> dict[str, float]:
    """One raw-client baseline (benchmarks/baselines.py) in a process of its own."""
    role, config = _raw_role(ctx, job)
    cmd = [sys.executable, "-m", "benchmarks.baselines", role, json.dumps(config)]
    try:
        with anyio.fail_after(ctx.params.timeout_s):
            done = await anyio.run_process(cmd, cwd=BENCH_DIR.parent, check=False)
    except TimeoutError:
        raise BenchError(f"raw {role} did not finish within {ctx.params.timeout_s:.0f}s") from None
    out = done.stdout.decode(errors="replace")
    line = next((x for x in out.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"raw {role} exited with {done.returncode}: "
                         f"{_tail(done.stderr.decode(errors='replace') or out)}")
    result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
    if job == "latency":
        return _latency_metrics(result["latencies_ms"])
    n = result["processed"]
    return {"tasks_per_s": n / result["drain_seconds"],
            "enqueue_per_s": n / result["enqueue_seconds"],
            "cpu_us_per_task": result["cpu_us_per_task"], "n": float(n)}


async def _measure(fw: Framework, ctx: RunContext, job: str, drain: bool,
                   cpu_task_s: float) -> dict[str, float]:
    if fw.name == BASELINE:
        return await _raw(ctx, job)
    if job == "drain":
        return await _drain(fw, ctx, drain=drain, cpu_task_s=cpu_task_s)
    if job == "latency":
        return await _latency(fw, ctx)
    if job == "producer":
        return await _producer_memory(fw, ctx, cpu_task_s)
    if job == "scale":
        return await _scale(fw, ctx, cpu_task_s)
    if job == "limits":
        return await _limits(fw, ctx, cpu_task_s)
    raise ValueError(f"unknown job {job!r}")


def measure(fw: Framework, ctx: RunContext, job: str, *, repeat: int, drain: bool = True,
            cpu_task_s: float = 0.02) -> Run:
    """Run one job and return its record (failed, with the error, if it failed).
    The servers are cleaned of the run's queues and keys whatever happens."""
    plan = fw.worker(ctx) if job != "producer" else None
    if fw.name == BASELINE:
        role = _raw_role(ctx, job)[0]
        worker = (f"python -m benchmarks.baselines {role}"
                  + (f"  [streams={ctx.params.raw_streams}]" if role == "redis_throughput"
                     else "  [prefetch=100]" if role == "amqp_throughput" else ""))
    elif plan is not None:
        worker = plan.text()
    elif ctx.broker == "memory" and job != "producer":
        processes, concurrency, prefetch = fw.options(ctx)
        worker = (f"in-process worker (memory broker): rt.worker(concurrency={concurrency}, "
                  f"prefetch={prefetch})")
        if ctx.workload in ("cpu", "pool"):
            worker = (f"in-process worker (memory broker), kind='process' tasks in "
                      f"ProcessPool(size={processes}): rt.worker(concurrency={processes}, "
                      f"processes=pool)")
    else:
        worker = "no worker"
    settings = {"worker": worker,
                "client": fw.client_note(ctx)}
    started = time.perf_counter()
    try:
        fw.prepare(ctx)
        metrics = anyio.run(_measure, fw, ctx, job, drain, cpu_task_s)
        status = "ok"
        error = None
    except Exception as e:
        metrics, status = {}, "failed"
        error = f"{type(e).__name__}: {e}" if not isinstance(e, BenchError) else str(e)
    finally:
        cleanup_error = None
        try:
            fw.cleanup(ctx)
        except Exception as e:
            cleanup_error = f"cleanup failed: {type(e).__name__}: {e}"
    if cleanup_error:
        error = f"{error}; {cleanup_error}" if error else cleanup_error
    return Run(workload=ctx.workload, broker=ctx.broker, framework=fw.name, repeat=repeat,
               status="ok" if status == "ok" and not cleanup_error else "failed",
               metrics=metrics, error=error, settings=settings,
               seconds=time.perf_counter() - started, job=job)
