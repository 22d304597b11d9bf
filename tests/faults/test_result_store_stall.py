"""The result store stalled, then stopped, for 20 s under load (issue 19 item 2;
RELIABILITY.md E1).

The broker is healthy: a redis-server of its own. The results live on a second
redis-server the test owns, reached through the nemesis proxy. A producer keeps
~200 tasks/s coming while a worker (in this process, on uvloop as ``taskloom
worker`` runs) executes them; then, for 20 s, either

- ``blackhole``: the proxy holds every byte both ways, sockets stay open, no RST
  (only timeouts can notice), or
- ``sigstop``: the result redis-server is SIGSTOPped (its listen queue still
  accepts connections, nothing answers), then SIGCONTed.

The ledger (tests/faults/ledger.py) is written beside the system: the producer's
ENQ_*, the task bodies' START/END, and ACKED(id, stored) written when the worker
acknowledges a delivery, after reading the task's result on a connection that
bypasses the proxy (``stored``: a terminal result was there). The promises:

- no delivery is acknowledged before its result is stored;
- nothing is lost, nothing runs twice, nothing is dead-lettered;
- the worker recovers by itself (same worker, no restart) and settles the whole
  backlog; the recovery time after the heal is printed (``pytest -s``);
- it backs off instead of spinning: the connections it opens to the result
  store during the 20 s are counted at the proxy and bounded, and the outage is
  logged once when it starts and once when it ends.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import brokers
from brokers.base import Delivery
from runtime import Runtime
from runtime.errors import ResultStoreUnavailable
from runtime.results.redis import RedisResultStore
from tests.faults.harness import RedisServer, wait_for_ledger
from tests.faults.ledger import Ledger, LedgerView, LedgerWriter, check, new_exec_id
from tests.faults.nemesis import TcpProxy
from tests.passthrough import PassThroughBroker, PassThroughDelivery

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

RATE = 200            # tasks/s offered by the producer, before, during and after the fault
TICK_S = 0.05
PER_TICK = int(RATE * TICK_S)
CONCURRENCY = 20
TASK_S = 0.02
OUTAGE_S = 20.0
AFTER_S = 2.0         # seconds of load offered after the heal
#: Connections the worker may open to the result store during the 20 s outage.
#: Its retries back off (doubling, capped at 5 s, jittered; one shared retry per
#: worker) and a stalled call waits out its socket timeout (10 s): a few dozen at
#: most. A worker that spun would open hundreds per second.
MAX_CONNECTIONS = 60
OUTAGE_WARNING = "result store unavailable"
RECOVERED_INFO = "result store reachable again"
RECOVERED_DEBUG = "result store call failed and succeeded on retry"


@dataclass
class Fault:
    name: str
    start: Callable[[], None]
    heal: Callable[[], None]


def _fault(name: str, proxy: TcpProxy, server: RedisServer) -> Fault:
    if name == "blackhole":
        return Fault(name, lambda: proxy.set_mode("blackhole"), lambda: proxy.set_mode("pass"))
    pid = server.pid  # the redis-server this test started (taskset execs it)
    return Fault(name, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT))


class Acked(PassThroughDelivery):
    """A real delivery whose ack first records, in the ledger, whether the
    task's result is in the store (an observer, not a mock)."""

    def __init__(self, inner: Delivery, on_ack: Callable[[str], Any]) -> None:
        super().__init__(inner)
        self._on_ack = on_ack

    async def ack(self) -> None:
        await self._on_ack(self.envelope.id)
        await self._inner.ack()


async def _stored(direct: RedisResultStore, task_id: str) -> bool:
    """Whether a terminal result of ``task_id`` is stored, read past the proxy.
    While the server is SIGSTOPped a read times out: it is asked again (each
    try blocks up to the store's socket timeout; this is no busy loop)."""
    while True:
        try:
            result = await direct.get(task_id)
        except ResultStoreUnavailable:
            continue
        return result is not None and result.state.terminal


async def _paced_load(rt: Runtime, log: LedgerWriter, make: Callable[[str], Any],
                      keys: list[str], stop: anyio.Event) -> None:
    """Enqueue PER_TICK tasks every TICK_S until ``stop``: the offered load.

    Ids are generated, not explicit: ``enqueue(task_id=...)`` reserves the id in
    the result store first, which would stall the producer with the store
    (runtime/reserving.py). ENQ_OK records the task id beside the key."""
    next_t = anyio.current_time()
    while not stop.is_set():
        for _ in range(PER_TICK):
            key = f"k{len(keys)}"
            keys.append(key)
            log.write("ENQ_SENT", id=key)
            handle = await rt.enqueue(make(key))
            log.write("ENQ_OK", id=key, tid=handle.id)
        next_t += TICK_S
        await anyio.sleep_until(next_t)  # the producer's pace, not a wait for work


def _all_acked(view: LedgerView) -> bool:
    return {r["tid"] for r in view.by_kind["ENQ_OK"]} <= view.ids("ACKED")


@pytest.mark.parametrize("fault", ["blackhole", "sigstop"])
def test_a_result_store_stalled_or_stopped_for_20s_under_load_loses_nothing(
        fault: str, redis_server: RedisServer, tmp_path: Path, ledger: Ledger,
        namespace: str) -> None:
    results = RedisServer(tmp_path / "results")
    results.start()
    try:
        with TcpProxy(target_port=results.port) as proxy:
            figures = anyio.run(scenario, _fault(fault, proxy, results), proxy, redis_server,
                                results, ledger, namespace, backend="asyncio",
                                backend_options={"use_uvloop": True})
    finally:
        results.close()  # SIGKILL of our own pid: a stopped process dies too
    print(f"\n[{fault}] {figures}")


async def scenario(fault: Fault, proxy: TcpProxy, broker_server: RedisServer,
                   results: RedisServer, ledger: Ledger, namespace: str) -> dict[str, Any]:
    log = ledger.writer("test.jsonl")
    direct = RedisResultStore.from_url(results.url, namespace=namespace)

    async def on_ack(task_id: str) -> None:
        log.write("ACKED", id=task_id, stored=await _stored(direct, task_id))

    broker = PassThroughBroker(brokers.from_url(broker_server.url, namespace=namespace),
                               lambda d: Acked(d, on_ack))
    rt = Runtime(broker=broker, results=f"redis://127.0.0.1:{proxy.port}/0",
                 namespace=namespace)

    @rt.task(name="work")
    async def work(key: str) -> str:
        x = new_exec_id()
        log.write("START", id=key, x=x)
        await anyio.sleep(TASK_S)
        log.write("END", id=key, x=x, ok=True)
        return key

    with capture_logs() as logs:
        async with direct, rt:
            try:
                measured = await _under_fault(rt, fault, proxy, ledger, log, work.s)
                dead = await rt.broker.dead_letters("default")
                stats = await rt.broker.stats("default")
            finally:
                if fault.name == "sigstop":
                    fault.heal()  # never leave our server stopped
                await rt.broker.purge_namespace()  # type: ignore[attr-defined]
    log.close()
    view = ledger.read()
    return _verdict(view, measured, logs, dead, stats)


async def _under_fault(rt: Runtime, fault: Fault, proxy: TcpProxy, ledger: Ledger,
                       log: LedgerWriter, make: Callable[[str], Any]) -> dict[str, Any]:
    keys: list[str] = []
    stop = anyio.Event()
    measured: dict[str, Any] = {}
    async with rt.worker(concurrency=CONCURRENCY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_paced_load, rt, log, make, keys, stop)
            # bounds below are generous: a slow, shared 2-core machine
            await wait_for_ledger(ledger, lambda v: len(v.by_kind["ACKED"]) >= RATE,
                                  timeout=60, what="the load to be under way")
            connections = proxy.connections_total
            fault.start()
            try:
                await anyio.sleep(OUTAGE_S)  # the fault's length is the point
                view = ledger.read()
                measured["held_at_heal"] = len(_tids(view, view.done()) - view.ids("ACKED"))
                measured["connections_during"] = proxy.connections_total - connections
            finally:
                fault.heal()
            measured["heal_t"] = time.monotonic()
            measured["sent_before_heal"] = len(keys)
            await anyio.sleep(AFTER_S)  # the load goes on after the heal (its length)
            stop.set()
        await wait_for_ledger(ledger, _all_acked, timeout=180,
                              what="every enqueued task acknowledged after the heal",
                              describe=lambda: _progress(ledger.read()))
    measured["enqueued"] = len(keys)
    return measured


def _tids(view: LedgerView, keys: set[str]) -> set[str]:
    return {r["tid"] for r in view.by_kind["ENQ_OK"] if r["id"] in keys}


def _progress(view: LedgerView) -> str:
    return (f"enq_ok={len(view.ids('ENQ_OK'))} done={len(view.done())} "
            f"acked={len(view.ids('ACKED'))}")


def _verdict(view: LedgerView, measured: dict[str, Any], logs: Sequence[Mapping[str, Any]],
             dead: list[Any], stats: Any) -> dict[str, Any]:
    heal_t = measured["heal_t"]
    acks_after = sorted(r["t"] for r in view.by_kind["ACKED"] if r["t"] >= heal_t)
    held = _tids(view, {r["id"] for r in view.by_kind["END"] if r["t"] < heal_t}) - {
        r["id"] for r in view.by_kind["ACKED"] if r["t"] < heal_t}
    assert measured["held_at_heal"] > 0 and held, "no finished task was held: the fault missed"
    last_held_ack = max(r["t"] for r in view.by_kind["ACKED"] if r["id"] in held)
    warnings = [e for e in logs if e["event"].startswith(OUTAGE_WARNING)]
    recovered = [e for e in logs if e["event"].startswith((RECOVERED_INFO, RECOVERED_DEBUG))]
    report = check(view)
    unstored = sorted(r["id"] for r in view.by_kind["ACKED"] if not r["stored"])
    figures = {
        "enqueued": measured["enqueued"], "held_at_heal": measured["held_at_heal"],
        "connections_during_20s": measured["connections_during"],
        "first_ack_after_heal_s": round(acks_after[0] - heal_t, 3),
        "held_tasks_all_acked_after_heal_s": round(last_held_ack - heal_t, 3),
        "backlog_drained_after_heal_s": round(acks_after[-1] - heal_t, 3),
        "outage_warnings": len(warnings),
        "recoveries_logged": [(e["log_level"], e.get("down_s"), e.get("retries"))
                              for e in recovered],
    }
    assert unstored == [], f"acknowledged before the result was stored: {unstored[:10]}"
    assert not report.lost and not report.unexpected, report.summary()
    assert report.dup_exec == {}, report.summary()  # held in place, never run again
    assert dead == [], [(d.envelope.id, d.reason) for d in dead]
    assert (stats.ready, stats.delayed, stats.in_flight) == (0, 0, 0), stats
    assert measured["connections_during"] <= MAX_CONNECTIONS, figures
    # at most one line when the outage begins and one when it ends, never one per retry
    assert len(warnings) <= 1 and len(recovered) <= 1, figures
    return figures
