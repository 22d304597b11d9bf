"""Publishing and connecting on a real RabbitMQ: unroutable messages raise, the URL's
vhost is the one used, an unreachable server is a clear ConnectionFailed."""

from __future__ import annotations

import secrets
import socket
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import anyio
import pytest

from brokers.amqp import AmqpBroker
from brokers.base import ConnectionFailed, Envelope, PublishError
from tests.amqp.conftest import MakeBroker, amqp_url, rabbitmqctl
from tests.conftest import AMQP_URL, require_tool

pytestmark = pytest.mark.amqp


def env(queue: str, id: str, **kw: Any) -> Envelope:
    return Envelope(id=id, queue=queue, body=id.encode(), **kw)


async def test_publish_to_a_queue_deleted_behind_the_brokers_back_raises(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    await raw.queue_delete(f"{namespace}.jobs")  # the broker still believes it exists
    with pytest.raises(PublishError, match="could not route"):
        await broker.publish(env("jobs", "m1"))
    # The failure makes the broker declare the queue again on next use.
    await broker.publish(env("jobs", "m2"))
    assert (await broker.stats("jobs")).ready == 1
    await raw.queue_delete(f"{namespace}.jobs")
    with pytest.raises(PublishError, match="could not route"):
        await broker.publish_many([env("jobs", "m3"), env("jobs", "m4")])
    await broker.publish_many([env("jobs", "m5"), env("jobs", "m6")])
    assert (await broker.stats("jobs")).ready == 2


async def test_messages_are_persistent_and_queues_durable(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "m1", headers={"k": "v"}, priority=3))
    # Durability as the server sees it (aio-pika's `queue.durable` after a passive
    # declare is the client's own default, not the server's answer).
    listed = await rabbitmqctl("list_queues", "name", "durable", "--no-table-headers")
    flags = dict(line.split("\t") for line in listed.splitlines() if "\t" in line)
    assert flags[f"{namespace}.jobs"] == "true", listed
    assert flags[f"{namespace}.jobs.dlq"] == "true", listed
    queue = await raw.declare_queue(f"{namespace}.jobs", passive=True)
    message = await queue.get(no_ack=True)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.message_id, message.priority, message.headers) == ("m1", 3, {"k": "v"})


async def test_an_unreachable_server_is_a_clear_connection_failed() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = AmqpBroker.from_url(f"amqp://guest:guest@127.0.0.1:{port}/?connect_timeout_s=5")
    with anyio.fail_after(10), pytest.raises(ConnectionFailed, match="could not connect"):
        await broker.__aenter__()


async def test_a_vhost_that_does_not_exist_is_a_connection_failed_naming_it(
    make_broker: MakeBroker
) -> None:
    await make_broker()  # fails in CI (skips elsewhere) when the server is missing
    vhost = f"taskloom-missing-{secrets.token_hex(4)}"
    broker = AmqpBroker.from_url(amqp_url(path=f"/{vhost}"))
    with anyio.fail_after(15), pytest.raises(ConnectionFailed, match=vhost):
        await broker.__aenter__()


@pytest.mark.slow
async def test_the_urls_vhost_is_used_and_isolates_queues(
    make_broker: MakeBroker, namespace: str
) -> None:
    """S5: the same queue names in two vhosts never meet."""
    user = urlsplit(AMQP_URL).username or "guest"
    vhost = f"taskloom-test-{namespace}"
    in_default = await make_broker()
    await rabbitmqctl("add_vhost", vhost)
    try:  # deleting the vhost deletes what the test declared in it
        await rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        async with AmqpBroker.from_url(amqp_url(path=f"/{vhost}"),
                                       namespace=namespace) as in_vhost:
            assert in_vhost.vhost == vhost
            await in_vhost.publish(env("jobs", "only-in-vhost"))
            assert (await in_vhost.stats("jobs")).ready == 1
            assert (await in_default.stats("jobs")).ready == 0
            listed = await rabbitmqctl("list_queues", "-p", vhost, "name", "messages")
            assert f"{namespace}.jobs\t1" in listed
            async with in_vhost.consume(["jobs"], prefetch=1) as consumer:
                with anyio.fail_after(5):
                    delivery = await consumer.receive()
                assert delivery.envelope.id == "only-in-vhost"
                await delivery.ack()
    finally:
        # Cleanup must not hide the test's own failure: a failed delete_vhost raises
        # only when the body passed (a raise in `finally` would replace its error).
        exe = require_tool("rabbitmqctl", "apt-get install -y rabbitmq-server")
        deleted = await anyio.run_process([exe, "-q", "delete_vhost", vhost], check=False)
    assert deleted.returncode == 0, f"delete_vhost {vhost}: {deleted.stderr.decode()}"


async def test_purge_namespace_deletes_queues_levels_and_exchanges(
    make_broker: MakeBroker, namespace: str
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "later", delay_s=0.5))  # 5 ticks: levels 0..2
    await broker.publish(env("other", "now"))
    names = [f"{namespace}.jobs", f"{namespace}.jobs.dlq", f"{namespace}.other",
             *(f"{namespace}.jobs.delay.{k:02d}" for k in range(3))]
    exchanges = [f"{namespace}.taskloom.dlx", f"{namespace}.taskloom.delay",
                 *(f"{namespace}.taskloom.delay.{k:02d}" for k in range(3))]
    async with await aio_pika.connect(amqp_url()) as connection:
        for name in names:
            await (await connection.channel()).declare_queue(name, passive=True)
        for name in exchanges:
            await (await connection.channel()).declare_exchange(name, passive=True)
        await broker.purge_namespace()
        for name in names:
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).declare_queue(name, passive=True)
        for name in exchanges:
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).declare_exchange(name, passive=True)
