"""What only the Redis store does: failures of Redis itself, limits, URL options,
shared connections and round trips, cleanup."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from runtime.errors import (
    ConfigError,
    ConnectionFailed,
    PayloadTooLarge,
    ResultStoreUnavailable,
    ResultTimeout,
)
from runtime.messages import State
from runtime.results.redis import RedisResultStore
from tests.conftest import REDIS_URL, server_missing
from tests.results_contract.conftest import OwnRedis
from tests.results_contract.helpers import eventually, ok, started

pytestmark = pytest.mark.redis


@asynccontextmanager
async def opened(url: str = REDIS_URL, *, namespace: str = "",
                 **options: Any) -> AsyncIterator[RedisResultStore]:
    store = RedisResultStore.from_url(url, namespace=namespace, **options)
    try:
        await store.__aenter__()
    except ConnectionFailed as e:
        server_missing("redis", e)
    try:
        yield store
    finally:
        try:
            if namespace:
                await store.purge_namespace()
        finally:
            await store.__aexit__(None, None, None)


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def subscribers(client: aioredis.Redis, channel: str) -> int:
    reply = await client.execute_command("PUBSUB", "NUMSUB", channel)  # type: ignore[no-untyped-call]
    return int(reply[1])


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- Redis unreachable ----------------------------------------------------------------
# (on a redis-server of the test's own: no namespace, nothing to clean up)


async def test_opening_a_store_where_no_redis_listens_raises_connection_failed() -> None:
    port = unused_port()
    store = RedisResultStore.from_url(f"redis://127.0.0.1:{port}/0")

    with anyio.fail_after(10), pytest.raises(ConnectionFailed, match=str(port)) as caught:
        await store.__aenter__()

    assert "redis-server is running" in str(caught.value)


async def test_a_waiter_gets_result_store_unavailable_when_redis_dies(
        own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store, raw(own_redis.url) as probe:
        failures: list[BaseException] = []

        async def waiter() -> None:
            try:
                await store.wait("t1", timeout=30)
            except ResultStoreUnavailable as e:
                failures.append(e)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)

                async def subscribed() -> bool:
                    return await subscribers(probe, "taskloom:done:t1") == 1

                await eventually(subscribed, what="the waiter subscribing")
                own_redis.kill()

        assert len(failures) == 1
        assert own_redis.url.removesuffix("/0") in str(failures[0])


async def test_wait_and_put_on_a_dead_redis_raise_result_store_unavailable(
        own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store:
        own_redis.kill()

        with anyio.fail_after(10):
            with pytest.raises(ResultStoreUnavailable, match="can be retried"):
                await store.wait("t1", timeout=30)
            with pytest.raises(ResultStoreUnavailable):
                await store.put(ok("t1"))
            with pytest.raises(ResultStoreUnavailable):
                await store.get("t1")


async def test_waiting_works_again_once_redis_is_back(own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.put, ok("before"))
            assert (await store.wait("before", timeout=5)).value is None
            own_redis.kill()
            with pytest.raises(ResultStoreUnavailable):
                await store.wait("t1", timeout=5)
            own_redis.start()

            got: list[Any] = []

            async def waiter() -> None:
                got.append((await store.wait("t1", timeout=10)).value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await store.put(ok("t1", "after restart"))

        assert got == ["after restart"]


async def test_watch_reconnects_after_redis_restarts(own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store, opened(own_redis.url) as peer:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(peer.watch)
                own_redis.kill()
                own_redis.start()
                async with raw(own_redis.url) as probe:

                    async def resubscribed() -> bool:
                        return await subscribers(probe, "taskloom:revoke") == 1

                    await eventually(resubscribed, timeout=15, what="watch resubscribing")
                await store.revoke("t1")
                await eventually(lambda: peer.is_revoked("t1"), what="the peer seeing it")
                tg.cancel_scope.cancel()


async def test_scripts_lost_by_redis_are_loaded_again(own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store, raw(own_redis.url) as probe:
        await probe.script_flush()

        assert await store.put(ok("t1", 1)) is True
        assert await store.put_many([ok("t1", 2), ok("t2", 3)]) == [False, True]
        await probe.script_flush()
        assert await store.join("g", 0, 1, "v") == ["v"]


# -- batching and connections ---------------------------------------------------------


async def test_concurrent_puts_share_round_trips(own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store, raw(own_redis.url) as probe:
        await probe.config_resetstat()

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(store.put, ok(f"t{i}", i))

        stats = await probe.info("commandstats")
        scripts = stats["cmdstat_evalsha"]["calls"]
        assert 1 <= scripts <= 50, f"{scripts} EVALSHA calls for 500 concurrent puts"
        got = await store.get("t499")
        assert got is not None and got.value == 499


async def test_1000_waiters_do_not_need_1000_connections(own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store, raw(own_redis.url) as probe:
        peak = 0

        async def waiter(i: int) -> None:
            await store.wait(f"t{i}", timeout=30)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(waiter, i)

                async def all_subscribed() -> bool:
                    return int((await probe.info("clients"))["connected_clients"]) > 0 and \
                        await subscribers(probe, "taskloom:done:t999") == 1

                await eventually(all_subscribed, timeout=15, what="1000 waiters subscribing")
                peak = int((await probe.info("clients"))["connected_clients"])
                await store.put_many([ok(f"t{i}", i) for i in range(1000)])

        assert peak <= 40, f"{peak} connections for 1000 waiters"


# -- limits and options ---------------------------------------------------------------


async def test_the_url_sets_max_result_bytes(namespace: str) -> None:
    async with opened(f"{REDIS_URL}?max_result_bytes=1000", namespace=namespace) as store:
        assert store.max_result_bytes == 1000
        with pytest.raises(PayloadTooLarge):
            await store.put(ok("t1", "x" * 2000))


async def test_the_url_sets_the_ttl(namespace: str) -> None:
    async with opened(f"{REDIS_URL}?ttl_s=30", namespace=namespace) as store, \
            raw(REDIS_URL) as probe:
        assert store.ttl_s == 30
        await store.put(started("t1"))
        await store.join("g1", 0, 2, "a")

        for key in (f"{namespace}:result:{{t1}}", f"{namespace}:join:{{g1}}"):
            pttl = await probe.pttl(key)
            assert 0 < pttl <= 30_000, (key, pttl)


async def test_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="ttl_s"):
        RedisResultStore.from_url(f"{REDIS_URL}?ttl_s=0")
    with pytest.raises(ConfigError):
        RedisResultStore.from_url(f"{REDIS_URL}?ttl_s=soon")
    with pytest.raises(ConfigError, match="redis://"):
        RedisResultStore.from_url("http://127.0.0.1:6379")
    with pytest.raises(ConfigError, match="namespace"):
        RedisResultStore.from_url(REDIS_URL, namespace="a{b}")


async def test_join_refuses_an_index_outside_the_join(namespace: str) -> None:
    async with opened(namespace=namespace) as store:
        with pytest.raises(ValueError, match=r"outside 0\.\.2"):
            await store.join("g1", 3, 3, "x")


async def test_a_revoked_result_is_stored_once(namespace: str) -> None:
    async with opened(namespace=namespace) as store:
        assert await store.revoke("t1") is True
        assert await store.revoke("t1") is False  # announced again, not stored again
        current = await store.get("t1")
        assert current is not None and current.state is State.REVOKED


# -- cleanup --------------------------------------------------------------------------


async def test_purge_namespace_deletes_only_its_own_keys(namespace: str) -> None:
    async with opened(namespace=namespace) as mine, \
            opened(namespace=namespace + "x") as theirs:
        await mine.put(ok("t1"))
        await mine.join("g1", 0, 2, 1)
        await mine.claim("t1", 30)
        await mine.revoke("t2")
        await theirs.put(ok("t1"))

        # results t1 and t2 and their expiry markers, join g1, claim t1, the revoked set
        assert await mine.purge_namespace() == 7

        assert await mine.get("t1") is None
        assert await theirs.get("t1") is not None


async def test_a_store_without_namespace_refuses_to_purge() -> None:
    async with opened() as store:
        with pytest.raises(ConfigError, match="namespace"):
            await store.purge_namespace()


async def test_a_waiter_gets_a_result_too_big_to_ride_in_the_notification(
        namespace: str) -> None:
    big = "x" * 200_000  # over the inline limit: the waiter reads it with a GET
    got: list[Any] = []
    async with opened(namespace=namespace) as store:

        async def waiter() -> None:
            got.append((await store.wait("t1", timeout=10)).value)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await store.put(ok("t1", big))

    assert got == [big]


# -- the expiry marker is additive ----------------------------------------------------


async def test_a_result_written_without_a_marker_expires_as_before(namespace: str) -> None:
    """An older taskloom writes no expiry marker: its expired result reads as
    absent, and a waiter times out as it always did (no ResultExpired)."""
    async with opened(namespace=namespace, ttl_s=1.0) as store, raw(REDIS_URL) as client:
        await store.put(ok("old"))
        marker = f"{namespace}:ended:{{old}}"
        assert await client.exists(marker) == 1
        ttl_ms = await client.pttl(marker)
        assert ttl_ms > 3000 * 1000  # the marker outlives the 1 s result by an hour
        await client.delete(marker)  # as an older writer leaves it

        async def gone() -> bool:
            return await store.get("old") is None

        await eventually(gone, what="the result expiring")
        assert not await store.expired("old")
        with pytest.raises(ResultTimeout):
            await store.wait("old", timeout=0.05)


async def test_reserve_of_many_ids_sends_one_set_each_and_nothing_else(own_redis: OwnRedis) -> None:
    async with opened(own_redis.url) as store, raw(own_redis.url) as client:
        await client.config_resetstat()
        assert await store.reserve([f"id{i}" for i in range(100)]) == [True] * 100
        stats = await client.info("commandstats")
        assert stats["cmdstat_set"]["calls"] == 100
        clients = await client.info("stats")
        assert clients["total_commands_processed"] <= 102  # the SETs, INFO, CONFIG
