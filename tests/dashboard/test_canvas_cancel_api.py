"""The REST API for a task's canvas (``GET /api/tasks/{id}/family``: parent, root,
children, members, read from the task index) and the dry run of cancel by
filter that the UI's confirmation shows."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime import chain, group
from tests.dashboard.conftest import Env, wait_listed, wait_state

pytestmark = pytest.mark.redis

WAIT_S = 30   # generous: the machine is shared; the point is that it happens


async def submit(env: Env, name: str, args: list[Any], **options: Any) -> str:
    r = await env.client.post("/api/tasks", json={"name": name, "args": args,
                                                  "options": options}, headers=env.admin)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def family_of(env: Env, task_id: str, *, want_members: int) -> dict[str, Any]:
    """The family once the index has every member (it writes in batches)."""
    with anyio.fail_after(WAIT_S):
        while True:
            r = await env.client.get(f"/api/tasks/{task_id}/family", headers=env.read)
            if r.status_code == 200 and len(r.json()["members"]) >= want_members:
                out: dict[str, Any] = r.json()
                return out
            await anyio.sleep(0.05)


async def test_family_of_a_chain_then_group(env: Env) -> None:
    add = env.rt.registry["tasks.add"]
    # root -> step -> group of two: four tasks under one root
    canvas = chain(add.s(1, 2), add.partial(3), group(add.partial(10), add.partial(20)))
    handle = await env.rt.enqueue(canvas)
    assert (await wait_state(env, handle.id, "SUCCESS"))["result"] == [16, 26]
    with anyio.fail_after(WAIT_S):   # the index writes in batches
        while True:
            r = await env.client.get("/api/tasks?name=tasks.add&limit=500", headers=env.read)
            items = r.json()["items"]
            if len(items) == 4 and {t["state"] for t in items} == {"SUCCESS"}:
                break
            await anyio.sleep(0.05)
    roots = [t for t in items if not t.get("parent_id")]
    assert len(roots) == 1
    root = roots[0]["id"]

    fam = await family_of(env, root, want_members=3)
    assert fam["root_id"] == root and fam["parent"] is None and fam["complete"] is True
    assert len(fam["children"]) == 1            # the second step
    step = fam["children"][0]
    assert step["name"] == "tasks.add" and step["state"] == "SUCCESS"
    assert step["link"] == f"#/task/{step['id']}"
    assert {m["id"] for m in fam["members"]} == {t["id"] for t in items} - {root}

    mid = await family_of(env, step["id"], want_members=3)
    assert mid["parent_id"] == root and mid["parent"]["id"] == root
    assert mid["root"]["id"] == root and mid["root"]["state"] == "SUCCESS"
    assert len(mid["children"]) == 2            # the group's members
    assert {c["parent_id"] for c in mid["children"]} == {step["id"]}

    leaf = mid["children"][0]["id"]
    low = await family_of(env, leaf, want_members=3)
    assert low["parent"]["id"] == step["id"] and low["children"] == []
    # the task page's own record names both
    t = (await env.client.get(f"/api/tasks/{leaf}", headers=env.read)).json()
    assert t["parent_id"] == step["id"] and t["root_id"] == root


async def test_family_scan_is_bounded_and_says_so(env: Env) -> None:
    from runtime.dashboard.family import family

    add = env.rt.registry["tasks.add"]
    handle = await env.rt.enqueue(chain(add.s(1, 2), add.partial(3)))
    assert (await wait_state(env, handle.id, "SUCCESS"))["result"] == 6
    items = await wait_listed(env, {handle.id}, "name=tasks.add")
    root = next(t["id"] for t in items if t["id"] != handle.id)
    ops = env.app.state.dashboard.source.ops
    for _ in range(3):   # tasks after the chain: more than a scan of 1 reads
        await submit(env, "tasks.add", [1, 1])
    with anyio.fail_after(WAIT_S):
        while (out := await family(ops, root, scan_max=1)) is None or out["complete"]:
            await anyio.sleep(0.05)
    assert out["scanned"] < 10


async def test_family_errors(env: Env) -> None:
    r = await env.client.get("/api/tasks/nope-not-a-task/family", headers=env.read)
    assert r.status_code == 404 and "GET /api/tasks" in r.json()["error"]
    assert (await env.client.get("/api/tasks/x/family")).status_code == 401


async def test_cancel_dry_run_counts_and_changes_nothing(env: Env) -> None:
    queue = "hold-" + env.worker_name[-6:]
    ids = {await submit(env, "tasks.slow", [30], countdown=600, queue=queue) for _ in range(3)}
    other = await submit(env, "tasks.add", [1, 1], countdown=600, queue=queue)
    await wait_listed(env, ids | {other})

    async def dry(body: dict[str, Any]) -> int:
        r = await env.client.post("/api/tasks/cancel", json={**body, "dry_run": True},
                                  headers=env.admin)
        assert r.status_code == 200, r.text
        assert r.json()["dry_run"] is True and r.json()["revoked"] == 0
        return int(r.json()["matched"])

    assert await dry({"queue": queue}) == 4                      # counted from the index's sets
    assert await dry({"name": "tasks.slow", "queue": queue}) == 3   # listed, as cancel lists
    assert await dry({"ids": [other, other]}) == 1
    assert await dry({"ids": [other], "name": "tasks.slow"}) == 4
    for task_id in ids | {other}:
        t = (await env.client.get(f"/api/tasks/{task_id}", headers=env.read)).json()
        assert t["state"] == "PENDING"
    none = await env.client.post("/api/tasks/cancel", json={"dry_run": True}, headers=env.admin)
    assert none.status_code == 422 and "cancel needs ids" in none.json()["error"]
    ro = await env.client.post("/api/tasks/cancel", json={"queue": queue, "dry_run": True},
                               headers=env.read)
    assert ro.status_code == 403
    done = await env.client.post("/api/tasks/cancel", json={"queue": queue}, headers=env.admin)
    assert done.json() == {"matched": 4, "revoked": 4, "unchanged": 0, "dry_run": False}
    await wait_state(env, other, "REVOKED")
