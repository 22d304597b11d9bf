"""What the chaos soak prints of a lost task (tests/chaos/evidence.py): the
ledger's enqueue records, the nearest faults, and what the servers still held.

The ledger part needs no server (a synthetic ledger); the probe reads a real
Redis (the shared one, under a namespace of its own).
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from brokers.redis.keys import Queue
from runtime import Result, State
from tests.chaos.app import NOOP, build
from tests.chaos.evidence import Fault, explain, faults_of, probe
from tests.conftest import REDIS_URL
from tests.faults.ledger import LedgerView

T0 = 5000.0
LOST = "c14-18026"


def _ledger(*, refused: bool = False) -> LedgerView:
    def rec(kind: str, t: float, **fields: object) -> dict[str, object]:
        return {"k": kind, "pid": 7, "t": T0 + t, **fields}

    ok = rec("ENQ_OK", 63.0, id=LOST, dup=True) if refused else rec("ENQ_OK", 63.0, id=LOST)
    return LedgerView([
        rec("SOAK_START", 0.0),
        rec("NEMESIS", 10.0, what="worker_kill"), rec("HEAL", 10.0, what="worker_kill"),
        rec("NEMESIS", 60.0, what="broker_kill"), rec("HEAL", 62.5, what="broker_kill"),
        rec("NEMESIS", 120.0, what="proxy_reset"), rec("HEAL", 125.0, what="proxy_reset"),
        rec("NEMESIS", 180.0, what="results_reset"), rec("HEAL", 185.0, what="results_reset"),
        rec("ENQ_SENT", 61.0, id=LOST),
        rec("ENQ_INDET", 61.25, id=LOST, err="BrokerConnectionError: reset", attempt=1),
        ok,
        # an id whose name LOST starts with, done: not part of the evidence
        rec("ENQ_SENT", 61.0, id="c14-1802"), rec("ENQ_OK", 61.1, id="c14-1802"),
        rec("START", 64.0, id="c14-1802", x="a"), rec("END", 64.1, id="c14-1802", x="a", ok=True),
    ])


def test_a_lost_id_names_its_enqueue_records_and_the_nearest_faults() -> None:
    view = _ledger()
    lines = explain(view, [LOST], t0=T0, servers={LOST: "store: no result record"})
    text = "\n".join(lines)
    assert lines[0] == f"lost {LOST}: sent at t=61.000s", text
    assert "  fault before: broker_kill at t=60.000s-62.500s (1.000s before)" in lines, text
    assert "  fault after: proxy_reset at t=120.000s-125.000s (59.000s after)" in lines, text
    assert "  ENQ_SENT t=61.000s pid=7" in lines, text
    assert ("  ENQ_INDET t=61.250s pid=7 err=BrokerConnectionError: reset attempt=1"
            in lines), text
    assert "  ENQ_OK t=63.000s pid=7" in lines, text
    assert "  servers: store: no result record" in lines, text
    assert "c14-1802 " not in text and "x=a" not in text, text


def test_a_refused_id_says_nothing_was_published() -> None:
    lines = explain(_ledger(refused=True), [LOST], t0=T0)
    assert "REFUSED as a duplicate" in lines[0], lines
    assert "  ENQ_OK t=63.000s pid=7 dup=True" in lines, lines


def test_faults_given_by_the_soak_override_the_ledger() -> None:
    view = _ledger()
    assert [f.name for f in faults_of(view, T0)] == [
        "worker_kill", "broker_kill", "proxy_reset", "results_reset"]
    lines = explain(view, [LOST], t0=T0, faults=[Fault("proxy_blackhole", 70.0)])
    assert "  fault before: none" in lines, lines
    assert "  fault after: proxy_blackhole at t=70.000s (9.000s after)" in lines, lines


@pytest.mark.redis
async def test_probe_tells_a_reservation_and_a_pending_entry_from_nothing(
        namespace: str) -> None:
    rt = build(REDIS_URL, results=REDIS_URL, namespace=namespace)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with rt:
            await rt.enqueue(rt.signature(NOOP, "p1-1"), task_id="p1-1")
            await rt.enqueue(rt.signature(NOOP, "p1-2"), task_id="p1-2")
            await rt.results.put(Result(id="p1-3", state=State.SUCCESS))
        lengths = {k: await client.xlen(k) for k in Queue(f"{namespace}:", "default").streams}
        (stream,) = [k for k, n in lengths.items() if n]  # one priority: one stream
        # deliver the oldest entry (p1-1) to a consumer that never acks it (the
        # group is made by a worker's consumer; none runs here)
        await client.xgroup_create(stream, "taskloom", id="0")
        await client.xreadgroup("taskloom", "probe-test", {stream: ">"}, count=1)
        held = await probe(REDIS_URL, namespace=namespace, queue="default",
                           ids=["p1-1", "p1-2", "p1-3", "p1-10"], broker="redis")
    finally:
        # COUNT 10 000: the SCAN walks the whole shared keyspace (over a million
        # keys left by other runs); redis-py's default COUNT (10) made that one
        # round trip per 10 keys, minutes under load, past the test timeout
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=10_000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()
    assert "a reservation (PENDING" in held["p1-1"], held
    assert "pending entry (delivered, unacked)" in held["p1-1"], held
    assert "stream entry (not delivered)" in held["p1-2"], held
    assert held["p1-3"].startswith("store: a terminal result record state=SUCCESS, an ended "
                                   "marker; broker: nothing"), held
    assert held["p1-10"] == ("store: no result record, no ended marker; broker: nothing "
                             "(no stream, pending, delayed or dead entry)"), held
