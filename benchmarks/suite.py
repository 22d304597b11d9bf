"""The whole comparison in one run: every framework, workload and broker, alternating.

Order: for each repeat, for each job, for each broker, the frameworks in an
order rotated by one every repeat (so no framework always goes first or last).
Every ratio in the table compares figures measured in this same run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import harness, servers
from benchmarks.config import (
    APPS_DIR,
    BASELINE,
    BROKERS,
    FRAMEWORKS,
    RESULTS_DIR,
    WORKLOADS,
    Params,
    Run,
    Servers,
)
from benchmarks.frameworks import Framework, RunContext, make_frameworks
from benchmarks.venvs import VenvError, ensure_venv, installed_versions, venv_ready

__all__ = ["Job", "Plan", "SuiteResult", "calibrate_cpu", "plan_jobs", "run_suite"]


@dataclass(frozen=True)
class Plan:
    """What to run."""

    workloads: Sequence[str] = WORKLOADS
    brokers: Sequence[str] = BROKERS
    frameworks: Sequence[str] = FRAMEWORKS
    repeat: int = 3
    params: Params = field(default_factory=Params)
    servers: Servers = field(default_factory=Servers)
    #: frameworks whose producer RSS is measured with ``params.producer_n`` tasks
    producer_frameworks: Sequence[str] = ("taskloom",)
    out_dir: Path = RESULTS_DIR
    chart: bool = True
    rebuild_venvs: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        for name, given, known in (("workload", self.workloads, WORKLOADS),
                                   ("broker", self.brokers, BROKERS),
                                   ("framework", self.frameworks, FRAMEWORKS),
                                   ("framework", self.producer_frameworks, FRAMEWORKS)):
            unknown = [g for g in given if g not in known]
            if unknown:
                raise ValueError(f"unknown {name} {', '.join(unknown)}; choose from "
                                 f"{', '.join(known)}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {self.repeat}")
        if not (self.workloads and self.brokers and self.frameworks):
            raise ValueError("nothing to run: give at least one workload, broker and framework")


@dataclass(frozen=True)
class Job:
    """One kind of measurement, and which workloads' figures it yields."""

    name: str  # drain | latency | producer | scale | limits
    workload: str  # the RunContext workload (sizes, settings)
    yields: tuple[str, ...]  # workloads whose records it produces
    drain: bool = True
    once: bool = False  # not repeated (producer RSS: one long run)


def plan_jobs(workloads: Sequence[str]) -> list[Job]:
    """The jobs that measure ``workloads``: throughput, enqueue and the worker's RSS
    come from one drain of no-op tasks (its producer phase is the enqueue figure)."""
    wanted = set(workloads)
    jobs: list[Job] = []
    shared = tuple(w for w in ("throughput", "enqueue", "memory") if w in wanted)
    if shared:
        drains = bool({"throughput", "memory"} & wanted)
        jobs.append(Job("drain", "throughput", shared, drain=drains))
    if "latency" in wanted:
        jobs.append(Job("latency", "latency", ("latency",)))
    if "io" in wanted:
        jobs.append(Job("drain", "io", ("io",)))
    if "cpu" in wanted:
        jobs.append(Job("drain", "cpu", ("cpu",)))
    if "scale" in wanted:
        jobs.append(Job("scale", "scale", ("scale",)))
    if "pool" in wanted:
        jobs.append(Job("drain", "pool", ("pool",)))
    if "limits" in wanted:
        jobs.append(Job("limits", "limits", ("limits",)))
    if "memory" in wanted:
        jobs.append(Job("producer", "memory", ("memory",), drain=False, once=True))
    return jobs


_RECORD_KEYS = {
    "throughput": ("tasks_per_s", "startup_s", "with_startup_per_s", "drain_s", "n",
                   "cpu_us_per_task"),
    "enqueue": ("enqueue_per_s", "n"),
    "memory": ("worker_rss_mib", "producer_rss_mib", "producer_baseline_mib"),
}


def _split(job: Job, run: Run) -> list[Run]:
    """A drain of no-op tasks yields throughput, enqueue and memory records."""
    if job.name != "drain" or job.workload != "throughput":
        return [run]
    out = []
    for workload in job.yields:
        metrics = {k: v for k, v in run.metrics.items() if k in _RECORD_KEYS[workload]}
        if workload == "enqueue" and "enqueue_per_s" in metrics:
            metrics["tasks_per_s"] = metrics.pop("enqueue_per_s")
        if workload == "memory":
            metrics.pop("producer_rss_mib", None)  # that one is the 1M-task producer job's
        out.append(dataclasses.replace(run, workload=workload, metrics=metrics))
    return out


def calibrate_cpu(task_ms: float) -> tuple[int, float]:
    """Loops of ``work.burn`` that take about ``task_ms`` here, and the seconds they take."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_work", APPS_DIR / "work.py")
    assert spec is not None and spec.loader is not None
    work = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(work)
    loops, target = 20_000, task_ms / 1000
    for _ in range(8):
        took = float(work.timed_burn(loops, 7))
        if abs(took - target) / target < 0.03:
            break
        loops = max(1000, int(loops * target / took))
    return loops, float(work.timed_burn(loops, 9))


@dataclass
class SuiteResult:
    runs: list[Run]
    meta: dict[str, Any]
    json_path: Path | None = None
    chart_path: Path | None = None


class Progress:
    """What the suite tells while it runs (rich progress bars, or nothing)."""

    def start(self, total: int) -> None:
        """``total`` measurements are about to run."""

    def phase(self, text: str) -> None:
        """A preparation step (installing a venv, calibrating)."""

    def begin(self, text: str) -> None:
        """A measurement starts."""

    def end(self) -> None:
        """The measurement begun last is over."""

    def done(self, run: Run) -> None:
        """A record is in (ok, failed or n/a)."""

    def stop(self) -> None:
        """No more measurements."""


def _ns(suite_id: str, job: Job, broker: str, fw: str, repeat: int) -> str:
    return f"tlb{suite_id}-{job.workload[:3]}-{broker[:2]}-{fw[:4]}-{repeat}"


def run_suite(plan: Plan, progress: Progress | None = None,
              on_run: Callable[[Run], None] | None = None) -> SuiteResult:
    """Run the plan; write the JSON (and chart) into ``plan.out_dir``."""
    progress = progress or Progress()
    suite_id = secrets.token_hex(3)
    owner = f"taskloom-bench {suite_id}"
    started = datetime.now(UTC)
    frameworks = make_frameworks(list(plan.frameworks))
    network = [b for b in plan.brokers if b != "memory"]
    # the peers, and taskloom's results on AMQP, use Redis databases of the benchmark's own
    peer_network = bool(network) and (any(fw.name != "taskloom" for fw in frameworks)
                                      or "amqp" in network)
    server_versions = servers.check_servers(plan.servers, network) if network else {}
    if peer_network:
        servers.claim_peer_dbs(plan.servers, owner)

    venv_errors: dict[str, str] = {}
    versions: dict[str, dict[str, str]] = {}
    for fw in frameworks:
        if fw.requirements:
            if plan.rebuild_venvs or not venv_ready(fw.name, fw.requirements):
                progress.phase(f"installing {fw.name} into benchmarks/venvs/{fw.name} "
                               f"({', '.join(fw.requirements)}); done once, then reused")
            try:
                ensure_venv(fw.name, fw.requirements, rebuild=plan.rebuild_venvs)
            except VenvError as e:
                venv_errors[fw.name] = str(e)
                continue
        versions[fw.name] = installed_versions(fw.python, fw.distributions)

    cpu_loops, cpu_task_s = 0, plan.params.cpu_task_ms / 1000
    if "cpu" in plan.workloads:
        progress.phase("calibrating the CPU task")
        cpu_loops, cpu_task_s = calibrate_cpu(plan.params.cpu_task_ms)
    pool_loops, pool_task_s = 0, plan.params.pool_task_ms / 1000
    if "pool" in plan.workloads:
        progress.phase("calibrating the process-pool task")
        pool_loops, pool_task_s = calibrate_cpu(plan.params.pool_task_ms)

    jobs = plan_jobs(plan.workloads)
    work: list[tuple[int, Job, str, Framework]] = []
    runs: list[Run] = []

    def record(run: Run) -> None:
        runs.append(run)
        if on_run is not None:
            on_run(run)
        progress.done(run)

    for repeat in range(1, plan.repeat + 1):
        for job in jobs:
            if job.once and repeat > 1:
                continue
            for broker in plan.brokers:
                shift = (repeat - 1) % len(frameworks)
                order = frameworks[shift:] + frameworks[:shift]
                for fw in order:
                    if job.name == "producer" and fw.name not in plan.producer_frameworks:
                        continue
                    reason = _not_applicable(fw, job, broker)
                    if reason is not None:
                        if repeat == 1:
                            for w in job.yields:
                                record(Run(w, broker, fw.name, repeat, "n/a", error=reason,
                                           job=job.name))
                        continue
                    if fw.name in venv_errors:
                        for w in job.yields:
                            record(Run(w, broker, fw.name, repeat, "failed",
                                       error=venv_errors[fw.name], job=job.name))
                        continue
                    work.append((repeat, job, broker, fw))

    progress.start(len(work))
    meta = _meta(plan, suite_id, started, server_versions, versions, cpu_loops, cpu_task_s)
    meta["pool_task"] = {"loops": pool_loops, "ms": round(pool_task_s * 1000, 2),
                         "n": plan.params.pool_n}
    try:
        _run_all(plan, work, ctx_args=(suite_id, owner, cpu_loops, cpu_task_s),
                 pool=(pool_loops, pool_task_s),
                 progress=progress, record=record)
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        progress.stop()
        if peer_network:
            servers.release_peer_dbs(plan.servers, owner)
        meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        meta["machine"]["load_avg_at_end"] = [round(x, 2) for x in psutil.getloadavg()]
        meta["leftovers"] = _leftovers(plan, suite_id)
    result = SuiteResult(runs=runs, meta=meta)
    _write(plan, result)
    return result


def _run_all(plan: Plan, work: list[tuple[int, Job, str, Framework]],
             ctx_args: tuple[str, str, int, float], progress: Progress,
             record: Callable[[Run], None], pool: tuple[int, float] = (0, 0.1)) -> None:
    suite_id, owner, cpu_loops, cpu_task_s = ctx_args
    for repeat, job, broker, fw in work:
        loops, task_s = pool if job.workload == "pool" else (cpu_loops, cpu_task_s)
        progress.begin(f"[{repeat}/{plan.repeat}] {' + '.join(job.yields)} · {broker} · "
                       f"{fw.name}")
        ctx = RunContext(workload=job.workload, broker=broker,
                         namespace=_ns(suite_id, job, broker, fw.name, repeat),
                         servers=plan.servers, params=plan.params, cpu_loops=loops,
                         owner=owner)
        run = harness.measure(fw, ctx, job.name, repeat=repeat, drain=job.drain,
                              cpu_task_s=task_s)
        for part in _split(job, run):
            record(part)
        progress.end()


def _not_applicable(fw: Framework, job: Job, broker: str) -> str | None:
    if fw.name == BASELINE and not (job.name == "latency"
                                    or (job.name == "drain" and job.workload == "throughput")):
        return "the raw baselines cover throughput, enqueue and latency"
    if job.workload in ("scale", "pool", "limits") and fw.name != "taskloom":
        return f"the {job.workload} workload is measured for taskloom only"
    if job.workload == "limits" and broker != "redis":
        return "the limits workload runs on Redis (its no-op queue's stats count the drain)"
    if job.workload == "pool" and broker != "memory":
        return "the process-pool workload runs on the memory broker (the pool is the point)"
    if job.workload == "scale" and broker == "memory":
        return "the memory broker is in-process: one worker process only"
    if broker == "memory" and fw.name != "taskloom":
        return f"{fw.name} has no broker shared by processes in memory (taskloom's is in-process)"
    if not fw.supports(broker):
        return f"{fw.name} has no {broker} transport"
    return None


def _leftovers(plan: Plan, suite_id: str) -> dict[str, Any]:
    """Anything of this run still on the servers (should be nothing)."""
    out: dict[str, Any] = {}
    if "amqp" in plan.brokers:
        found = servers.amqp_leftovers(f"tlb{suite_id}")
        if found is None:
            out["amqp"] = "not checked (rabbitmqctl not usable here)"
        elif found[0] or found[1]:
            servers.amqp_delete(plan.servers.amqp_url, found[0], found[1])
            out["amqp"] = {"queues": found[0], "exchanges": found[1], "deleted": True}
    if "redis" in plan.brokers or "amqp" in plan.brokers:
        try:
            count = servers.redis_delete_matching(plan.servers.redis_url, f"tlb{suite_id}")
        except Exception as e:
            out["redis"] = f"not checked: {e}"
        else:
            if count:
                out["redis"] = {"keys_deleted": count}
    return out


def _meta(plan: Plan, suite_id: str, started: datetime, server_versions: dict[str, str],
          versions: dict[str, dict[str, str]], cpu_loops: int, cpu_task_s: float
          ) -> dict[str, Any]:
    freq = psutil.cpu_freq()
    load = [round(x, 2) for x in psutil.getloadavg()]
    return {
        "suite_id": suite_id,
        "started": started.isoformat(timespec="seconds"),
        "command": plan.command,
        "repeat": plan.repeat,
        "workloads": list(plan.workloads),
        "brokers": list(plan.brokers),
        "frameworks": list(plan.frameworks),
        "producer_frameworks": list(plan.producer_frameworks),
        "params": dataclasses.asdict(plan.params),
        "cpu_task": {"loops": cpu_loops, "ms": round(cpu_task_s * 1000, 2)},
        "machine": {
            "cpus": psutil.cpu_count(logical=True),
            "cpu_mhz": round(freq.max or freq.current) if freq else None,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "load_avg_at_start": load,
        },
        "servers": {**plan.servers.describe(), **{f"{k}_version": v
                                                 for k, v in server_versions.items()}},
        "versions": versions,
    }


def _write(plan: Plan, result: SuiteResult) -> None:
    from benchmarks import report

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if plan.chart:
        try:
            result.chart_path = report.chart(result.runs, plan.out_dir / f"{stamp}.png",
                                             title=f"taskloom bench {stamp}")
        except ImportError:
            result.meta["chart"] = "skipped: matplotlib is not installed (pip install -e '.[bench]')"
    path = plan.out_dir / f"{stamp}.json"
    payload = {"suite": result.meta, "summary": report.summarize(result.runs),
               "runs": [r.to_json() for r in result.runs]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    result.json_path = path
