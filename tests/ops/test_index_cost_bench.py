"""``python -m benchmarks.index_cost`` as a user runs it (tiny: the figures are not
checked, the machine is shared): both modes run, the table and the by-command
breakdown of what the index and events add on Redis are printed."""

from __future__ import annotations

import io

import pytest

from benchmarks import index_cost
from tests.ops.conftest import redis_up

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def test_the_benchmark_prints_the_modes_and_the_commands_they_add() -> None:
    await redis_up()
    out = io.StringIO()
    import anyio.to_thread

    runs = await anyio.to_thread.run_sync(
        lambda: index_cost.main(["--tasks", "300", "--repeats", "1"], out))
    text = out.getvalue()
    assert sorted(r.mode for r in runs) == ["off", "on"]
    assert "throughput cost of index+events" in text
    table = text.split('what "on" adds per task')[1]
    assert "evalsha" in table and "script itself" in table
    on = next(r for r in runs if r.mode == "on")
    assert on.commands["evalsha"][0] >= 1
