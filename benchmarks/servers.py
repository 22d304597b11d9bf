"""The shared servers: checking them, and leaving them as they were found.

Isolation rules (the Redis and RabbitMQ here are shared with other users):

- Never FLUSHALL. taskloom's keys carry the run's namespace and are deleted by
  that namespace (SCAN MATCH + UNLINK) on the shared database.
- The peers write fixed key names (``_kombu.*``, ``dramatiq:*``, ``arq:*``, result
  keys named by bare task id), so they get Redis databases of their own
  (``Servers.peer_dbs``, default 5 and 6). The benchmark *claims* those: it
  FLUSHDBs a database only when it is empty or carries the benchmark's owner
  marker (``taskloom-bench:owner``), and refuses otherwise. These two
  databases are the only ones ever FLUSHDB'ed.
- RabbitMQ queues and exchanges are named after the run; each run deletes the
  ones it declared, by name.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

import anyio
import redis

from benchmarks.config import Servers

__all__ = [
    "MARKER",
    "ServerError",
    "amqp_delete",
    "amqp_leftovers",
    "check_servers",
    "claim_peer_dbs",
    "redis_delete_matching",
    "release_peer_dbs",
    "reset_peer_dbs",
]

MARKER = "taskloom-bench:owner"


class ServerError(RuntimeError):
    """A server is missing, or a database is not the benchmark's to use."""


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=30)


#: a claim lapses this long after the claiming run last touched it (a crashed run's
#: databases become free again); every run between measurements renews it
MARKER_TTL_S = 3600


def claim_peer_dbs(servers: Servers, owner: str) -> None:
    """Take the peers' Redis databases for this run (see the module doc)."""
    for db in servers.peer_dbs:
        with _client(servers.redis_db(db)) as r:
            size = r.dbsize()
            holder = r.get(MARKER)
            if size and holder is None:
                raise ServerError(
                    f"Redis database {db} at {servers.describe()['redis']} holds {size} keys that "
                    "the benchmark did not write, and the benchmark only empties databases it "
                    "owns; free that database or choose others with --peer-redis-dbs A,B")
            if holder is not None and holder != owner.encode():
                raise ServerError(
                    f"Redis database {db} is in use by another benchmark run "
                    f"({holder.decode(errors='replace')}): wait for it to finish, or choose "
                    "other databases with --peer-redis-dbs A,B. If no other run is going on, "
                    f"the claim lapses within {MARKER_TTL_S // 60} minutes, or free it now with "
                    f"`redis-cli -n {db} DEL {MARKER}`")
            # set the claim first, so that a run starting meanwhile sees it
            if not r.set(MARKER, owner, ex=MARKER_TTL_S, nx=True):
                raise ServerError(f"Redis database {db} was just claimed by another benchmark "
                                  "run; choose other databases with --peer-redis-dbs A,B")
            r.flushdb()  # empty, or ours: the marker above says so
            r.set(MARKER, owner, ex=MARKER_TTL_S)


def reset_peer_dbs(servers: Servers, owner: str) -> None:
    """Empty the peers' databases between runs (they were claimed by this run)."""
    for db in servers.peer_dbs:
        with _client(servers.redis_db(db)) as r:
            if r.get(MARKER) != owner.encode():
                raise ServerError(f"Redis database {db} is no longer claimed by this run (another "
                                  "benchmark run took it, or the claim lapsed); its keys were "
                                  "left alone")
            r.flushdb()  # claimed by this run: see claim_peer_dbs
            r.set(MARKER, owner, ex=MARKER_TTL_S)


def release_peer_dbs(servers: Servers, owner: str) -> None:
    """Leave the peers' databases empty at the end of the suite."""
    for db in servers.peer_dbs:
        with _client(servers.redis_db(db)) as r:
            if r.get(MARKER) == owner.encode():
                r.flushdb()  # claimed by this run: see claim_peer_dbs


def redis_delete_matching(url: str, fragment: str) -> int:
    """Delete the keys of ``url``'s database whose names contain ``fragment``
    (a run's unique namespace); returns how many."""
    if len(fragment) < 8:
        raise ValueError(f"refusing to delete keys matching the short fragment {fragment!r}")
    deleted = 0
    with _client(url) as r:
        batch: list[bytes] = []
        for key in r.scan_iter(match=f"*{fragment}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(r.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(r.unlink(*batch))
    return deleted


async def _amqp_delete(url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        for kind, names in (("queue", list(queues)), ("exchange", list(exchanges))):
            for name in names:
                channel = await connection.channel()
                try:
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                except Exception:  # not there (already gone): nothing to clean
                    pass
                finally:
                    if not channel.is_closed:
                        await channel.close()


def amqp_delete(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete the named queues and exchanges (those a run declared)."""
    anyio.run(_amqp_delete, url, list(queues), list(exchanges))


def amqp_leftovers(fragment: str) -> tuple[list[str], list[str]] | None:
    """Queues and exchanges whose names contain ``fragment``, listed with
    rabbitmqctl where it can be used (None where it cannot)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    found: list[list[str]] = []
    for what in ("list_queues", "list_exchanges"):
        try:
            done = subprocess.run(["rabbitmqctl", "-q", what, "name"], capture_output=True,
                                  text=True, timeout=60, check=True)
        except (subprocess.SubprocessError, OSError):
            return None
        names = [line.strip() for line in done.stdout.splitlines()]
        found.append([n for n in names if fragment in n and n != "name"])
    return found[0], found[1]


async def _amqp_version(url: str) -> str:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        props = getattr(connection.transport, "connection", None)
        server = getattr(props, "server_properties", {}) or {}
        version = server.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)


def check_servers(servers: Servers, brokers: Iterable[str]) -> dict[str, str]:
    """``{broker: server version}`` for the reachable servers among ``brokers``;
    raises ServerError naming what is unreachable."""
    found: dict[str, str] = {}
    wanted = set(brokers)
    if "redis" in wanted or "amqp" in wanted:  # results live in Redis for AMQP runs too
        try:
            with _client(servers.redis_url) as r:
                found["redis"] = str(r.info("server").get("redis_version", "?"))
        except redis.RedisError as e:
            raise ServerError(f"Redis at {servers.describe()['redis']} is not reachable ({e}); "
                              "start it, set TASKLOOM_BENCH_REDIS_URL, or leave redis out "
                              "with --only memory") from None
    if "amqp" in wanted:
        try:
            found["amqp"] = anyio.run(_amqp_version, servers.amqp_url)
        except Exception as e:
            raise ServerError(f"RabbitMQ at {servers.describe()['amqp']} is not reachable ({e}); "
                              "start it, set TASKLOOM_BENCH_AMQP_URL, or leave amqp out with "
                              "--only memory,redis") from None
    return found
