"""``taskloom scheduler`` (a scheduler on its own) and ``taskloom schedules``
(list, pause, resume, remove). ``taskloom worker --scheduler`` runs one inside
a worker process (runtime/process/serve.py). Any number may run; one leads."""

from __future__ import annotations

import functools
import sys
from datetime import datetime

import click
import msgspec

from runtime.cli import common
from runtime.ops.scheduler import ScheduleInfo, run_scheduler, schedules_for

__all__ = ["register"]


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.isoformat(timespec="seconds")


@click.command()
@click.argument("app")
@click.option("--lease-s", default=10.0, show_default=True, type=click.FloatRange(min=1),
              help="Leader lease: a killed leader is replaced within this many seconds.")
def scheduler(app: str, lease_s: float) -> None:
    """Run a scheduler for APP until SIGTERM/SIGINT (any number may run; one leads)."""
    rt = common.load_runtime(app)
    common.log.info("scheduler starting", app=app, lease_s=lease_s)
    try:
        common.run("the scheduler stopped", functools.partial(
            run_scheduler, rt, multiprocess=True, lease_s=lease_s))
    except KeyboardInterrupt:
        common.log.info("scheduler stopped")


@click.command()
@click.argument("app")
@click.argument("action", required=False,
                type=click.Choice(["list", "pause", "resume", "remove"]), default="list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def schedules(app: str, action: str, name: str | None, as_json: bool) -> None:
    """List the schedules of APP (name, rule, next run, last run and its outcome,
    paused), or pause, resume or remove one: `taskloom schedules APP pause NAME`."""
    rt = common.load_runtime(app)
    if action != "list" and not name:
        raise click.UsageError(f"`{action}` needs the schedule's NAME: "
                               f"taskloom schedules {app} {action} NAME")

    async def act() -> list[ScheduleInfo] | bool:
        async with rt:
            ops = schedules_for(rt)
            if action == "list":
                return await ops.list()
            assert name is not None
            verb = {"pause": ops.pause, "resume": ops.resume, "remove": ops.remove}[action]
            return await verb(name)

    found = common.run(f"could not {action} the schedules", act)  # ScheduleNotFound: one line
    if isinstance(found, bool):
        did = {"pause": "paused", "resume": "resumed", "remove": "removed"}[action]
        click.echo(f"{did} {name}" if found else f"no schedule named {name}: nothing removed")
        return
    if as_json:
        for info in found:
            sys.stdout.write(msgspec.json.encode(info).decode() + "\n")
        return
    _table(found)


def _table(found: list[ScheduleInfo]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"schedules ({len(found)})")
    for column in ("name", "task", "rule", "next run", "last run", "last outcome", "paused"):
        table.add_column(column)
    for info in found:
        outcome = info.last_outcome or "-"
        if outcome == "FAILURE":
            outcome = "[red]FAILURE[/red]"
        table.add_row(info.name, info.task, info.rule, _when(info.next_run), _when(info.last_run),
                      outcome, "yes" if info.paused else "")
    Console().print(table)


def register(group: click.Group) -> None:
    group.add_command(scheduler)
    group.add_command(schedules)
