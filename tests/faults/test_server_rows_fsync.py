"""RELIABILITY.md row C3, a machine crash that loses the unsynced tail of the
AOF, on a redis-server each test starts itself.

A process crash (``kill -9``, row C1) keeps what Redis wrote to its AOF: the
page cache survives. A power loss also loses what was written but not yet
fsynced. The test simulates that: it samples the size of the multi-part AOF's
``*.incr.aof`` every 100 ms while a producer enqueues, stops the producer,
SIGKILLs Redis, truncates the incr file to what had been fsynced, and restarts
Redis (``aof-load-truncated yes``, the default, loads the cut file). A worker
then drains what survived and the ledger counts what was confirmed but lost.

What was fsynced depends on ``appendfsync``:

- ``everysec``: Redis fsyncs about once a second, so the cut goes back to the
  size sampled 1 s before the kill. Every enqueue sent after that sample is lost
  (its write was beyond the cut), and only enqueues confirmed in the last 3 s
  can be (the cut's 1 s, plus up to 2 s by which Redis postpones a write behind
  a slow fsync while already replying). Measured, not hidden: the loss is about
  the enqueue rate x 1 s.
- ``always``: Redis fsyncs before it replies, so what was confirmed is on disk
  and there is nothing to cut: lost = 0. (``WAITAOF`` would give the same per
  call on Redis >= 7.2; the servers here run 7.0.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis

from tests.faults.app import WORK, build
from tests.faults.harness import (
    Producer,
    RedisServer,
    WorkerPool,
    wait_queue_settled,
    worker_env,
)
from tests.faults.ledger import Ledger, check

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(120)]

QUEUE = "default"
#: The fsync window the everysec cut goes back by.
WINDOW_S = 1.0
#: How far back a loss may reach under everysec: the cut's 1 s, plus up to 2 s by
#: which Redis may postpone a write (its reply already sent) behind a slow fsync.
BOUND_S = WINDOW_S + 2.0


class Sample:
    __slots__ = ("after", "before", "size")

    def __init__(self, before: float, size: int, after: float) -> None:
        self.before, self.size, self.after = before, size, after


def incr_file(server: RedisServer) -> Path:
    [path] = sorted((server.dir / "appendonlydir").glob("*.incr.aof"))
    return path


async def crash_with_fsync(server: RedisServer, ledger: Ledger, namespace: str,
                           tmp_path: Path, fsync: str,
                           cut: Callable[[list[Sample], float], Sample | None]
                           ) -> tuple[set[str], set[str], set[str], set[str]]:
    """Load, kill -9, cut the AOF where ``cut`` says, restart, drain.
    Returns (confirmed, lost, sent after the cut, confirmed within BOUND_S of the kill)."""
    client = redis.Redis(port=server.port)
    client.config_set("appendfsync", fsync)
    client.close()
    path = incr_file(server)
    samples: list[Sample] = []
    enough = anyio.Event()
    log = ledger.writer("test")
    rt = build(server.url, namespace=namespace)
    producer = Producer(rt, log, max_tries=1)
    async with rt:
        async def sample() -> None:
            while True:
                before = time.monotonic()
                size = path.stat().st_size
                samples.append(Sample(before, size, time.monotonic()))
                # longer than the loss bound, so that the bound excludes something
                if (samples[-1].after - samples[0].after > BOUND_S + 1.0
                        and producer.ok >= 200):
                    enough.set()
                await anyio.sleep(0.1)  # the sampling period of the row's design

        async def load() -> None:
            i = 0
            while True:
                key = f"c3-{fsync}-{i:06d}"
                i += 1
                await producer.enqueue(key, rt.signature(WORK, key, 0.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            tg.start_soon(load)
            # the load and the samples span the fsync window (bounded: a stalled
            # producer fails the test instead of hanging it)
            with anyio.fail_after(60):
                await enough.wait()
            tg.cancel_scope.cancel()
    killed_at = time.monotonic()
    log.write("NEMESIS", what=f"kill -9 redis-server ({fsync}), cut the AOF")
    server.kill()
    at = cut(samples, killed_at)
    if at is not None:
        os.truncate(path, at.size)
    full = samples[-1].size
    server.start()
    env = worker_env(broker=server.url, namespace=namespace, ledger=ledger)
    rt = build(server.url, namespace=namespace)
    async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                              concurrency=20) as pool:
        await wait_queue_settled(rt, QUEUE, timeout=60, describe_more=pool.logs)
    log.close()
    view = ledger.read()
    report = check(view)
    assert not report.unexpected, report.summary()
    confirmed = view.ids("ENQ_OK")
    sent_after = ({r["id"] for r in view.by_kind["ENQ_SENT"] if r["t"] > at.after}
                  if at is not None else set()) & confirmed
    recent = {r["id"] for r in view.by_kind["ENQ_OK"] if r["t"] > killed_at - BOUND_S}
    cut_bytes = full - at.size if at is not None else 0
    oks = [r["t"] for r in view.by_kind["ENQ_OK"]]
    rate = len(oks) / max(1e-3, max(oks) - min(oks))
    print(f"\n[C3 {fsync}] {len(confirmed)} confirmed ({rate:.0f}/s, one producer), "
          f"cut {cut_bytes} bytes of AOF: "
          f"lost={len(report.lost)}, confirmed in the last {BOUND_S:g} s={len(recent)}")
    return confirmed, report.lost, sent_after, recent


def a_second_back(samples: list[Sample], killed_at: float) -> Sample:
    return [s for s in samples if s.after <= killed_at - WINDOW_S][-1]


async def test_everysec_loses_at_most_the_fsync_window(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    confirmed, lost, sent_after, recent = await crash_with_fsync(
        redis_server, ledger, namespace, tmp_path, "everysec", a_second_back)
    assert sent_after, "the producer kept confirming enqueues inside the window"
    assert sent_after <= lost  # written after the cut: gone
    assert recent < confirmed, "the load ran longer than the bound"
    assert lost <= recent  # lost <= rate x 3 s: only what was confirmed in the window


async def test_always_loses_nothing_confirmed(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    confirmed, lost, _, _ = await crash_with_fsync(
        redis_server, ledger, namespace, tmp_path, "always", lambda _s, _k: None)
    assert confirmed
    assert not lost
