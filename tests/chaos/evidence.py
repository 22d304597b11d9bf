"""What the chaos soak keeps of a lost task: the ledger's records of it, the
faults around it, and what the servers still held for it.

:func:`explain` is pure (a ledger view in, lines out); :func:`probe` reads the
result store and, for the Redis transport, the broker's keys of the queue, and
must run before the soak stops its servers. A lost id then says which story
it belongs to: a confirmed XADD the broker lost (Redis ``kill -9`` under
``appendfsync everysec``: no stream entry, no result, the reservation gone
with it or still there), or a producer refused by a stale reservation
(``ENQ_OK dup``: nothing was ever published).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from brokers.redis.keys import BANDS, Queue, decode
from runtime.results.base import reservation
from tests.faults.ledger import LedgerView

__all__ = ["Fault", "explain", "faults_of", "probe"]

#: ledger kinds shown for a lost id, in this order of interest
_PRODUCER = ("ENQ_SENT", "ENQ_INDET", "ENQ_OK")
_WORKER = ("HEAD", "START", "END")
#: the consumer group of the Redis broker (brokers/redis/options.py default)
_GROUP = "taskloom"


@dataclass(frozen=True)
class Fault:
    """One injected fault, in seconds since the soak's start."""

    name: str
    at: float
    healed: float | None = None

    def text(self) -> str:
        span = "" if self.healed is None else f"-{self.healed:.3f}s"
        return f"{self.name} at t={self.at:.3f}s{span}"


def faults_of(view: LedgerView, t0: float) -> list[Fault]:
    """The faults from the ledger's NEMESIS/HEAL records, each with its heal."""
    heals = sorted((r["t"], r["what"]) for r in view.by_kind["HEAL"])
    out: list[Fault] = []
    for r in sorted(view.by_kind["NEMESIS"], key=lambda r: r["t"]):
        healed = next((t for t, what in heals if what == r["what"] and t >= r["t"]), None)
        out.append(Fault(r["what"], r["t"] - t0, None if healed is None else healed - t0))
    return out


def soak_start(view: LedgerView) -> float | None:
    """The monotonic time of the soak's SOAK_START record, if written."""
    starts = view.by_kind["SOAK_START"]
    return starts[0]["t"] if starts else None


def _record(r: dict[str, Any], t0: float) -> str:
    extra = {k: v for k, v in r.items() if k not in ("k", "id", "t", "pid")}
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"{r['k']} t={r['t'] - t0:.3f}s pid={r['pid']}" + (f" {more}" if more else "")


def _nearest(faults: Sequence[Fault], at: float) -> tuple[Fault | None, Fault | None]:
    before = [f for f in faults if f.at <= at]
    after = [f for f in faults if f.at > at]
    return (before[-1] if before else None), (after[0] if after else None)


def explain(view: LedgerView, lost: Iterable[str], *, t0: float,
            faults: Sequence[Fault] | None = None,
            servers: dict[str, str] | None = None) -> list[str]:
    """Lines naming, for each lost id, its ledger records (times since ``t0``),
    the nearest fault before and after its first ENQ_SENT, and ``servers[id]``
    (what :func:`probe` found) when given."""
    faults = faults_of(view, t0) if faults is None else sorted(faults, key=lambda f: f.at)
    mine: dict[str, list[dict[str, Any]]] = {}
    ids = sorted(lost)
    wanted = set(ids)
    for kind in (*_PRODUCER, *_WORKER):
        for r in view.by_kind[kind]:
            if r.get("id") in wanted:
                mine.setdefault(r["id"], []).append(r)
    lines: list[str] = []
    for task_id in ids:
        records = sorted(mine.get(task_id, []), key=lambda r: r["t"])
        sent = [r["t"] for r in records if r["k"] == "ENQ_SENT"]
        at = (sent[0] if sent else records[0]["t"] if records else t0) - t0
        before, after = _nearest(faults, at)
        refused = any(r["k"] == "ENQ_OK" and r.get("dup") for r in records)
        lines.append(f"lost {task_id}: sent at t={at:.3f}s"
                     + ("; REFUSED as a duplicate (nothing published)" if refused else ""))
        lines.append(f"  fault before: {before.text() if before else 'none'}"
                     + (f" ({at - before.at:.3f}s before)" if before else ""))
        lines.append(f"  fault after: {after.text() if after else 'none'}"
                     + (f" ({after.at - at:.3f}s after)" if after else ""))
        lines.extend(f"  {_record(r, t0)}" for r in records)
        if not records:
            lines.append("  no ledger record of this id")
        if servers is not None:
            lines.append(f"  servers: {servers.get(task_id, 'not probed')}")
    return lines


# -- the servers, before they stop ---------------------------------------------------


async def _store(client: aioredis.Redis, ns: str, task_id: str) -> str:
    raw: bytes | None = await client.get(f"{ns}:result:{{{task_id}}}")
    marker = await client.exists(f"{ns}:ended:{{{task_id}}}")
    if raw is None:
        held = "no result record"
    elif raw == reservation(task_id):
        ttl = await client.pttl(f"{ns}:result:{{{task_id}}}")
        held = f"a reservation (PENDING from reserving.py, pttl {ttl} ms)"
    else:
        held = f"a {'terminal' if raw[:1] == b'T' else 'non-terminal'} result record{_state(raw)}"
    return f"store: {held}, {'an' if marker else 'no'} ended marker"


def _state(raw: bytes) -> str:
    # read generically (not via the store's decoder, whose signature moves): the
    # record is a msgpack map with a "state" field unless it is sealed
    try:
        record = msgspec.msgpack.decode(raw[1:])
    except msgspec.DecodeError:
        return f" ({len(raw)} bytes, not plain msgpack: sealed?)"
    return f" state={record.get('state')}" if isinstance(record, dict) else ""


def _mentions(body: bytes, task_id: str, env_id: str) -> bool:
    # the msgpack form of the id (length prefix included): "c1-1" never matches "c1-10"
    return env_id == task_id or msgspec.msgpack.encode(task_id) in body


async def _broker(client: aioredis.Redis, ns: str, queue: str, ids: set[str]
                  ) -> dict[str, list[str]]:
    """Where the Redis broker still holds each id: stream entry (pending or
    not), delayed-set member, dead-letter entry."""
    q = Queue(f"{ns}:", queue)
    found: dict[str, list[str]] = {i: [] for i in ids}
    for band in range(BANDS):
        key = q.streams[band]
        pending: set[bytes] = set()
        if await client.exists(key):
            try:
                rows = await client.xpending_range(key, _GROUP, min="-", max="+", count=100_000)
            except aioredis.ResponseError:
                rows = []  # no group yet
            pending = {r["message_id"] for r in rows}
        for entry_id, fields in await client.xrange(key):
            env = decode(fields[b"e"])
            for task_id in ids:
                if _mentions(env.body, task_id, env.id):
                    where = "pending entry (delivered, unacked)" if entry_id in pending \
                        else "stream entry (not delivered)"
                    found[task_id].append(f"{where} {key} {entry_id.decode()} as {env.id}")
    for member, score in await client.zrange(q.delayed, 0, -1, withscores=True):
        env = decode(member.split(b":", 1)[1])
        for task_id in ids:
            if _mentions(env.body, task_id, env.id):
                found[task_id].append(f"delayed-set member due {score:.0f} as {env.id}")
    for entry_id, fields in await client.xrange(q.dead):
        env = decode(fields[b"e"])
        for task_id in ids:
            if _mentions(env.body, task_id, env.id):
                found[task_id].append(f"dead-letter entry {entry_id.decode()} "
                                      f"reason={fields.get(b'r', b'?').decode()}")
    return found


async def probe(redis_url: str, *, namespace: str, queue: str, ids: Iterable[str],
                broker: str) -> dict[str, str]:
    """For each id, one line: what the result store holds and (Redis transport)
    whether the broker still has it. Never raises: a failed read is reported."""
    wanted = set(ids)
    if not wanted:
        return {}
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        stores = {i: await _store(client, namespace, i) for i in sorted(wanted)}
        if broker == "redis":
            held = await _broker(client, namespace, queue, wanted)
            where = {i: "; ".join(held[i]) or "nothing (no stream, pending, delayed or dead "
                     "entry)" for i in wanted}
        else:
            where = {i: "not inspected (a RabbitMQ queue cannot be read without consuming it)"
                     for i in wanted}
        return {i: f"{stores[i]}; broker: {where[i]}" for i in wanted}
    except Exception as e:  # evidence, not a verdict: say what failed
        return {i: f"probe failed: {type(e).__name__}: {e}" for i in wanted}
    finally:
        await client.aclose()
