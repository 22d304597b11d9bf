"""Promise 1 (publish returns only when the message is stored; publish_many is
all-or-error) and promise 10 (errors leave a broker only as the types of
``brokers.base``; the caller's own exceptions pass through unchanged)."""

from __future__ import annotations

from typing import Any

import pytest

from brokers.base import DeliveryAlreadySettled
from tests.contract.helpers import env, known_broken, open_client, recv, recv_n


class CallersOwnError(Exception):
    """An error of the code inside ``async with broker.consume(...)``."""


async def observer(broker: Any, kind: str) -> Any:
    """A second, independent client of the same broker and namespace (the memory
    broker has no other client than itself)."""
    return broker if kind == "memory" else await open_client(broker, kind)


@pytest.mark.promise(1)
async def test_a_published_message_is_stored_when_publish_returns(broker: Any, queue: str,
                                                                  broker_kind: str) -> None:
    await broker.publish(env(queue, "one"))
    await broker.publish_many([env(queue, f"m{i}") for i in range(5)])
    other = await observer(broker, broker_kind)
    try:  # seen through another connection, without waiting for anything
        assert (await other.stats(queue)).ready == 6
        async with other.consume([queue], prefetch=10) as consumer:
            got = sorted(d.envelope.id for d in await recv_n(consumer, 6))
    finally:
        if other is not broker:
            await other.__aexit__(None, None, None)
    assert got == ["m0", "m1", "m2", "m3", "m4", "one"]


@pytest.mark.promise(10)
async def test_the_callers_exception_leaves_consume_unwrapped(
    broker: Any, queue: str, broker_kind: str, request: pytest.FixtureRequest
) -> None:
    """An exception raised by the caller inside ``consume`` comes out as itself, not
    in an ExceptionGroup, and the unsettled delivery goes back to the queue."""
    known_broken(request, broker_kind, 10)
    await broker.publish(env(queue, "m1"))
    with pytest.raises(CallersOwnError):
        async with broker.consume([queue], prefetch=1) as consumer:
            await recv(consumer)
            raise CallersOwnError("the caller's own failure")
    async with broker.consume([queue], prefetch=1) as consumer:
        again = await recv(consumer)
        assert (again.envelope.id, again.delivery_count) == ("m1", 2)
        await again.ack()


@pytest.mark.promise(10)
async def test_a_broker_error_inside_consume_leaves_as_its_own_type(
    broker: Any, queue: str, broker_kind: str, request: pytest.FixtureRequest
) -> None:
    known_broken(request, broker_kind, 10)
    await broker.publish(env(queue, "m1"))
    with pytest.raises(DeliveryAlreadySettled):
        async with broker.consume([queue], prefetch=1) as consumer:
            delivery = await recv(consumer)
            await delivery.ack()
            await delivery.nack()  # another verb: DeliveryAlreadySettled, as itself
    assert (await broker.stats(queue)).in_flight == 0
