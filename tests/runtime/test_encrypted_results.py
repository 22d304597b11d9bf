"""Encrypted results: with ``encryption_keys``, the value and error details of
each stored result (and each chord join value) are sealed with AES-256-GCM
under the current key, bound to the task id; readers with the key get them
back through ``run``, ``handle.result()`` and ``handle.info()``, a reader
without it gets ``SealedResultError`` naming the key id. On the memory store
and on the real Redis with a real worker."""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from runtime import Runtime, TaskError, run
from runtime.canvas import chord
from runtime.encryption import Keyring, SealedResultError
from runtime.messages import ErrorInfo, Result, State
from runtime.persist import StoreRetry
from runtime.results import MemoryResultStore
from runtime.results.base import SEALED
from tests.conftest import REDIS_URL
from tests.runtime.helpers import LIMIT, purged

K1 = os.urandom(32)
K2 = os.urandom(32)
SECRET = "iban-DE89370400440532013000"


def _app(rt: Runtime) -> dict[str, Any]:
    @rt.task(name="vault.reveal")
    async def reveal(n: int = 0) -> str:
        return f"{SECRET}-{n}"

    @rt.task(name="vault.leak")
    async def leak() -> str:
        raise ValueError(f"cannot pay {SECRET}")

    @rt.task(name="vault.count")
    async def count(values: list[str]) -> int:
        return sum(SECRET in v for v in values)

    return {"reveal": reveal, "leak": leak, "count": count}


# -- memory ---------------------------------------------------------------------------


async def test_memory_results_are_sealed_and_read_back() -> None:
    rt = Runtime(encryption_keys={"k1": K1})
    tasks = _app(rt)
    store = rt.results
    assert isinstance(store, MemoryResultStore)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(tasks["reveal"].s(1)) == f"{SECRET}-1"
            handle = await rt.enqueue(tasks["reveal"].s(2))
            assert await handle.result() == f"{SECRET}-2"
            info = await handle.info()
            assert info is not None and info.value == f"{SECRET}-2" and info.state is State.SUCCESS
            failed = await rt.enqueue(tasks["leak"].s())
            with pytest.raises(TaskError, match=SECRET):
                await failed.result()
    stored = [entry[2] for entry in store._results.values()]
    assert len(stored) == 3
    assert all(data[:1] == SEALED for data in stored)
    assert not any(SECRET.encode() in data for data in stored)


async def test_memory_store_without_the_key_says_which_key() -> None:
    store = MemoryResultStore()
    store.use_keyring(Keyring({"k1": K1}))
    await store.put(Result(id="a", state=State.SUCCESS, value=SECRET))
    await store.put(Result(id="b", state=State.FAILURE,
                           error=ErrorInfo(type="ValueError", message=SECRET, traceback=SECRET)))
    failed = await store.get("b")
    assert failed is not None and failed.error is not None
    assert (failed.error.message, failed.error.traceback) == (SECRET, SECRET)
    store.use_keyring(Keyring({"k2": K2}))  # k1 removed too early
    with pytest.raises(SealedResultError, match=r"'k1'.*add that key") as e:
        await store.get("a")
    assert e.value.key_id == "k1" and e.value.task_id == "a"
    store.use_keyring(None)  # a reader with no keys at all
    with pytest.raises(SealedResultError, match=r"'k1'.*no encryption_keys"):
        await store.wait("b", 1.0)


async def test_a_worker_does_not_retry_a_record_it_cannot_decrypt_as_an_outage() -> None:
    """The worker's store calls retry a ResultError as an outage; a record whose
    key is gone is no outage: raised at once (the delivery is dead-lettered)."""
    store = MemoryResultStore()
    store.use_keyring(Keyring({"k1": K1}))
    await store.put(Result(id="a", state=State.SUCCESS, value=SECRET))
    store.use_keyring(Keyring({"k2": K2}))
    persist = StoreRetry()
    with anyio.fail_after(LIMIT), pytest.raises(SealedResultError, match="'k1'"):
        await persist("read", lambda: store.get("a"))
    assert persist.failures == 0


async def test_memory_rotation_reads_old_records_with_the_old_key() -> None:
    store = MemoryResultStore()
    store.use_keyring(Keyring({"k1": K1}))
    await store.put(Result(id="old", state=State.SUCCESS, value=SECRET))
    store.use_keyring(Keyring({"k1": K1, "k2": K2}, "k2"))
    await store.put(Result(id="new", state=State.SUCCESS, value=SECRET))
    assert b"k1" in store._results["old"][2] and b"k2" in store._results["new"][2]
    for task_id in ("old", "new"):
        got = await store.get(task_id)
        assert got is not None and got.value == SECRET


async def test_a_sealed_record_moved_to_another_id_fails() -> None:
    store = MemoryResultStore()
    store.use_keyring(Keyring({"k1": K1}))
    await store.put(Result(id="a", state=State.SUCCESS, value=SECRET))
    expiry, state, data = store._results["a"]
    store._results["b"] = (expiry, state, data.replace(b"\xa1a", b"\xa1b"))  # its own id too
    with pytest.raises(SealedResultError, match="does not authenticate"):
        await store.get("b")


# -- Redis, with a real worker ----------------------------------------------------------


async def _raw_namespace(namespace: str) -> bytes:
    """Every key of the namespace and what Redis holds in it (strings, hashes, streams)."""
    client = aioredis.from_url(REDIS_URL)
    out = bytearray()
    try:
        async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            kind = (await client.type(key)).decode()
            out += key + b" " + kind.encode() + b"\n"
            if kind == "string":
                out += await client.get(key) or b""
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    out += field + b"=" + value + b"\n"
            elif kind == "stream":
                for _, fields in await client.xrange(key):
                    for name, value in fields.items():
                        out += name + b"=" + value + b"\n"
    finally:
        await client.aclose()
    return bytes(out)




def _redis(namespace: str, keys: dict[str, bytes] | None, kid: str | None = None
           ) -> tuple[Runtime, dict[str, Any]]:
    rt = Runtime(broker=REDIS_URL, namespace=namespace, encryption_keys=keys,
                 encryption_key_id=kid, events=False, index=False)
    return rt, _app(rt)


@pytest.mark.redis
async def test_redis_never_holds_the_result_but_callers_read_it(namespace: str) -> None:
    worker, _ = _redis(namespace, {"k1": K1})
    producer, tasks = _redis(namespace, {"k1": K1})
    async with purged(worker):
        with anyio.fail_after(LIMIT):
            async with producer, worker, worker.worker():
                assert await run(tasks["reveal"].s(1)) == f"{SECRET}-1"
                handle = await producer.enqueue(tasks["reveal"].s(2))
                assert await handle.result() == f"{SECRET}-2"
                info = await handle.info()
                assert info is not None and info.value == f"{SECRET}-2"
                failed = await producer.enqueue(tasks["leak"].s())
                with pytest.raises(TaskError, match=SECRET):
                    await failed.result()
                # a chord: its members' values wait in a join hash in Redis
                assert await run(chord([tasks["reveal"].s(n) for n in range(3)],
                                       tasks["count"].s())) == 3
            raw = await _raw_namespace(namespace)
    assert f":result:{{{handle.id}}}".encode() in raw and b":join:" in raw
    assert SECRET.encode() not in raw and b"cannot pay" not in raw


@pytest.mark.redis
async def test_redis_producer_without_the_key_gets_a_clear_error(namespace: str) -> None:
    worker, _ = _redis(namespace, {"k1": K1})
    producer, tasks = _redis(namespace, {"k1": K1})
    keyless, _ = _redis(namespace, None)
    async with purged(worker):
        with anyio.fail_after(LIMIT):
            async with producer, worker, worker.worker():
                handle = await producer.enqueue(tasks["reveal"].s(1))
                assert await handle.result() == f"{SECRET}-1"
            async with keyless:
                stranger = keyless.handle(handle.id)
                with pytest.raises(SealedResultError, match=r"'k1'.*encryption_keys") as e:
                    await stranger.result()
                assert e.value.key_id == "k1" and e.value.task_id == handle.id
                with pytest.raises(SealedResultError, match="'k1'"):
                    await stranger.info()


@pytest.mark.redis
async def test_redis_rotation_old_key_still_reads_old_records(namespace: str) -> None:
    before, tasks = _redis(namespace, {"k1": K1})
    after, _ = _redis(namespace, {"k1": K1, "k2": K2}, "k2")
    new_only, _ = _redis(namespace, {"k2": K2})
    async with purged(after):
        with anyio.fail_after(LIMIT):
            async with before, before.worker():
                old = await before.enqueue(tasks["reveal"].s(1))
                assert await old.result() == f"{SECRET}-1"
            async with after, after.worker():
                new = await after.enqueue(tasks["reveal"].s(2))
                assert await new.result() == f"{SECRET}-2"
                assert await after.handle(old.id).result() == f"{SECRET}-1"  # old key, still there
            async with new_only:
                assert await new_only.handle(new.id).result() == f"{SECRET}-2"
                with pytest.raises(SealedResultError, match="'k1'"):
                    await new_only.handle(old.id).result()


@pytest.mark.redis
async def test_with_index_and_events_on_an_error_text_stays_sealed(namespace: str) -> None:
    """The task index, the event stream and the worker's "task failed" line keep
    a failure's type but not its text while encryption is on."""
    from structlog.testing import capture_logs

    rt = Runtime(broker=REDIS_URL, namespace=namespace, encryption_keys={"k1": K1})
    tasks = _app(rt)
    async with purged(rt):
        with capture_logs() as logs, anyio.fail_after(LIMIT):
            async with rt, rt.worker() as worker:
                failed = await rt.enqueue(tasks["leak"].s())
                with pytest.raises(TaskError, match=SECRET):
                    await failed.result()
                await worker.idle()
                for listener in rt._listeners:   # the index is written off the task's path
                    if hasattr(listener, "flush"):
                        await listener.flush()
                page = await rt.ops.tasks(state="failed")
            raw = await _raw_namespace(namespace)
    assert page.items[0].error_type == "ValueError"
    assert b"ValueError" in raw and b":ops:" in raw
    assert SECRET.encode() not in raw and b"cannot pay" not in raw
    told = [e for e in logs if e.get("event") == "task failed"]
    assert told and all(SECRET not in str(e) for e in told)
