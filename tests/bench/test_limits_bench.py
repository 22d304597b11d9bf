"""The limits workload of ``taskloom bench`` (issue 16): a no-op drain alone, then with
rate- and concurrency-limited tasks waiting in the same worker.

Timings never go into these assertions: that the workload is registered and
planned, that the limited tasks' ledger turns into the right figures, that the
report checks the ratio against its target, and (on Redis, tiny counts) that a
real run yields every figure with the concurrency limit held.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from benchmarks import flow
from benchmarks.cli import bench
from benchmarks.config import APPS_DIR, BENCH_DIR, WORKLOADS, Params, Run, Servers
from benchmarks.frameworks import RunContext, make_frameworks
from benchmarks.report import render, summarize, targets
from benchmarks.suite import Plan, plan_jobs, run_suite


def test_the_limits_workload_is_planned_as_one_job_of_its_own() -> None:
    assert "limits" in WORKLOADS
    jobs = [(j.name, j.workload, j.yields) for j in plan_jobs(["throughput", "limits"])]
    assert jobs == [("drain", "throughput", ("throughput",)), ("limits", "limits", ("limits",))]


def test_bench_accepts_the_limits_workload_and_runs_it_on_redis_only(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench, [
        "--only", "memory", "--frameworks", "taskloom", "--workloads", "limits",
        "--repeat", "1", "--out", str(tmp_path), "--no-chart",
    ])
    assert result.exit_code == 0, result.output
    [path] = tmp_path.glob("*.json")
    [run] = json.loads(path.read_text())["runs"]
    assert (run["workload"], run["broker"], run["status"]) == ("limits", "memory", "n/a")
    assert "runs on Redis" in run["error"]


def test_only_the_limits_runs_load_the_limited_tasks() -> None:
    [taskloom] = make_frameworks(["taskloom"])
    params = Params()

    def env(workload: str) -> dict[str, str]:
        return taskloom.env(RunContext(workload, "redis", "tlbtest-ns", Servers(), params), None)

    assert json.loads(env("limits")["BENCH_LIMITS"]) == {"rate": "5/s", "concurrency": 2}
    assert env("throughput")["BENCH_LIMITS"] == ""

    # the app, loaded as the worker loads it: the limited tasks, their limits, their queue
    probe = ("import taskloom_app as a; t = a.TASKS; "
             "print(sorted(t), t['rate_limited'].queue, t['concurrency_limited'].queue, "
             "t['rate_limited'].limits is not None, t['concurrency_limited'].limits is not None)")
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=APPS_DIR, check=True, capture_output=True, text=True,
        env={**os.environ, **env("limits"), "BENCH_BROKER_URL": "memory://",
             "PYTHONPATH": os.pathsep.join((str(APPS_DIR), str(BENCH_DIR.parent)))})
    assert out.stdout.split() == ["['concurrency_limited',", "'cpu',", "'noop',",
                                  "'rate_limited',", "'sleep']", "limited", "limited",
                                  "True", "True"]


def test_the_ledger_gives_runs_rates_and_the_peak_per_key() -> None:
    window = flow.Window(spawn=100.0, first=100.5, last=102.0, end=110.0)
    rate = flow.parse_ledger([b"rate 100.25", b"rate 101.25", "rate 102.25", "rate 102.75"])
    figures = flow.figures("rate", rate, window)
    assert figures["rate_ran"] == 4 and figures["rate_ran_during"] == 2
    assert figures["rate_observed_per_s"] == pytest.approx(3 / 2.5)
    assert figures["rate_max_1s"] == 2  # 102.25 and 102.75; 101.25 to 102.25 is a full second
    assert figures["rate_observed_s"] == 10.0

    held = flow.parse_ledger(["k0 100.0 100.5", "k0 100.1 100.6", "k0 100.5 101.0",
                              "k1 100.0 101.0", "k1 100.2 100.4", "k1 100.3 100.9"])
    figures = flow.figures("conc", held, window)
    assert figures["conc_ran"] == 6 and figures["conc_peak"] == 3  # k1 at 100.3
    assert figures["conc_observed_per_s"] == pytest.approx(5 / 0.5)
    with pytest.raises(ValueError, match="malformed"):
        flow.parse_ledger(["rate"])


def _runs(rate_ratio: float, conc_ratio: float) -> list[Run]:
    return [Run("limits", "redis", "taskloom", repeat, "ok",
                {"alone_per_s": 5_000.0, "rate_noop_per_s": 5_000.0 * rate_ratio,
                 "rate_ratio": rate_ratio, "conc_noop_per_s": 5_000.0 * conc_ratio,
                 "conc_ratio": conc_ratio, "rate_ran": 48.0, "conc_peak": 2.0}, job="limits")
            for repeat in (1, 2, 3)]


def test_the_report_checks_the_waiting_over_alone_ratios_against_issue_16s_target() -> None:
    goals = {g["target"]: g for g in targets(summarize(_runs(0.95, 0.5)))}
    rate = goals["redis: no-op drain with rate-limited tasks waiting ÷ alone (issue 16)"]
    conc = goals["redis: no-op drain with concurrency-limited tasks waiting ÷ alone (issue 16)"]
    assert (rate["value"], rate["goal"], rate["reached"]) == (0.95, ">= 0.9", True)
    assert (conc["value"], conc["reached"]) == (0.5, False)

    out = io.StringIO()
    render(_runs(0.95, 0.5), {"machine": {"cpus": 2, "python": "3.12"}, "repeat": 3},
           Console(file=out, width=200))
    text = out.getvalue()
    assert "rate-limited waiting ÷ alone" in text and "rate-limited run (observed window)" in text
    assert "tasks waiting ÷ alone (issue 16): 0.95 (target >= 0.9) reached" in text
    assert "tasks waiting ÷ alone (issue 16): 0.50 (target >= 0.9) not reached" in text


@pytest.mark.redis
@pytest.mark.slow
def test_a_tiny_limits_run_on_redis_yields_every_figure_and_holds_the_limit(
        tmp_path: Path) -> None:
    params = Params(throughput_n=200, limits_m=6, limits_hold_s=0.05, limits_observe_s=1.0)
    plan = Plan(workloads=("limits",), brokers=("redis",), frameworks=("taskloom",), repeat=1,
                params=params, out_dir=tmp_path, chart=False)
    [run] = run_suite(plan).runs
    assert run.status == "ok", run.error
    for key in ("alone_per_s", "rate_noop_per_s", "rate_ratio", "conc_noop_per_s",
                "conc_ratio", "rate_observed_s", "conc_observed_s"):
        assert run.metrics[key] > 0, key
    assert 0 <= run.metrics["rate_ran_during"] <= run.metrics["rate_ran"] <= 6
    assert 0 <= run.metrics["conc_ran_during"] <= run.metrics["conc_ran"] <= 6
    assert run.metrics["conc_peak"] <= 2  # the concurrency limit, per key
