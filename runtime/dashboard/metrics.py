"""Prometheus metrics (prometheus-client): a lifecycle ``Listener`` that counts
transitions, and the per-queue / per-worker gauges the dashboard process sets.

| metric | type | labels | what |
|---|---|---|---|
| ``taskloom_tasks_enqueued_total`` | counter | task, queue | tasks published |
| ``taskloom_tasks_started_total`` | counter | task, queue | attempts started |
| ``taskloom_tasks_succeeded_total`` | counter | task, queue | tasks that succeeded |
| ``taskloom_tasks_failed_total`` | counter | task, queue | tasks that failed for good |
| ``taskloom_tasks_retried_total`` | counter | task, queue | attempts that will be retried |
| ``taskloom_tasks_dead_lettered_total`` | counter | task, queue, reason | tasks dead-lettered |
| ``taskloom_tasks_revoked_total`` | counter | task, queue | tasks cancelled |
| ``taskloom_tasks_expired_total`` | counter | task, queue | tasks that expired unrun |
| ``taskloom_task_run_seconds`` | histogram | task, queue | STARTED to the end of the attempt |
| ``taskloom_task_queue_wait_seconds`` | histogram | task, queue | ENQUEUED (or due time) to STARTED |
| ``taskloom_tasks_in_flight`` | gauge | task, queue | started, not ended (summed over live children) |
| ``taskloom_queue_depth`` | gauge | queue, state | ready/delayed/in_flight/dead (broker, by the dashboard) |
| ``taskloom_worker_loop_lag_seconds`` | gauge | worker | max loop lag since its last heartbeat |
| ``taskloom_worker_in_flight`` | gauge | worker | tasks the worker holds (prefetched or running) |
| ``taskloom_workers_online`` | gauge | | workers with a live heartbeat |

No task ids in labels: task names, queues, dead-letter reasons and worker ids
are bounded sets. Each ``Metrics`` has its own ``CollectorRegistry``. In a
worker process started by ``taskloom worker --processes N --metrics-port P``
prometheus-client runs in multiprocess mode (the supervisor sets
``PROMETHEUS_MULTIPROC_DIR``) and the supervisor serves the sum on P
(:mod:`runtime.process.metrics_hub`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.exposition import generate_latest

from runtime.lifecycle import Phase, Transition

__all__ = ["Metrics", "MetricsListener", "metrics_app"]

log = structlog.get_logger("taskloom.metrics")

_TRACKED = 100_000   # started/enqueued times remembered for the histograms (oldest dropped)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_ENDS = {Phase.SUCCEEDED: "succeeded", Phase.FAILED: "failed", Phase.DEAD_LETTERED: "dead_lettered",
         Phase.REVOKED: "revoked", Phase.EXPIRED: "expired"}


class Metrics:
    """The metric families, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, tq = self.registry, ["task", "queue"]
        self.counters = {
            name: Counter(f"taskloom_tasks_{name}", f"Tasks {name.replace('_', ' ')}", tq, registry=r)
            for name in ("enqueued", "started", "succeeded", "failed", "retried", "revoked",
                         "expired")
        }
        self.dead_lettered = Counter("taskloom_tasks_dead_lettered", "Tasks dead-lettered",
                                     [*tq, "reason"], registry=r)
        self.run_seconds = Histogram("taskloom_task_run_seconds", "Run time of an attempt", tq,
                                     buckets=_BUCKETS, registry=r)
        self.wait_seconds = Histogram("taskloom_task_queue_wait_seconds",
                                      "Time from enqueue (or due time) to start", tq,
                                      buckets=_BUCKETS, registry=r)
        # under a supervisor (prometheus-client's multiprocess mode) in-flight is summed
        # over the live children; the dashboard's gauges keep the latest value
        self.in_flight = Gauge("taskloom_tasks_in_flight", "Tasks started and not yet ended", tq,
                               registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge("taskloom_queue_depth", "Messages in a queue by state",
                                 ["queue", "state"], registry=r, multiprocess_mode="mostrecent")
        self.worker_lag = Gauge("taskloom_worker_loop_lag_seconds",
                                "Largest event-loop lag since the worker's last heartbeat",
                                ["worker"], registry=r, multiprocess_mode="mostrecent")
        self.worker_in_flight = Gauge("taskloom_worker_in_flight", "Tasks a worker holds",
                                      ["worker"], registry=r, multiprocess_mode="mostrecent")
        self.workers_online = Gauge("taskloom_workers_online", "Workers with a live heartbeat",
                                    registry=r, multiprocess_mode="mostrecent")
        self._known_workers: set[str] = set()

    def set_queues(self, queues: list[dict[str, Any]]) -> None:
        for q in queues:
            for state in ("ready", "delayed", "in_flight", "dead"):
                self.queue_depth.labels(queue=q["name"], state=state).set(q.get(state, 0))

    def set_workers(self, workers: list[dict[str, Any]]) -> None:
        seen = set()
        for w in workers:
            wid = str(w.get("id", ""))
            seen.add(wid)
            self.worker_lag.labels(worker=wid).set(float(w.get("lag_ms", 0.0)) / 1000)
            self.worker_in_flight.labels(worker=wid).set(float(w.get("in_flight", 0)))
        for gone in self._known_workers - seen:   # a worker that left leaves no stale series
            self.worker_lag.remove(gone)
            self.worker_in_flight.remove(gone)
        self._known_workers = seen
        self.workers_online.set(len(seen))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsListener:
    """A lifecycle ``Listener`` (runtime/lifecycle.py) that feeds ``Metrics``.

    ``transition`` only updates in-memory metrics (no I/O, never raises), so it
    can sit on a worker's hot path; ``serve``/``aclose`` have nothing to flush."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self._enqueued: OrderedDict[str, int] = OrderedDict()   # id -> ms due
        self._started: OrderedDict[str, tuple[int, str, str]] = OrderedDict()

    @staticmethod
    def _remember(d: OrderedDict[str, Any], key: str, value: Any) -> None:
        d[key] = value
        if len(d) > _TRACKED:
            d.popitem(last=False)

    def transition(self, t: Transition, /) -> None:
        try:
            self._count(t)
        except Exception as e:  # never raise into the hot path
            log.debug("metrics could not count a transition", error=f"{type(e).__name__}: {e}")

    def _count(self, t: Transition) -> None:
        m, labels = self.metrics, {"task": t.task, "queue": t.queue}
        if t.phase in (Phase.ENQUEUED, Phase.SCHEDULED):
            m.counters["enqueued"].labels(**labels).inc()
            self._remember(self._enqueued, t.id, t.eta_ms or t.at_ms)
        elif t.phase is Phase.STARTED:
            m.counters["started"].labels(**labels).inc()
            if t.id in self._started:   # a redelivery: the earlier attempt never ended here
                m.in_flight.labels(**labels).dec()
            m.in_flight.labels(**labels).inc()
            due = self._enqueued.pop(t.id, None)
            if due is not None:
                m.wait_seconds.labels(**labels).observe(max(0, t.at_ms - due) / 1000)
            self._remember(self._started, t.id, (t.at_ms, t.task, t.queue))
        elif t.phase is Phase.RETRYING:
            m.counters["retried"].labels(**labels).inc()
            self._ended(t)
            if t.eta_ms:
                self._remember(self._enqueued, t.id, t.eta_ms)
        elif t.phase in _ENDS:
            if t.phase is Phase.DEAD_LETTERED:
                m.dead_lettered.labels(**labels, reason=t.reason or "unknown").inc()
            else:
                m.counters[_ENDS[t.phase]].labels(**labels).inc()
            self._ended(t)
            self._enqueued.pop(t.id, None)

    def _ended(self, t: Transition) -> None:
        started = self._started.pop(t.id, None)
        if started is not None:
            at, task, queue = started
            self.metrics.in_flight.labels(task=task, queue=queue).dec()
            self.metrics.run_seconds.labels(task=task, queue=queue).observe(
                max(0, t.at_ms - at) / 1000)

    async def serve(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def metrics_app(metrics: Metrics | MetricsListener | None = None) -> Any:
    """An ASGI app serving ``metrics`` in the Prometheus text format (for
    ``taskloom worker --metrics-port``: serve it with uvicorn on that port)."""
    if isinstance(metrics, MetricsListener):
        metrics = metrics.metrics
    registry = metrics.registry if metrics is not None else CollectorRegistry()
    return make_asgi_app(registry=registry)
