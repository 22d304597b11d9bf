"""A short chaos soak per transport (issue 19 item 6): ``tests.chaos.soak`` for
3 min with a fault every 30 s, so each kind runs once (worker SIGKILL, broker
kill -9 and restart, broker proxy reset, broker proxy blackhole, result-store
proxy reset). The ledger's verdict: nothing lost, nothing stuck, nothing run
that was never sent, nothing dead-lettered that was not meant to be.
``python -m tests.chaos --minutes 30 --broker …`` is the long version.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from tests.chaos import FAULTS, soak

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(900)]

log = structlog.get_logger("tests.chaos")


@pytest.mark.parametrize("broker", [pytest.param("redis", marks=pytest.mark.redis),
                                    pytest.param("amqp", marks=pytest.mark.amqp)])
async def test_short_chaos_soak_loses_nothing(broker: str, tmp_path: Path) -> None:
    verdict = await soak(minutes=3, broker=broker, fault_every=30, rate=300, seed=19,
                         workdir=tmp_path, report=lambda line: log.info("chaos", line=line))
    text = verdict.text()
    log.info("chaos.verdict", verdict=text)
    assert {name for _, name in verdict.faults} == set(FAULTS), text
    assert verdict.enqueued > 0, text
    assert verdict.lost == 0, text
    assert verdict.stuck == 0, text
    assert verdict.unexpected == 0, text
    assert verdict.dead_false == 0, text
    assert verdict.dead_by_design > 0, text
