"""The operator's commands: see and steer a running deployment of APP.

    taskloom tasks APP [--state failed] [--queue q] [--name n] [--limit 50] [--cursor C]
    taskloom inspect APP                       # workers, what each runs, orphaned tasks
    taskloom events APP [--since ID] [--json]  # follows the event stream (Ctrl-C stops)
    taskloom retry APP ID [--queue q]
    taskloom replay APP --queue q [--id ID ...] [--reason r] [--name n] [--limit N] [--dry-run]
    taskloom purge-dead APP --queue q [--id ID ...] [--reason r] [--name n] [--limit N] [--dry-run]
    taskloom cancel APP [ID ...] [--name n] [--queue q]
    taskloom pause APP --queue q   /   taskloom resume APP --queue q

Every command takes ``--json`` (one JSON object per line) for scripts.

Exit codes: 0 done; 1 an operational error (a server down, the app cannot be
loaded, nothing to retry, an ``--id`` that is not a dead letter of the queue:
one line says what and what to do, and nothing is done); 2 usage error.

``register(main)`` adds them to the ``taskloom`` group.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import msgspec

from runtime.cli import common
from runtime.errors import TaskloomError
from runtime.ops.api import Operations
from runtime.ops.deadletters import UnknownDeadLetter, admin_for
from runtime.ops.index import TaskSummary
from runtime.ops.verbs import DeadReport, retry_id

__all__ = ["register"]

T = TypeVar("T")
_JSON = click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")


def _emit(obj: Any) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")


def _with_ops(app: str, what: str, fn: Callable[[Operations], Awaitable[T]]) -> T:
    rt = common.load_runtime(app)

    async def run() -> T:
        async with rt, Operations(rt) as ops:
            return await fn(ops)

    return common.run(what, run)


def _ms(value: float | None) -> int | None:
    return None if value is None else int(value * 1000)


def _when(ms: int | None) -> str:
    return "-" if not ms else common.age(ms)


def _tasks_table(items: Sequence[TaskSummary], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("id", "name", "state", "queue", "attempt", "when", "worker", "error"):
        table.add_column(column, overflow="fold")
    for s in items:
        error = f"{s.error_type}: {s.error}" if s.error_type else s.reason
        table.add_row(s.id, s.name, s.state.value, s.queue, str(s.attempt), _when(s.at_ms),
                      s.worker or "-", error[:80])
    Console().print(table)


@click.command()
@click.argument("app")
@click.option("--state", "states", multiple=True,
              help="enqueued, scheduled, started, retrying, succeeded, failed, dead_lettered, "
                   "revoked or expired (repeat for several; default: all).")
@click.option("--queue", default=None)
@click.option("--name", default=None, help="The task name.")
@click.option("--since", type=float, default=None, help="Epoch seconds: not before.")
@click.option("--until", type=float, default=None, help="Epoch seconds: not after.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1, max=10_000))
@click.option("--cursor", default=None, help="The next-page cursor a previous call printed.")
@_JSON
def tasks(app: str, states: tuple[str, ...], queue: str | None, name: str | None,
          since: float | None, until: float | None, limit: int, cursor: str | None,
          as_json: bool) -> None:
    """List APP's tasks by state, newest first (one page; the cursor of the next
    page is printed to stderr, or as the last JSON line's "next_cursor")."""
    page = _with_ops(app, "could not list the tasks", lambda ops: ops.tasks(
        state=states or None, queue=queue, name=name, since_ms=_ms(since),
        until_ms=_ms(until), limit=limit, cursor=cursor))
    if as_json:
        for s in page.items:
            _emit(s)
        _emit({"next_cursor": page.next_cursor})
        return
    _tasks_table(page.items, f"tasks ({len(page.items)})")
    if page.next_cursor:
        click.echo(f"next page: --cursor {page.next_cursor}", err=True)


@click.command()
@click.argument("app")
@_JSON
def inspect(app: str, as_json: bool) -> None:
    """The live workers of APP (state, load, what each runs now) and the started
    tasks whose worker is gone (orphaned until the broker redelivers them)."""

    async def gather(ops: Operations) -> tuple[list[Any], list[TaskSummary]]:
        workers = await ops.workers()
        try:
            lost = await ops.orphans()
        except Exception:  # the index is off: workers alone
            lost = []
        return workers, lost

    workers, lost = _with_ops(app, "could not inspect the workers", gather)
    if as_json:
        for w in workers:
            _emit({"worker": w})
        for s in lost:
            _emit({"orphaned": s})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"workers ({len(workers)})")
    for column in ("id", "state", "queues", "busy", "processed", "failed", "lag ms", "seen",
                   "running now"):
        table.add_column(column, overflow="fold")
    for w in workers:
        running = ", ".join(f"{t.name}[{t.id[:8]}] {_when(t.started_ms)}" for t in w.tasks[:5])
        table.add_row(w.id, w.state, ",".join(w.queues), f"{w.in_flight}/{w.concurrency}",
                      str(w.processed), str(w.failed), f"{w.lag_ms:g}", _when(w.last_seen_ms),
                      running + (" ..." if len(w.tasks) > 5 else ""))
    Console().print(table)
    if lost:
        _tasks_table(lost, f"orphaned tasks ({len(lost)}): their worker is gone")


@click.command()
@click.argument("app")
@click.option("--since", default=None,
              help="Resume after this event id ('0': from the oldest kept; default: new only).")
@click.option("--count", default=None, type=click.IntRange(min=1),
              help="Stop after this many events (default: follow until Ctrl-C).")
@_JSON
def events(app: str, since: str | None, count: int | None, as_json: bool) -> None:
    """Follow APP's event stream (task transitions, workers, scheduler ticks)."""

    async def follow(ops: Operations) -> int:
        n = 0
        async for rec in ops.events(since=since):
            if as_json:
                _emit({"id": rec.id, **msgspec.to_builtins(rec.event)})
            else:
                e = msgspec.to_builtins(rec.event)
                kind = e.pop("kind", "?")
                e.pop("v", None)
                at = e.pop("at_ms", None)
                stamp = time.strftime("%H:%M:%S", time.localtime(at / 1000)) if at else "--"
                fields = " ".join(f"{k}={v}" for k, v in e.items() if v not in ("", None))
                click.echo(f"{rec.id} {stamp} {kind} {fields}")
            sys.stdout.flush()
            n += 1
            if count is not None and n >= count:
                break
        return n

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a follow: exit 0
        _with_ops(app, "could not read the event stream", follow)


@click.command()
@click.argument("app")
@click.argument("task_id")
@click.option("--queue", default=None, help="Where its dead letter is (default: from the index).")
@_JSON
def retry(app: str, task_id: str, queue: str | None, as_json: bool) -> None:
    """Run a failed or dead-lettered task again: a new attempt with the same
    arguments under a new id linked to TASK_ID (safe to repeat)."""
    report = _with_ops(app, "could not retry the task",
                       lambda ops: ops.retry(task_id, queue=queue))
    if as_json:
        _emit(report)
    elif report.retried:
        click.echo(f"retried {task_id} as {report.new_id}")
    else:
        click.echo(f"{task_id} was already retried as {report.new_id}; nothing sent")


def _dead_options(fn: Callable[..., None]) -> Callable[..., None]:
    for option in reversed([
        click.argument("app"),
        click.option("--queue", required=True, help="The queue whose dead letters to act on."),
        click.option("--id", "ids", multiple=True,
                     help="Only this task id (repeat for several); an id that is not a "
                          "dead letter of --queue is an error, and nothing is done."),
        click.option("--reason", default=None, help="Only this reason (e.g. failed)."),
        click.option("--name", default=None, help="Only this task name."),
        click.option("--since", type=float, default=None, help="Epoch seconds: not before."),
        click.option("--until", type=float, default=None, help="Epoch seconds: not after."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="At most this many (the oldest first)."),
        click.option("--dry-run", is_flag=True, help="Only count what matches."),
        _JSON,
    ]):
        fn = option(fn)
    return fn


async def _known(ops: Operations, task_id: str) -> bool:
    """Whether the result store or the task index knows ``task_id``."""
    if await ops.rt.results.get(task_id) is not None:
        return True
    try:
        return await ops.task(task_id) is not None
    except TaskloomError:  # the index is off
        return False


async def _check_ids(ops: Operations, queue: str, ids: Sequence[str], *,
                     replaying: bool) -> list[str]:
    """The ids already replayed (their retry is known); raises
    :class:`UnknownDeadLetter` for ids that are neither a dead letter of ``queue``
    nor (when ``replaying``) already replayed."""
    kept = {e.letter.envelope.id for e in await admin_for(ops.rt.broker).entries(queue)}
    absent = [i for i in dict.fromkeys(ids) if i not in kept]
    done = [i for i in absent if replaying and await _known(ops, retry_id(i))]
    unknown = [i for i in absent if i not in done]
    if unknown:
        raise UnknownDeadLetter(queue, unknown, "already replayed with no result kept, or never "
                                "dead-lettered there" if replaying else
                                "already purged or replayed, or never dead-lettered there")
    return done


def _dead_verb(replaying: bool, app: str, queue: str, ids: tuple[str, ...],
               filters: dict[str, Any]) -> tuple[DeadReport, list[str]]:
    async def act(ops: Operations) -> tuple[DeadReport, list[str]]:
        done = await _check_ids(ops, queue, ids, replaying=replaying) if ids else []
        verb = ops.replay if replaying else ops.purge_dead
        return await verb(queue, ids=ids or None, **filters), done

    what = "could not replay the dead letters" if replaying else \
        "could not purge the dead letters"
    return _with_ops(app, what, act)


@click.command()
@_dead_options
def replay(app: str, queue: str, ids: tuple[str, ...], reason: str | None, name: str | None,
           since: float | None, until: float | None, limit: int | None, dry_run: bool,
           as_json: bool) -> None:
    """Publish again the dead letters of --queue that match, each as a new
    attempt (its dead letter is then removed; safe to repeat)."""
    report, already = _dead_verb(True, app, queue, ids, dict(
        reason=reason, name=name, since_ms=_ms(since), until_ms=_ms(until), limit=limit,
        dry_run=dry_run))
    if as_json:
        _emit({**msgspec.to_builtins(report), "already_replayed": already})
        return
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{queue}: {report.matched} matched, {verb} "
               f"{report.matched - report.undecodable if dry_run else report.done}"
               + (f", {report.undecodable} not task messages (purge them)"
                  if report.undecodable else ""))
    for task_id in already:
        click.echo(f"{task_id} was already replayed as {retry_id(task_id)}; nothing sent")


@click.command(name="purge-dead")
@_dead_options
def purge_dead(app: str, queue: str, ids: tuple[str, ...], reason: str | None,
               name: str | None, since: float | None, until: float | None, limit: int | None,
               dry_run: bool, as_json: bool) -> None:
    """Remove the dead letters of --queue that match."""
    report, _ = _dead_verb(False, app, queue, ids, dict(
        reason=reason, name=name, since_ms=_ms(since), until_ms=_ms(until), limit=limit,
        dry_run=dry_run))
    if as_json:
        _emit(report)
        return
    click.echo(f"{queue}: {report.matched} matched, "
               f"{'would remove' if dry_run else 'removed'} "
               f"{report.matched if dry_run else report.done}")


@click.command()
@click.argument("app")
@click.argument("ids", nargs=-1)
@click.option("--name", default=None, help="Every pending task of this name.")
@click.option("--queue", default=None, help="Every pending task of this queue.")
@_JSON
def cancel(app: str, ids: tuple[str, ...], name: str | None, queue: str | None,
           as_json: bool) -> None:
    """Cancel tasks by id, or every pending (enqueued, scheduled, retrying) task
    of a name or queue (safe to repeat)."""
    if not ids and name is None and queue is None:
        raise click.UsageError("give task ids, --name or --queue")
    report = _with_ops(app, "could not cancel",
                       lambda ops: ops.cancel(list(ids), name=name, queue=queue))
    if as_json:
        _emit(report)
    else:
        click.echo(f"{report.matched} matched, {report.revoked} cancelled, "
                   f"{report.unchanged} already finished or cancelled")


def _pause_command(paused: bool) -> click.Command:
    @click.command(name="pause" if paused else "resume")
    @click.argument("app")
    @click.option("--queue", required=True)
    @_JSON
    def command(app: str, queue: str, as_json: bool) -> None:
        async def act(ops: Operations) -> tuple[bool, set[str]]:
            changed = await (ops.pause(queue) if paused else ops.resume(queue))
            return changed, await ops.paused()

        changed, now = _with_ops(app, "could not change the paused queues", act)
        if as_json:
            _emit({"queue": queue, "paused": paused, "changed": changed, "all_paused": sorted(now)})
            return
        state = "paused" if paused else "resumed"
        click.echo(f"{queue}: {state}" if changed else f"{queue}: already {state}")

    command.__doc__ = ("Stop workers taking from --queue (enqueue still works)." if paused
                       else "Let workers take from --queue again.")
    command.help = command.__doc__
    return command


def register(group: click.Group) -> None:
    for command in (tasks, inspect, events, retry, replay, purge_dead, cancel,
                    _pause_command(True), _pause_command(False)):
        group.add_command(command)


