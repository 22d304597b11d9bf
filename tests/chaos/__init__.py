"""The chaos soak (issue 19 item 6, RELIABILITY.md row H)::

    python -m tests.chaos --minutes 30 --broker redis|amqp [--fault-every 60] [--rate 500]

Starts its own servers (a redis-server; for ``amqp`` also a RabbitMQ node), puts a
nemesis proxy between the worker processes and each server (broker and result
store), runs ``--workers`` CLI worker processes of ``tests.chaos.app:rt``
(respawned when they die), and drives a steady mixed load (no-op, sleep, small
CPU, two-step chains, and a few tasks dead-lettered by design) for ``--minutes``.
Every ``--fault-every`` seconds it injects one fault drawn from: worker SIGKILL,
broker kill -9 and restart, broker proxy reset, broker proxy blackhole,
result-store proxy reset. Then it stops the load, drains, and prints the
ledger's verdict: lost, duplicated (and overlapping), stuck, dead-lettered by
design, p99 latency per minute. The exit code is 1 when lost > 0 or stuck > 0.

For each lost id it also prints what the ledger knows (its ENQ_SENT / ENQ_INDET /
ENQ_OK records, refused duplicates included, and worker records, in seconds
since the soak's start), the nearest fault before and after it, and what the
servers still held for it, read before they stop (result record, reservation or
``ended`` marker; stream, pending, delayed or dead entry): ``tests/chaos/evidence.py``.
The workdir (ledger, server data with the Redis AOF, worker logs, and
``evidence.txt``) is removed only when the verdict passes; otherwise it is kept
and its path printed. ``--keep DIR`` runs in DIR and never removes it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.to_thread
import structlog

from runtime import Runtime, Signature, chain
from tests.chaos.app import CPU, HEAD, NOOP, REJECT, SLEEP, TAIL, build
from tests.chaos.evidence import explain, probe
from tests.faults.harness import (
    Producer,
    RabbitNode,
    RedisServer,
    WorkerPool,
    wait_for_ledger,
    wait_queue_settled,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, check
from tests.faults.nemesis import TcpProxy

__all__ = ["FAULTS", "Verdict", "main", "soak"]

log = structlog.get_logger("tests.chaos")

QUEUE = "default"
FAULTS = ("worker_kill", "broker_kill", "proxy_reset", "proxy_blackhole", "results_reset")
#: How long a proxy fault lasts.
RESET_S = 5.0
BLACKHOLE_S = 10.0
#: AMQP options of the soak (quorum queues, explicit delivery limit: RabbitMQ 3.10
#: has none by default; consumer_timeout as in the test node's rabbitmq.conf).
AMQP_OPTIONS = {"queue_type": "quorum", "delivery_limit": 5, "consumer_timeout_s": 60,
                "publish_timeout_s": 10}


@dataclass
class Verdict:
    broker: str
    minutes: float
    enqueued: int
    lost: int
    stuck: int
    duplicated: int
    overlapping: int
    unexpected: int
    dead_by_design: int
    dead_false: int
    indeterminate: int
    faults: list[tuple[float, str]]
    p99_ms_per_minute: list[float | None]
    rate_per_s: float
    lost_ids: list[str] = field(default_factory=list)
    #: confirmed only as duplicates the runtime refused: nothing was published
    refused_ids: list[str] = field(default_factory=list)
    #: per lost id: ledger records, nearest faults, what the servers held
    evidence: list[str] = field(default_factory=list)
    #: the kept workdir (None when it was removed)
    workdir: str | None = None

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.stuck == 0

    def text(self) -> str:
        faults = Counter(name for _, name in self.faults)
        p99 = ", ".join("-" if v is None else f"{v:.0f}" for v in self.p99_ms_per_minute)
        return "\n".join([
            f"chaos soak: broker={self.broker} minutes={self.minutes:g} "
            f"achieved={self.rate_per_s:.0f} tasks/s",
            f"faults ({len(self.faults)}): "
            + ", ".join(f"{k}={v}" for k, v in sorted(faults.items())),
            f"enqueued (confirmed): {self.enqueued}   indeterminate publishes: "
            f"{self.indeterminate}",
            f"lost: {self.lost} {self.lost_ids[:10]}",
            f"refused as duplicates (nothing published): {len(self.refused_ids)} "
            f"{self.refused_ids[:10]}",
            f"stuck: {self.stuck}",
            f"duplicated: {self.duplicated} (overlapping: {self.overlapping})",
            f"unexpected: {self.unexpected}",
            f"dead-lettered by design: {self.dead_by_design}   not by design: {self.dead_false}",
            f"p99 latency per minute (ms, enqueue -> end): [{p99}]",
            *self.evidence,
            *([f"workdir kept: {self.workdir}"] if self.workdir else []),
            f"verdict: {'PASS' if self.ok else 'FAIL'}",
        ])


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


def latency_per_minute(view: LedgerView, t0: float, minutes: int) -> list[float | None]:
    sent = {r["id"]: r["t"] for r in view.by_kind["ENQ_SENT"]}
    ended: dict[str, float] = {}
    for r in view.by_kind["END"]:
        if r.get("ok") and r["id"] not in ended:
            ended[r["id"]] = r["t"]
    buckets: dict[int, list[float]] = defaultdict(list)
    for key, t in sent.items():
        if key in ended:
            buckets[int((t - t0) // 60)].append((ended[key] - t) * 1000)
    return [_p99(buckets.get(m, [])) for m in range(max(minutes, 1))]


class _Mix:
    """The load: mostly no-ops, then sleeps, small CPU, chains, and 0.5 % rejects."""

    def __init__(self, rt: Runtime, rng: random.Random) -> None:
        self.rt = rt
        self.rng = rng
        self.rejects: set[str] = set()

    def __call__(self, i: int, lane: int) -> tuple[str, Signature[Any] | Any]:
        key = f"c{lane}-{i}"
        roll = self.rng.random()
        rt = self.rt
        if roll < 0.005:
            self.rejects.add(key)
            return key, rt.signature(REJECT, key)
        if roll < 0.6:
            return key, rt.signature(NOOP, key)
        if roll < 0.8:
            return key, rt.signature(SLEEP, key, self.rng.uniform(0.01, 0.2))
        if roll < 0.9:
            return key, rt.signature(CPU, key, 2000.0)
        return key, chain(rt.signature(HEAD, key), rt.signature(TAIL))


async def soak(*, minutes: float, broker: str, fault_every: float = 60.0, rate: float = 500.0,
               workers: int = 2, concurrency: int = 32, lanes: int = 16, seed: int | None = None,
               workdir: Path | None = None, drain_s: float = 300.0,
               report: Callable[[str], None] = lambda _: None) -> Verdict:
    """Run the soak; returns the verdict (see the module docstring)."""
    if broker not in ("redis", "amqp"):
        raise ValueError(f"unknown broker {broker!r}: use redis or amqp")
    rng = random.Random(seed)
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="taskloom-chaos-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(root / "ledger")
    namespace = f"chaos{rng.randrange(16**6):06x}"
    # appendfsync always: under everysec Redis may answer a write before it is in
    # the AOF while an earlier fsync is still running (up to 2 s), so even a plain
    # kill -9 can lose a confirmed enqueue (RELIABILITY C3, measured by
    # tests/faults/test_server_rows_fsync.py); a soak that counts every loss runs
    # with the setting under which Redis promises none
    redis_server = RedisServer(root / "redis", appendfsync="always")
    node: RabbitNode | None = None
    faults: list[tuple[float, str]] = []
    passed = False
    try:
        redis_server.start()
        results_proxy = TcpProxy(target_port=redis_server.port).start()
        if broker == "amqp":
            node = RabbitNode(root / "rabbit")
            await anyio.to_thread.run_sync(node.start)
            broker_port = node.port
        else:
            broker_port = redis_server.port
        broker_proxy = TcpProxy(target_port=broker_port).start()
        results_direct = redis_server.url
        results_through = f"redis://127.0.0.1:{results_proxy.port}/0"
        if node is not None:
            query = urlencode(AMQP_OPTIONS)
            broker_direct = f"{node.url}?{query}"
            broker_through = f"amqp://guest:guest@127.0.0.1:{broker_proxy.port}/?{query}"
        else:
            broker_direct = redis_server.url
            broker_through = f"redis://127.0.0.1:{broker_proxy.port}/0"
        rt = build(broker_direct, results=results_direct, namespace=namespace)
        env = worker_env(broker=broker_through, results=results_through, namespace=namespace,
                         ledger=ledger)
        writer = ledger.writer("producer")
        producer = Producer(rt, writer, max_tries=120)
        mix = _Mix(rt, rng)
        duration = minutes * 60
        report(f"chaos: {broker} soak for {minutes:g} min, a fault every {fault_every:g} s, "
               f"target {rate:g} tasks/s, workdir {root}")
        async with rt, WorkerPool(env=env, log_dir=root / "logs", ledger=writer, count=workers,
                                  concurrency=concurrency, respawn=True,
                                  app="tests.chaos.app:rt") as pool:
            writer.write("SOAK_START")
            t0 = time.monotonic()
            end_at = t0 + duration

            async def lane(n: int) -> None:
                period = lanes / rate
                i = 0
                next_at = time.monotonic()
                while time.monotonic() < end_at:
                    key, sig = mix(i, n)
                    i += 1
                    await producer.enqueue(key, sig)
                    next_at += period
                    # pacing of the load (a schedule, not a wait for work)
                    await anyio.sleep(max(0.0, next_at - time.monotonic()))

            async def inject(name: str) -> None:
                writer.write("NEMESIS", what=name)
                log.info("chaos.fault", fault=name)
                if name == "worker_kill":
                    if pool.pids:
                        pool.kill(rng.choice(pool.pids))
                elif name == "broker_kill":
                    if node is not None:
                        await anyio.to_thread.run_sync(node.restart)
                    else:
                        await redis_server.arestart(kill=True, down_s=2.0)
                elif name == "proxy_reset":
                    broker_proxy.set_mode("reset")
                    await anyio.sleep(RESET_S)  # the fault's length
                    broker_proxy.set_mode("pass")
                elif name == "proxy_blackhole":
                    broker_proxy.set_mode("blackhole")
                    await anyio.sleep(BLACKHOLE_S)  # the fault's length
                    broker_proxy.set_mode("pass")
                elif name == "results_reset":
                    results_proxy.set_mode("reset")
                    await anyio.sleep(RESET_S)  # the fault's length
                    results_proxy.set_mode("pass")
                writer.write("HEAL", what=name)

            async def nemesis() -> None:
                k = 0
                while True:
                    k += 1
                    at = t0 + k * fault_every
                    if at >= end_at:
                        return
                    await anyio.sleep(max(0.0, at - time.monotonic()))  # the fault schedule
                    # each kind once before any repeats, then at random
                    name = FAULTS[k - 1] if k <= len(FAULTS) else rng.choice(FAULTS)
                    faults.append((time.monotonic() - t0, name))
                    report(f"chaos: t={time.monotonic() - t0:.0f}s fault {name}")
                    await inject(name)

            async with anyio.create_task_group() as tg:
                tg.start_soon(nemesis)
                for n in range(lanes):
                    tg.start_soon(lane, n)
            load_s = time.monotonic() - t0
            report(f"chaos: load over after {load_s:.0f}s ({producer.ok} confirmed), draining")

            def all_settled(view: LedgerView) -> bool:
                return view.ids("ENQ_OK") - mix.rejects <= view.done()

            try:
                await wait_for_ledger(ledger, all_settled, timeout=drain_s,
                                      what="every confirmed task to end ok")
            except AssertionError as e:
                report(f"chaos: drain incomplete: {str(e).splitlines()[0]}")
            stuck = 0
            try:
                await wait_queue_settled(rt, QUEUE, timeout=60)
            except AssertionError:
                stats = await rt.broker.stats(QUEUE)
                stuck = stats.ready + stats.delayed + stats.in_flight
            for dead in await rt.broker.dead_letters(QUEUE, limit=100_000):
                writer.write("DLQ_SEEN", id=dead.envelope.id, reason=dead.reason)
        view = ledger.read()
        rep = check(view, designed_to_fail=mix.rejects)
        writer.close()
        # read before the servers stop (the finally below): what they still hold
        held = await probe(redis_server.url, namespace=namespace, queue=QUEUE, ids=rep.lost,
                           broker=broker)
        evidence = explain(view, rep.lost, t0=t0, servers=held)
        passed = not rep.lost and not stuck
        if not passed:
            (root / "evidence.txt").write_text("\n".join(evidence) + "\n")
        return Verdict(
            broker=broker, minutes=minutes, enqueued=rep.enqueued, lost=len(rep.lost),
            stuck=stuck, duplicated=len(rep.dup_exec), overlapping=len(rep.concurrent_dup),
            unexpected=len(rep.unexpected),
            dead_by_design=len(view.ids("DLQ_SEEN") & mix.rejects),
            dead_false=len(rep.dlq_false), indeterminate=len(rep.indeterminate), faults=faults,
            p99_ms_per_minute=latency_per_minute(view, t0, math.ceil(minutes)),
            rate_per_s=rep.enqueued / max(load_s, 1e-9), lost_ids=sorted(rep.lost),
            refused_ids=sorted(rep.refused), evidence=evidence,
            workdir=None if passed and own_dir else str(root))
    finally:
        for proxy_name in ("broker_proxy", "results_proxy"):
            proxy = locals().get(proxy_name)
            if isinstance(proxy, TcpProxy):
                proxy.close()
        if node is not None:
            node.close()
        redis_server.close()
        if own_dir and passed:
            shutil.rmtree(root, ignore_errors=True)
        elif own_dir:
            # a failed verdict (or a crash): the evidence stays
            report(f"chaos: workdir kept (verdict failed or the soak crashed): {root}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--broker", choices=("redis", "amqp"), required=True)
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--rate", type=float, default=500.0, help="target tasks/s (default 500)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this directory and keep it (ledger, logs, server data); "
                        "without it a temp dir is used, kept only when the verdict fails")
    parser.add_argument("--json", action="store_true", help="also print the verdict as JSON")
    args = parser.parse_args(argv)
    out = sys.stdout

    def report(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    verdict = anyio.run(lambda: soak(
        minutes=args.minutes, broker=args.broker, fault_every=args.fault_every, rate=args.rate,
        workers=args.workers, concurrency=args.concurrency, seed=args.seed, workdir=args.keep,
        report=report))
    report(verdict.text())
    if args.json:
        report(json.dumps(verdict.__dict__, default=str))
    return 0 if verdict.ok else 1
