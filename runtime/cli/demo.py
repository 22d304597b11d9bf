"""`taskloom demo`: a small pipeline on the embedded default, narrated.

Everything runs in this process (memory broker, memory results, an embedded
worker): tasks, a chain, a chord, a retry, a timeout and a dead letter. With
``--broker URL`` the same pipeline goes through that broker (namespace
``taskloom-demo``), its worker still embedded in this process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from brokers.base import redact_url
from runtime.app import Runtime, run
from runtime.canvas import chain, chord
from runtime.errors import Retry, TaskError, TaskTimeLimitExceeded

__all__ = ["build_demo", "run_demo"]


DEMO_NAMESPACE = "taskloom-demo"


def build_demo(broker: str = "memory://") -> Runtime:
    """The demo's tasks on ``broker`` (the embedded memory broker by default)."""
    rt = Runtime(broker, namespace="" if broker.startswith("memory:") else DEMO_NAMESPACE)
    attempts: dict[str, int] = {}

    @rt.task(name="demo.fetch")
    async def fetch(url: str) -> str:
        await anyio.sleep(0.01)
        return f"<html>{url}</html>"

    @rt.task(name="demo.size")
    def size(page: str) -> int:  # a plain def runs in a thread
        return len(page)

    @rt.task(name="demo.total")
    async def total(sizes: list[int]) -> int:
        return sum(sizes)

    @rt.task(name="demo.flaky", retries=3, backoff=0.05)
    async def flaky(key: str) -> str:
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] < 3:
            raise Retry(reason=f"upstream busy (attempt {attempts[key]})")
        return f"{key} done after {attempts[key]} attempts"

    @rt.task(name="demo.slow", timeout=0.2)
    async def slow() -> None:
        await anyio.sleep(10)

    @rt.task(name="demo.broken")
    async def broken(x: int) -> float:
        return 1 / x

    return rt


async def run_demo(echo: Callable[[str], None], broker: str = "memory://") -> None:
    rt = build_demo(broker)
    where = ("memory broker, in-process" if broker.startswith("memory:")
             else f"broker {redact_url(broker)}, namespace {DEMO_NAMESPACE!r}")
    t = rt.registry
    started = time.perf_counter()

    def stamp() -> str:
        return f"[{(time.perf_counter() - started) * 1000:7.1f} ms]"

    async with rt, rt.worker(concurrency=50) as worker:
        echo(f"{stamp()} worker started on queues {worker.queues} ({where})")
        page = await run(t["demo.fetch"].s("https://example.org"))
        echo(f"{stamp()} fetch -> {page!r}")
        n = await run(chain(t["demo.fetch"].s("https://example.org/a"), t["demo.size"].s()))
        echo(f"{stamp()} chain fetch | size -> {n}")
        urls = [f"https://example.org/{i}" for i in range(20)]
        summed = await run(chord(
            (chain(t["demo.fetch"].s(u), t["demo.size"].s()) for u in urls), t["demo.total"].s()))
        echo(f"{stamp()} chord of 20 fetch|size -> total {summed}")
        flaky = await run(t["demo.flaky"].s("report"))
        echo(f"{stamp()} flaky -> {flaky!r} (two retries with backoff)")
        doomed = [await rt.enqueue(t["demo.slow"].s()), await rt.enqueue(t["demo.broken"].s(0))]
        try:
            await doomed[0]
        except TaskTimeLimitExceeded as e:
            echo(f"{stamp()} slow -> time limit: {e.info.message}")
        try:
            await doomed[1]
        except TaskError as e:
            echo(f"{stamp()} broken(0) -> failed: {e.info.type}: {e.info.message}")
        handles = await rt.enqueue_many([t["demo.size"].s("x" * i) for i in range(1000)])
        batch = time.perf_counter()
        results = [await h for h in handles]
        echo(f"{stamp()} 1000 tasks via enqueue_many -> sum {sum(results)} "
             f"in {(time.perf_counter() - batch) * 1000:.0f} ms")
        await worker.idle()
        for queue in worker.queues:
            for dead in await rt.broker.dead_letters(queue, limit=1000):
                if dead.envelope.id not in {h.id for h in doomed}:
                    continue  # an earlier run's, on a real broker
                echo(f"{stamp()} dead-letter queue {queue!r}: message {dead.envelope.id[:8]}… "
                     f"reason={dead.reason}")
        echo(f"{stamp()} processed {worker.processed} deliveries, {worker.failed} failed for good")
