"""The fault harness's producer and the ledger see an enqueue the runtime refused
as a duplicate (``handle.duplicate``: nothing was published).

The chaos soak (tests/chaos) sends every key once, so a refusal there means an
explicit-id reservation (runtime/reserving.py) outlived the runtime's own
bookkeeping: the task is never sent although the producer was told "enqueued".
Before this, the producer wrote a plain ENQ_OK and the checker could only call
the id "lost", the same verdict as a message the broker dropped; ``refused``
tells the two apart. Real Redis; a stale reservation is made with the result
store's own ``reserve`` (what an earlier attempt would have left)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from runtime import Runtime
from tests.canvas.conftest import make_runtime, purge
from tests.faults.harness import Producer
from tests.faults.ledger import Ledger, check

pytestmark = [pytest.mark.redis]


def _runtime(namespace: str) -> Runtime:
    rt = make_runtime("redis", namespace)

    @rt.task(name="refused.noop")
    async def noop(key: str) -> str:
        return key

    return rt


async def test_an_enqueue_refused_as_a_duplicate_is_reported_refused_and_lost(
        namespace: str, tmp_path: Path) -> None:
    rt = _runtime(namespace)
    ledger = Ledger(tmp_path / "ledger")
    writer = ledger.writer("producer")
    try:
        async with rt:
            producer = Producer(rt, writer, max_tries=1)
            with anyio.fail_after(30):  # generous: two round trips to a local Redis
                assert await rt.results.reserve(["stale"]) == [True]
                await producer.enqueue("stale", rt.signature("refused.noop", "stale"))
                await producer.enqueue("fresh", rt.signature("refused.noop", "fresh"))
                stats = await rt.broker.stats("default")
        writer.close()
        report = check(ledger.read())
        assert producer.ok == 2
        assert stats.ready == 1, stats  # only "fresh" was published
        assert report.refused == {"stale"}, report.summary()
        # no worker ran: both are lost, and the ledger says which one was never sent
        assert report.lost == {"stale", "fresh"}, report.summary()
    finally:
        writer.close()
        await purge(rt)
