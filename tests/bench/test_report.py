"""The comparison table's arithmetic and its failure display, on hand-made runs."""

from __future__ import annotations

import io

from rich.console import Console

from benchmarks.config import Run
from benchmarks.report import render, summarize
from benchmarks.suite import plan_jobs


def _runs() -> list[Run]:
    out = []
    for repeat, (ours, theirs) in enumerate([(20_000.0, 5_000.0), (22_000.0, 6_000.0),
                                              (18_000.0, 4_000.0)], start=1):
        out.append(Run("throughput", "redis", "taskloom", repeat, "ok",
                       {"tasks_per_s": ours}, job="drain"))
        out.append(Run("throughput", "redis", "celery", repeat, "ok",
                       {"tasks_per_s": theirs}, job="drain"))
        out.append(Run("latency", "redis", "taskloom", repeat, "ok",
                       {"p50_ms": 0.5, "p99_ms": 1.0}, job="latency"))
        out.append(Run("latency", "redis", "celery", repeat, "failed",
                       error="celery latency exited with 1: TimeoutError: no result",
                       job="latency"))
    out.append(Run("throughput", "amqp", "arq", 1, "n/a", error="arq has no amqp transport",
                   job="drain"))
    return out


def test_summary_gives_medians_ranges_and_ratios_to_taskloom_of_the_same_run() -> None:
    rows = {(r["key"], r["broker"], r["framework"]): r for r in summarize(_runs())}
    ours = rows[("tasks_per_s", "redis", "taskloom")]
    theirs = rows[("tasks_per_s", "redis", "celery")]
    assert (ours["median"], ours["min"], ours["max"], ours["runs"]) == (20_000, 18_000, 22_000, 3)
    assert theirs["median"] == 5_000
    assert theirs["ratio_to_taskloom"] == 0.25
    assert ours["ratio_to_taskloom"] is None
    assert rows[("tasks_per_s", "amqp", "arq")]["status"] == "n/a"


def test_a_failed_peer_is_shown_failed_with_its_error_not_left_out() -> None:
    rows = {(r["key"], r["framework"]): r for r in summarize(_runs()) if r["broker"] == "redis"}
    failed = rows[("p50_ms", "celery")]
    assert failed["status"] == "failed" and failed["failed"] == 3 and failed["median"] is None
    assert failed["errors"] == ["celery latency exited with 1: TimeoutError: no result"]

    out = io.StringIO()
    render(_runs(), {"machine": {"cpus": 2, "python": "3.11"}, "repeat": 3},
           Console(file=out, width=160))
    text = out.getvalue()
    assert "FAILED [1]" in text
    assert "[1] celery · latency · redis: celery latency exited with 1: TimeoutError" in text
    assert "x0.25" in text


def test_one_drain_of_noop_tasks_yields_throughput_enqueue_and_worker_memory() -> None:
    jobs = plan_jobs(["throughput", "enqueue", "memory", "latency"])
    assert [(j.name, j.workload, j.yields) for j in jobs] == [
        ("drain", "throughput", ("throughput", "enqueue", "memory")),
        ("latency", "latency", ("latency",)),
        ("producer", "memory", ("memory",)),
    ]
    only_enqueue = plan_jobs(["enqueue"])
    assert [(j.name, j.drain) for j in only_enqueue] == [("drain", False)]
