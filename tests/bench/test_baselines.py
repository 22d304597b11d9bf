"""The raw-client baselines (issue 18): they run beside taskloom on the real servers,
with tiny counts, and every taskloom figure is printed as a ratio to its baseline.

Timings never go into these assertions: only that each figure exists and is
positive, and that the report prints the ratio the issue asks for.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from benchmarks.cli import bench
from benchmarks.config import Run
from benchmarks.report import render, summarize, targets
from benchmarks.suite import plan_jobs


def _runs() -> list[Run]:
    out = []
    for repeat, (ours, raw, ours_ms, raw_ms) in enumerate(
            [(10_000.0, 20_000.0, 2.0, 1.0), (12_000.0, 20_000.0, 2.4, 1.2)], start=1):
        out += [Run("throughput", "redis", "taskloom", repeat, "ok",
                    {"tasks_per_s": ours, "cpu_us_per_task": 60.0}, job="drain"),
                Run("throughput", "redis", "raw", repeat, "ok",
                    {"tasks_per_s": raw, "cpu_us_per_task": 20.0}, job="drain"),
                Run("latency", "redis", "taskloom", repeat, "ok",
                    {"p50_ms": ours_ms, "p99_ms": 3 * ours_ms}, job="latency"),
                Run("latency", "redis", "raw", repeat, "ok",
                    {"p50_ms": raw_ms, "p99_ms": 2 * raw_ms}, job="latency"),
                Run("throughput", "redis", "celery", repeat, "ok",
                    {"tasks_per_s": 5_000.0}, job="drain")]
    return out


def test_every_taskloom_figure_is_a_ratio_to_its_raw_baseline_with_min_max_over_repeats(
        ) -> None:
    rows = {(r["key"], r["framework"]): r for r in summarize(_runs())}
    tput = rows[("tasks_per_s", "taskloom")]
    assert tput["ratio_to_baseline"] == 11_000 / 20_000
    assert (tput["ratio_min"], tput["ratio_max"]) == (0.5, 0.6)  # each repeat against its own
    assert rows[("cpu_us_per_task", "taskloom")]["ratio_to_baseline"] == 3.0
    assert rows[("p50_ms", "taskloom")]["ratio_to_baseline"] == 2.0
    # the peers stay compared with taskloom, the baseline is not
    assert rows[("tasks_per_s", "celery")]["ratio_to_taskloom"] == 5_000 / 11_000
    assert rows[("tasks_per_s", "raw")]["ratio_to_taskloom"] is None

    goals = {g["target"]: g for g in targets(summarize(_runs()))}
    assert goals["redis no-op throughput ÷ raw"]["reached"] is False
    assert goals["redis run() p50 ÷ raw round trip"]["value"] == 2.0
    assert goals["redis run() p99 ÷ its p50"]["reached"] is True

    out = io.StringIO()
    render(_runs(), {"machine": {"cpus": 2, "python": "3.12"}, "repeat": 2},
           Console(file=out, width=200))
    text = out.getvalue()
    assert "=0.55raw" in text and "(0.50-0.60)" in text
    assert "worker CPU per task" in text
    assert "issue 18 targets" in text and "not reached" in text


def test_the_scale_pool_and_queued_memory_jobs_are_planned() -> None:
    jobs = [(j.name, j.workload) for j in plan_jobs(["scale", "pool", "memory"])]
    assert jobs == [("drain", "throughput"), ("scale", "scale"), ("drain", "pool"),
                    ("producer", "memory")]


@pytest.mark.redis
@pytest.mark.amqp
@pytest.mark.slow
def test_bench_runs_the_raw_baselines_beside_taskloom_and_prints_the_ratios(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(bench, [
        "--only", "redis,amqp", "--frameworks", "taskloom,raw",
        "--workloads", "throughput,enqueue,latency", "--repeat", "1",
            # 1,000 tasks: at 0.005 (100 tasks) a batched worker drained them inside one
            # 10 ms CPU-clock tick, so its CPU per task read 0.0
            "--scale", "0.05",
        "--out", str(tmp_path), "--no-chart",
        # not the default 5,6: a full `taskloom bench` may be holding those right now
        "--peer-redis-dbs", "13,14",
    ])
    assert result.exit_code == 0, result.output
    assert "raw" in result.output and "issue 18 targets" in result.output

    [path] = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    runs = {(r["workload"], r["broker"], r["framework"]): r for r in record["runs"]}
    for broker in ("redis", "amqp"):
        for workload, key in (("throughput", "tasks_per_s"), ("throughput", "cpu_us_per_task"),
                              ("enqueue", "tasks_per_s"), ("latency", "p50_ms")):
            for fw in ("taskloom", "raw"):
                run = runs[(workload, broker, fw)]
                assert run["status"] == "ok", run["error"]
                assert run["metrics"][key] > 0, (workload, broker, fw, key)
        assert runs[("throughput", broker, "raw")]["metrics"]["n"] == 1000
        assert runs[("latency", broker, "raw")]["metrics"]["round_trips"] == 50
    ratios = [r for r in record["summary"] if r["framework"] == "taskloom"]
    assert ratios and all(r["ratio_to_baseline"] is not None for r in ratios
                          if r["key"] in ("tasks_per_s", "cpu_us_per_task", "p50_ms", "p99_ms"))
