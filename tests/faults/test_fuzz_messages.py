"""Hostile bytes (issue 19 item 5, RELIABILITY.md D4/D5/D6): Hypothesis writes random
and mutated message bodies and headers straight into a Redis stream and a RabbitMQ
queue, past the runtime's publisher; a real worker (embedded, same process)
consumes them.

For every batch: each message ends dead-lettered with a reason (or, when the
mutation left a valid task message, executed), the worker never dies, the queue
never blocks (a good task enqueued after the batch completes and the queue
settles to empty), and the process's memory stays bounded.

Each test uses its own namespace on the shared servers and removes it after.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec
import psutil
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import brokers
from brokers.base import Envelope
from brokers.redis.keys import Queue
from runtime import Runtime
from tests.conftest import AMQP_URL, REDIS_URL
from tests.faults.harness import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(300)]

QUEUE = "default"
SINK = "fuzz.sink"
#: Batches per transport: bounded so each test stays well under a minute here.
EXAMPLES = 40
#: RSS growth allowed over the whole test (generous: allocator noise, Hypothesis's
#: own bookkeeping); an unbounded buffer of hostile messages would pass it quickly.
RSS_BOUND = 256 * 1024 * 1024
#: A batch settles within this (2 shared cores; normally well under a second).
SETTLE_S = 60

_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])


def build(broker: Any, namespace: str, executed: list[str]) -> Runtime:
    rt = Runtime(broker=broker, results=REDIS_URL, namespace=namespace)

    @rt.task(name=SINK)
    async def sink(key: str) -> str:
        executed.append(key)
        return key

    return rt


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Byte edits: (position, op, value) with op 0 flip, 1 delete, 2 insert, 3 truncate."""
    out = bytearray(data)
    for pos, op, value in edits:
        if not out:
            out.append(value)
            continue
        i = pos % len(out)
        if op == 0:
            out[i] ^= value or 1
        elif op == 1:
            del out[i]
        elif op == 2:
            out.insert(i, value)
        else:
            del out[i:]
    return bytes(out)


edits_st = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.integers(0, 255)),
                    min_size=1, max_size=6)
text_st = st.text(max_size=40)


async def template_body(namespace: str) -> bytes:
    """The body of a real ``fuzz.sink`` task message, as the runtime publishes it
    (read back raw from a stream nobody consumes)."""
    tpl = f"{namespace}tpl"
    rt = build(brokers.from_url(REDIS_URL, namespace=tpl), tpl, [])
    async with rt:
        await rt.enqueue(rt.signature(SINK, "template"), task_id="template")
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            [(_, fields)] = await client.xrange(Queue(f"{tpl}:", QUEUE).streams[0])
        finally:
            await client.aclose()
        await rt.broker.purge_namespace()  # type: ignore[attr-defined]
    return msgspec.msgpack.decode(fields[b"e"], type=Envelope).body


@asynccontextmanager
async def worker_of(rt: Runtime, executed: list[str]) -> AsyncIterator[Callable[[int], Any]]:
    """The runtime with an embedded worker; yields ``settle(sent)``: waits until
    ``sent`` more fuzz messages than before ended dead-lettered or executed, a good
    task enqueued after them ran, and the queue holds nothing."""
    counted = [0]
    good = [0]

    async def settle(sent: int) -> None:
        good[0] += 1
        key = f"good-{good[0]}"
        with anyio.fail_after(SETTLE_S):
            assert await rt.run(rt.signature(SINK, key), timeout=SETTLE_S) == key
        want = counted[0] + sent
        last: list[Any] = []

        async def probe() -> bool:
            dead = len(await rt.broker.dead_letters(QUEUE, limit=100_000))
            ran = sum(1 for k in executed if not k.startswith("good-"))
            stats = await rt.broker.stats(QUEUE)
            last[:] = [dead, ran, stats]
            return dead + ran >= want and not (stats.ready or stats.in_flight or stats.delayed)

        await wait_until(probe, timeout=SETTLE_S, what=f"{want} fuzz messages settled",
                         describe=lambda: f"(dead, executed, stats) = {last}")
        dead, ran, _ = last
        assert dead + ran == want, last
        counted[0] = want

    async with rt, rt.worker(concurrency=8):
        yield settle


def rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


# -- Redis ------------------------------------------------------------------------------


_MSGPACK_MAPS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_not_e = st.binary(min_size=1, max_size=8).filter(lambda k: k != b"e")
#: Entries the broker hands over as a taskloom envelope (or none): what is
#: hostile is the task body, the headers, the count field, the missing envelope.
redis_body_st = st.one_of(
    # random bytes where the envelope should be, not a msgpack map, plus extra fields
    st.builds(lambda e, extra: ("raw", {b"e": e, **extra}),
              st.binary(max_size=4096).filter(lambda b: not b or b[0] not in _MSGPACK_MAPS),
              st.dictionaries(_not_e, st.binary(max_size=64), max_size=3)),
    # no envelope at all
    st.builds(lambda f: ("raw", f), st.dictionaries(_not_e, st.binary(max_size=64),
                                                    min_size=1, max_size=3)),
    # a valid envelope around a mutated task body, random headers and count field
    st.builds(lambda edits, headers, n: ("body", edits, headers, n), edits_st,
              st.dictionaries(text_st, text_st, max_size=4),
              st.one_of(st.none(), st.binary(max_size=12))),
)
#: The envelope itself mutated (its msgpack bytes edited) and random maps.
redis_envelope_st = st.one_of(
    st.builds(lambda edits: ("envelope", edits), edits_st),
    st.builds(lambda e: ("raw", {b"e": e}), st.binary(min_size=1, max_size=512).map(
        lambda b: bytes([0x80 | (b[0] & 0x0F)]) + b[1:])),
)
#: ``envelopes`` found that an envelope string field that is not UTF-8 raised a
#: UnicodeDecodeError out of the Redis consumer and killed the worker; it is now a
#: ``malformed_entry`` dead letter.


@pytest.mark.redis
@pytest.mark.parametrize("entries", [
    pytest.param(redis_body_st, id="bodies"),
    pytest.param(redis_envelope_st, id="envelopes"),
])
async def test_hostile_stream_entries_are_dead_lettered_and_the_worker_carries_on(
    namespace: str, entries: st.SearchStrategy[Any],
) -> None:
    body = await template_body(namespace)
    executed: list[str] = []
    rt = build(brokers.from_url(REDIS_URL, namespace=namespace), namespace, executed)
    stream = Queue(f"{namespace}:", QUEUE).streams[0]
    client = aioredis.Redis.from_url(REDIS_URL)
    serial = [0]
    try:
        async with worker_of(rt, executed) as settle:
            await settle(0)  # the group exists, the worker consumes
            base = rss()

            async def write(batch: list[Any]) -> None:
                for item in batch:
                    serial[0] += 1
                    mid = f"fz-{serial[0]}"
                    if item[0] == "raw":
                        fields = item[1]
                    elif item[0] == "body":
                        _, edits, headers, n = item
                        env = Envelope(id=mid, queue=QUEUE, body=mutate(body, edits),
                                       headers=headers)
                        fields = {b"e": msgspec.msgpack.encode(env)}
                        if n is not None:
                            fields[b"n"] = n
                    else:
                        env = Envelope(id=mid, queue=QUEUE, body=body)
                        fields = {b"e": mutate(msgspec.msgpack.encode(env), item[1])}
                    await client.xadd(stream, fields)  # type: ignore[arg-type]
                await settle(len(batch))

            @_SETTINGS
            @given(st.lists(entries, min_size=1, max_size=25))
            def fuzz(batch: list[Any]) -> None:
                anyio.from_thread.run(write, batch)

            await anyio.to_thread.run_sync(fuzz)
            grown = rss() - base
            assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB over the fuzz run"
        assert serial[0] >= EXAMPLES
    finally:
        async with rt:
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
        await client.aclose()


# -- RabbitMQ ---------------------------------------------------------------------------


_INT64 = st.integers(-(2**63), 2**63 - 1)
#: What aio-pika (pamqp) can put in a header table. Not bytes (pamqp refuses them)
#: and only finite 32-bit floats: pamqp packs floats as 32-bit, and RabbitMQ 3.10
#: closes the *publisher's* connection with INTERNAL_ERROR on an infinite one
#: (the message never reaches a queue, so it is no input for the worker).
header_value_st = st.recursive(
    st.one_of(st.none(), st.booleans(), _INT64,
              st.floats(allow_nan=False, allow_infinity=False, width=32),
              st.text(max_size=60)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(min_size=1, max_size=10), inner, max_size=3)),
    max_leaves=6,
)
headers_st = st.dictionaries(
    st.one_of(st.text(min_size=1, max_size=20),
              st.sampled_from(["x-taskloom-delivered", "x-delivery-count", "x-death",
                               "x-taskloom-reason", "x-taskloom-signature"])),
    header_value_st, max_size=5)
amqp_message_st = st.tuples(
    st.one_of(st.builds(lambda b: ("raw", b), st.binary(max_size=4096)),
              st.builds(lambda e: ("body", e), edits_st)),
    headers_st,
    st.one_of(st.none(), st.text(max_size=40)),       # message_id
    st.one_of(st.none(), st.sampled_from(["application/msgpack", "application/json",
                                          "text/plain", ""])),
)


@pytest.mark.amqp
async def test_hostile_amqp_messages_are_dead_lettered_and_the_worker_carries_on(
    namespace: str,
) -> None:
    body = await template_body(namespace)
    executed: list[str] = []
    rt = build(brokers.from_url(AMQP_URL, namespace=namespace), namespace, executed)
    connection = await aio_pika.connect(AMQP_URL)
    serial = [0]
    try:
        channel = await connection.channel()
        async with worker_of(rt, executed) as settle:
            await settle(0)  # the queue is declared, the worker consumes
            base = rss()

            async def publish(batch: list[Any]) -> None:
                for (kind, data), headers, message_id, content_type in batch:
                    serial[0] += 1
                    payload = data if kind == "raw" else mutate(body, data)
                    await channel.default_exchange.publish(
                        aio_pika.Message(payload, headers=headers, message_id=message_id,
                                         content_type=content_type,
                                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=f"{namespace}.{QUEUE}")
                await settle(len(batch))

            @_SETTINGS
            @given(st.lists(amqp_message_st, min_size=1, max_size=25))
            def fuzz(batch: list[Any]) -> None:
                anyio.from_thread.run(publish, batch)

            await anyio.to_thread.run_sync(fuzz)
            grown = rss() - base
            assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB over the fuzz run"
        assert serial[0] >= EXAMPLES
    finally:
        await connection.close()
        async with rt:
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
