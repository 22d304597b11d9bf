"""``taskloom bench``: taskloom against Celery, taskiq, dramatiq and arq, in one run.

This command lives with the suite in ``benchmarks/`` of a checkout of the
repository (not part of the installed package): ``taskloom`` registers it only
when it runs from a checkout, and ``python -m benchmarks`` runs it too. It
imports the suite only when run, so importing the CLI stays cheap and never
pulls in matplotlib or the peer frameworks (those run in their own venvs).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import click

__all__ = ["bench"]

_CHOICES = {
    "workloads": ("throughput", "enqueue", "latency", "io", "cpu", "memory", "scale", "pool",
                  "limits"),
    "brokers": ("memory", "redis", "amqp"),
    "frameworks": ("taskloom", "raw", "celery", "taskiq", "dramatiq", "arq"),
}


def _suite_module() -> Any:
    """``benchmarks.suite``, imported only when the command runs (it needs the
    ``bench`` extra: matplotlib)."""
    try:
        from benchmarks import suite
    except ModuleNotFoundError as e:
        raise click.ClickException(
            f"the benchmark suite needs {e.name!r}, which is not installed: run "
            f"`pip install -e '.[bench]'` in the repository") from None
    return suite


def _listed(kind: str) -> Any:
    """A click callback parsing a comma-separated subset of ``_CHOICES[kind]``."""
    known = _CHOICES[kind]

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
        if value is None or value.strip() in ("", "all"):
            return known
        names = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise click.BadParameter(
                f"unknown {', '.join(unknown)}; choose from {', '.join(known)} (comma-separated)")
        return names

    return parse


def _dbs(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two database numbers like 5,6, got {value!r}") from None
    if a == b or min(a, b) < 1:
        raise click.BadParameter("two different database numbers above 0 (0 is the shared one)")
    return a, b


class _RichProgress:
    """Progress bars while the suite runs (rich)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console)
        self.task: Any = None

    def phase(self, text: str) -> None:
        self.console.print(f"[dim]·[/dim] {text}", highlight=False)

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("starting", total=total)

    def begin(self, text: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, description=text)

    def end(self) -> None:
        if self.task is not None:
            self.bar.advance(self.task)

    def done(self, run: Any) -> None:
        if run.status == "failed":
            error = str(run.error or "")
            self.console.print(f"[red]failed[/red] {run.framework} · {run.workload} · "
                               f"{run.broker} (repeat {run.repeat}): "
                               f"{error[:300]}{'…' if len(error) > 300 else ''}",
                               highlight=False)

    def stop(self) -> None:
        self.bar.stop()


@click.command()
@click.option("--only", "brokers", default=None, callback=_listed("brokers"),
              metavar="BROKERS", help="Brokers to run: memory,redis,amqp (default: all).")
@click.option("--frameworks", default=None, callback=_listed("frameworks"),
              metavar="NAMES",
              help="taskloom,raw,celery,taskiq,dramatiq,arq (default: all; raw = the raw-client "
                   "baselines every taskloom figure is divided by; peers off: taskloom,raw).")
@click.option("--workloads", default=None, callback=_listed("workloads"),
              metavar="NAMES",
              help="throughput,enqueue,latency,io,cpu,memory,scale,pool,limits (default: all; "
                   "scale = 1 -> 2 worker processes, pool = 40 tasks of 100 ms CPU in a process "
                   "pool of 2, limits = the no-op drain alone and with rate- or "
                   "concurrency-limited tasks waiting in the same worker, Redis).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Measurements of each figure; the table shows median and min-max.")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(min=0.0001),
              help="Multiply every task count (e.g. 0.1 for a quick look; figures are quoted "
                   "at 1).")
@click.option("--producer-frameworks", default="taskloom", show_default=True,
              callback=_listed("frameworks"), metavar="NAMES",
              help="Frameworks whose producer RSS is measured while enqueuing 1,000,000 tasks "
                   "(slow for the peers).")
@click.option("--queued", default=None, type=click.IntRange(min=1), metavar="N",
              help="No-op tasks queued for the memory workload's producer and worker peak RSS "
                   "(default 1,000,000, times --scale).")
@click.option("--redis-url", envvar="TASKLOOM_BENCH_REDIS_URL",
              default="redis://127.0.0.1:6379/0", show_default=True,
              help="Redis for taskloom (keys under a per-run namespace, deleted after).")
@click.option("--amqp-url", envvar="TASKLOOM_BENCH_AMQP_URL",
              default="amqp://guest:guest@127.0.0.1:5672/", show_default=True,
              help="RabbitMQ (queues named per run, deleted after).")
@click.option("--peer-redis-dbs", default="5,6", show_default=True, callback=_dbs,
              metavar="A,B",
              help="Redis databases for the peers' broker and results: the benchmark empties "
                   "them (FLUSHDB), so they must be free for it.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Where the JSON and PNG go (default: benchmarks/results/).")
@click.option("--no-chart", is_flag=True, help="Do not draw the PNG chart.")
@click.option("--rebuild-venvs", is_flag=True, help="Make the peers' venvs again.")
def bench(brokers: tuple[str, ...], frameworks: tuple[str, ...], workloads: tuple[str, ...],
          repeat: int, scale: float, producer_frameworks: tuple[str, ...], queued: int | None,
          redis_url: str,
          amqp_url: str, peer_redis_dbs: tuple[int, int], out_dir: Path | None, no_chart: bool,
          rebuild_venvs: bool) -> None:
    """Benchmark taskloom against its peers on the same servers, in one run.

    Every framework runs every workload on every broker it supports (taskloom
    also on the in-process memory broker), repeated with the frameworks taking
    turns; the table gives medians, min-max and each peer's figure as a ratio
    to taskloom's. Every run is written to benchmarks/results/<time>.json,
    with a PNG chart of throughput and latency. The peers are installed in
    their own venvs under benchmarks/venvs/ on the first run.
    """
    from rich.console import Console

    suite = _suite_module()
    config = importlib.import_module("benchmarks.config")
    params = config.Params()
    if scale != 1.0:
        params = params.scaled(scale)
    if queued is not None:
        params = dataclasses.replace(params, producer_n=queued)
    plan_args: dict[str, Any] = {
        "workloads": workloads, "brokers": brokers, "frameworks": frameworks,
        "repeat": repeat, "params": params,
        "servers": config.Servers(redis_url=redis_url, amqp_url=amqp_url,
                                  peer_dbs=peer_redis_dbs),
        "producer_frameworks": tuple(f for f in producer_frameworks if f in frameworks),
        "chart": not no_chart, "rebuild_venvs": rebuild_venvs,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if out_dir is not None:
        plan_args["out_dir"] = out_dir
    try:
        plan = suite.Plan(**plan_args)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the table
        console = Console(width=160)
    servers = importlib.import_module("benchmarks.servers")
    try:
        result = suite.run_suite(plan, progress=_RichProgress(console))
    except servers.ServerError as e:
        raise click.ClickException(str(e)) from None
    report = importlib.import_module("benchmarks.report")
    report.render(result.runs, result.meta, console)
    console.print(f"runs: {result.json_path}", highlight=False)
    if result.chart_path is not None:
        console.print(f"chart: {result.chart_path}", highlight=False)
    elif result.meta.get("chart"):
        console.print(f"chart: {result.meta['chart']}", highlight=False)
    if result.meta.get("interrupted"):
        raise click.ClickException("interrupted: the figures above are partial")
    if any(r.framework == "taskloom" and r.status == "failed" for r in result.runs):
        raise click.ClickException("taskloom failed a workload (see the footnotes above)")
