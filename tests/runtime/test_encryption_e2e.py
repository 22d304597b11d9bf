"""Payload encryption end to end on the real Redis (broker and results): a
producer runtime and a separate worker runtime, each with its own keys, and a
real worker consuming. What Redis holds never shows the arguments; rotation
keeps old messages readable; a removed key, a tampered body and an old worker
each dead-letter the message with a reason and the worker keeps serving.

Until ``Runtime(encryption_keys=, encryption_key_id=)`` lands in runtime/app.py,
each runtime gets its encrypting codec by assignment (``rt.codec = ...``),
which is all the Runtime argument does.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from brokers.base import Envelope
from runtime import Runtime, TaskDeadLettered, run
from runtime.codec import Codec
from runtime.messages import TaskMessage
from tests.conftest import REDIS_URL
from tests.runtime.helpers import LIMIT, dead_letters, purged
from tests.unit import encryption_old_codec

pytestmark = pytest.mark.redis

OLD = os.urandom(32)
NEW = os.urandom(32)
SECRET = "iban-DE89370400440532013000"


class App:
    """One runtime with the two tasks, and what ran on it."""

    def __init__(self, rt: Runtime, mask: Any, length: Any, ran: list[str]) -> None:
        self.rt, self.mask, self.length, self.ran = rt, mask, length, ran


def _runtime(namespace: str, keys: dict[str, bytes] | None, kid: str | None = None,
             **codec: Any) -> App:
    rt = Runtime(broker=REDIS_URL, namespace=namespace)
    if keys is not None:
        rt.codec = Codec(encryption_keys=keys, encryption_key_id=kid, **codec)
    ran: list[str] = []

    @rt.task(name="pay.mask")
    async def mask(account: str) -> str:
        ran.append(account)
        return account[:4] + "*" * (len(account) - 4)

    @rt.task(name="pay.length")
    async def length(masked: str) -> int:
        return len(masked)

    return App(rt, mask, length, ran)


def _message(task_id: str, account: str) -> TaskMessage:
    return TaskMessage(id=task_id, task="pay.mask", args=[account])




async def _queued_entries(namespace: str) -> bytes:
    """Every field of every entry in the default queue's streams, as Redis holds them
    (the key layout of brokers/redis/keys.py)."""
    client = aioredis.from_url(REDIS_URL)
    out = bytearray()
    try:
        for band in range(10):
            for _, fields in await client.xrange(f"{namespace}:{{default}}:p{band}"):
                for name, value in fields.items():
                    out += name + b"=" + value + b"\n"
    finally:
        await client.aclose()
    return bytes(out)


async def test_round_trip_and_redis_never_holds_the_arguments(namespace: str) -> None:
    producer = _runtime(namespace, {"k1": OLD})
    worker = _runtime(namespace, {"k1": OLD})
    async with purged(worker.rt):
        with anyio.fail_after(LIMIT):
            async with producer.rt:
                handle = await producer.rt.enqueue(producer.mask.s(SECRET))
                raw = await _queued_entries(namespace)  # queued, no worker yet
                assert b"aesgcm" in raw and handle.id.encode() in raw
                assert SECRET.encode() not in raw and b"pay.mask" not in raw
                async with worker.rt, worker.rt.worker():
                    assert await handle.result() == "iban" + "*" * (len(SECRET) - 4)
                    # the next step, sent by the worker, travels encrypted too
                    assert await run(producer.mask.s(SECRET) | producer.length.s()) == len(SECRET)
    assert worker.ran == [SECRET, SECRET]


async def test_rotation_old_key_id_is_read_while_configured(namespace: str) -> None:
    producer = _runtime(namespace, {"k1": OLD})  # not rotated yet
    worker = _runtime(namespace, {"k1": OLD, "k2": NEW}, "k2")
    new_only = _runtime(namespace, {"k2": NEW})
    async with purged(worker.rt):
        with anyio.fail_after(LIMIT):
            async with producer.rt, worker.rt, worker.rt.worker():
                assert await run(producer.mask.s(SECRET) | producer.length.s()) == len(SECRET)
    assert worker.ran == [SECRET]
    body, headers = worker.rt.codec.encode(_message("t", SECRET))  # what the worker sends
    assert headers["ekid"] == "k2"
    assert new_only.rt.codec.decode(body, headers).args == [SECRET]


async def test_a_removed_key_dead_letters_with_bad_encryption_and_the_worker_goes_on(
        namespace: str) -> None:
    producer = _runtime(namespace, {"k1": OLD})
    worker = _runtime(namespace, {"k2": NEW})
    async with purged(worker.rt):
        with anyio.fail_after(LIMIT):
            async with producer.rt, worker.rt, worker.rt.worker() as w:
                lost = await producer.rt.enqueue(producer.mask.s(SECRET))
                await w.idle()
                assert await dead_letters(worker.rt) == [(lost.id, "bad_encryption")]
                assert worker.ran == []  # never run with garbage
                assert await run(worker.mask.s("ok-account")) == "ok-a******"


async def test_a_tampered_body_dead_letters_with_bad_encryption(namespace: str) -> None:
    worker = _runtime(namespace, {"k1": OLD})
    async with purged(worker.rt):
        with anyio.fail_after(LIMIT):
            async with worker.rt, worker.rt.worker() as w:
                body, headers = worker.rt.codec.encode(_message("tampered", SECRET))
                body = body[:-1] + bytes([body[-1] ^ 0x80])  # the tag's last byte
                await worker.rt.broker.publish(Envelope(id="tampered", queue="default",
                                                        body=body, headers=headers))
                await w.idle()
                assert await dead_letters(worker.rt) == [("tampered", "bad_encryption")]
                assert worker.ran == []
                assert await run(worker.mask.s("still-up")) == "stil****"


async def test_a_worker_from_before_encryption_dead_letters_it_and_never_runs_it(
        namespace: str) -> None:
    producer = _runtime(namespace, {"k1": OLD}, compress_over=0)
    old = _runtime(namespace, None)
    old.rt.codec = encryption_old_codec.Codec()  # type: ignore[assignment]
    async with purged(old.rt):
        with anyio.fail_after(LIMIT):
            async with producer.rt, old.rt, old.rt.worker() as w:
                handle = await producer.rt.enqueue(producer.mask.s(SECRET))
                await w.idle()
                assert await dead_letters(old.rt) == [(handle.id, "decode_error")]
                assert old.ran == []


async def test_a_removed_key_reaches_a_signed_caller_as_task_dead_lettered(
        namespace: str) -> None:
    signing = {"s1": b"signing-key-for-the-e2e-test-0001"}
    producer = _runtime(namespace, {"k1": OLD}, signing_keys=signing)
    worker = _runtime(namespace, {"k2": NEW}, signing_keys=signing)
    try:
        with anyio.fail_after(LIMIT):
            async with purged(worker.rt), producer.rt, worker.rt, worker.rt.worker():
                await run(producer.mask.s(SECRET), timeout=600)  # far past LIMIT: at once or fail
    except TaskDeadLettered as e:
        caught = e
    else:
        raise AssertionError("run() of a message whose key was removed returned")
    assert caught.reason == "bad_encryption"
    assert "'k1' is not configured" in str(caught) and SECRET not in str(caught)
    assert worker.ran == []
