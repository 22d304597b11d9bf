"""The REST API against a runtime on the shared Redis with an embedded worker:
every endpoint, and every error (no key, read key on a mutation, oversized
body, unknown task, bad arguments)."""

from __future__ import annotations

import pytest

from runtime.dashboard.api import MAX_BODY, routes_table
from tests.dashboard.conftest import Env, wait_listed, wait_state

pytestmark = pytest.mark.redis


async def test_health_is_open_and_says_what_it_checked(env: Env) -> None:
    r = await env.client.get("/api/health")
    assert r.status_code == 200
    assert r.json()["checks"]["broker"] == "ok" and r.json()["checks"]["results"] == "ok"


async def test_openapi_lists_every_route_and_docs_render(env: Env) -> None:
    spec = (await env.client.get("/api/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    for method, path, _, _ in routes_table():
        assert method.lower() in spec["paths"][path]
    docs = await env.client.get("/api/docs")
    assert docs.status_code == 200 and "/api/tasks" in docs.text and "<script" not in docs.text


async def test_submit_get_and_list(env: Env) -> None:
    r = await env.client.post("/api/tasks", json={"name": "tasks.add", "args": [1, 2]},
                              headers=env.admin)
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    done = await wait_state(env, task_id, "SUCCESS")
    assert done["result"] == 3 and done["name"] == "tasks.add" and done["args"] == [1, 2]
    listed = (await env.client.get("/api/tasks?limit=10", headers=env.read)).json()
    assert task_id in [t["id"] for t in listed["items"]]
    only = (await env.client.get("/api/tasks?state=FAILURE", headers=env.read)).json()
    assert task_id not in [t["id"] for t in only["items"]]


async def test_pagination_by_cursor(env: Env) -> None:
    ids = set()
    for i in range(5):
        r = await env.client.post("/api/tasks", json={"name": "tasks.add", "args": [i, i]},
                                  headers=env.admin)
        ids.add(r.json()["id"])
    await wait_listed(env, ids)   # the index writes in batches: a listing lags a little
    seen: list[str] = []
    cursor = None
    while True:
        q = "/api/tasks?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await env.client.get(q, headers=env.read)).json()
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen))


async def test_read_key_sees_no_arguments_or_results_when_hidden(env: Env) -> None:
    r = await env.client.post("/api/tasks", json={"name": "tasks.add", "args": [4, 5]},
                              headers=env.admin)
    task_id = r.json()["id"]
    await wait_state(env, task_id, "SUCCESS")
    seen = (await env.client.get(f"/api/tasks/{task_id}", headers=env.read)).json()
    assert "hidden" in seen["args"] and "hidden" in seen["result"]


async def test_failure_retry_and_dead_letters(env: Env) -> None:
    r = await env.client.post("/api/tasks", json={"name": "tasks.boom", "args": ["x"]},
                              headers=env.admin)
    task_id = r.json()["id"]
    failed = await wait_state(env, task_id, "FAILURE")
    assert failed["error"]["type"] == "RuntimeError" and "boom: x" in failed["error"]["traceback"]
    dead = (await env.client.get("/api/queues/default/dead-letters", headers=env.read)).json()
    assert task_id in [d["id"] for d in dead["items"]]
    dry = await env.client.post("/api/queues/default/dead-letters/replay",
                                json={"ids": [task_id], "dry_run": True}, headers=env.admin)
    assert dry.status_code == 200 and dry.json()["matched"] == [task_id]
    assert dry.json()["replayed"] == []
    again = await env.client.post(f"/api/tasks/{task_id}/retry", headers=env.admin)
    assert again.status_code == 200, again.text
    new_id = again.json()["new_id"]
    assert again.json()["retried"] is True
    await wait_state(env, new_id, "FAILURE")   # it fails again, as it must
    # the retry took the original's dead letter; the retry's own is there to replay
    dead = (await env.client.get("/api/queues/default/dead-letters", headers=env.read)).json()
    assert task_id not in [d["id"] for d in dead["items"]]
    assert new_id in [d["id"] for d in dead["items"]]
    replayed = await env.client.post("/api/queues/default/dead-letters/replay",
                                     json={"ids": [new_id], "dry_run": False}, headers=env.admin)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["matched"] == [new_id] and len(replayed.json()["replayed"]) == 1
    await wait_state(env, replayed.json()["replayed"][0], "FAILURE")
    # the link is read from the index, which the worker writes in batches: the
    # retry's result can be stored before its index entry is
    await wait_listed(env, {new_id})
    original = (await env.client.get(f"/api/tasks/{task_id}", headers=env.read)).json()
    assert original["retried_as"] == new_id and original["attempts"][-1]["state"] == "FAILURE"


async def test_cancel(env: Env) -> None:
    r = await env.client.post("/api/tasks", json={"name": "tasks.slow", "args": [30],
                                                  "options": {"countdown": 60}}, headers=env.admin)
    task_id = r.json()["id"]
    c = await env.client.post(f"/api/tasks/{task_id}/cancel", headers=env.admin)
    assert c.status_code == 200 and c.json()["cancelled"] is True
    await wait_state(env, task_id, "REVOKED")


async def test_queues_workers_schedules(env: Env) -> None:
    queues = (await env.client.get("/api/queues", headers=env.read)).json()["items"]
    assert "default" in [q["name"] for q in queues]
    assert {"ready", "delayed", "in_flight", "dead", "paused"} <= set(queues[0])
    workers = (await env.client.get("/api/workers", headers=env.read))
    assert workers.status_code == 200 and isinstance(workers.json()["items"], list)
    schedules = await env.client.get("/api/schedules", headers=env.read)
    assert schedules.status_code == 200 and schedules.json()["items"] == []
    missing = await env.client.post("/api/schedules/nope/trigger", headers=env.admin)
    assert missing.status_code == 404 and "GET /api/schedules" in missing.json()["error"]
    missing = await env.client.post("/api/schedules/nope/pause", headers=env.admin)
    assert missing.status_code == 404


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _, s in routes_table() if s != "none"])
async def test_every_guarded_route_needs_a_key(env: Env, method: str, path: str) -> None:
    url = path.replace("{id}", "x").replace("{queue}", "default").replace("{name}", "n")
    r = await env.client.request(method, url)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    r = await env.client.request(method, url, headers={"Authorization": "Bearer tlk_wrong"})
    assert r.status_code == 401 and "not valid" in r.json()["error"]


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _, s in routes_table() if s == "admin"])
async def test_read_key_cannot_mutate(env: Env, method: str, path: str) -> None:
    url = path.replace("{id}", "x").replace("{queue}", "default").replace("{name}", "n")
    r = await env.client.request(method, url, headers=env.read)
    assert r.status_code == 403 and "admin key" in r.json()["error"]


async def test_bad_input_is_4xx_with_what_to_do(env: Env) -> None:
    post = env.client.post
    big = await post("/api/tasks", content=b"[" + b"1," * MAX_BODY + b"1]", headers=env.admin)
    assert big.status_code == 413 and "send less" in big.json()["error"]
    unknown = await post("/api/tasks/x/retry", headers=env.admin)
    assert unknown.status_code == 404
    missing = await env.client.get("/api/tasks/no-such-task", headers=env.read)
    assert missing.status_code == 404 and "GET /api/tasks" in missing.json()["error"]
    bad = await post("/api/tasks", json={"name": "tasks.add", "args": ["a", "b"]}, headers=env.admin)
    assert bad.status_code == 422 and "argument 'x'" in bad.json()["error"]
    bad = await post("/api/tasks", json={"name": "tasks.add", "args": [1]}, headers=env.admin)
    assert bad.status_code == 422 and "signature" in bad.json()["error"]
    bad = await post("/api/tasks", json={"name": "tasks.add", "options": {"nope": 1}},
                     headers=env.admin)
    assert bad.status_code == 422 and "allowed" in bad.json()["error"]
    bad = await post("/api/tasks", json={"name": "tasks.add", "options": {"priority": 99}},
                     headers=env.admin)
    assert bad.status_code == 422
    bad = await post("/api/tasks", content=b"{not json", headers=env.admin)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    bad = await post("/api/tasks", json={"args": []}, headers=env.admin)
    assert bad.status_code == 422
    bad = await env.client.get("/api/tasks?limit=0", headers=env.read)
    assert bad.status_code == 422
    bad = await env.client.get("/api/tasks?state=nope", headers=env.read)
    assert bad.status_code == 422
    bad = await env.client.delete("/api/tasks", headers=env.admin)
    assert bad.status_code == 405
    bad = await env.client.get("/api/nothing", headers=env.read)
    assert bad.status_code == 404 and "/api/docs" in bad.json()["error"]


async def test_a_replay_filter_that_matches_nothing_replays_nothing(env: Env) -> None:
    r = await env.client.post("/api/tasks", json={"name": "tasks.boom", "args": ["y"]},
                              headers=env.admin)
    task_id = r.json()["id"]
    await wait_state(env, task_id, "FAILURE")
    none = await env.client.post("/api/queues/default/dead-letters/replay",
                                 json={"name": "tasks.no_such_task", "dry_run": False},
                                 headers=env.admin)
    assert none.status_code == 200, none.text
    assert none.json()["matched"] == [] and none.json()["replayed"] == []
    dead = (await env.client.get("/api/queues/default/dead-letters", headers=env.read)).json()
    assert task_id in [d["id"] for d in dead["items"]]   # still there, not replayed
