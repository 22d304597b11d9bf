"""Prometheus metrics parsed by prometheus_client.parser, the listener fed by
lifecycle transitions, and API keys (hashed at rest, printed once)."""

from __future__ import annotations

import stat
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from runtime.cli.dashboard import dashboard, keys
from runtime.dashboard import MetricsListener, load_keys
from runtime.lifecycle import Phase, Transition
from tests.dashboard.conftest import Env, wait_state


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.redis
async def test_scrape_shows_counters_moving(env: Env) -> None:
    before = samples((await env.client.get("/metrics", headers=env.read)).text)
    key = ("taskloom_tasks_succeeded_total", (("queue", "default"), ("task", "tasks.add")))
    assert before.get(key, 0.0) == 0.0
    for i in range(3):
        r = await env.client.post("/api/tasks", json={"name": "tasks.add", "args": [i, 1]},
                                  headers=env.admin)
        await wait_state(env, r.json()["id"], "SUCCESS")
    with anyio.fail_after(30):  # the watcher publishes after the result lands; shared machine
        while True:
            after = samples((await env.client.get("/metrics", headers=env.read)).text)
            depth = any(name == "taskloom_queue_depth" for name, _ in after)
            if after.get(key, 0.0) >= 3 and depth:   # depth: the next 2 s snapshot
                break
            await anyio.sleep(0.05)
    assert after[("taskloom_tasks_enqueued_total", key[1])] >= 3
    assert any(name == "taskloom_queue_depth" for name, _ in after)
    text = (await env.client.get("/metrics", headers=env.read)).text
    assert "task_id" not in text and "id=" not in text   # no task ids in labels


def test_listener_counts_transitions_and_histograms() -> None:
    listener = MetricsListener()

    def t(phase: Phase, at: int, tid: str = "a", **kw: object) -> Transition:
        return Transition(id=tid, task="t", queue="q", phase=phase, at_ms=at, **kw)  # type: ignore[arg-type]

    listener.transition(t(Phase.ENQUEUED, 1000))
    listener.transition(t(Phase.STARTED, 1500))
    listener.transition(t(Phase.SUCCEEDED, 3500))
    listener.transition(t(Phase.ENQUEUED, 1000, "b"))
    listener.transition(t(Phase.STARTED, 1100, "b"))
    listener.transition(t(Phase.DEAD_LETTERED, 1200, "b", reason="failed"))
    s = samples(listener.metrics.exposition().decode())
    lab = (("queue", "q"), ("task", "t"))
    assert s[("taskloom_tasks_succeeded_total", lab)] == 1
    assert s[("taskloom_tasks_dead_lettered_total", (("queue", "q"), ("reason", "failed"),
                                                     ("task", "t")))] == 1
    assert s[("taskloom_task_run_seconds_sum", lab)] == pytest.approx(2.1)
    assert s[("taskloom_task_queue_wait_seconds_sum", lab)] == pytest.approx(0.6)
    assert s[("taskloom_tasks_in_flight", lab)] == 0


def test_keys_add_prints_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    out = CliRunner().invoke(keys, ["add", "ops", "--scope", "admin", "--file", str(path)])
    assert out.exit_code == 0, out.output
    secret = out.stdout.strip().splitlines()[-1]
    assert secret.startswith("tlk_")
    text = path.read_text()
    assert secret not in text and 'scope = "admin"' in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = load_keys(path)
    found = ring.check(secret)
    assert found is not None and found.scope == "admin"
    assert ring.check(secret + "x") is None
    bad = CliRunner().invoke(keys, ["add", "bad name", "--file", str(path)])
    assert bad.exit_code != 0


def test_dashboard_refuses_a_public_bind_without_keys() -> None:
    with capture_logs() as logs:
        out = CliRunner().invoke(dashboard, ["tests.dashboard.conftest:nothing", "--host",
                                             "0.0.0.0"])
    assert out.exit_code != 0
    assert any("--api-key-file" in str(e.get("error")) for e in logs), logs
