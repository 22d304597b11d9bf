"""Least-privilege users (issue 19 item 3; RELIABILITY.md S3, S5).

A Redis ACL user limited to its namespace's keys and channels and to the
commands taskloom sends (:mod:`tests.faults.least_privilege`), on a redis-server
the test owns; and a RabbitMQ user whose configure/write/read regexes cover only
the namespace's queues and exchanges, in a vhost of its own on the shared node
(created and deleted by the test with ``rabbitmqctl``). With them:

- the contract suite's Redis and AMQP cases pass (a pytest subprocess with
  ``TASKLOOM_TEST_REDIS_URL`` / ``TASKLOOM_TEST_AMQP_URL`` pointing at the user);
- a worker, producer, result store and ops (task index, events, pauses) work end
  to end, on either broker, with Redis results as the ACL user;
- what the user must not do is refused: FLUSHALL, CONFIG, KEYS, DEBUG, ...; a
  namespace outside its keys (Redis) or its regexes (RabbitMQ) fails with a
  taskloom error that says permission was refused;
- S5: two runtimes with the same namespace and queue names in vhosts a and b
  never see each other's tasks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis

import brokers
from brokers.base import BrokerError, Envelope
from runtime import Runtime, chord
from tests.faults.harness import REPO_ROOT, RedisServer, wait_until
from tests.faults.least_privilege import (
    DENIED_COMMANDS,
    RabbitVhostUser,
    acl_denials,
    rabbit_permissions,
    redis_acl_rules,
)

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(300)]

USER = "taskloom"
PASSWORD = "lp-secret-7f3a"
#: The namespaces of the contract tests: "t" + 10 hex digits (tests/conftest.py).
CONTRACT_NS_GLOB = "t??????????"
CONTRACT_NS_REGEX = "t[0-9a-f]{10}"
#: What the contract suite may leave in ACL LOG: the broker's maxmemory-policy
#: check (CONFIG GET), which tolerates the refusal (brokers/redis/broker.py).
TOLERATED = {"config|get"}
TASKS = 50


def _admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port)


def _acl_url(server: RedisServer, namespace_glob: str) -> str:
    with _admin(server) as admin:
        admin.execute_command("ACL", "SETUSER", USER, *redis_acl_rules(namespace_glob, PASSWORD))
        admin.acl_log_reset()
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"


def _contract(kind: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The contract suite's ``kind`` cases in a pytest subprocess (CI=true: a
    server it cannot reach fails instead of skipping)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/contract", "-k", kind],
        cwd=REPO_ROOT, env={**os.environ, "CI": "true", **env}, capture_output=True,
        text=True, timeout=280, check=False)


def _passed(done: subprocess.CompletedProcess[str]) -> int:
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    found = re.search(r"(\d+) passed", done.stdout)
    assert found is not None and " skipped" not in done.stdout, tail
    return int(found.group(1))


@pytest.fixture
def shared_rabbit_user(namespace: str) -> Iterator[RabbitVhostUser]:
    """A user of two fresh vhosts on the shared RabbitMQ, allowed only the
    contract namespaces and this test's namespace; deleted afterwards."""
    regex = f"({CONTRACT_NS_REGEX}|{re.escape(namespace)})"
    with RabbitVhostUser(vhosts=2, permissions=rabbit_permissions(regex)) as user:
        yield user


# -- Redis ------------------------------------------------------------------------


def test_the_redis_contract_suite_passes_as_an_acl_user(redis_server: RedisServer) -> None:
    url = _acl_url(redis_server, CONTRACT_NS_GLOB)
    assert _passed(_contract("redis", {"TASKLOOM_TEST_REDIS_URL": url})) > 0
    with _admin(redis_server) as admin:
        refused = {obj for user, _, obj in acl_denials(admin) if user == USER}
    assert refused <= TOLERATED, refused


def test_a_redis_acl_user_is_refused_everything_else(redis_server: RedisServer) -> None:
    url = _acl_url(redis_server, CONTRACT_NS_GLOB)
    with _admin(redis_server) as admin:
        # ACL DRYRUN: what the user may run, without running it (SHUTDOWN, ...)
        verdicts = {command: admin.execute_command("ACL", "DRYRUN", USER, *command)
                    for command in DENIED_COMMANDS}
    assert all(b"no permissions" in v for v in verdicts.values()), verdicts
    with redis.Redis.from_url(url) as user:
        user.ping()
        for command in (("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("elsewhere:key", b"1")  # a key outside the namespace
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.publish("elsewhere:channel", b"1")  # a channel outside it


async def test_a_namespace_outside_the_acl_fails_with_a_taskloom_error(
        redis_server: RedisServer) -> None:
    url = _acl_url(redis_server, CONTRACT_NS_GLOB)
    broker = brokers.from_url(url, namespace="elsewhere")
    async with broker:
        with pytest.raises(BrokerError) as refused:
            await broker.publish(Envelope(id="x1", queue="jobs", body=b"x"))
    text = str(refused.value)
    # names the operation and the refusal; the password never appears
    assert "publishing message" in text and "jobs" in text, text
    assert "permission" in text.lower() and "Least privilege" in text, text  # says what to grant
    assert PASSWORD not in text


# -- RabbitMQ ---------------------------------------------------------------------


@pytest.mark.amqp
def test_the_amqp_contract_suite_passes_as_a_restricted_user(
        shared_rabbit_user: RabbitVhostUser) -> None:
    url = shared_rabbit_user.url(0)
    assert _passed(_contract("amqp", {"TASKLOOM_TEST_AMQP_URL": url})) > 0


@pytest.mark.amqp
async def test_a_namespace_outside_the_permissions_fails_with_a_taskloom_error(
        shared_rabbit_user: RabbitVhostUser) -> None:
    broker = brokers.from_url(shared_rabbit_user.url(0), namespace="elsewhere")
    async with broker:
        with pytest.raises(BrokerError) as refused:
            await broker.publish(Envelope(id="x1", queue="jobs", body=b"x"))
    text = str(refused.value)
    assert "ACCESS_REFUSED" in text and "elsewhere.jobs" in text, text
    assert "permissions" in text, text
    assert shared_rabbit_user.password not in text


# -- end to end -------------------------------------------------------------------


def _app(broker: str, results: str, namespace: str, ran: list[int]) -> tuple[Runtime, Any, Any]:
    rt = Runtime(broker=broker, results=results, namespace=namespace)

    @rt.task(name="add")
    async def add(a: int, b: int) -> int:
        ran.append(a)
        return a + b

    @rt.task(name="total")
    async def total(values: list[int]) -> int:
        return sum(values)

    return rt, add, total


async def _at_least(rt: Runtime, n: int) -> int | None:
    count = await rt.ops.count("succeeded")
    return count if count >= n else None


async def _events(rt: Runtime, n: int) -> int:
    seen = 0
    async for _ in rt.ops.events(since="0"):
        seen += 1
        if seen >= n:
            break
    return seen


@pytest.mark.amqp
@pytest.mark.parametrize("kind", ["redis", "amqp"])
async def test_a_worker_producer_results_and_ops_run_as_least_privilege_users(
        kind: str, redis_server: RedisServer, shared_rabbit_user: RabbitVhostUser,
        namespace: str) -> None:
    results = _acl_url(redis_server, namespace)  # this namespace only
    broker = results if kind == "redis" else shared_rabbit_user.url(0)
    ran: list[int] = []
    rt, add, total = _app(broker, results, namespace, ran)
    with anyio.fail_after(120):  # generous: a loaded 2-core machine
        async with rt:
            try:
                async with rt.worker(concurrency=4):
                    handles = await rt.enqueue_many([add.s(i, 1) for i in range(TASKS)])
                    late = await rt.enqueue(add.s(1000, 1), countdown=0.3)
                    joined = await rt.enqueue(chord([add.s(i, i) for i in range(5)], total.s()))
                    values = [(await rt.results.wait(h.id, 60)).value for h in handles]
                    assert (await rt.results.wait(late.id, 60)).value == 1001
                    assert (await rt.results.wait(joined.id, 60)).value == 20
                    assert await rt.ops.pause("default") is True
                    assert await rt.ops.paused() == {"default"}
                    assert await rt.ops.resume("default") is True
                    # the index is written in batches beside the results: wait for it
                    succeeded = await wait_until(lambda: _at_least(rt, TASKS + 7), timeout=30,
                                                 what="the index to count every success")
                    events = await _events(rt, TASKS)
            finally:
                await rt.broker.purge_namespace()  # type: ignore[attr-defined]
    with _admin(redis_server) as admin:
        refused = {obj for user, _, obj in acl_denials(admin) if user == USER}
        stray = [k for k in admin.scan_iter() if not k.startswith(f"{namespace}:".encode())]
    assert values == [i + 1 for i in range(TASKS)]
    assert succeeded == TASKS + 7
    assert events == TASKS
    assert refused <= TOLERATED, refused
    assert stray == []


@pytest.mark.amqp
async def test_runtimes_in_two_vhosts_never_see_each_others_tasks(
        shared_rabbit_user: RabbitVhostUser, namespace: str) -> None:
    """S5: same namespace, same queue, same task name, vhosts a and b."""
    ran: dict[str, list[int]] = {"a": [], "b": []}
    made = {name: _app(shared_rabbit_user.url(i), "memory://", namespace, ran[name])
            for i, name in enumerate(("a", "b"))}
    apps = {name: rt for name, (rt, _, _) in made.items()}
    sent: dict[str, list[Any]] = {}
    with anyio.fail_after(120):  # generous: a loaded 2-core machine
        async with apps["a"], apps["b"]:
            try:
                for offset, (name, rt) in enumerate(apps.items()):
                    add = made[name][1]
                    sent[name] = await rt.enqueue_many(
                        [add.s(offset * 1000 + i, 0) for i in range(TASKS)])
                async with apps["a"].worker(concurrency=4), apps["b"].worker(concurrency=4):
                    for name, rt in apps.items():
                        for h in sent[name]:
                            await rt.results.wait(h.id, 60)
                stats = {name: await rt.broker.stats("default") for name, rt in apps.items()}
            finally:
                for rt in apps.values():
                    await rt.broker.purge_namespace()  # type: ignore[attr-defined]
    assert sorted(ran["a"]) == list(range(TASKS))
    assert sorted(ran["b"]) == [1000 + i for i in range(TASKS)]
    assert all((s.ready, s.in_flight, s.dead) == (0, 0, 0) for s in stats.values()), stats
