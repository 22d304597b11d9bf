"""Hostile AMQP headers (issue 10, finding 5): a message published behind the
broker's back with a delivery count header that is enormous, a string, negative,
a float, a table or a bool, or user headers that are not strings, is handed
over with sane values only: a delivery count in a small bounded range (the bad
header treated as absent) and headers that are all ``str``. Such a message can
then be settled like any other (acked, nacked, dead-lettered and read back)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aio_pika
import anyio
import pytest

from brokers.amqp import H_DELIVERED, AmqpDelivery
from tests.amqp.conftest import MakeBroker

pytestmark = pytest.mark.amqp

#: The largest integer an AMQP field table carries (signed 64 bits).
ENORMOUS = 2**63 - 1

HOSTILE_COUNTS: dict[str, Any] = {
    "enormous": ENORMOUS,
    "big": 2**40,
    "string": "5",
    "negative": -3,
    "float": 1.5,
    "decimal": Decimal("2147483.647"),
    "table": {"n": 7},
    "array": [1, 2, 3],
    "bool": True,
    "bytes": bytearray(b"\xff\xfe"),
}


async def publish_raw(raw: aio_pika.abc.AbstractChannel, queue: str, message_id: str,
                      headers: dict[str, Any]) -> None:
    await raw.default_exchange.publish(
        aio_pika.Message(b"{}", message_id=message_id, headers=headers), routing_key=queue)


async def receive_all(broker: Any, n: int) -> list[AmqpDelivery]:
    got: list[AmqpDelivery] = []
    async with broker.consume(["jobs"], prefetch=n) as consumer:
        with anyio.fail_after(30):  # generous: a shared, loaded test server
            while len(got) < n:
                got.append(await consumer.receive())
        for d in got:
            await d.ack()
    return got


@pytest.mark.parametrize("case", sorted(HOSTILE_COUNTS))
async def test_a_hostile_delivery_count_header_is_treated_as_absent(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str, case: str
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    await publish_raw(raw, f"{namespace}.jobs", f"m-{case}",
                      {H_DELIVERED: HOSTILE_COUNTS[case], "x-delivery-count": HOSTILE_COUNTS[case]})
    [delivery] = await receive_all(broker, 1)
    # first delivery, bad counts ignored (not 2**63, not -2, not 6)
    assert delivery.delivery_count == 1, (case, delivery.delivery_count)
    assert delivery.envelope.id == f"m-{case}"


async def test_a_valid_delivery_count_header_is_kept(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    await publish_raw(raw, f"{namespace}.jobs", "m-ok", {H_DELIVERED: 3})
    [delivery] = await receive_all(broker, 1)
    assert delivery.delivery_count == 4


async def test_user_headers_are_strings_or_dropped(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    await publish_raw(raw, f"{namespace}.jobs", "m-h", {
        "ct": "json", "sig": {"nested": {"deeper": [1, 2]}}, "kid": bytearray(b"\xff\xfe"),
        "n": 5, "flag": False, "f": 2.5, "list": ["a", "b"], "ok": bytearray(b"utf8 \xc3\xa9"),
    })
    [delivery] = await receive_all(broker, 1)
    headers = delivery.envelope.headers
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()), headers
    # tables, arrays, floats and non-UTF-8 bytes are not interpreted: absent
    assert headers == {"ct": "json", "n": "5", "flag": "false", "ok": "utf8 \u00e9"}


async def test_a_message_with_hostile_headers_can_be_dead_lettered_and_read_back(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    await publish_raw(raw, f"{namespace}.jobs", "m-dl",
                      {H_DELIVERED: ENORMOUS, "sig": {"x": 1}})
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        with anyio.fail_after(30):
            delivery = await consumer.receive()
        await delivery.dead_letter("decode_error")
    [letter] = await broker.dead_letters("jobs")
    assert letter.envelope.id == "m-dl"
    assert letter.reason == "decode_error"
    assert letter.delivery_count == 1
    assert "sig" not in letter.envelope.headers
    assert (await broker.stats("jobs")).ready == 0
