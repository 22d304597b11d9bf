"""``taskloom limits APP``: the flow-control state of APP (rate limiters with
the starts they allow now, concurrency permits held, deferred tasks waiting in
the broker, deferrals counted), and run-time changes::

    taskloom limits APP                          # rich table
    taskloom limits APP --json                   # JSON lines
    taskloom limits APP --task send --rate 5/m   # change a task's limits for every worker
    taskloom limits APP --task send --concurrency 3
    taskloom limits APP --task send --clear      # back to the declared limits

``register(main)`` adds it to the ``taskloom`` group.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import msgspec

from runtime.cli import common
from runtime.ops.limits import LimitState, limits_state, set_limit, store_for

__all__ = ["register"]


@click.command()
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.option("--task", "task", default=None, help="The task whose limits to change.")
@click.option("--rate", default=None, help="A new rate limit for --task, e.g. 20/s, 5/m, 100/h.")
@click.option("--burst", default=None, type=click.IntRange(min=1), help="The burst of --rate.")
@click.option("--concurrency", default=None, type=click.IntRange(min=1),
              help="A new concurrency limit (per key) for --task.")
@click.option("--clear", is_flag=True, help="Drop --task's run-time changes.")
def limits(app: str, as_json: bool, task: str | None, rate: str | None, burst: int | None,
           concurrency: int | None, clear: bool) -> None:
    """The rate and concurrency limiters of APP and what they hold now; with
    --task, change that task's limits at run time (every worker sees it within
    a second)."""
    changing = rate is not None or concurrency is not None or clear or burst is not None
    if changing and not task:
        raise click.UsageError("--rate, --burst, --concurrency and --clear need --task NAME")
    rt = common.load_runtime(app)

    async def act() -> tuple[dict[str, Any] | None, list[LimitState]]:
        changed = None
        try:
            if task and changing:
                changed = await set_limit(rt, task, rate_limit=rate, burst=burst,
                                          concurrency_limit=concurrency, clear=clear)
            return changed, await limits_state(rt)
        finally:
            await store_for(rt).aclose()

    changed, states = common.run("could not read or change the limits", act)
    if changed is not None:
        click.echo(f"{task}: {changed if changed else 'declared limits restored'}", err=True)
    if as_json:
        for state in states:
            sys.stdout.write(msgspec.json.encode(state).decode() + "\n")
        return
    _table(states)


def _table(states: list[LimitState]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"limiters ({len(states)})")
    for column in ("task", "key", "kind", "limit", "tokens now", "held", "waiting", "deferred"):
        table.add_column(column, justify="right" if column in (
            "tokens now", "held", "waiting", "deferred") else "left")
    for s in states:
        limit = f"{s.limit} (changed)" if s.overridden else s.limit
        table.add_row(s.task, s.key or "*", s.kind, limit,
                      "-" if s.tokens is None else f"{s.tokens:g}",
                      "-" if s.held is None else str(s.held), str(s.waiting), str(s.deferred))
    Console().print(table)


def register(group: click.Group) -> None:
    group.add_command(limits)
