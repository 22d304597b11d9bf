"""``taskloom limits APP``: the table, --json, and run-time changes, on the shared Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import anyio
import click
import pytest
from click.testing import CliRunner

from runtime.cli.limits import register
from runtime.messages import TaskMessage
from runtime.ops.limits import LimitsGate, RedisLimitStore, store_for
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.redis

APP = "tests.limits.cli_app:rt"


@pytest.fixture
def cli(namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[click.Group]:
    monkeypatch.setenv("LIMITS_NS", namespace)
    group = click.Group()
    register(group)
    yield group

    async def purge() -> None:
        store = RedisLimitStore(REDIS_URL, namespace=namespace)
        await store.purge()
        await store.aclose()
    anyio.run(purge)


def test_limits_shows_the_state_and_changes_a_limit(cli: click.Group, namespace: str) -> None:
    from tests.limits.cli_app import rt  # imported here: LIMITS_NS is set

    assert store_for(rt).shared

    async def traffic() -> None:
        gate = LimitsGate(rt, RedisLimitStore(REDIS_URL, namespace=namespace))
        for _ in range(3):
            await gate.admit(TaskMessage(id=uuid.uuid4().hex, task="send", args=["u1"]))
        await gate.store.aclose()
    anyio.run(traffic)

    runner = CliRunner()
    shown = runner.invoke(cli, ["limits", APP, "--json"])
    assert shown.exit_code == 0, shown.output
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert rows == [{"kind": "rate", "task": "send", "key": "u1", "limit": "5/m", "tokens": 0.0,
                     "held": None, "waiting": 2, "deferred": 2, "overridden": False}]
    table = runner.invoke(cli, ["limits", APP])
    assert table.exit_code == 0 and "send" in table.stdout and "5/m" in table.stdout

    changed = runner.invoke(cli, ["limits", APP, "--task", "send", "--rate", "100/h"])
    assert changed.exit_code == 0, changed.output
    assert json.loads(runner.invoke(cli, ["limits", APP, "--json"]).stdout)["limit"] == "100/h"
    refused = runner.invoke(cli, ["limits", APP, "--rate", "5/s"])
    assert refused.exit_code == 2 and "--task" in refused.output
