"""Small helpers shared by the contract tests."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from brokers.base import Consumer, Delivery, Envelope

#: Upper bound for anything a test waits for; never a timing assertion.
WAIT_S = 5.0
#: How long a test watches for something that must NOT arrive.
QUIET_S = 0.3
#: Delays used by delay tests (short, but far above timer granularity).
DELAY_S = 0.3


def env(queue: str, id: str, body: bytes = b"", **kw: Any) -> Envelope:
    return Envelope(id=id, queue=queue, body=body or id.encode(), **kw)


async def recv(consumer: Consumer) -> Delivery:
    with anyio.fail_after(WAIT_S):
        return await consumer.receive()


async def recv_n(consumer: Consumer, n: int) -> list[Delivery]:
    return [await recv(consumer) for _ in range(n)]


async def assert_nothing_arrives(consumer: Consumer, within: float = QUIET_S) -> None:
    """Fail if a delivery arrives within ``within`` seconds."""
    with anyio.move_on_after(within):
        delivery = await consumer.receive()
        pytest.fail(f"unexpected delivery of {delivery.envelope.id!r} "
                    f"(delivery_count={delivery.delivery_count})")


#: (broker kind, promise) -> why that broker breaks that promise today. The contract
#: tests of such a cell are strict xfails (they must start passing when it is fixed,
#: then the entry is removed); tests/test_meta_promises.py reads the same table.
KNOWN_BROKEN: dict[tuple[str, int], str] = {
}


def known_broken(request: pytest.FixtureRequest, kind: str, promise: int) -> None:
    """Mark this test a strict xfail when ``kind`` breaks ``promise`` today."""
    reason = KNOWN_BROKEN.get((kind, promise))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


async def open_client(broker: Any, kind: str) -> Any:
    """Another connected client of the same server and namespace as ``broker`` (a
    Redis or AMQP broker; the memory broker has no other client). The caller closes it."""
    import brokers
    from tests.contract.conftest import URLS

    other = brokers.from_url(URLS[kind], namespace=broker.namespace)
    await other.__aenter__()
    return other
