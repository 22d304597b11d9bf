"""Turning runs into the comparison: summary rows, the rich table, the PNG chart."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.config import BASELINE, BROKERS, FRAMEWORKS, METRICS, Metric, Run

__all__ = ["chart", "format_value", "render", "settings_table", "summarize", "table"]


def _order(values: Iterable[str], known: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [k for k in known if k in seen] + [v for v in seen if v not in known]


def _relevant(runs: Sequence[Run], metric: Metric, broker: str, framework: str) -> list[Run]:
    return [r for r in runs if r.workload == metric.workload and r.broker == broker
            and r.framework == framework and (not metric.job or not r.job or r.job == metric.job)]


def summarize(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (figure, broker, framework) that was run: median, min, max over
    the repeats, failures with their errors, and the ratio to taskloom's median."""
    brokers = _order((r.broker for r in runs), BROKERS)
    frameworks = _order((r.framework for r in runs), FRAMEWORKS)
    rows: list[dict[str, Any]] = []
    for metric in METRICS:
        for broker in brokers:
            block: list[dict[str, Any]] = []
            for fw in frameworks:
                relevant = _relevant(runs, metric, broker, fw)
                if not relevant:
                    continue
                values = [r.metrics[metric.key] for r in relevant
                          if r.status == "ok" and metric.key in r.metrics]
                by_repeat = {r.repeat: r.metrics[metric.key] for r in relevant
                             if r.status == "ok" and metric.key in r.metrics}
                failed = [r for r in relevant if r.status == "failed"]
                if not values and not failed and not any(r.status == "n/a" for r in relevant):
                    continue  # ran, but this figure is not one of its records
                status = ("ok" if values and not failed else "partial" if values
                          else "failed" if failed else "n/a")
                block.append({
                    "figure": metric.label, "workload": metric.workload, "key": metric.key,
                    "unit": metric.unit, "higher_is_better": metric.higher_is_better,
                    "broker": broker, "framework": fw, "status": status,
                    "median": statistics.median(values) if values else None,
                    "min": min(values) if values else None,
                    "max": max(values) if values else None,
                    "runs": len(values), "failed": len(failed),
                    "errors": sorted({r.error for r in relevant if r.error}),
                    "ratio_to_taskloom": None,
                    "ratio_to_baseline": None, "ratio_min": None, "ratio_max": None,
                    "by_repeat": by_repeat,
                })
            base = next((b["median"] for b in block if b["framework"] == "taskloom"), None)
            raw = next((b for b in block if b["framework"] == BASELINE), None)
            for b in block:
                if base and b["median"] is not None and b["framework"] not in ("taskloom",
                                                                                BASELINE):
                    b["ratio_to_taskloom"] = b["median"] / base
                if b["framework"] == "taskloom" and raw is not None and raw["median"] \
                        and b["median"] is not None:
                    b["ratio_to_baseline"] = b["median"] / raw["median"]
                    # min-max of the ratio over the repeats, each repeat against its own
                    paired = [v / raw["by_repeat"][k] for k, v in b["by_repeat"].items()
                              if raw["by_repeat"].get(k)]
                    if paired:
                        b["ratio_min"], b["ratio_max"] = min(paired), max(paired)
            rows.extend(block)
    return rows


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.0f}%"
    if unit == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "s":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if unit == "µs":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "tasks":
        return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
    if unit == "MiB":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if value >= 100_000:
        return f"{value / 1000:,.0f}k"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _cell(row: dict[str, Any], notes: dict[str, int]) -> str:
    if row["status"] == "n/a":
        return "[dim]n/a[/dim]"
    if row["status"] == "failed":
        marks = "".join(f"[{notes.setdefault(e, len(notes) + 1)}]" for e in row["errors"])
        return f"[bold red]FAILED[/bold red] {marks}"
    text = format_value(row["median"], row["unit"])
    ratio = row["ratio_to_taskloom"]
    if ratio is not None:
        text += f" [cyan]x{ratio:.2f}[/cyan]" if ratio < 10 else f" [cyan]x{ratio:.0f}[/cyan]"
    base = row.get("ratio_to_baseline")
    if base is not None:
        text += f" [magenta]={base:.2f}raw[/magenta]"
        if row.get("ratio_min") is not None and row["runs"] > 1:
            text += f" [dim magenta]({row['ratio_min']:.2f}-{row['ratio_max']:.2f})[/dim magenta]"
    if row["runs"] > 1:
        text += (f"\n[dim]{format_value(row['min'], row['unit'])}-"
                 f"{format_value(row['max'], row['unit'])}[/dim]")
    if row["status"] == "partial":
        marks = "".join(f"[{notes.setdefault(e, len(notes) + 1)}]" for e in row["errors"])
        text += f"\n[red]{row['failed']} failed[/red] {marks}"
    return text


def table(rows: Sequence[dict[str, Any]], *, title: str = "") -> tuple[Any, dict[str, int]]:
    """The comparison as a rich Table (figures x brokers down, frameworks across)
    and the footnotes {error: number} its cells refer to."""
    from rich import box
    from rich.table import Table

    frameworks = _order((r["framework"] for r in rows), FRAMEWORKS)
    t = Table(title=title or None, box=box.SIMPLE_HEAVY, show_lines=False, pad_edge=False,
              caption="median over the repeats, min-max below; xr = the framework's median ÷ "
                      "taskloom's, measured in the same run (frameworks alternating); "
                      "=r raw = taskloom's median ÷ the raw-client baseline's (raw column), "
                      "with its min-max over the repeats (each repeat against its own)",
              caption_justify="left")
    t.add_column("figure", no_wrap=True)
    t.add_column("broker", no_wrap=True)
    for fw in frameworks:
        t.add_column(fw, justify="right", no_wrap=True)
    notes: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    previous = ""
    for row in rows:
        key = (row["figure"], row["broker"])
        if key in seen:
            continue
        seen.add(key)
        cells = {r["framework"]: r for r in rows
                 if r["figure"] == row["figure"] and r["broker"] == row["broker"]}
        arrow = "↑" if row["higher_is_better"] else "↓"
        label = f"{row['figure']} ({row['unit']} {arrow})" if row["figure"] != previous else ""
        if previous and row["figure"] != previous:
            t.add_section()
        previous = row["figure"]
        t.add_row(label, row["broker"],
                  *[_cell(cells[fw], notes) if fw in cells else "[dim]—[/dim]"
                    for fw in frameworks])
    return t, notes


def _find(rows: Sequence[dict[str, Any]], key: str, workload: str, broker: str,
          framework: str = "taskloom") -> dict[str, Any] | None:
    return next((r for r in rows if r["key"] == key and r["workload"] == workload
                 and r["broker"] == broker and r["framework"] == framework
                 and r["median"] is not None), None)


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's targets, checked against this run's medians (only those measured)."""
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, target: str, reached: bool | None) -> None:
        if value is not None and reached is not None:
            out.append({"target": what, "value": value, "goal": target, "reached": reached})

    for broker, tput, enq in (("redis", 0.6, 0.9), ("amqp", 0.6, 0.7)):
        for workload, goal, label in (("throughput", tput, "throughput"),
                                      ("enqueue", enq, "enqueue_many")):
            row = _find(rows, "tasks_per_s", workload, broker)
            r = row["ratio_to_baseline"] if row else None
            add(f"{broker} no-op {label} ÷ raw", r, f">= {goal}",
                None if r is None else r >= goal)
    p50 = _find(rows, "p50_ms", "latency", "redis")
    p99 = _find(rows, "p99_ms", "latency", "redis")
    if p50 is not None:
        r = p50["ratio_to_baseline"]
        add("redis run() p50 ÷ raw round trip", r, "<= 1.5", None if r is None else r <= 1.5)
        if p99 is not None:
            add("redis run() p99 ÷ its p50", p99["median"] / p50["median"], "<= 3",
                p99["median"] <= 3 * p50["median"])
    for key in ("p50_ms", "p99_ms"):
        ours = _find(rows, key, "latency", "amqp")
        peers = [r["median"] for r in rows if r["key"] == key and r["workload"] == "latency"
                 and r["broker"] == "amqp" and r["median"] is not None
                 and r["framework"] not in ("taskloom", BASELINE)]
        if ours is not None and peers:
            add(f"amqp run() {key[:3]} ÷ fastest peer's", ours["median"] / min(peers), "<= 1",
                ours["median"] <= min(peers))
    pool = _find(rows, "efficiency", "pool", "memory")
    if pool is not None:
        add("process pool of 2: wall ÷ ideal", 100 / pool["median"], "<= 1.15",
            100 / pool["median"] <= 1.15)
    for broker in ("redis", "amqp"):
        sp = _find(rows, "speedup", "scale", broker)
        if sp is not None:
            add(f"{broker}: 2 worker processes ÷ 1", sp["median"], ">= 1.6", sp["median"] >= 1.6)
    for key, what in (("rate_ratio", "rate"), ("conc_ratio", "concurrency")):
        row = _find(rows, key, "limits", "redis")
        if row is not None:
            add(f"redis: no-op drain with {what}-limited tasks waiting ÷ alone (issue 16)",
                row["median"], ">= 0.9", row["median"] >= 0.9)
    for broker in ("redis", "amqp", "memory"):
        for key, limit, who in (("producer_rss_mib", 200, "producer"),
                                ("queued_worker_rss_mib", 150, "worker")):
            row = _find(rows, key, "memory", broker)
            if row is not None:
                add(f"{broker}: {who} peak RSS, tasks queued (MiB)", row["median"],
                    f"< {limit}", row["median"] < limit)
    return out


def settings_table(runs: Sequence[Run]) -> Any:
    """How each framework was run for each workload (worker command, client side)."""
    from rich import box
    from rich.table import Table

    t = Table(title="settings (each framework's documented best for the workload)",
              box=box.SIMPLE, title_justify="left")
    t.add_column("framework", no_wrap=True)
    t.add_column("workload", no_wrap=True)
    t.add_column("worker command [settings]")
    t.add_column("client")
    seen: set[tuple[str, str, str]] = set()
    for fw in _order((r.framework for r in runs), FRAMEWORKS):
        for r in runs:
            if r.framework != fw or r.status == "n/a" or not r.settings:
                continue
            key = (fw, r.workload, r.settings.get("worker", ""))
            if key in seen or (r.workload in ("enqueue", "memory") and r.job == "drain"):
                continue
            seen.add(key)
            t.add_row(fw, r.workload, r.settings.get("worker", ""), r.settings.get("client", ""))
    return t


def render(runs: Sequence[Run], meta: dict[str, Any], console: Any) -> None:
    """Print the comparison, its footnotes, the settings and the versions."""
    rows = summarize(runs)
    machine = meta.get("machine", {})
    title = (f"taskloom bench · {meta.get('started', '')} · {machine.get('cpus', '?')} cores · "
             f"Python {machine.get('python', '?')} · repeat {meta.get('repeat', '?')}")
    t, notes = table(rows)
    console.print(title, style="bold", highlight=False)
    console.print(t)
    for error, number in sorted(notes.items(), key=lambda kv: kv[1]):
        where = sorted({f"{r['framework']} · {r['workload']} · {r['broker']}" for r in rows
                        if error in r["errors"]})
        console.print(f"[red][{number}][/red] {', '.join(where)}: {error}", markup=True,
                      highlight=False, soft_wrap=True)
    goals = targets(rows)
    if goals:
        console.print("issue 18 targets (and issue 16's, marked; this run's medians):",
                      style="bold", highlight=False)
        for g in goals:
            mark = "[green]reached[/green]" if g["reached"] else "[red]not reached[/red]"
            console.print(f"  {g['target']}: {g['value']:.2f} (target {g['goal']}) {mark}",
                          highlight=False)
    console.print(settings_table(runs))
    versions = meta.get("versions", {})
    if versions:
        console.print("versions: " + "; ".join(
            f"{fw}: " + ", ".join(f"{d} {v}" for d, v in vs.items())
            for fw, vs in versions.items()), highlight=False, soft_wrap=True)
    servers = meta.get("servers", {})
    if servers:
        console.print("servers: " + ", ".join(f"{k} {v}" for k, v in servers.items()),
                      highlight=False, soft_wrap=True)
    load = machine.get("load_avg_at_start")
    if load and load[0] > 0.5:
        console.print(f"[yellow]note:[/yellow] the machine was busy when the run started (load "
                      f"average {load[0]} on {machine.get('cpus', '?')} cores): other processes "
                      "competed for the CPU, so the figures are noisier and lower than on a quiet "
                      "machine", highlight=False, soft_wrap=True)
    cpu = meta.get("cpu_task", {})
    if cpu.get("loops"):
        console.print(f"cpu task: burn({cpu['loops']}) ≈ {cpu['ms']} ms here; io task: "
                      f"sleep({meta['params']['io_sleep_s']}) s; efficiency = tasks/s ÷ ideal "
                      "(io: 1,000 at once; cpu: 2 processes busy all the time)",
                      highlight=False, soft_wrap=True)


def chart(runs: Sequence[Run], path: Path, *, title: str = "") -> Path:
    """A PNG of throughput and latency (p50, with p99 marked) per framework and broker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(runs)
    frameworks = _order((r["framework"] for r in rows), FRAMEWORKS)
    panels = [("throughput", "tasks_per_s", "throughput: no-op tasks/s (higher is better)"),
              ("latency", "p50_ms", "latency: enqueue + await result, p50 ms (lower is better)")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.get_cmap("tab10")
    for ax, (workload, key, heading) in zip(axes, panels, strict=True):
        chosen = [r for r in rows if r["workload"] == workload and r["key"] == key]
        brokers = _order((r["broker"] for r in chosen), BROKERS)
        width = 0.8 / max(1, len(frameworks))
        for i, fw in enumerate(frameworks):
            xs, ys, lo, hi = [], [], [], []
            for j, broker in enumerate(brokers):
                r = next((r for r in chosen if r["broker"] == broker and r["framework"] == fw),
                         None)
                if r is None or r["median"] is None:
                    if r is not None and r["status"] == "failed":
                        ax.text(j + (i - (len(frameworks) - 1) / 2) * width, 0, "failed",
                                rotation=90, ha="center", va="bottom", fontsize=7, color="red",
                                transform=ax.get_xaxis_transform())
                    continue
                xs.append(j + (i - (len(frameworks) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=fw, color=colours(i))
            if workload == "latency":
                p99 = [next((r for r in rows if r["key"] == "p99_ms" and r["broker"] == b
                             and r["framework"] == fw), None) for b in brokers]
                px = [j + (i - (len(frameworks) - 1) / 2) * width
                      for j, r in enumerate(p99) if r is not None and r["median"] is not None]
                py = [r["median"] for r in p99 if r is not None and r["median"] is not None]
                ax.scatter(px, py, marker="_", s=120, color="black", zorder=3,
                           label="p99" if i == 0 else None)
        ax.set_xticks(range(len(brokers)), brokers)
        ax.set_yscale("log")
        ax.set_title(heading, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
