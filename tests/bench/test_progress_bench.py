"""``python -m benchmarks.progress`` on a small count: it runs on memory and
Redis, stores the last progress with the outcome, and never writes more
records than calls (no timing assertions: this checks the benchmark, not the
machine)."""

from __future__ import annotations

import io

import pytest

from benchmarks.progress import main, measure
from tests.conftest import REDIS_URL

CALLS = 500


def test_progress_benchmark_prints_a_row_per_store_and_loop() -> None:
    out = io.StringIO()
    rows = main(["--calls", str(CALLS), "--no-redis"], out=out)
    table = out.getvalue()
    assert "µs per call" in table
    assert "memory" in table
    assert [(r.store, r.loop) for r in rows] == [("memory", "tight"), ("memory", "yields")]
    for row in rows:
        assert row.calls == CALLS
        assert row.stored_done == CALLS
        assert row.total_s > 0
        assert row.records <= CALLS
    assert rows[0].writes == 0  # a loop that never yields leaves the writer no turn


@pytest.mark.redis
@pytest.mark.parametrize("yields", [False, True], ids=["tight", "yields"])
async def test_progress_benchmark_on_redis_stores_the_last_progress(yields: bool) -> None:
    row = await measure("redis", CALLS, yields=yields, redis_url=REDIS_URL)
    assert row.stored_done == CALLS
    assert row.records <= CALLS
    assert row.us_per_call > 0
