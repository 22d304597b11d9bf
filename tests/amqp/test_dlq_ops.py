"""Dead-letter operations on the real RabbitMQ: tasks that fail for real are dead-lettered,
listed (reason, task name, id), replayed one by one (the new attempt runs and succeeds),
purged by filter; what is not chosen stays in the dead-letter queue, in order. Every
walk of a dead-letter queue holds its lock, so a listing running beside a removal sees
all or nothing of what is removed, never a part."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from brokers.amqp import AmqpBroker
from brokers.base import Envelope
from runtime import Runtime
from runtime.ops.api import Operations
from runtime.ops.deadletters import admin_for
from runtime.ops.verbs import retry_id
from tests.amqp.conftest import amqp_url

pytestmark = pytest.mark.amqp

LIMIT = 30.0  # generous: a loaded 2-core machine; the work itself takes milliseconds

broken = {"on": True}


@pytest.fixture
async def rt(namespace: str) -> AsyncIterator[Runtime]:
    runtime = Runtime(amqp_url(), results="memory://", namespace=namespace)

    @runtime.task(name="dlq.flaky", queue="dq")
    async def flaky(x: int) -> int:
        if broken["on"]:
            raise ValueError(f"broken for {x}")
        return x * 2

    @runtime.task(name="dlq.other", queue="dq")
    async def other(x: int) -> int:
        raise KeyError(x)

    broken["on"] = True
    try:
        yield runtime
    finally:
        async with runtime:
            await runtime.broker.purge_namespace()  # type: ignore[attr-defined]


async def _drain(rt: Runtime) -> None:
    with anyio.fail_after(LIMIT):
        async with rt.worker(queues=["dq"], concurrency=1) as w:
            await w.idle()


def _ids(letters: list[object]) -> list[str]:
    return [d.envelope.id for d in letters]  # type: ignore[attr-defined]


async def test_list_replay_one_and_purge_by_filter(rt: Runtime) -> None:
    async with rt, Operations(rt) as ops:
        flaky = [await rt.enqueue(rt.signature("dlq.flaky", i)) for i in range(3)]
        other = await rt.enqueue(rt.signature("dlq.other", 7))
        await rt.broker.publish(Envelope(id="junk-1", queue="dq", body=b"not a task"))
        await _drain(rt)

        letters = await rt.broker.dead_letters("dq")
        order = _ids(letters)
        assert sorted(order) == sorted([h.id for h in flaky] + [other.id, "junk-1"])
        by_id = {d.envelope.id: d for d in letters}
        assert {by_id[h.id].reason for h in flaky} == {"failed"}
        assert by_id["junk-1"].reason == "decode_error"
        entries = await admin_for(rt.broker).entries("dq")
        assert [e.letter.envelope.id for e in entries] == order
        assert all(e.at_ms is not None for e in entries)  # since/until filters work
        env = by_id[other.id].envelope
        assert rt.codec.decode(env.body, env.headers).task == "dlq.other"

        dry = await ops.replay("dq", name="dlq.flaky", dry_run=True)
        assert (dry.matched, dry.done) == (3, 0)
        assert _ids(await rt.broker.dead_letters("dq")) == order  # a dry run changes nothing

        broken["on"] = False
        chosen = flaky[1].id
        done = await ops.replay("dq", ids=[chosen])
        assert (done.matched, done.done) == (1, 1)
        order.remove(chosen)
        assert _ids(await rt.broker.dead_letters("dq")) == order  # the rest, in order
        await _drain(rt)
        assert await rt.handle(retry_id(chosen)).result(timeout=LIMIT) == 2
        again = await ops.replay("dq", ids=[chosen])  # idempotent: nothing left to replay
        assert (again.matched, again.done) == (0, 0)

        purged = await ops.purge_dead("dq", reason="decode_error")
        assert (purged.matched, purged.done) == (1, 1)
        order.remove("junk-1")
        assert _ids(await rt.broker.dead_letters("dq")) == order
        purged = await ops.purge_dead("dq", name="dlq.other")
        assert (purged.matched, purged.done) == (1, 1)
        order.remove(other.id)
        left = await rt.broker.dead_letters("dq")
        assert _ids(left) == order and {d.reason for d in left} == {"failed"}
        assert (await ops.purge_dead("dq", name="dlq.other")).done == 0
        assert (await rt.broker.stats("dq")).dead == 2


async def test_removal_by_key_is_exact_and_idempotent(make_broker: object) -> None:
    broker: AmqpBroker = await make_broker()  # type: ignore[operator]
    async with broker.consume(["cp"], prefetch=10) as consumer:
        for body in (b"a", b"same", b"same", b"b"):
            await broker.publish(Envelope(id="m-" + body.decode(), queue="cp", body=body))
        with anyio.fail_after(LIMIT):
            for _ in range(4):
                await (await consumer.receive()).dead_letter("rejected")
    entries = await broker.dead_letter_entries("cp")
    assert [e.letter.envelope.id for e in entries] == ["m-a", "m-same", "m-same", "m-b"]
    assert entries[1].key != entries[2].key  # two copies dead-lettered at other times
    assert await broker.remove_dead_letters("cp", [entries[2].key]) == 1
    left = await broker.dead_letter_entries("cp")
    assert [e.key for e in left] == [entries[0].key, entries[1].key, entries[3].key]
    # a key given twice removes at most as many copies as there are; unknown: nothing
    assert await broker.remove_dead_letters(
        "cp", [entries[1].key, entries[1].key, entries[2].key, "nope#0"]) == 1
    assert [e.letter.envelope.id for e in await broker.dead_letter_entries("cp")] == [
        "m-a", "m-b"]
    assert await broker.remove_dead_letters("missing-queue", ["x#1"]) == 0
    assert await broker.dead_letter_entries("missing-queue") == []


async def test_a_listing_beside_a_removal_sees_all_or_nothing(make_broker: object) -> None:
    broker: AmqpBroker = await make_broker()  # type: ignore[operator]
    n = 200
    await broker.declare("cc")
    async with broker.consume(["cc"], prefetch=50) as consumer:
        await broker.publish_many([Envelope(id=f"m{i:03d}", queue="cc", body=b"x")
                                   for i in range(n)])
        with anyio.fail_after(LIMIT):
            for _ in range(n):
                await (await consumer.receive()).dead_letter("rejected")
    entries = await broker.dead_letter_entries("cc")
    every = [e.letter.envelope.id for e in entries]
    assert len(every) == n
    doomed = [e.key for e in entries[n // 2:]]  # the newest half: a removal walks it all
    seen: list[list[str]] = []
    removed: list[int] = []

    async def listing() -> None:
        seen.append([d.envelope.id for d in await broker.dead_letters("cc", limit=n)])

    async def removal() -> None:
        removed.append(await broker.remove_dead_letters("cc", doomed))

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listing)
            tg.start_soon(removal)
            for _ in range(3):
                tg.start_soon(listing)
    assert removed == [n // 2]
    for ids in seen:  # each listing ran wholly before or wholly after the removal
        assert ids in (every, every[:n // 2]), (len(ids), ids[:3])
    assert [d.envelope.id for d in await broker.dead_letters("cc", limit=n)] == every[:n // 2]
