"""A real restart of a volatile Redis (reliability row C2), on a private server
this test starts and kills itself: connection errors are survived, the lost group
is recreated loudly, and serving goes on without a NOGROUP loop."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from brokers.redis import RedisBroker
from tests.conftest import require_tool
from tests.contract.helpers import env

pytestmark = [pytest.mark.redis, pytest.mark.fault, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with anyio.fail_after(10):
            while True:  # wait for the listening socket (a server, not work, is awaited)
                try:
                    await (await anyio.connect_tcp("127.0.0.1", self.port)).aclose()
                    return
                except OSError:
                    await anyio.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL of the server this test started
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    require_tool("redis-server", "apt-get install -y redis-server")
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.kill()


async def test_consumer_survives_a_restart_that_lost_everything(
    private_redis: PrivateRedis,
) -> None:
    await private_redis.start()
    url = f"redis://127.0.0.1:{private_redis.port}/0?block_s=0.5"
    with capture_logs() as logs:
        async with RedisBroker.from_url(url, namespace="app") as broker:
            await broker.publish(env("jobs", "before"))
            async with broker.consume(["jobs"], prefetch=2) as consumer:
                with anyio.fail_after(10):
                    held = await consumer.receive()
                private_redis.kill()
                await held.ack()  # cannot reach Redis: logged, the message would come back
                await private_redis.start()  # empty: no persistence
                await broker.publish(env("jobs", "after"))  # reconnects by itself
                with anyio.fail_after(10):
                    delivery = await consumer.receive()
                assert (delivery.envelope.id, delivery.delivery_count) == ("after", 1)
                await delivery.ack()
                assert (await broker.stats("jobs")).in_flight == 0
    alerts = [e for e in logs if e["event"].startswith("DATA LOSS")]
    assert alerts and all(a["log_level"] == "error" for a in alerts)
    assert len(alerts) <= 2, "no NOGROUP loop"


async def test_a_publish_after_a_restart_reconnects_a_connection_that_died_idle(
    private_redis: PrivateRedis,
) -> None:
    """The broker's pooled connection was idle when Redis died: the next publish
    goes out on a new connection (nothing was sent on the dead one, so nothing
    is resent), not on the dead one (``ConnectionLost``)."""
    await private_redis.start()
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    async with RedisBroker.from_url(url, namespace="app") as broker:
        await broker.publish(env("jobs", "before"))  # leaves one idle pooled connection
        private_redis.kill()
        await private_redis.start()  # empty: no persistence
        await broker.publish(env("jobs", "after"))
        assert (await broker.stats("jobs")).ready == 1
