"""A reset of the result store under load (issue 10, finding 2; RELIABILITY.md E1).

RabbitMQ broker (the shared server, a namespace of this test), Redis results
through a TCP proxy the test owns to a redis-server the test owns. While the
worker runs tasks, the proxy resets every connection to the result store for
10 s. The promise: no settlement before the result is stored. Finished tasks
are held unacknowledged while their result writes are retried (capped,
jittered backoff; one log line per outage), then stored and acked once the
store is back: 0 finished tasks dead-lettered, every result stored, none
acknowledged before its result was stored, none run twice, every chord
callback run once with all its members.

The worker runs on uvloop, as ``taskloom worker`` does: there a write on a
reset connection raises ``RuntimeError: unable to perform operation on
<TCPTransport closed=True>`` rather than a ``ConnectionError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import brokers
from brokers.base import Delivery, Envelope
from runtime import Runtime, chord
from runtime.messages import State, TaskMessage
from runtime.results.redis import RedisResultStore
from tests.conftest import AMQP_URL
from tests.faults.harness import RedisServer, wait_until
from tests.faults.nemesis import TcpProxy
from tests.passthrough import PassThroughBroker, PassThroughDelivery

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(120)]

PLAIN = 200           # plain tasks, and chords of CHORD_SIZE members (joins and a
CHORDS = 20           # once-only callback each: the store is used past the result write)
CHORD_SIZE = 10
TASKS = PLAIN + CHORDS * CHORD_SIZE
CONCURRENCY = 10
TASK_S = 0.2          # 10 slots x 0.2 s: ~50 tasks/s, so the 10 s outage hits mid-load
OUTAGE_S = 10.0
OUTAGE_WARNING = "result store unavailable"
RECOVERED_INFO = "result store reachable again"


class Checked(PassThroughDelivery):
    """A real delivery whose ack first checks, on a connection that bypasses
    the proxy, that the task's result is stored (an observer, not a mock)."""

    def __init__(self, inner: Delivery, check: Callable[[str], Any]) -> None:
        super().__init__(inner)
        self._check = check

    async def ack(self) -> None:
        await self._check(self.envelope.id)
        await self._inner.ack()


def test_a_result_store_reset_under_load_dead_letters_nothing_and_stores_every_result(
        redis_server: RedisServer, namespace: str) -> None:
    # on uvloop, as `taskloom worker` runs
    anyio.run(scenario, redis_server, namespace, backend="asyncio",
              backend_options={"use_uvloop": True})


async def scenario(redis_server: RedisServer, namespace: str) -> None:
    direct = RedisResultStore.from_url(redis_server.url, namespace=namespace)
    acked_unstored: list[str] = []

    async def check(task_id: str) -> None:
        result = await direct.get(task_id)
        if result is None or not result.state.terminal:
            acked_unstored.append(task_id)

    runs: dict[int, int] = {}
    callbacks: dict[int, int] = {}
    with TcpProxy(target_port=redis_server.port) as proxy:
        broker = PassThroughBroker(brokers.from_url(AMQP_URL, namespace=namespace),
                                   lambda d: Checked(d, check))
        rt = Runtime(broker=broker, results=f"redis://127.0.0.1:{proxy.port}/0",  # type: ignore[arg-type]
                     namespace=namespace)

        @rt.task(name="work")
        async def work(i: int) -> int:
            await anyio.sleep(TASK_S)
            runs[i] = runs.get(i, 0) + 1
            return i * 2

        @rt.task(name="total")
        async def total(values: list[int]) -> int:
            chord_no = (values[0] // 2 - PLAIN) // CHORD_SIZE
            callbacks[chord_no] = callbacks.get(chord_no, 0) + 1
            return sum(values)

        async def stored() -> int:
            """Results in the store, read past the proxy."""
            return sum(r is not None and r.state is State.SUCCESS
                       for r in [await direct.get(h.id) for h in handles])

        async def at_least(n: int) -> bool:
            return await stored() >= n

        with capture_logs() as logs:
            async with direct, rt:
                try:
                    # chords first: the outage hits members, joins and callbacks
                    handles = await rt.enqueue_many([
                        chord([work.s(PLAIN + c * CHORD_SIZE + j) for j in range(CHORD_SIZE)],
                              total.s()) for c in range(CHORDS)])
                    handles += await rt.enqueue_many([work.s(i) for i in range(PLAIN)])
                    async with rt.worker(concurrency=CONCURRENCY):
                        # the reset begins once the load is under way (bounds: a slow shared
                        # machine; the task rate is ~50/s when it is not starved)
                        await wait_until(lambda: at_least(1), timeout=60,
                                         what="a chord stored before the outage")
                        with proxy.fault("reset"):
                            await anyio.sleep(OUTAGE_S)  # the fault's length is the point
                            held_during = len(runs) - await stored()
                        await wait_until(lambda: at_least(len(handles)), timeout=90,
                                         what=f"all {len(handles)} results stored after the heal",
                                         describe=lambda: f"runs: {len(runs)}", interval=0.5)
                        dead = await rt.broker.dead_letters("default")
                        chord_values = [(await direct.get(h.id)) for h in handles[:CHORDS]]
                finally:
                    await rt.broker.purge_namespace()  # type: ignore[attr-defined]
                    await direct.purge_namespace()

    warnings = [e for e in logs if e["event"].startswith(OUTAGE_WARNING)]
    recovered = [e for e in logs if e["event"].startswith(RECOVERED_INFO)]
    assert proxy.resets_total > 0, "the reset never hit a connection"
    assert held_during > 0, "no finished task was held during the outage: it did not hit load"
    assert dead == [], [(d.envelope.id, d.reason) for d in dead]
    assert acked_unstored == []
    assert sorted(runs) == list(range(TASKS))
    assert [i for i, n in runs.items() if n > 1] == []  # held and retried in place, never re-run
    assert callbacks == dict.fromkeys(range(CHORDS), 1)
    assert [r.value if r else None for r in chord_values] == [
        sum(2 * (PLAIN + c * CHORD_SIZE + j) for j in range(CHORD_SIZE)) for c in range(CHORDS)]
    # one line when the outage begins and one when it ends, not one per retry
    assert len(warnings) == 1, [(e["doing"], e["error"][-120:]) for e in warnings]
    assert len(recovered) == 1
    assert recovered[0]["retries"] > 1



async def test_a_worker_stopped_while_the_store_is_down_hands_its_tasks_back(
        redis_server: RedisServer, namespace: str) -> None:
    """While the store is down, a finished task's result write and a once-only
    task's claim (a chord body, an errback) are retried, never dead-lettered;
    stopped meanwhile, the worker leaves both deliveries unsettled: back in the
    queue, neither acked nor dead-lettered, the once-only task never run
    (memory broker: the store is the only thing under fault)."""
    ran: list[str] = []
    with TcpProxy(target_port=redis_server.port) as proxy:
        rt = Runtime(results=f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace)

        @rt.task(name="quick")
        async def quick(tag: str) -> int:
            ran.append(tag)
            return 1

        once = TaskMessage(id="once-1", task="quick", args=["once"], once=True)
        body, headers = rt.codec.encode(once)

        async def both_held() -> bool:
            return (await rt.broker.stats("default")).in_flight == 2 and ran == ["plain"]

        with capture_logs() as logs, anyio.fail_after(60):  # bound for a starved machine
            async with rt:
                async with rt.worker(concurrency=2, shutdown_grace_s=1.0):
                    proxy.set_mode("reset")
                    handle = await rt.enqueue(quick.s("plain"))
                    await rt.broker.publish(Envelope(id=once.id, queue="default", body=body,
                                                     headers=headers))
                    await wait_until(both_held, timeout=30, what="both deliveries held")
                    await wait_until(lambda: _logged(logs, OUTAGE_WARNING), timeout=30,
                                     what="the worker to meet the outage")
                # stopped: the grace period passed with the store still down
                stats = await rt.broker.stats("default")
                dead = await rt.broker.dead_letters("default")
                proxy.set_mode("pass")
                stored = [await rt.results.get(i) for i in (handle.id, once.id)]
    assert dead == []
    assert (stats.ready, stats.in_flight, stats.dead) == (2, 0, 0)
    assert stored == [None, None]
    assert ran == ["plain"]


async def _logged(logs: list[dict[str, Any]], prefix: str) -> bool:
    return any(e["event"].startswith(prefix) for e in logs)
