"""Dead-letter operations on the real RabbitMQ: tasks that fail for real are dead-lettered,
listed (reason, task name, id), replayed one by one (the new attempt runs and succeeds),
purged by filter; what is not chosen stays in the dead-letter queue, in order. Every
walk of a dead-letter queue holds its lock, so a listing running beside a removal sees
all or nothing of what is removed, never a part."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import aio_pika
import anyio
import pytest

from brokers.amqp import AmqpBroker
from brokers.amqp.deadletters import LOCK_WAIT_S, _locked
from brokers.amqp.topology import Queue
from brokers.base import ConnectionLost, Envelope
from runtime import Runtime
from runtime.ops.api import Operations
from runtime.ops.deadletters import admin_for
from runtime.ops.verbs import retry_id
from tests.amqp.conftest import MakeBroker, amqp_url, running_proxy
from tests.amqp.test_quorum import next_message_of

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
        first = order.pop(0)  # retry by id takes the same way
        assert (await ops.retry(first, queue="dq")).retried
        assert _ids(await rt.broker.dead_letters("dq")) == order
        await _drain(rt)
        assert await rt.handle(retry_id(first)).result(timeout=LIMIT) == 2 * int(
            rt.codec.decode(by_id[first].envelope.body, by_id[first].envelope.headers).args[0])


async def test_removal_by_key_is_exact_and_idempotent(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    await broker.declare("cp")
    for body in (b"a", b"same", b"same", b"b"):  # two identical copies share one key
        await raw.default_exchange.publish(
            aio_pika.Message(body, message_id="m-" + body.decode(),
                             headers={"x-taskloom-reason": "rejected"}),
            routing_key=f"{namespace}.cp.dlq")
    entries = await broker.dead_letter_entries("cp")
    assert [e.letter.envelope.id for e in entries] == ["m-a", "m-same", "m-same", "m-b"]
    a, same, _, b = (e.key for e in entries)
    assert entries[2].key == same and len({a, same, b}) == 3
    assert await broker.remove_dead_letters("cp", [same, b]) == 2  # one key: one copy
    assert [e.key for e in await broker.dead_letter_entries("cp")] == [a, same]
    # a key given more often than there are copies removes those there are; unknown: none
    assert await broker.remove_dead_letters("cp", [same, same, "nope#0"]) == 1
    assert [e.key for e in await broker.dead_letter_entries("cp")] == [a]
    assert await broker.remove_dead_letters("cp", [same]) == 0  # idempotent
    assert await broker.remove_dead_letters("missing-queue", ["x#1"]) == 0
    assert await broker.dead_letter_entries("missing-queue") == []


async def test_a_listing_beside_a_removal_sees_all_or_nothing(make_broker: MakeBroker) -> None:
    broker = await make_broker()
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


async def test_letters_dead_lettered_by_rabbitmq_are_dated_and_removable(
    make_broker: MakeBroker, namespace: str
) -> None:
    broker = await make_broker(queue_type="quorum", delivery_limit=1)
    before_ms = int(time.time() * 1000)
    await broker.publish(Envelope(id="poison", queue="qj", body=b"x"))
    for _ in range(2):  # each consumer dies holding it (as a crashing worker would)
        async with broker.consume(["qj"], prefetch=1) as consumer:
            with anyio.fail_after(LIMIT):
                await consumer.receive()
    with anyio.fail_after(LIMIT):
        await next_message_of(f"{namespace}.qj.dlq")
    [entry] = await broker.dead_letter_entries("qj")
    assert (entry.letter.envelope.id, entry.letter.reason) == ("poison", "delivery_limit")
    # x-death's time has whole seconds; a wide window: only "when" is checked, not speed
    assert entry.at_ms is not None and before_ms - 2000 <= entry.at_ms <= time.time() * 1000
    assert await broker.remove_dead_letters("qj", [entry.key]) == 1
    assert await broker.dead_letter_entries("qj") == []


class _CrashBeforeRemoval(AmqpBroker):
    """Dies (as a process killed there would) after the replay's publish was confirmed
    and before its dead letter is removed."""

    crash = True

    async def remove_dead_letters(self, queue: str, keys: Sequence[str]) -> int:
        if self.crash:
            raise ConnectionLost("killed between the confirmed publish and the removal")
        return await super().remove_dead_letters(queue, keys)


async def test_a_crash_between_publish_and_removal_duplicates_never_loses(
    namespace: str
) -> None:
    broker = _CrashBeforeRemoval.from_url(amqp_url(), namespace=namespace)
    rt = Runtime(broker, results="memory://", namespace=namespace)

    @rt.task(name="dlq.once", queue="cr")
    async def once(x: int) -> int:
        if broken["on"]:
            raise ValueError(x)
        return x + 1

    broken["on"] = True
    try:
        async with rt, Operations(rt) as ops:
            h = await rt.enqueue(rt.signature("dlq.once", 1))
            with anyio.fail_after(LIMIT):
                async with rt.worker(queues=["cr"], concurrency=1) as w:
                    await w.idle()
            with pytest.raises(ConnectionLost):
                await ops.replay("cr", ids=[h.id])
            # the new attempt is stored and the dead letter is still there
            assert (await rt.broker.stats("cr")).ready == 1
            assert _ids(await rt.broker.dead_letters("cr")) == [h.id]
            broker.crash = False  # "restarted": removal works again
            broken["on"] = False
            again = await ops.replay("cr", ids=[h.id])
            assert (again.matched, again.done) == (1, 1)
            assert (await rt.broker.stats("cr")).ready == 2  # a duplicate, of the same id
            with anyio.fail_after(LIMIT):
                async with rt.worker(queues=["cr"], concurrency=1) as w:
                    await w.idle()
            assert await rt.handle(retry_id(h.id)).result(timeout=LIMIT) == 2
            assert await rt.broker.dead_letters("cr") == []
    finally:
        async with rt:
            await broker.purge_namespace()


async def test_the_lock_passes_on_at_once_when_its_holder_dies(make_broker: MakeBroker,
                                                                 namespace: str) -> None:
    reader = await make_broker()  # its clean-up removes the queues, the lock's too
    async with running_proxy() as proxy, AmqpBroker.from_url(
            amqp_url(netloc=f"127.0.0.1:{proxy.port}"), namespace=namespace) as holder:
        async with reader.consume(["lk"], prefetch=1) as consumer:
            await reader.publish(Envelope(id="d1", queue="lk", body=b"x"))
            with anyio.fail_after(LIMIT):
                await (await consumer.receive()).dead_letter("rejected")
        letters: list[list[str]] = []

        async def listing() -> None:
            letters.append(_ids(await reader.dead_letters("lk")))

        # LIMIT is below LOCK_WAIT_S: only the holder's death can let the reader in
        assert LIMIT < LOCK_WAIT_S
        async with _locked(holder, holder._queue("lk")):
            with anyio.fail_after(LIMIT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listing)
                    while (lock := await _lock_state(namespace))[0] < 2:  # the reader is in line
                        await anyio.sleep(0.02)
                    # a second token (the reader saw none ready) waits for it: not delivered
                    # while the holder is the active consumer, so the reader has not read
                    assert lock == (2, 1) and letters == []
                    await proxy.reset()  # the holder's connection dies (a crash)
        assert letters == [["d1"]]


async def _lock_state(namespace: str) -> tuple[int, int]:
    """Consumers and ready tokens of the dead-letter lock of queue ``lk``."""
    async with await aio_pika.connect(amqp_url()) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{namespace}.lk.dlq.lock", passive=True)
        ok = queue.declaration_result
        return int(ok.consumer_count or 0), int(ok.message_count or 0)


def test_the_lock_queue_name_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Queue("ns.", "jobs.dlq.lock")
    assert Queue("ns.", "jobs").dlq_lock == "ns.jobs.dlq.lock"
