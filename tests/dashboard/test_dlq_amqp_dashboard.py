"""The dashboard's dead-letter views and verbs on RabbitMQ (results on Redis): tasks
that fail for real are listed with reason, task name and id; one is replayed by id and
runs to success; a purge by task name leaves the others, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from runtime import Runtime
from runtime.dashboard import dashboard_app
from runtime.ops.verbs import retry_id
from tests.conftest import AMQP_URL, REDIS_URL
from tests.dashboard.conftest import purge, redis_up

pytestmark = [pytest.mark.amqp, pytest.mark.redis]

LIMIT = 30.0  # generous: a loaded 2-core machine; the work itself takes milliseconds
URL = "/api/queues/ddq/dead-letters"
broken = {"on": True}


@pytest.fixture
async def rt(namespace: str) -> AsyncIterator[Runtime]:
    await redis_up()
    runtime = Runtime(AMQP_URL, results=REDIS_URL, namespace=namespace)

    @runtime.task(name="dash.flaky", queue="ddq")
    async def flaky(x: int) -> int:
        if broken["on"]:
            raise ValueError(f"broken for {x}")
        return x + 100

    @runtime.task(name="dash.other", queue="ddq")
    async def other(x: int) -> int:
        raise KeyError(x)

    broken["on"] = True
    try:
        yield runtime
    finally:
        async with runtime:
            await runtime.broker.purge_namespace()  # type: ignore[attr-defined]
        await purge(namespace)


async def _drain(rt: Runtime) -> None:
    with anyio.fail_after(LIMIT):
        async with rt.worker(queues=["ddq"], concurrency=1) as w:
            await w.idle()


async def _listed(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get(URL)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def test_dead_letters_listed_replayed_and_purged_on_rabbitmq(rt: Runtime) -> None:
    app = dashboard_app(rt)
    async with rt:
        flaky = [(await rt.enqueue(rt.signature("dash.flaky", i))).id for i in range(3)]
        other = (await rt.enqueue(rt.signature("dash.other", 1))).id
        await _drain(rt)
        async with app.state.dashboard.running():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
                items = await _listed(client)
                assert [(d["id"], d["name"], d["reason"]) for d in items] == [
                    *((i, "dash.flaky", "failed") for i in flaky), (other, "dash.other", "failed")]
                broken["on"] = False
                r = await client.post(f"{URL}/replay", json={"ids": [flaky[1]], "dry_run": False})
                assert r.status_code == 200, r.text
                assert r.json()["replayed"] == [retry_id(flaky[1])]
                await _drain(rt)
                assert await rt.handle(retry_id(flaky[1])).result(timeout=LIMIT) == 101
                assert [d["id"] for d in await _listed(client)] == [flaky[0], flaky[2], other]
                r = await client.post(f"{URL}/purge", json={"name": "dash.other"})
                assert r.status_code == 200, r.text
                assert (r.json()["matched"], r.json()["purged"]) == (1, 1)
                assert [d["id"] for d in await _listed(client)] == [flaky[0], flaky[2]]
