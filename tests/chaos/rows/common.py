"""What rows H1 and H2 share: private servers, the pre-queued backlog, the
drain with RSS samples, and the settle check (stuck, dead letters)."""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import anyio
import anyio.to_thread
import psutil
import redis

from brokers.base import BrokerError
from runtime import Runtime
from tests.chaos import AMQP_OPTIONS
from tests.chaos.rows.app import NOOP, build
from tests.chaos.rows.tally import LedgerTail, Tally, crosscheck, key
from tests.faults.harness import (
    RabbitNode,
    RedisServer,
    WorkerPool,
    wait_queue_settled,
    wait_until,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerWriter

__all__ = ["MIB", "QUEUE", "SAMPLE_S", "Drained", "Setup", "drain", "prequeue", "rss", "servers",
           "settle", "verdict",
           "warm_up"]

QUEUE = "default"
MIB = 1024 * 1024
#: RSS samples: every 5 s (RELIABILITY.md row H2)
SAMPLE_S = 5.0
Report = Callable[[str], None]


@dataclass
class Setup:
    broker: str
    root: Path
    ledger: Ledger
    writer: LedgerWriter
    redis_server: RedisServer
    node: RabbitNode | None
    rt: Runtime
    env: dict[str, str]
    namespace: str
    tail: LedgerTail
    tally: Tally = field(default_factory=Tally)
    passed: bool = False

    def pool(self, *, workers: int, concurrency: int, prefetch: int | None) -> WorkerPool:
        """``taskloom worker tests.chaos.rows.app:rt`` processes, as the soak starts them."""
        return WorkerPool(env=self.env, log_dir=self.root / "logs", ledger=self.writer,
                          count=workers, concurrency=concurrency, prefetch=prefetch,
                          app="tests.chaos.rows.app:rt")


@contextlib.asynccontextmanager
async def servers(broker: str, *, queue_type: str, workdir: Path | None,
                  report: Report) -> AsyncIterator[Setup]:
    """A private redis-server (and RabbitMQ node for ``amqp``) in a temp dir,
    stopped by pid at the end; the dir is removed when ``setup.passed``."""
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="taskloom-rows-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(root / "ledger")
    namespace = f"rows{random.randrange(16**6):06x}"
    redis_server = RedisServer(root / "redis")
    node: RabbitNode | None = None
    setup: Setup | None = None
    try:
        redis_server.start()
        broker_url = redis_server.url
        if broker == "amqp":
            node = RabbitNode(root / "rabbit")
            await anyio.to_thread.run_sync(node.start)
            options = {**AMQP_OPTIONS, "queue_type": queue_type}
            if queue_type != "quorum":
                options.pop("delivery_limit")  # a quorum queue option only
            broker_url = f"{node.url}?{urlencode(options)}"
        rt = build(broker_url, results=redis_server.url, namespace=namespace)
        env = worker_env(broker=broker_url, results=redis_server.url, namespace=namespace,
                         ledger=ledger)
        setup = Setup(broker=broker, root=root, ledger=ledger, writer=ledger.writer("producer"),
                      redis_server=redis_server, node=node, rt=rt, env=env,
                      namespace=namespace, tail=LedgerTail(ledger.dir))
        report(f"rows: broker {broker_url.split('?')[0]}"
               f"{f' ({queue_type} queue)' if node else ''}, results {redis_server.url}, "
               f"workdir {root}")
        async with rt:
            yield setup
    finally:
        if setup is not None:
            setup.writer.close()
        if node is not None:
            node.close()
        redis_server.close()
        if own_dir and setup is not None and setup.passed:
            shutil.rmtree(root, ignore_errors=True)
        elif own_dir:
            report(f"rows: workdir kept (verdict failed or the run crashed): {root}")


def rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (0 once it is gone)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in (proc, *proc.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


async def _queues(node: RabbitNode, namespace: str) -> list[list[str]]:
    """The row's queues: name, type, messages, memory (bytes)."""
    out = await node.actl("list_queues", "-q", "name", "type", "messages", "memory")
    return [parts for parts in (line.split("\t") for line in out.splitlines())
            if len(parts) == 4 and parts[0].startswith(namespace) and parts[2].isdigit()
            and parts[3].isdigit()]


async def server_memory(setup: Setup, *, expect: int) -> str:
    """Redis ``used_memory``; for RabbitMQ the row's queues (messages, memory)
    from ``rabbitmqctl list_queues`` and the node's RSS, once the main queue's
    count shows ``expect`` messages (the node publishes queue stats every 5 s)."""
    def used_memory() -> int:
        client = redis.Redis(port=setup.redis_server.port)
        try:
            return int(client.info("memory")["used_memory"])
        finally:
            client.close()

    lines = [f"redis used_memory: {await anyio.to_thread.run_sync(used_memory) / MIB:.1f} MiB"
             + (" (result store)" if setup.node else "")]
    if setup.node is not None:
        node, main = setup.node, f"{setup.namespace}.{QUEUE}"
        rows: list[list[str]] = []

        async def probe() -> bool:
            rows[:] = await _queues(node, setup.namespace)
            return any(r[0] == main and int(r[2]) == expect for r in rows)

        try:
            await wait_until(probe, timeout=30, interval=1.0,
                             what=f"list_queues to show {expect} messages in {main}")
        except AssertionError:
            lines.append(f"(list_queues did not show {expect} messages in {main} within 30 s: "
                         "the last stats follow)")
        for name, kind, messages, memory in sorted(rows):
            lines.append(f"rabbitmq queue {name} ({kind}): {messages} messages, "
                         f"memory {int(memory) / MIB:.1f} MiB")
        if setup.node.beam_pid is not None:
            lines.append(f"rabbitmq node RSS (beam.smp): {rss(setup.node.beam_pid) / MIB:.1f} MiB")
    return "\n".join(lines)


async def prequeue(setup: Setup, *, lo: int, n: int, payload: str, batch: int,
                   report: Report) -> tuple[float, int]:
    """Enqueue ids ``lo .. lo+n-1`` with ``enqueue_many`` in batches, before any
    worker runs, with ENQ_SENT/ENQ_OK per id; the producer's RSS is sampled every
    5 s. A batch that raises is recorded ENQ_INDET and sent again (no faults are
    injected: any such retry is reported). Returns (seconds, peak RSS bytes)."""
    rt, writer, me = setup.rt, setup.writer, psutil.Process()
    peak = me.memory_info().rss
    t_start = time.monotonic()
    done = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            await anyio.sleep(SAMPLE_S)  # the sampling schedule
            peak = max(peak, me.memory_info().rss)
            report(f"  queued {done}/{n}  producer RSS {me.memory_info().rss / MIB:.1f} MiB "
                   f"(peak {peak / MIB:.1f})  {done / (time.monotonic() - t_start):.0f}/s")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        for first in range(lo, lo + n, batch):
            keys = [key(i) for i in range(first, min(first + batch, lo + n))]
            for k in keys:
                writer.write("ENQ_SENT", id=k)
            for attempt in range(1, 11):
                try:
                    await rt.enqueue_many([rt.signature(NOOP, k, payload) for k in keys])
                    break
                except BrokerError as e:
                    for k in keys:
                        writer.write("ENQ_INDET", id=k, err=f"{type(e).__name__}: {e}"[:300],
                                     attempt=attempt)
                    await anyio.sleep(min(0.1 * 2**attempt, 2.0))  # the retry policy
            else:
                raise RuntimeError(f"a batch from {keys[0]} failed 10 times in a row")
            for k in keys:
                writer.write("ENQ_OK", id=k)
            done += len(keys)
        tg.cancel_scope.cancel()
    peak = max(peak, me.memory_info().rss)
    return time.monotonic() - t_start, peak


async def warm_up(setup: Setup, pool: WorkerPool, *, lo: int, timeout: float = 120.0,
                  batch: int = 20) -> int:
    """Until every worker process ran a task: ``batch`` tasks from id ``lo`` every
    0.2 s, then until they all ended. Returns the next free id. (A load started
    with the workers still importing measures their startup as latency.)"""
    rt, tally, i = setup.rt, setup.tally, lo
    with anyio.fail_after(timeout):
        while True:
            keys = [key(j) for j in range(i, i + batch)]
            i += batch
            for k in keys:
                setup.writer.write("ENQ_SENT", id=k)
            await rt.enqueue_many([rt.signature(NOOP, k, "") for k in keys])
            for k in keys:
                setup.writer.write("ENQ_OK", id=k)
            tally.update(setup.tail)
            if set(pool.pids) <= tally.start_pids:
                break
            await anyio.sleep(0.2)  # the warm-up's pace (a schedule, not a wait for work)

    async def probe() -> bool:
        tally.update(setup.tail)
        return tally.settled(lo, i)

    await wait_until(probe, timeout=timeout, what="the warm-up tasks to end")
    return i


@dataclass
class Drained:
    seconds: float  # first START -> last END ok
    with_startup_s: float  # workers spawned -> last END ok
    rate: float
    worker_peaks: dict[int, int]


async def drain(setup: Setup, pool: WorkerPool, *, lo: int, hi: int, t_spawn: float,
                timeout: float, report: Report, progress_every: int = 6) -> Drained:
    """Until every confirmed id in [lo, hi) ended (tailing the ledger), sampling
    each worker's RSS every 5 s; a progress line every ``progress_every`` samples."""
    peaks: dict[int, int] = {}
    tally, n = setup.tally, hi - lo
    samples = 0

    async def sample() -> None:
        nonlocal samples
        while True:
            for pid in pool.pids:
                peaks[pid] = max(peaks.get(pid, 0), rss(pid))
            samples += 1
            if samples % progress_every == 0:
                report(f"  drained {tally.done[lo:hi].count(1)}/{n}  worker RSS "
                       + ", ".join(f"{pid}: {rss(pid) / MIB:.1f} MiB" for pid in pool.pids))
            await anyio.sleep(SAMPLE_S)  # the sampling schedule

    async def probe() -> bool:
        tally.update(setup.tail)
        return len(tally) >= hi and tally.settled(lo, hi)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        try:
            await wait_until(probe, timeout=timeout, interval=0.5,
                             what=f"ids {lo}..{hi - 1} to end ok")
        finally:
            tg.cancel_scope.cancel()
    for pid in pool.pids:
        peaks[pid] = max(peaks.get(pid, 0), rss(pid))
    first, last = tally.span(lo, hi)
    seconds = last - first
    return Drained(seconds=seconds, with_startup_s=last - t_spawn,
                   rate=n / seconds if seconds > 0 else math.inf, worker_peaks=peaks)


async def settle(setup: Setup, *, timeout: float = 60.0) -> tuple[int, int]:
    """(stuck, dead-lettered): the queue's ready + delayed + unacked once it
    should be empty, and its dead letters (each written DLQ_SEEN)."""
    stuck = 0
    try:
        await wait_queue_settled(setup.rt, QUEUE, timeout=timeout)
    except AssertionError:
        stats = await setup.rt.broker.stats(QUEUE)
        stuck = stats.ready + stats.delayed + stats.in_flight
    dead = await setup.rt.broker.dead_letters(QUEUE, limit=100_000)
    for d in dead:
        try:  # the row's key is the task's first argument
            task_key = str(setup.rt.codec.decode(d.envelope.body, d.envelope.headers).args[0])
        except Exception:  # an undecodable dead letter: counted as foreign (unexpected)
            task_key = d.envelope.id
        setup.writer.write("DLQ_SEEN", id=task_key, reason=d.reason)
    setup.tally.update(setup.tail)
    return stuck, len(dead)


#: runs up to this many tasks also run the shared checker on the whole ledger
CROSSCHECK_MAX = 100_000


def verdict(setup: Setup, *, stuck: int, dead: int) -> tuple[list[str], bool]:
    """The ledger's verdict lines, and whether nothing was lost, duplicated,
    unexpected, stuck or dead-lettered (no task of these rows may fail)."""
    t = setup.tally
    lost, dup, unexpected = t.lost(), t.duplicated(), t.unexpected()
    lines = [
        f"enqueued (confirmed): {t.ok_count}   indeterminate publishes: {t.indeterminate}",
        f"lost: {len(lost)} {[key(i) for i in lost[:10]]}",
        f"duplicated executions: {len(dup)} {[key(i) for i in dup[:10]]}",
        f"unexpected (run, never sent): {len(unexpected)} {unexpected[:10]}",
        f"stuck: {stuck}",
        f"dead-lettered: {dead}",
    ]
    if t.ok_count <= CROSSCHECK_MAX:
        lines.append(crosscheck(setup.ledger, t))
    ok = not (lost or dup or unexpected or stuck or dead)
    return lines, ok
