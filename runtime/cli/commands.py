"""The ``taskloom`` command's commands. Nothing imports this package.

An operational error (a server down or unreachable, an application that
cannot be imported, a bad URL) is one log line saying what failed and what to
do, never a traceback (``--log-level DEBUG`` adds it); the other commands
exit 1 on it.

Exit codes of ``taskloom worker`` (see also :mod:`runtime.process.serve`):

====  ==========================================================================
0     stopped cleanly: every worker process drained
1     startup or configuration error (bad APP or option, the app cannot load)
2     command-line usage error (click)
3     worker processes crash-looped: they kept dying before becoming ready
5     the broker or the result store cannot be reached (try again later; a
      supervisor restarts such a worker process with backoff)
130   forced stop: a second SIGTERM/SIGINT, or processes that outlived the grace
====  ==========================================================================
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
import structlog

from brokers.base import TaskloomError
from runtime.cli import common
from runtime.cli import dashboard as dashboard_cli
from runtime.errors import ConfigError
from runtime.logs import LOG_LOCALS_ENV, configure_logging
from runtime.process.loading import load_runtime as _load
from runtime.process.serve import EXIT_CONFIG, ParentLink, WorkerOptions

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["main"]

log = structlog.get_logger("taskloom.cli")


@click.group()
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of console text.")
@click.option("--log-locals", is_flag=True, envvar=LOG_LOCALS_ENV,
              help="Show local variables in logged tracebacks (debugging only: they hold "
                   f"message bodies, arguments, results and keys). Env: {LOG_LOCALS_ENV}=1.")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_json: bool, log_locals: bool) -> None:
    """taskloom: an asyncio-native task runtime."""
    ctx.obj = {"log_level": log_level, "log_json": log_json, "log_locals": log_locals}
    configure_logging(log_level, json=log_json, show_locals=log_locals)
    logging.getLogger("aiormq.connection").addFilter(common.DropTransportErrors())


@main.command()
@click.argument("app")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes. Above 1 (or with a recycling limit) a supervisor starts "
                   "them and restarts any that dies; 1 runs the worker in this process.")
@click.option("--queues", default=None, help="Comma-separated queues (default: all the app's).")
@click.option("--concurrency", default=100, show_default=True, type=click.IntRange(min=1),
              help="Tasks run at once per worker process.")
@click.option("--prefetch", default=None, type=click.IntRange(min=1),
              help="Deliveries held per process (default: the concurrency).")
@click.option("--shutdown-grace", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight tasks get to finish on SIGTERM.")
@click.option("--max-tasks-per-child", default=None, type=click.IntRange(min=1),
              help="Recycle a worker process (drain, replace) after this many tasks.")
@click.option("--max-memory-per-child", default=None, type=common.Size(),
              help="Recycle a worker process past this RSS, e.g. 512MiB.")
@click.option("--pool-size", default=None, type=click.IntRange(min=0),
              help="Processes per worker process for kind='process' tasks (default: the CPU "
                   "count divided by --processes, when the app has such tasks; 0: none).")
@click.option("--lag-threshold", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="Warn when an async task blocks the event loop longer (seconds; 0: off).")
@click.option("--heartbeat", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between liveness heartbeats (0: off).")
@click.option("--scheduler", "with_scheduler", is_flag=True,
              help="Also run a scheduler in each worker process (any number may; one leads).")
@click.option("--metrics-port", default=None, type=click.IntRange(1, 65535),
              help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (needs the "
                   "dashboard extra). With --processes N the supervisor serves the sum over "
                   "its worker processes on PORT; they serve none.")
@click.option("--child", is_flag=True, hidden=True,
              help="Run as a supervised child (internal).")
@click.pass_context
def worker(ctx: click.Context, app: str, processes: int, queues: str | None, concurrency: int,
           prefetch: int | None, shutdown_grace: float, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, pool_size: int | None, lag_threshold: float,
           heartbeat: float, with_scheduler: bool, metrics_port: int | None, child: bool) -> None:
    """Run workers for APP (module:runtime_attribute).

    \b
    Signals: SIGTERM or SIGINT drains (no new tasks; in-flight ones get
    --shutdown-grace seconds); a second one stops at once (SIGKILL to the
    worker processes; their unfinished tasks return to the broker).
    Exit codes: 0 clean, 1 startup/config error, 2 usage error,
    3 worker processes crash-looping, 5 broker or result store unreachable,
    130 forced stop.
    """
    from runtime.process.serve import serve_worker

    listener = dashboard_cli.metrics_listener() if metrics_port is not None else None
    opts = WorkerOptions(
        app=app, queues=common.queue_names(queues), concurrency=concurrency, prefetch=prefetch,
        shutdown_grace_s=shutdown_grace, pool_size=pool_size, max_tasks=max_tasks_per_child,
        max_memory_bytes=max_memory_per_child, lag_threshold_s=lag_threshold,
        heartbeat_s=heartbeat, scheduler=with_scheduler)
    if child:
        link = ParentLink.attach()
        try:
            rt = _load(app)
        except TaskloomError as e:  # a configuration error: the supervisor does not retry it
            link.send("fatal", error=str(e))
            common.fail("cannot load the application", e, app=app)
        run = _with_metrics(functools.partial(serve_worker, rt, opts, link=link), rt, listener,
                            metrics_port)
        sys.exit(_serve(run, link))
    if processes == 1 and max_tasks_per_child is None and max_memory_per_child is None:
        rt = common.load_runtime(app)
        run = _with_metrics(functools.partial(serve_worker, rt, opts), rt, listener, metrics_port)
        sys.exit(_serve(run, None))
    module_name, _, attr = app.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected module:attribute (e.g. app.tasks:rt), got {app!r}",
                                 param_hint="APP")
    from runtime.process.supervisor import Supervisor

    if pool_size is None:  # share the cores among the children's pools
        pool_size = max(1, (os.cpu_count() or 1) // processes)
    command = _child_command(ctx, app, queues=queues, concurrency=concurrency, prefetch=prefetch,
                             shutdown_grace=shutdown_grace, max_tasks=max_tasks_per_child,
                             max_memory=max_memory_per_child, pool_size=pool_size,
                             lag_threshold=lag_threshold, heartbeat=heartbeat,
                             scheduler=with_scheduler, metrics_port=metrics_port)
    supervisor = Supervisor(command, processes, shutdown_grace_s=shutdown_grace)
    sys.exit(anyio.run(supervisor.run, backend_options=common.event_loop_backend()))


def _with_metrics(run: Callable[[], Awaitable[int]], rt: Runtime, listener: Any,
                  port: int | None) -> Callable[[], Awaitable[int]]:
    """``run`` itself, or (with ``--metrics-port``) ``run`` beside a /metrics
    endpoint fed by ``listener``, added to the runtime's listeners before the
    worker opens it."""
    if listener is None or port is None:
        return run
    rt.listeners.append(listener)
    return functools.partial(dashboard_cli.serve_with_metrics, run, listener,
                             dashboard_cli.metrics_port_of(port))


def _serve(run: Callable[[], Awaitable[int]], link: ParentLink | None) -> int:
    """Run one worker process; startup errors become a log line and exit code 1."""
    try:
        return anyio.run(run, backend_options=common.event_loop_backend())
    except Exception as e:
        reported = common.operational(e)
        if reported is None:
            raise
        if link is not None and isinstance(reported, ConfigError):
            link.send("fatal", error=str(reported))
        log.debug("traceback of the error below", exc_info=e)
        log.error(f"{common.command_name()}: the worker could not start", error=common.describe(reported),
                  error_type=type(reported).__name__)
        return EXIT_CONFIG


def _child_command(ctx: click.Context, app: str, *, queues: str | None, concurrency: int,
                   prefetch: int | None, shutdown_grace: float, max_tasks: int | None,
                   max_memory: int | None, pool_size: int | None, lag_threshold: float,
                   heartbeat: float, scheduler: bool, metrics_port: int | None = None
                   ) -> list[str]:
    root = ctx.find_root().obj or {}
    cmd = [sys.executable, "-m", "runtime.cli", "--log-level", str(root.get("log_level", "INFO"))]
    if root.get("log_json"):
        cmd.append("--log-json")
    if root.get("log_locals"):
        cmd.append("--log-locals")
    cmd += ["worker", app, "--child", "--concurrency", str(concurrency),
            "--shutdown-grace", repr(shutdown_grace), "--lag-threshold", repr(lag_threshold),
            "--heartbeat", repr(heartbeat)]
    if scheduler:
        cmd.append("--scheduler")
    optional: Sequence[tuple[str, object]] = (
        ("--queues", queues), ("--prefetch", prefetch), ("--max-tasks-per-child", max_tasks),
        ("--max-memory-per-child", max_memory), ("--pool-size", pool_size),
        ("--metrics-port", metrics_port))
    for flag, value in optional:
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


# -- inspection and maintenance ----------------------------------------------------------


@main.command()
@click.argument("app")
@click.option("--queues", default=None, help="Comma-separated queues (default: all the app's).")
def status(app: str, queues: str | None) -> None:
    """Live workers of APP and the depths of its queues."""
    from rich.console import Console
    from rich.table import Table

    from runtime.process.liveness import store_for

    rt = common.load_runtime(app)
    names = list(common.queue_names(queues) or rt.registry.queues() or [rt.default_queue])

    async def gather() -> tuple[list[Any], list[Any]]:
        store = store_for(rt)
        try:
            async with rt.broker:
                stats = [(q, await rt.broker.stats(q)) for q in names]
            beats = await store.list()
        finally:
            await store.aclose()
        return beats, stats

    beats, stats = common.run("could not read the workers and queues", gather)
    console = Console()
    workers = Table(title=f"workers ({len(beats)} live)")
    for column in ("worker", "host", "pid", "queues", "in flight", "processed", "failed",
                   "lag ms", "up", "seen"):
        workers.add_column(column, justify="right" if column in (
            "pid", "in flight", "processed", "failed", "lag ms") else "left")
    for b in beats:
        workers.add_row(b.id, b.host, str(b.pid), ",".join(b.queues), str(b.in_flight),
                        str(b.processed), str(b.failed), f"{b.lag_ms:g}", common.age(b.started_ms),
                        f"{common.age(b.last_seen_ms)} ago")
    console.print(workers)
    if not beats and type(rt.broker).__name__ == "MemoryBroker":
        console.print("(the memory broker lives inside one process: no other process's "
                      "workers can be seen)")
    depths = Table(title="queues")
    for column in ("queue", "ready", "delayed", "in flight", "dead"):
        depths.add_column(column, justify="left" if column == "queue" else "right")
    for q, s in stats:
        depths.add_row(q, str(s.ready), str(s.delayed), str(s.in_flight), str(s.dead))
    console.print(depths)


@main.command()
@click.argument("app")
@click.option("--queue", "queue", required=True, help="The queue to empty.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(app: str, queue: str, yes: bool) -> None:
    """Drop every ready and delayed message of a queue of APP."""
    rt = common.load_runtime(app)
    if not yes:
        click.confirm(f"Drop every ready and delayed message of queue {queue!r}?", abort=True)

    async def run() -> int:
        async with rt.broker:
            return await rt.broker.purge(queue)

    dropped = common.run(f"could not purge queue {queue!r}", run)
    click.echo(f"purged {dropped} message(s) from {queue}")


@main.command()
@click.argument("app")
@click.option("--queue", "queue", required=True, help="The queue whose dead letters to list.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
def dlq(app: str, queue: str, limit: int) -> None:
    """List the dead letters of a queue of APP, with why each was dead-lettered."""
    from rich.console import Console
    from rich.table import Table

    rt = common.load_runtime(app)

    async def run() -> list[Any]:
        async with rt.broker:
            return await rt.broker.dead_letters(queue, limit=limit)

    letters = common.run(f"could not read the dead letters of queue {queue!r}", run)
    table = Table(title=f"dead letters of {queue} ({len(letters)} shown)")
    for column in ("message id", "task", "reason", "deliveries", "args"):
        table.add_column(column)
    for letter in letters:
        env = letter.envelope
        try:
            msg = rt.codec.decode(env.body, env.headers)
            task, args = msg.task, repr((msg.args, msg.kwargs))
        except Exception as e:  # undecodable: that may be why it is here
            task, args = "?", f"<{type(e).__name__}>"
        table.add_row(env.id, task, letter.reason, str(letter.delivery_count),
                      args if len(args) <= 60 else args[:57] + "...")
    Console().print(table)


@main.command()
@click.option("--broker", default="memory://", show_default=True,
              help="Run the pipeline through this broker (e.g. redis://localhost:6379/0); "
                   "the worker stays in this process.")
def demo(broker: str) -> None:
    """Run a small pipeline on the embedded default and show what happened."""
    from runtime.cli.demo import run_demo

    configure_logging("ERROR")
    common.run("the demo failed", functools.partial(run_demo, click.echo, broker))


def _bench_command() -> click.Command | None:
    """``taskloom bench`` (benchmarks/cli.py) when this runtime runs from a checkout
    of the repository; None from an installed wheel, which has no benchmarks/."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "cli.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.append(str(root))
    command: click.Command = importlib.import_module("benchmarks.cli").bench
    return command


_bench = _bench_command()
if _bench is not None:
    main.add_command(_bench)
