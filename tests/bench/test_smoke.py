"""`taskloom bench` end to end on the smallest run: taskloom on the memory broker.

The full suite (peers, Redis, RabbitMQ, minutes) never runs in CI; this runs
the same code path (command, suite, harness, driver subprocess, report) for a
few hundred tasks in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from benchmarks.cli import bench


def test_bench_command_measures_taskloom_on_memory_and_writes_a_well_formed_record(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(bench, [
        "--only", "memory", "--frameworks", "taskloom", "--workloads", "throughput,latency",
        "--repeat", "1", "--scale", "0.01", "--out", str(tmp_path), "--no-chart",
    ])
    assert result.exit_code == 0, result.output
    assert "throughput (tasks/s" in result.output
    assert "latency p50 (ms" in result.output

    [path] = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    runs = {(r["workload"], r["broker"], r["framework"]): r for r in record["runs"]}
    throughput = runs[("throughput", "memory", "taskloom")]
    assert throughput["status"] == "ok", throughput["error"]
    assert throughput["metrics"]["n"] == 200
    assert throughput["metrics"]["tasks_per_s"] > 0
    assert throughput["settings"]["worker"]
    latency = runs[("latency", "memory", "taskloom")]
    assert latency["status"] == "ok", latency["error"]
    assert 0 < latency["metrics"]["p50_ms"] <= latency["metrics"]["p99_ms"]
    assert latency["metrics"]["round_trips"] == 10

    rows = {(r["key"], r["workload"]): r for r in record["summary"]}
    row = rows[("tasks_per_s", "throughput")]
    assert row["framework"] == "taskloom" and row["broker"] == "memory"
    assert row["median"] == row["min"] == row["max"] == throughput["metrics"]["tasks_per_s"]
    assert row["runs"] == 1 and row["failed"] == 0 and row["ratio_to_taskloom"] is None
    assert record["suite"]["machine"]["cpus"] >= 1
    assert record["suite"]["params"]["throughput_n"] == 200


def test_bench_command_refuses_an_unknown_framework_before_running_anything(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(bench, ["--frameworks", "taskloom,rq", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown rq" in result.output
    assert not list(tmp_path.iterdir())
