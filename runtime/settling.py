"""The one settle path of the worker (:class:`Concluder`), and plain successes
stored in batches, then acked, off the runner (:class:`Settler`).

:meth:`Concluder.conclude` stores an outcome, publishes what follows, and only
then settles the delivery: the late-ack order, kept for every delivery.


A task that succeeded with nothing to follow (no next chain step, no join, no
hooks, no claim, no admission gate) needs only its result stored and its
delivery acked. Its runner hands both to the worker's :class:`Settler` and
takes its next delivery at once; the settler stores every result handed to it
since its last write with one ``put_many``, and only then settles those
deliveries (through the worker's one settle path, which also tells the
listeners). So the promise holds: a delivery is acked only after its result is
stored, and a worker that dies before leaves it to be delivered again.

While the result store is down the write is retried in place
(:class:`~runtime.persist.StoreRetry`) and the deliveries stay unsettled: the
consumer's prefetch bounds what piles up. A batch the store refuses for good
(a result that cannot be encoded, or is too large) goes down the worker's
one-by-one path instead, where each outcome is judged alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from brokers.base import BrokerConnectionError, Delivery
from runtime.flow import Flow, Kind, Outcome
from runtime.hooks import after_outcome
from runtime.judging import count_of
from runtime.messages import Result, TaskMessage
from runtime.persist import StoreRetry, type_name
from runtime.registry import Task
from runtime.screening import report, settle

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["RELEASE_DELAY_S", "Concluder", "Settler"]

log = structlog.get_logger("taskloom.worker")

#: How long a delivery released after an unexpected error stays invisible.
RELEASE_DELAY_S = 5.0


class Concluder:
    """The worker's one settle path (see :meth:`conclude`)."""

    __slots__ = ("flow", "runtime", "worker")

    def __init__(self, runtime: Runtime, worker: str, flow: Flow) -> None:
        self.runtime = runtime
        self.worker = worker
        self.flow = flow

    async def conclude(self, delivery: Delivery, msg: TaskMessage | None, outcome: Outcome,
                       hooked: Task[Any, Any] | None = None, stored: bool = False) -> None:
        """Store ``outcome`` (unless ``stored``: a success stored already), publish
        what follows, and only then settle: the late-ack order, kept here for
        every delivery. After the task ran, an unexpected error (a bug, a broker
        error while sending what follows or settling) releases the delivery to
        run again, never dead-letters it."""
        rt = self.runtime
        try:
            if outcome.kind is Kind.RELEASE and outcome.ran:
                raise outcome.value  # the judging of what the task did failed
            if not stored and msg is not None and outcome.kind is not Kind.DEAD_LETTER:
                outcome = await self.flow.carry_out(msg, outcome, count_of(delivery))
            if rt._listeners:
                report(rt.transition, self.worker, delivery, msg, outcome)
            if hooked is not None:
                await after_outcome(rt.hooks, hooked, outcome)
            await settle(delivery, outcome)
        except Exception as e:
            if not outcome.ran:
                raise
            assert msg is not None
            if isinstance(e, BrokerConnectionError):
                log.warning("could not send what follows a task or settle it; releasing it to "
                            "run again", task_id=msg.id, task=msg.task, error=str(e)[:300])
            else:
                log.error("internal error after a task ran; releasing it to run again",
                          task_id=msg.id, task=msg.task, error_type=type_name(e), exc_info=e)
            try:
                await settle(delivery, Outcome(kind=Kind.RELEASE, delay_s=RELEASE_DELAY_S))
            except Exception as settle_error:
                # unsettled: the broker gives it back when the consumer's connection ends
                log.warning("could not release a delivery; the broker will redeliver it",
                            task_id=msg.id, error=str(settle_error)[:300])

_Item = tuple[Delivery, TaskMessage, Outcome, Result]


class Settler:
    """Stores handed-over successes in batches, then concludes each.

    ``put_many``: the result store's; ``concluder``: the worker's settle path;
    ``done``: called once per delivery handed over, when it is concluded (or
    left to the broker). :meth:`serve` runs in the worker's task group;
    :meth:`drain` waits until what was handed over is concluded.
    """

    __slots__ = ("_conclude", "_done", "_handed", "_idle", "_pending", "_persist",
                 "_put_many", "_through", "_wake")

    def __init__(self, put_many: Callable[[Sequence[Result]], Awaitable[Any]],
                 persist: StoreRetry, concluder: Concluder, done: Callable[[], None]) -> None:
        self._put_many = put_many
        self._persist = persist
        self._conclude = concluder.conclude
        self._done = done
        self._pending: list[_Item] = []
        self._wake = anyio.Event()
        self._idle: anyio.Event | None = None
        self._handed = 0  # items handed over so far
        self._through = 0  # of those, the ones stored and concluded (or left to the broker)

    def add(self, delivery: Delivery, msg: TaskMessage, outcome: Outcome, result: Result
            ) -> None:
        """Store ``result``, then conclude ``delivery`` with ``outcome``, soon."""
        self._pending.append((delivery, msg, outcome, result))
        self._handed += 1
        self._wake.set()

    def behind(self) -> bool:
        """Whether something handed over is not through yet (see :meth:`flushed`)."""
        return self._through < self._handed

    async def serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            try:
                while self._pending:
                    batch, self._pending = self._pending, []
                    await self._settle(batch)
            finally:
                idle, self._idle = self._idle, None
                if idle is not None:
                    idle.set()

    async def flushed(self) -> None:
        """Return once everything handed over before this call is stored and
        concluded (:meth:`serve` runs). The worker awaits it before storing any
        other outcome, so a worker stores the outcomes of one task id in the
        order it reached them (a duplicate's later failure never lands before
        the earlier success it handed over: first terminal wins)."""
        target = self._handed
        while self._through < target:
            if self._idle is None:
                self._idle = anyio.Event()
            idle = self._idle
            self._wake.set()
            await idle.wait()

    async def drain(self) -> None:
        """Return once everything handed over is concluded (the runners are done)."""
        await self.flushed()

    async def _settle(self, batch: list[_Item]) -> None:
        left = 0
        try:
            results = [item[3] for item in batch]
            put_many = self._put_many
            try:
                await self._persist("store results", lambda: put_many(results))
                stored = True
            except Exception:
                # one of them cannot be stored (or the store failed for good):
                # judge each alone on the one-by-one path
                stored = False
            conclude = self._conclude
            for delivery, msg, outcome, _ in batch:
                left += 1
                try:
                    await conclude(delivery, msg, outcome, None, stored)
                finally:
                    self._done()
        finally:
            # cancelled (the worker was stopped past its grace, or killed): the
            # rest stay unsettled and go back to the broker
            for _ in range(left, len(batch)):
                self._done()
            self._through += len(batch)
