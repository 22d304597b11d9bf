"""``taskloom dlq``, ``replay`` and ``purge-dead`` on RabbitMQ (results on Redis), as a
subprocess: tasks that fail for real are listed with their reason, task name and id;
one is replayed by id and its new attempt succeeds; an unknown id is a clear error that
does nothing; a purge by task name leaves the others, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio
import pytest

from runtime import Runtime
from runtime.ops.verbs import retry_id
from tests.cli import dlq_amqp_app
from tests.ops.conftest import purge_ops, redis_up

pytestmark = [pytest.mark.amqp, pytest.mark.redis]

LIMIT = 30.0  # generous: a loaded 2-core machine; the work itself takes milliseconds
APP = "tests.cli.dlq_amqp_app:rt"


def _cli(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKLOOM_NAMESPACE": namespace, "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, check=False)


@pytest.fixture
async def rt(namespace: str) -> AsyncIterator[Runtime]:
    await redis_up()
    runtime = dlq_amqp_app.make(namespace)
    dlq_amqp_app.broken["on"] = True
    try:
        yield runtime
    finally:
        async with runtime:
            await runtime.broker.purge_namespace()  # type: ignore[attr-defined]
            await runtime.results.purge_namespace()  # type: ignore[attr-defined]
        await purge_ops(namespace)


async def _drain(rt: Runtime) -> None:
    with anyio.fail_after(LIMIT):
        async with rt.worker(queues=["cdq"], concurrency=1) as w:
            await w.idle()


async def test_list_replay_by_id_and_purge_by_name(rt: Runtime, namespace: str) -> None:
    async with rt:
        flaky = [(await rt.enqueue(rt.signature("cli.dlq.flaky", i))).id for i in range(3)]
        other = (await rt.enqueue(rt.signature("cli.dlq.other", 7))).id
        await _drain(rt)
        order = [d.envelope.id for d in await rt.broker.dead_letters("cdq")]
        assert sorted(order) == sorted([*flaky, other])

        listed = await anyio.to_thread.run_sync(_cli, namespace, "dlq", APP, "--queue", "cdq")
        assert listed.returncode == 0, listed.stderr
        rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines()
                if line.count("│") > 3 and "message id" not in line}
        assert set(rows) == {*flaky, other}
        assert all("failed" in rows[i] and "cli.dlq.flaky" in rows[i] for i in flaky)
        assert "cli.dlq.other" in rows[other]

        dlq_amqp_app.broken["on"] = False
        chosen = flaky[1]
        replayed = await anyio.to_thread.run_sync(
            _cli, namespace, "replay", APP, "--queue", "cdq", "--id", chosen, "--json")
        assert replayed.returncode == 0, replayed.stderr
        report = json.loads(replayed.stdout)
        assert (report["matched"], report["done"], report["already_replayed"]) == (1, 1, [])
        await _drain(rt)
        assert await rt.handle(retry_id(chosen)).result(timeout=LIMIT) == 2
        order.remove(chosen)
        assert [d.envelope.id for d in await rt.broker.dead_letters("cdq")] == order

        again = await anyio.to_thread.run_sync(
            _cli, namespace, "replay", APP, "--queue", "cdq", "--id", chosen)
        assert again.returncode == 0, again.stderr
        assert f"{chosen} was already replayed as {retry_id(chosen)}" in again.stdout
        unknown = await anyio.to_thread.run_sync(
            _cli, namespace, "replay", APP, "--queue", "cdq", "--id", flaky[0], "--id", "nope")
        assert unknown.returncode == 1
        assert "no dead letter of queue 'cdq' has the id nope" in unknown.stderr
        assert "Traceback" not in unknown.stderr
        bad_purge = await anyio.to_thread.run_sync(
            _cli, namespace, "purge-dead", APP, "--queue", "cdq", "--id", "nope")
        assert bad_purge.returncode == 1 and "has the id nope" in bad_purge.stderr
        assert [d.envelope.id for d in await rt.broker.dead_letters("cdq")] == order

        purged = await anyio.to_thread.run_sync(
            _cli, namespace, "purge-dead", APP, "--queue", "cdq", "--name", "cli.dlq.other",
            "--json")
        assert purged.returncode == 0, purged.stderr
        assert (json.loads(purged.stdout)["matched"], json.loads(purged.stdout)["done"]) == (1, 1)
        order.remove(other)
        left = await rt.broker.dead_letters("cdq")
        assert [d.envelope.id for d in left] == order == [flaky[0], flaky[2]]
        assert {d.reason for d in left} == {"failed"}
