"""Fixtures of the dashboard tests: a runtime on the shared Redis (a unique
namespace per test, its keys removed after) with an embedded worker, the
dashboard app with an admin and a read key, and an httpx client on it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from runtime import Runtime, current_task
from runtime.dashboard import add_key, dashboard_app
from runtime.process.liveness import publish_heartbeats, store_for
from tests.conftest import REDIS_URL, server_missing


def make_runtime(namespace: str) -> Runtime:
    rt = Runtime(REDIS_URL, namespace=namespace)

    @rt.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @rt.task(name="tasks.boom")
    async def boom(message: str) -> None:
        raise RuntimeError(f"boom: {message}")

    @rt.task(name="tasks.slow")
    async def slow(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "done"

    @rt.task(name="tasks.steps")
    async def steps(gate: str, n: int) -> int:
        """Reports ``n`` steps of progress, then waits until the test opens ``gate``."""
        ctx = current_task()
        for i in range(n):
            await ctx.progress(i + 1, n, f"step {i + 1}", gate=gate)
        ctx.meta["steps"] = n
        await GATES.setdefault(gate, anyio.Event()).wait()
        return n

    return rt


#: events the ``tasks.steps`` task waits on (the worker runs in the test's process)
GATES: dict[str, anyio.Event] = {}


async def purge(namespace: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{namespace}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.unlink(*keys[i:i + 500])
    finally:
        await client.aclose()


async def redis_up() -> None:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as e:
        server_missing("Redis", e)
    finally:
        await client.aclose()


@dataclass
class Env:
    rt: Runtime
    app: Any
    client: httpx.AsyncClient
    admin: dict[str, str]
    read: dict[str, str]
    worker_name: str


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "keys.toml"
    admin = add_key(path, "ops", "admin")
    read = add_key(path, "viewer", "read")
    return path, admin, read


@asynccontextmanager
async def open_env(namespace: str, key_file: tuple[Path, str, str]) -> AsyncIterator[Env]:
    """The dashboard running with an embedded worker (the task groups are entered
    and left in one task)."""
    await redis_up()
    path, admin, read = key_file
    rt = make_runtime(namespace)
    app = dashboard_app(rt, api_keys=path, hide_data_from_read=True)
    store = store_for(rt)   # heartbeats, as `taskloom worker` publishes them
    try:
        async with app.state.dashboard.running(), rt.worker(concurrency=8) as worker, \
                anyio.create_task_group() as tg:
            await tg.start(functools.partial(publish_heartbeats, store, worker, interval_s=0.5))
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
                    yield Env(rt, app, client, {"Authorization": f"Bearer {admin}"},
                              {"Authorization": f"Bearer {read}"}, worker.name)
            finally:
                tg.cancel_scope.cancel()
    finally:
        await store.aclose()
        await purge(namespace)


@pytest.fixture
async def env(namespace: str, key_file: tuple[Path, str, str]) -> AsyncIterator[Env]:
    """``open_env`` run in a task of its own: pytest-asyncio sets a fixture up and
    tears it down in different tasks, which a task group does not allow."""
    ready: asyncio.Future[Env] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with open_env(namespace, key_file) as e:
                ready.set_result(e)
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    holder = asyncio.create_task(hold())
    try:
        yield await ready
    finally:
        stop.set()
        await holder


async def wait_state(env: Env, task_id: str, want: str) -> dict[str, Any]:
    """Until the task reaches ``want`` (30 s bound: the machine is shared and slow)."""
    with anyio.fail_after(30):
        while True:
            r = await env.client.get(f"/api/tasks/{task_id}", headers=env.admin)
            if r.status_code == 200 and r.json()["state"] == want:
                return dict(r.json())
            await anyio.sleep(0.05)


async def wait_listed(env: Env, ids: set[str], query: str = "") -> list[dict[str, Any]]:
    """Until every id in ``ids`` is in the first page of ``GET /api/tasks?<query>``
    (the index writes in batches; 30 s bound: the machine is shared and slow)."""
    with anyio.fail_after(30):
        while True:
            r = await env.client.get(f"/api/tasks?limit=500&{query}", headers=env.admin)
            items: list[dict[str, Any]] = r.json()["items"] if r.status_code == 200 else []
            if ids <= {t["id"] for t in items}:
                return items
            await anyio.sleep(0.05)
