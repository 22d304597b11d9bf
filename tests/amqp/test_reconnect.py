"""Robust reconnection (RELIABILITY B1/B5): after the connection is cut, consumers
subscribe again and get the redelivered messages; settling a delivery of the dead
connection (a stale delivery tag) is logged, never raised."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import anyio
import pytest
from structlog.testing import capture_logs

from brokers.amqp import AmqpBroker
from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker, Proxy, amqp_url, rabbitmqctl, running_proxy
from tests.conftest import AMQP_URL

pytestmark = pytest.mark.amqp


def env(id: str) -> Envelope:
    return Envelope(id=id, queue="jobs", body=id.encode())


async def survive_a_cut(broker: AmqpBroker, cut: Callable[[], Awaitable[None]]) -> None:
    await broker.publish(env("m1"))
    async with broker.consume(["jobs"], prefetch=2) as consumer:
        with anyio.fail_after(5):
            before = await consumer.receive()
        assert (before.envelope.id, before.delivery_count) == ("m1", 1)
        await cut()
        with anyio.fail_after(20):  # reconnect, subscribe again, get m1 back
            after = await consumer.receive()
        assert (after.envelope.id, after.delivery_count) == ("m1", 2)
        with capture_logs() as logs:
            await before.ack()  # stale: its channel died with the connection
            await before.ack()  # settling twice stays a no-op
        assert [e["event"] for e in logs] == ["amqp.stale_delivery"]
        await after.ack()
        await broker.publish(env("m2"))  # the publisher channel is back as well
        with anyio.fail_after(5):
            fresh = await consumer.receive()
        assert (fresh.envelope.id, fresh.delivery_count) == ("m2", 1)
        await fresh.ack()
    stats = await broker.stats("jobs")
    assert (stats.ready, stats.in_flight) == (0, 0)


async def test_consumer_resubscribes_after_the_link_is_cut(
    make_broker: MakeBroker, namespace: str
) -> None:
    await make_broker()  # fails in CI (skips elsewhere) when the server is missing
    async with running_proxy() as proxy:
        userinfo, at, _ = urlsplit(AMQP_URL).netloc.rpartition("@")
        url = amqp_url(netloc=f"{userinfo}{at}127.0.0.1:{proxy.port}", reconnect_interval_s=0.2)

        async def cut(proxy: Proxy = proxy) -> None:
            before = proxy.connections
            await proxy.reset()
            await proxy.wait_for_connections(before + 1)

        async with AmqpBroker.from_url(url, namespace=namespace) as broker:
            try:
                await survive_a_cut(broker, cut)
            finally:
                await broker.purge_namespace()


@pytest.mark.slow
async def test_consumer_resubscribes_after_the_server_closes_the_connection(
    make_broker: MakeBroker, namespace: str
) -> None:
    broker = await make_broker(reconnect_interval_s=0.2)

    async def cut() -> None:
        listed = await rabbitmqctl("list_connections", "pid", "client_properties")
        pids = [line.split("\t", 1)[0] for line in listed.splitlines()
                if f"taskloom {namespace} " in line]
        assert pids, f"no connection of namespace {namespace}: {listed}"
        for pid in pids:
            await rabbitmqctl("close_connection", pid, "taskloom test: forced close")

    await survive_a_cut(broker, cut)
