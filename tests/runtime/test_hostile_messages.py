"""Hostile messages written straight into the broker (issue 10, findings 5 and 6).

Every header and field the worker reads is validated before use; a message
that cannot be processed always ends settled (dead-lettered with a documented
reason); a message only writes results for ids it owns; the log never shows
the signing key, a signature or an argument. Each test runs on the memory
broker and on the real Redis broker (results in the same Redis).

Where a broker itself would never hand over such a value (a delivery count
past any integer width, a header that is not a string, a body that is not
bytes), a thin pass-through wrapper changes what the worker sees of a real
delivery: the worker must hold whatever a broker hands over.
"""

from __future__ import annotations

import hashlib
import hmac
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from brokers.base import Delivery, Envelope
from runtime import Runtime, State, TaskError
from runtime.codec import Codec
from runtime.messages import ChordRef, SigNode, TaskMessage
from tests.conftest import REDIS_URL
from tests.passthrough import PassThroughBroker, PassThroughDelivery
from tests.runtime.helpers import LIMIT, dead_letters

KEY = b"hostile-test-signing-key-0123456789"
SECRET_ARG = "secret-argument-7f3a9c"
#: The bound the worker clamps a delivery count to (runtime.messages.MAX_COUNT).
MAX_COUNT = 2**31 - 1
BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


# -- a pass-through broker that changes what the worker sees of a delivery -----------------


class Tampered(PassThroughDelivery):
    """A real delivery, seen with another envelope and delivery count;
    settlements go to the real one."""

    def __init__(self, inner: Delivery, envelope: Any, delivery_count: Any) -> None:
        super().__init__(inner)
        self.envelope = envelope
        self.delivery_count = delivery_count


def make_runtime(backend: str, namespace: str, *, tamper: Callable[[Delivery], Tampered] | None = None,
                 signing: bool = False) -> tuple[Runtime, list[Any]]:
    from runtime.app import Runtime as _Runtime

    kw: dict[str, Any] = {"signing_keys": {"k1": KEY}} if signing else {}
    if backend == "memory":
        broker: Any = "memory://"
        results = "memory://"
    else:
        import brokers

        broker = brokers.from_url(REDIS_URL, namespace=namespace)
        results = REDIS_URL
    if tamper is not None:
        if isinstance(broker, str):
            import brokers

            broker = brokers.from_url(broker)
        broker = PassThroughBroker(broker, tamper)
    rt = _Runtime(broker=broker, results=results, namespace=namespace, **kw)
    calls: list[Any] = []

    @rt.task(name="add")
    async def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    return rt, calls


@asynccontextmanager
async def serving(rt: Runtime, backend: str) -> AsyncIterator[Any]:
    async with rt:
        try:
            async with rt.worker(concurrency=4) as worker:
                yield worker
        finally:
            if backend == "redis":
                await rt.broker.purge_namespace()  # type: ignore[attr-defined]
                await rt.results.purge_namespace()  # type: ignore[attr-defined]


def envelope(body: bytes, headers: dict[str, str], id: str) -> Envelope:
    return Envelope(id=id, queue="default", body=body, headers=headers)


def encoded(codec: Codec, **fields: Any) -> Envelope:
    message = TaskMessage(**fields)
    body, headers = codec.encode(message)
    return envelope(body, headers, message.id)


def raw_json(id: str, **fields: Any) -> Envelope:
    """A JSON body written by hand: any value, in range or not."""
    body = msgspec.json.encode({"id": id, "task": "add", "args": [1, 2], **fields})
    return envelope(body, {"ct": "json"}, id)


async def settled(rt: Runtime, worker: Any) -> list[tuple[str, str]]:
    await worker.idle()
    return sorted(await dead_letters(rt))


@pytest.fixture
def no_secrets_logged() -> Iterator[list[str]]:
    """After the test: no log event of the test (its fields, and the text of
    any exception it carries) shows the key, a signature or the secret
    argument. Tests add the signatures they sent to the list."""
    forbidden: list[str] = [KEY.decode(), SECRET_ARG]
    with capture_logs() as events:
        yield forbidden
    assert events, "the worker logged nothing at all"
    text = "\n".join(_rendered(e) for e in events)
    for secret in forbidden:
        assert secret not in text, f"the log shows {secret[:12]}…"


def _rendered(event: dict[str, Any]) -> str:
    exc = event.get("exc_info")
    tb = "".join(traceback.format_exception(exc)) if isinstance(exc, BaseException) else ""
    return f"{event!r}\n{tb}"


# -- finding 5: poison in headers and fields -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "sig",
    ["é" * 64, "Z" * 64, "ab", "0" * 63 + "é", "\x00" * 64],
    ids=["non-ascii", "not-hex", "short", "last-non-ascii", "nul"],
)
async def test_a_malformed_signature_header_is_a_bad_signature(
        backend: str, namespace: str, sig: str, no_secrets_logged: list[str]) -> None:
    rt, calls = make_runtime(backend, namespace, signing=True)
    good = encoded(rt.codec, id="good", task="add", args=[SECRET_ARG, SECRET_ARG])
    no_secrets_logged.append(good.headers["sig"])
    bad = envelope(good.body, {**good.headers, "sig": sig}, "bad")
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(bad)
            assert await settled(rt, worker) == [("bad", "bad_signature")]
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "headers",
    [{"sig": 12345}, {"kid": ["k1"]}, {"sig": b"\xff" * 64}, {"kid": {"k": 1}}, None],
    ids=["int-sig", "list-kid", "bytes-sig", "dict-kid", "headers-not-a-dict"],
)
async def test_header_values_that_are_not_strings_are_a_bad_signature(
        backend: str, namespace: str, headers: dict[str, Any] | None,
        no_secrets_logged: list[str]) -> None:
    def tamper(d: Delivery) -> Tampered:
        env = d.envelope
        changed = None if headers is None else {**env.headers, **headers}
        return Tampered(d, msgspec.structs.replace(env, headers=changed), d.delivery_count)

    rt, calls = make_runtime(backend, namespace, signing=True, tamper=tamper)
    good = encoded(rt.codec, id="m1", task="add", args=[1, 2])
    no_secrets_logged.append(good.headers["sig"])
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(good)
            dead = await settled(rt, worker)
    assert dead == [("m1", "bad_signature" if headers is not None else "decode_error")]
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("body", ["text", None, 12], ids=["str", "none", "int"])
async def test_a_body_that_is_not_bytes_is_a_decode_error(backend: str, namespace: str,
                                                          body: Any) -> None:
    def tamper(d: Delivery) -> Tampered:
        return Tampered(d, msgspec.structs.replace(d.envelope, body=body), d.delivery_count)

    rt, calls = make_runtime(backend, namespace, tamper=tamper)
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(encoded(rt.codec, id="m1", task="add", args=[1, 2]))
            assert await settled(rt, worker) == [("m1", "decode_error")]
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", [10**30, -(10**30), -1, "7", None, 2.5],
                         ids=["huge", "huge-negative", "negative", "str", "none", "float"])
async def test_any_delivery_count_from_the_broker_still_ends_settled_with_a_result(
        backend: str, namespace: str, count: Any) -> None:
    def tamper(d: Delivery) -> Tampered:
        return Tampered(d, d.envelope, count)

    rt, calls = make_runtime(backend, namespace, tamper=tamper)
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(encoded(rt.codec, id="ok", task="add", args=[1, 2]))
            await rt.broker.publish(encoded(rt.codec, id="no", task="add", args=["x", 2]))
            assert await settled(rt, worker) == [("no", "bad_arguments")]
            ok = await rt.handle("ok").info()
            no = await rt.handle("no").info()
            stats = await rt.broker.stats("default")
    assert ok is not None and ok.state is State.SUCCESS and ok.value == 3
    assert 0 <= ok.delivery_count <= MAX_COUNT
    assert no is not None and no.state is State.FAILURE
    assert stats.ready == stats.in_flight == 0
    assert calls == [(1, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fields",
    [dict(attempt=10**30), dict(attempt=0), dict(attempt=-5), dict(retries=-1),
     dict(retries=10**25), dict(priority=10**20), dict(priority=-1), dict(timeout=-3.0),
     dict(timeout=1e300), dict(expires_ms=-1), dict(eta_ms=10**40), dict(id="")],
    ids=["attempt-huge", "attempt-0", "attempt-neg", "retries-neg", "retries-huge",
         "priority-huge", "priority-neg", "timeout-neg", "timeout-huge", "expires-neg",
         "eta-huge", "empty-id"],
)
async def test_numbers_out_of_range_are_dead_lettered_before_running(
        backend: str, namespace: str, fields: dict[str, Any]) -> None:
    rt, calls = make_runtime(backend, namespace)
    message = raw_json("r1", **{k: v for k, v in fields.items() if k != "id"})
    if "id" in fields:
        message = msgspec.structs.replace(message, body=msgspec.json.encode(
            {"id": "", "task": "add", "args": [1, 2]}))
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(message)
            assert await settled(rt, worker) == [("r1", "decode_error")]
            assert await rt.handle("r1").info() is None
    assert calls == []


# -- finding 6: a message writes results only for ids it owns --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", ["does.not.exist", "add"], ids=["unknown-task", "known-task"])
async def test_a_message_cannot_write_the_result_of_an_id_it_does_not_own(
        backend: str, namespace: str, task: str) -> None:
    rt, calls = make_runtime(backend, namespace)
    args: list[Any] = ["x", "y"] if task == "add" else []  # would fail: bad_arguments
    hostile = encoded(rt.codec, id="hostile", task=task, args=args, downstream=["victim"])
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(hostile)
            assert await settled(rt, worker) == [("hostile", "bad_message")]
            assert await rt.handle("victim").info() is None
            # the victim runs later and its own result stands
            await rt.broker.publish(encoded(rt.codec, id="victim", task="add", args=[2, 3]))
            assert await rt.handle("victim").result(timeout=LIMIT) == 5
    assert calls == [(2, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_downstream_ids_named_by_the_messages_own_links_still_fail_with_it(
        backend: str, namespace: str) -> None:
    """The legitimate case: a chain step's failure reaches the later steps' waiters."""
    rt, calls = make_runtime(backend, namespace)
    step = SigNode(id="step2", task="add", args=[1])
    message = encoded(rt.codec, id="step1", task="add", args=["x", 1], links=[step],
                      downstream=["step2"])
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(message)
            assert await settled(rt, worker) == [("step1", "bad_arguments")]
            with pytest.raises(TaskError) as info:
                await rt.handle("step2").result(timeout=LIMIT)
    assert info.value.info.reason == "upstream:step1"
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("index", "size"), [(5, 3), (3, 3)], ids=["past", "at-size"])
async def test_a_chord_index_out_of_range_is_rejected_before_running(
        backend: str, namespace: str, index: int, size: int) -> None:
    rt, calls = make_runtime(backend, namespace)
    ref = ChordRef(id="join", index=index, size=size)
    message = encoded(rt.codec, id="member", task="add", args=[1, 2], chord=ref,
                      downstream=["join"])
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(message)
            assert await settled(rt, worker) == [("member", "bad_message")]
            assert await rt.handle("member").info() is None
            assert await rt.handle("join").info() is None
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_nested_chord_reference_out_of_range_is_rejected(backend: str, namespace: str) -> None:
    rt, calls = make_runtime(backend, namespace)
    ref = ChordRef(id="inner", index=0, size=2, outer=ChordRef(id="outer", index=9, size=2))
    message = encoded(rt.codec, id="member", task="add", args=[1, 2], chord=ref)
    with anyio.fail_after(LIMIT):
        async with serving(rt, backend) as worker:
            await rt.broker.publish(message)
            assert await settled(rt, worker) == [("member", "bad_message")]
    assert calls == []


def test_the_signature_is_checked_as_sent() -> None:
    """The scheme the tests above rely on: HMAC-SHA256 hex of the body as sent."""
    codec = Codec(signing_keys={"k1": KEY})
    body, headers = codec.encode(TaskMessage(id="a", task="add"))
    assert headers["sig"] == hmac.new(KEY, body, hashlib.sha256).hexdigest()
