"""The dashboard on top of ``runtime.ops``: the task index lists STARTED live,
the event stream feeds the live pages, workers show what they run and the
orphans, task detail has progress and attempts, and the verbs the ops side
supports (pause/resume, purge, cancel by filter) answer instead of 501."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import pytest

from runtime import Runtime
from runtime.dashboard import dashboard_app
from runtime.lifecycle import Phase, Transition
from runtime.ops.index import index_for
from tests.conftest import AMQP_URL, REDIS_URL
from tests.dashboard.conftest import GATES, Env, purge, redis_up, wait_listed, wait_state

pytestmark = pytest.mark.redis

WAIT_S = 30   # generous: the machine is shared; the point is that it happens


async def submit(env: Env, name: str, args: list[Any], **options: Any) -> str:
    body: dict[str, Any] = {"name": name, "args": args}
    if options:
        body["options"] = options
    r = await env.client.post("/api/tasks", json=body, headers=env.admin)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_started_is_listed_and_sent_live_with_progress_and_attempts(env: Env) -> None:
    gate = uuid.uuid4().hex
    feed = env.app.state.dashboard.hub.subscribe()
    task_id = await submit(env, "tasks.steps", [gate, 3])
    try:
        seen: list[str] = []
        with anyio.fail_after(WAIT_S), feed:
            while "STARTED" not in seen:   # the worker's STARTED, through the event stream
                ev = await feed.receive()
                if ev.get("type") == "task" and ev["id"] == task_id:
                    seen.append(ev["state"])
        started = await wait_listed(env, {task_id}, "state=STARTED")
        assert next(t for t in started if t["id"] == task_id)["phase"] == "started"
        with anyio.fail_after(WAIT_S):   # progress is written off the hot path: soon
            while True:
                t = (await env.client.get(f"/api/tasks/{task_id}", headers=env.admin)).json()
                if t.get("progress", {}).get("done") == 3:
                    break
                await anyio.sleep(0.05)
        assert t["state"] == "STARTED" and t["progress"]["total"] == 3
        assert t["progress"]["message"] == "step 3"
        assert t["attempts"] == [{"attempt": 1, "state": "STARTED", "worker": t["worker"],
                                  "started_ms": t["started_ms"], "finished_ms": None}]
        # the worker shows the task it runs now (its heartbeat says so)
        with anyio.fail_after(WAIT_S):
            while True:
                items = (await env.client.get("/api/workers", headers=env.read)).json()["items"]
                running = [t for w in items if w["id"] == env.worker_name for t in w["tasks"]]
                if any(r["id"] == task_id for r in running):
                    break
                await anyio.sleep(0.05)
        assert next(r for r in running if r["id"] == task_id)["name"] == "tasks.steps"
    finally:
        GATES.setdefault(gate, anyio.Event()).set()
    done = await wait_state(env, task_id, "SUCCESS")
    assert done["result"] == 3 and done["meta"] == {"steps": 3}
    assert done["attempts"][-1]["state"] == "SUCCESS"
    ended = await wait_listed(env, {task_id}, "state=SUCCESS")
    assert task_id in [t["id"] for t in ended]


async def test_orphans_are_started_tasks_of_a_gone_worker(env: Env) -> None:
    index = index_for(env.rt)   # a STARTED record whose worker has no heartbeat
    try:
        now = int(time.time() * 1000)
        index.transition(Transition(id="orphan-1", task="tasks.add", queue="default",
                                    phase=Phase.STARTED, at_ms=now, worker="ghost-worker"))
        await index.flush()
    finally:
        await index.aclose()
    body = (await env.client.get("/api/workers", headers=env.admin)).json()
    assert [o["worker"] for o in body["orphans"] if o["id"] == "orphan-1"] == ["ghost-worker"]
    assert env.worker_name in [w["id"] for w in body["items"]]


async def test_pause_and_resume_a_queue(env: Env) -> None:
    r = await env.client.post("/api/queues/default/pause", headers=env.admin)
    assert r.status_code == 200 and r.json()["paused"] is True, r.text
    queues = (await env.client.get("/api/queues", headers=env.read)).json()["items"]
    assert [q["paused"] for q in queues if q["name"] == "default"] == [True]
    r = await env.client.post("/api/queues/default/resume", headers=env.admin)
    assert r.status_code == 200 and r.json()["paused"] is False
    queues = (await env.client.get("/api/queues", headers=env.read)).json()["items"]
    assert [q["paused"] for q in queues if q["name"] == "default"] == [False]


async def test_purge_dead_letters_dry_run_then_for_real(env: Env) -> None:
    task_id = await submit(env, "tasks.boom", ["purge me"])
    await wait_state(env, task_id, "FAILURE")
    url = "/api/queues/default/dead-letters"
    dry = await env.client.post(f"{url}/purge", json={"ids": [task_id], "dry_run": True},
                                headers=env.admin)
    assert dry.status_code == 200, dry.text
    assert dry.json()["matched"] == 1 and dry.json()["purged"] == 0
    assert task_id in [d["id"] for d in (await env.client.get(url, headers=env.read)).json()["items"]]
    done = await env.client.post(f"{url}/purge", headers=env.admin)   # no body: all of them
    assert done.status_code == 200 and done.json()["purged"] >= 1, done.text
    assert (await env.client.get(url, headers=env.read)).json()["items"] == []


async def test_cancel_by_filter(env: Env) -> None:
    ids = {await submit(env, "tasks.slow", [30], countdown=600) for _ in range(3)}
    keep = await submit(env, "tasks.add", [1, 1], countdown=600)
    await wait_listed(env, ids | {keep})   # cancel by name reads the index
    r = await env.client.post("/api/tasks/cancel", json={"name": "tasks.slow"}, headers=env.admin)
    assert r.status_code == 200, r.text
    assert r.json()["matched"] == 3 and r.json()["revoked"] == 3
    for task_id in ids:
        await wait_state(env, task_id, "REVOKED")
    assert (await env.client.get(f"/api/tasks/{keep}", headers=env.read)).json()["state"] == "PENDING"
    none = await env.client.post("/api/tasks/cancel", json={}, headers=env.admin)
    assert none.status_code == 422 and "cancel needs ids" in none.json()["error"]
    bad = await env.client.post("/api/tasks/cancel", json={"ids": ["a b"]}, headers=env.admin)
    assert bad.status_code == 422


@pytest.mark.amqp
async def test_rabbitmq_replay_and_purge_answer(namespace: str) -> None:
    """RabbitMQ replays and purges dead letters one by one (runtime.ops, issue 14):
    with none there, both answer 200 with nothing matched."""
    await redis_up()
    rt = Runtime(AMQP_URL, results=REDIS_URL, namespace=namespace)
    app = dashboard_app(rt)
    import httpx

    try:
        async with app.state.dashboard.running():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
                r = await client.post("/api/queues/default/dead-letters/replay",
                                      json={"dry_run": False})
                assert r.status_code == 200, r.text
                assert r.json()["matched"] == [] and r.json()["replayed"] == []
                p = await client.post("/api/queues/default/dead-letters/purge",
                                      json={"dry_run": False})
                assert p.status_code == 200, p.text
                assert p.json()["purged"] == 0
    finally:
        await purge(namespace)
