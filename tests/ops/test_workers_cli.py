"""Worker inspection on Redis (heartbeats with state and the running tasks; a dead
worker disappears after its TTL and its started tasks show as orphaned), and the
operator commands as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio
import pytest

from runtime import Runtime
from runtime.lifecycle import Phase
from runtime.ops.api import Operations
from runtime.process.liveness import Heartbeat, RunningTask, publish_heartbeats, store_for
from tests.conftest import REDIS_URL
from tests.ops.conftest import purge_ops, redis_up, tr

LIMIT = 30.0  # generous: a loaded 2-core machine


@pytest.fixture
async def rt(namespace: str) -> AsyncIterator[Runtime]:
    await redis_up()
    runtime = Runtime(REDIS_URL, results=REDIS_URL, namespace=namespace)
    yield runtime
    async with runtime:
        await runtime.broker.purge_namespace()  # type: ignore[attr-defined]
        await runtime.results.purge_namespace()  # type: ignore[attr-defined]
    await purge_ops(namespace)


@pytest.mark.redis
async def test_workers_show_what_they_run_and_the_dead_leave_orphans(rt: Runtime) -> None:
    gate = anyio.Event()

    @rt.task(name="slow", queue="w")
    async def slow() -> str:
        await gate.wait()
        return "done"

    async with rt, Operations(rt) as ops:
        store = store_for(rt)
        h = await rt.enqueue(rt.signature("slow"))
        with anyio.fail_after(LIMIT):
            async with rt.worker(queues=["w"]) as w, anyio.create_task_group() as tg:
                await tg.start(lambda task_status: publish_heartbeats(
                    store, w, interval_s=0.1, task_status=task_status))
                while not (live := await ops.workers()) or not live[0].tasks:
                    await anyio.sleep(0.05)
                info = live[0]
                assert info.id == w.name and info.queues == ["w"] and info.state == "running"
                assert info.in_flight == 1 and info.concurrency == w.concurrency
                assert [(t.id, t.name) for t in info.tasks] == [(h.id, "slow")]
                assert await ops.orphans() == []  # its worker is alive
                gate.set()
                await w.idle()
                tg.cancel_scope.cancel()
        assert await ops.workers() == []  # a stopped worker removes its heartbeat
        # a worker that died: its last heartbeat expires, its started task stays
        await store.put(Heartbeat(id="dead-w", host="h", pid=1, queues=["w"],
                                  tasks=[RunningTask("t-dead", "slow", 1)]), ttl_s=0.3)
        rt.transition(tr("t-dead", Phase.STARTED, worker="dead-w", queue="w", task="slow"))
        seen = await ops.workers()
        assert [w.id for w in seen] == ["dead-w"] and seen[0].tasks[0].id == "t-dead"
        with anyio.fail_after(LIMIT):
            while await ops.workers():
                await anyio.sleep(0.05)
            while not (lost := await ops.orphans()):
                await anyio.sleep(0.05)
        assert [(s.id, s.worker) for s in lost] == [("t-dead", "dead-w")]
        await store.aclose()


def _cli(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = ("from runtime.cli import main; from runtime.cli.ops import register; "
            "register(main); main()")
    env = {**os.environ, "TASKLOOM_NAMESPACE": namespace}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


@pytest.mark.redis
async def test_the_commands_say_what_they_did(namespace: str) -> None:
    await redis_up()
    app = "tests.ops.cli_app:rt"
    try:
        paused = _cli(namespace, "pause", app, "--queue", "cq", "--json")
        assert paused.returncode == 0, paused.stderr
        assert json.loads(paused.stdout) == {"queue": "cq", "paused": True, "changed": True,
                                             "all_paused": ["cq"]}
        again = _cli(namespace, "pause", app, "--queue", "cq")
        assert (again.returncode, again.stdout.strip()) == (0, "cq: already paused")
        nothing = _cli(namespace, "retry", app, "no-such-task", "--queue", "cq")
        assert nothing.returncode == 1 and "cannot be retried" in nothing.stderr
        usage = _cli(namespace, "cancel", app)
        assert usage.returncode == 2
        listed = _cli(namespace, "tasks", app, "--state", "failed", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout.splitlines()[-1]) == {"next_cursor": None}
        dry = _cli(namespace, "replay", app, "--queue", "cq", "--dry-run", "--json")
        assert dry.returncode == 0 and json.loads(dry.stdout)["matched"] == 0, dry.stderr
    finally:
        await purge_ops(namespace)


async def test_an_embedded_worker_is_inspected_in_memory_and_its_events_stream() -> None:
    from runtime.ops.events import WorkerEvent

    rt = Runtime("memory://")
    async with rt, Operations(rt) as ops:
        store = store_for(rt)
        with anyio.fail_after(LIMIT):
            async with rt.worker(queues=["m"]) as w, anyio.create_task_group() as tg:
                await tg.start(lambda task_status: publish_heartbeats(
                    store, w, interval_s=0.05, task_status=task_status))
                while not await ops.workers():
                    await anyio.sleep(0.02)
                assert [x.id for x in await ops.workers()] == [w.name]
                tg.cancel_scope.cancel()
            kinds = []
            async for rec in ops.events(since="0"):
                if isinstance(rec.event, WorkerEvent):
                    kinds.append(rec.event.what)
                    if rec.event.what == "offline":
                        break
        assert kinds[0] == "online" and kinds[-1] == "offline"
        assert await ops.workers() == []
