"""Rows H1 and H2 of the reliability plan as ledger runs (issue 19)::

    python -m tests.chaos.rows --row H1 --broker redis|amqp --minutes 10 --rate 1000 --workers 2 \
        [--find-max 100000] [--rate auto]
    python -m tests.chaos.rows --row H2 --broker redis|amqp --queued 1000000 --workers 2

Both start their own servers in a temp dir (a redis-server; for ``amqp`` also a
RabbitMQ node, quorum queues unless ``--queue-type classic``), never the shared
ones, and run ``--workers`` ``taskloom worker tests.chaos.rows.app:rt``
processes (``tests.faults.harness.WorkerPool``, as the chaos soak starts them).
Every task is a no-op whose body writes START/END to the ledger; the producer
writes ENQ_SENT/ENQ_OK around each publish.

H1 (sustained, no faults): ``--lanes`` paced producers enqueue at ``--rate``
tasks/s for ``--minutes``. Each minute: enqueued, completed, p50/p99 of
enqueue -> start (ENQ_SENT, written by the producer just before the publish,
to the START the task body writes; both CLOCK_MONOTONIC). ``--find-max N``
first queues N tasks before the workers start and times their drain (the max
rate); ``--rate auto`` then runs at half of it. Exit 1 when lost, duplicated,
unexpected, stuck or dead-lettered is not 0.

H2 (backlog): ``--queued`` tasks with a ``--payload-bytes`` (200) argument
are queued with ``enqueue_many`` before any worker starts, the producer's RSS
sampled every 5 s (target < 200 MiB); the server's memory is recorded (Redis
``used_memory``; RabbitMQ ``list_queues messages memory`` and the node's RSS);
then the workers drain it, each one's RSS sampled every 5 s (target < 150 MiB).
Prints the drain rate. Exit 1 when a target is missed or the ledger finds a
task lost, duplicated, unexpected, stuck or dead-lettered.

The workdir (ledger, server data, worker logs) is removed when the verdict
passes, kept otherwise; ``--keep DIR`` runs in DIR and never removes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.rows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", choices=("H1", "H2"), required=True)
    p.add_argument("--broker", choices=("redis", "amqp"), required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=100, help="per worker (default 100)")
    p.add_argument("--prefetch", type=int, default=None, help="per worker (default: the worker's)")
    p.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum",
                   help="RabbitMQ queue type (default quorum)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds (default: 600, or 1 s per 100 tasks queued if longer)")
    p.add_argument("--keep", type=Path, default=None,
                   help="run in this directory and keep it (default: a temp dir kept only "
                   "when the verdict fails)")
    h1 = p.add_argument_group("H1 (sustained)")
    h1.add_argument("--minutes", type=float, default=10.0)
    h1.add_argument("--rate", default="1000", help="tasks/s, or 'auto': half of --find-max's rate")
    h1.add_argument("--lanes", type=int, default=32, help="concurrent paced producers")
    h1.add_argument("--find-max", type=int, default=0, metavar="N",
                    help="first drain N pre-queued tasks and report the max rate")
    h1.add_argument("--task-ids", action="store_true",
                    help="enqueue with idempotent task ids (tests.faults.harness.Producer)")
    h2 = p.add_argument_group("H2 (backlog)")
    h2.add_argument("--queued", type=int, default=1_000_000)
    h2.add_argument("--payload-bytes", type=int, default=200)
    h2.add_argument("--batch", type=int, default=1000, help="enqueue_many batch size")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout

    def report(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    if args.rate != "auto":
        float(args.rate)  # a bad number fails here, before any server starts
    common = {"broker": args.broker, "workers": args.workers, "concurrency": args.concurrency,
              "prefetch": args.prefetch, "queue_type": args.queue_type, "workdir": args.keep,
              "report": report}
    if args.row == "H1":
        from tests.chaos.rows.sustained import sustained

        timeout = args.drain_timeout or max(600.0, args.find_max / 100)
        ok = anyio.run(lambda: sustained(
            minutes=args.minutes, rate=args.rate, lanes=args.lanes, find_max=args.find_max,
            task_ids=args.task_ids, drain_timeout=timeout, **common))
    else:
        from tests.chaos.rows.backlog import backlog

        timeout = args.drain_timeout or max(600.0, args.queued / 100)
        ok = anyio.run(lambda: backlog(
            queued=args.queued, payload_bytes=args.payload_bytes, batch=args.batch,
            drain_timeout=timeout, **common))
    return 0 if ok else 1
