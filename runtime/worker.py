"""The worker: consume → decode → execute → store → follow up → ack.

Each delivery's outcome is decided once (a :class:`runtime.flow.Outcome`) and
taken down one path (:mod:`runtime.settling`): stored with what follows it
(:meth:`runtime.flow.Flow.carry_out`), and only then settled (ack, dead letter
or release); a plain success is stored in a batch and acked after, off the
runner. Late ack: a worker dying at any point leaves the message to be
delivered again (at least once).

While the result store is down, every write (and join, and claim) is retried
in place with a capped, jittered backoff, holding the delivery unsettled (one
log line marks an outage's start, one its end); a worker stopped meanwhile
leaves it to the broker. Once a task has run, nothing unexpected (a bug, a
broker error while sending follow-ups) dead-letters it: it is released
(``nack``) to run again.

Dead-letter reasons: :class:`runtime.deadletters.DeadLetterReason` (README).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc
import structlog

from brokers.base import BrokerConnectionError, Consumer, Delivery
from runtime import gc_tuning
from runtime.context import CurrentTask, current
from runtime.deadletters import DeadLetterReason as Why
from runtime.errors import ArgumentsError, ConfigError
from runtime.execution import ProcessRunner, execute, running
from runtime.flow import Flow, Kind, Outcome, error_info, now_ms
from runtime.judging import cancelled, count_of, judge, message_id, named
from runtime.messages import Result, State, TaskMessage
from runtime.middleware import CallNext, Middleware, TaskContext, build_chain
from runtime.pausing import Generation, PauseView, Selector
from runtime.persist import StoreRetry, type_name
from runtime.registry import Task
from runtime.screening import decode, screen, settle
from runtime.seams import Admission, started
from runtime.settling import RELEASE_DELAY_S, Concluder, Settler
from runtime.states import StateWriter

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["Worker", "WorkerState"]

#: starting (until consuming), running, draining (after stop()), stopped
WorkerState = Literal["starting", "running", "draining", "stopped"]

log = structlog.get_logger("taskloom.worker")

#: The cap of the backoff between result-store retries while it is down.
_STORE_RETRY_MAX_S = 5.0
#: How long a stopping worker tries to mark a handed-back task PENDING.
_HAND_BACK_WRITE_S = 2.0


class _Lent:
    """A runner lent to a task awaiting a nested run."""

    __slots__ = ("done", "scope")

    def __init__(self) -> None:
        self.done = False
        self.scope: anyio.CancelScope | None = None


class Worker:
    """Runs the tasks of one runtime from its queues.

    ``await tg.start(worker.serve)`` returns once the worker is consuming;
    ``worker.stop()`` stops taking work and drains within ``shutdown_grace_s``.
    ``pauses`` (a :class:`~runtime.pausing.PauseView`): consume only the queues
    not paused. ``max_tasks``: take at most that many deliveries, then drain
    and stop (``spent`` says so). Deliveries held: ``prefetch`` exactly when
    given, else ``concurrency + nested_waits`` (room for lent slots' children).
    ``tune_gc``: tune the process's garbage collector once consuming
    (:mod:`runtime.gc_tuning`).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        prefetch: int | None = None,
        shutdown_grace_s: float = 30.0,
        threads: int = 40,
        processes: ProcessRunner | None = None,
        name: str | None = None,
        nested_waits: int | None = None,
        pauses: PauseView | None = None,
        max_tasks: int | None = None,
        tune_gc: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if max_tasks is not None and max_tasks < 1:
            raise ConfigError(f"max_tasks must be at least 1 (or None: no limit), got {max_tasks}")
        self.max_tasks = max_tasks
        self._tune_gc = tune_gc
        #: deliveries taken (counted with a ``max_tasks`` budget); whether it is spent
        self.taken, self.spent = 0, False
        self._pauses = pauses
        self._waits: set[anyio.CancelScope] = set()
        self.runtime = runtime
        self.queues = list(queues) if queues else runtime.registry.queues() or ["default"]
        self._select = Selector(self.queues, pauses)
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else concurrency
        self._prefetch_given = prefetch is not None
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, got {self.prefetch}")
        self.shutdown_grace_s = shutdown_grace_s
        #: tasks that may lend their slot while they await a nested run() (see README)
        self.nested_waits = max(1, concurrency // 10) if nested_waits is None else nested_waits
        if self.nested_waits < 0:
            raise ConfigError(f"nested_waits must be 0 or more, got {nested_waits}")
        self._lent = 0
        self._spawn: Callable[[_Lent], None] | None = None
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.processes = processes
        self._threads = anyio.CapacityLimiter(threads)
        self._default_limit = runtime.default_time_limit
        self._chain: CallNext | None = None
        if any(type(m).execute is not Middleware.execute for m in runtime.middleware):
            self._chain = build_chain(runtime.middleware, self._execute)
        self._scopes: set[anyio.CancelScope] = set()
        self._receiving: set[anyio.CancelScope] = set()
        self._stopping = False
        self.in_flight = 0
        #: deliveries handled (run, failed, dead-lettered, skipped), deferrals excepted
        self.processed = 0
        #: tasks an admission gate sent back to wait in the broker
        self.deferred = 0
        self.state: WorkerState = "starting"
        self._running: dict[str, tuple[str, int]] = {}
        self._live: dict[str, tuple[anyio.CancelScope, CurrentTask, str]] = {}
        #: read-only: task id -> (task name, started at, ms since the epoch)
        self.running: Mapping[str, tuple[str, int]] = MappingProxyType(self._running)
        self._listeners = runtime._listeners
        self._hooked = any(runtime.hooks.values())
        self._admission = Admission(runtime.gates, self.name) if runtime.gates else None
        self._changed: anyio.Event | None = None
        self._states = StateWriter(runtime.results)
        self._home: tuple[asyncio.AbstractEventLoop, int] | None = None
        persist = StoreRetry(cap_s=_STORE_RETRY_MAX_S)
        self._flow = Flow(runtime, self.name, persist, states=self._states)
        concluder = self._concluder = Concluder(runtime, self.name, self._flow)
        #: plain successes: stored in batches, then acked, off the runners
        self._settler = Settler(runtime.results.put_many, persist, concluder, self._settled)
        self._deadline = math.inf  # stop()'s: when the grace ends

    @property
    def failed(self) -> int:
        """Tasks that failed for good (dead-lettered with their failure stored)."""
        return self._flow.failed

    # -- lifecycle ---------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Consume until :meth:`stop` (or :meth:`kill`); then drain.

        ``concurrency`` long-lived runners share one consumer: no task is
        spawned per message, and a delivery is taken only when a runner is free.
        On :meth:`stop` a running task gets ``shutdown_grace_s`` to finish;
        :meth:`kill` cancels it at once.
        """
        rt = self.runtime
        self._listeners = rt._listeners
        self._hooked = any(rt.hooks.values())
        try:
            self._home = (asyncio.get_running_loop(), threading.get_ident())
        except RuntimeError:  # not asyncio: progress from threads is not supported
            self._home = None
        listen = getattr(rt.results, "listen_revoked", None)
        unlisten = listen(self._revoked) if listen is not None else None
        try:
            async with anyio.create_task_group() as services:
                await services.start(rt.results.watch)
                if self._pauses is not None:
                    await services.start(self._pauses.watch)
                services.start_soon(self._states.serve)
                if self._admission is not None:
                    for gate in self._admission.gates:
                        services.start_soon(gate.serve)
                await self._consume(task_status)
                services.cancel_scope.cancel()
        finally:
            self.state = "stopped"
            if unlisten is not None:
                unlisten()
        log.info("worker stopped", worker=self.name, processed=self.processed, failed=self.failed,
                 deferred=self.deferred)

    async def _consume(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the runners on a consumer of the queues not paused. When that set
        changes, the runners finish what they run, the consumer is closed (what
        it prefetched goes back to the broker) and another opened; with every
        queue paused, nothing is taken until one is resumed."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                if not self._stopping:
                    self.state = "running"
                if self._tune_gc:
                    gc_tuning.tune()
                task_status.started()

        while not self._stopping:
            active, gen = self._select.active(), Generation()
            if not active:
                log.info("every queue of this worker is paused; taking nothing until one is "
                         "resumed", worker=self.name, queues=self.queues)
                ready()
                with anyio.CancelScope() as wait:  # stop() cancels it
                    self._waits.add(wait)
                    try:
                        await self._select.change_from(active)
                    finally:
                        self._waits.discard(wait)
                continue
            prefetch = self.prefetch + (0 if self._prefetch_given else self.nested_waits)
            if self.max_tasks is not None:  # no more than the budget left is fetched
                prefetch = max(1, min(prefetch, self.max_tasks - self.taken))
            async with self.runtime.broker.consume(active, prefetch=prefetch) as consumer:
                log.info("worker consuming" if started else "worker started", worker=self.name,
                         queues=active, paused=sorted(set(self.queues) - set(active)),
                         concurrency=self.concurrency)
                async with anyio.create_task_group() as watching:
                    if self._pauses is not None:
                        watching.start_soon(self._close_on_change, active, gen)
                    watching.start_soon(self._settler.serve)
                    async with anyio.create_task_group() as runners:
                        for _ in range(self.concurrency):
                            runners.start_soon(self._runner, consumer, None, gen)

                        def spawn(lent: _Lent, c: Consumer = consumer, g: Generation = gen
                                  ) -> None:
                            runners.start_soon(self._runner, c, lent, g)

                        self._spawn = spawn
                        ready()
                    await self._drain_settler()
                    watching.cancel_scope.cancel()
            self._spawn = None
            if not gen.closing:
                return  # stopped, or the consumer ended

    async def _drain_settler(self) -> None:
        """What the runners handed over is stored and settled before the consumer
        closes, within a stop's grace; past it (or killed) it goes back to the broker."""
        with anyio.CancelScope(deadline=self._deadline) as scope:
            self._scopes.add(scope)
            try:
                await self._settler.drain()
            finally:
                self._scopes.discard(scope)

    async def _close_on_change(self, active: list[str], gen: Generation) -> None:
        await self._select.change_from(active)
        log.info("paused queues changed; reopening the consumer once running tasks finish",
                 worker=self.name, was=active, now=self._select.active(), in_flight=self.in_flight)
        gen.closing = True
        for scope in list(self._receiving):
            scope.cancel()

    def _take(self) -> bool:
        """Count a delivery against ``max_tasks``: whether it is within the
        budget. The one that spends it stops the worker (drain, then stop)."""
        assert self.max_tasks is not None
        self.taken += 1
        if self.taken > self.max_tasks:
            return False  # left unsettled: the consumer hands it back when it closes
        if self.taken == self.max_tasks:
            self.spent = True
            log.info("took max_tasks deliveries; draining", worker=self.name,
                     max_tasks=self.max_tasks)
            self.stop()
        return True

    async def _runner(self, consumer: Consumer, lent: _Lent | None = None,
                      gen: Generation | None = None) -> None:
        """Receive a delivery, run it, repeat: ``concurrency`` of these share the
        consumer, so no task is spawned per message.

        :meth:`stop` cancels only the runners waiting in ``receive`` (they are
        in ``_receiving``); a runner busy with a task finishes it within the
        grace period (the deadline set on its scope) and then sees that the
        worker is stopping. :meth:`kill` cancels every runner.
        """
        receive = consumer.receive
        receiving = self._receiving
        runner = anyio.get_current_task().id
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            if lent is not None:
                lent.scope = scope
            try:
                while (not self._stopping and (lent is None or not lent.done)
                       and (gen is None or not gen.closing)):
                    receiving.add(scope)
                    try:
                        delivery = await receive()
                    except anyio.EndOfStream:
                        return
                    finally:
                        receiving.discard(scope)
                    if self.max_tasks is not None and not self._take():
                        return
                    await self._handle(delivery, runner)
            finally:
                self._scopes.discard(scope)

    @contextmanager
    def lend_slot(self) -> Iterator[None]:
        """While a task awaits a nested ``run()`` (or a handle's result), one
        more runner takes work in its place, so the slot is not held by a
        waiter; at most ``nested_waits`` at once (then the wait keeps its
        slot). The extra runner stops after the task it is running when the
        wait ends."""
        spawn = self._spawn
        if spawn is None or self._stopping or self._lent >= self.nested_waits:
            yield
            return
        self._lent += 1
        lent = _Lent()
        spawn(lent)
        try:
            yield
        finally:
            self._lent -= 1
            lent.done = True
            if lent.scope is not None and lent.scope in self._receiving:
                lent.scope.cancel()

    def stop(self) -> None:
        """Stop taking work; in-flight tasks get ``shutdown_grace_s`` to finish,
        then are cancelled and handed back to the broker."""
        if self._stopping:
            return
        self._stopping = True
        if self.state != "stopped":
            self.state = "draining"
        deadline = self._deadline = anyio.current_time() + self.shutdown_grace_s
        for scope in list(self._waits):
            scope.cancel()
        for scope in list(self._scopes):
            if scope in self._receiving:
                scope.cancel()
            else:
                scope.deadline = deadline

    def kill(self) -> None:
        """Stop now: cancel running tasks too; their deliveries go back to the broker."""
        self.stop()
        self._deadline = -math.inf
        for scope in list(self._scopes):
            scope.cancel()

    async def idle(self) -> None:
        """Return once nothing is in flight here and the queues (paused ones
        excepted) hold nothing ready, delayed or unacked (burst mode for tests
        and scripts)."""
        broker = self.runtime.broker
        while True:
            changed = self._changed = self._changed or anyio.Event()
            if self.in_flight == 0:
                busy = False
                for queue in self._select.active():
                    stats = await broker.stats(queue)
                    if stats.ready or stats.delayed or stats.in_flight:
                        busy = True
                        break
                if not busy and self.in_flight == 0:
                    return
            await changed.wait()

    def _settled(self) -> None:
        """A delivery handed to the settler is concluded (or left to the broker)."""
        self.in_flight -= 1
        self.processed += 1
        self._signal()

    def _signal(self) -> None:
        if self.in_flight:
            return  # idle() only returns once nothing is in flight
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def _conclude(self, delivery: Delivery, msg: TaskMessage | None, outcome: Outcome,
                        hooked: Task[Any, Any] | None = None) -> None:
        if self._settler.behind():  # outcomes reached earlier are stored first
            await self._settler.flushed()
        await self._concluder.conclude(delivery, msg, outcome, hooked)

    async def _execute(self, ctx: TaskContext) -> Any:
        return await execute(ctx.task, ctx.args, ctx.kwargs, ctx.timeout, threads=self._threads,
                             processes=self.processes)

    # -- one delivery ------------------------------------------------------------

    async def _handle(self, delivery: Delivery, runner: int) -> None:
        self.in_flight += 1
        handed = False
        try:
            handed = await self._process(delivery, runner)
        except BrokerConnectionError as e:
            # the broker will redeliver what we could not settle
            log.warning("could not settle a delivery; the broker will redeliver it",
                        message_id=message_id(delivery), error=str(e)[:300])
        except Exception as e:
            # a bug of ours before the task ran: it must not stop the worker or
            # loop the message forever (after it ran, _conclude releases instead)
            log.error("internal error handling a delivery; dead-lettering it",
                      message_id=message_id(delivery), error_type=type_name(e), exc_info=e)
            try:
                await settle(delivery, Outcome(kind=Kind.DEAD_LETTER,
                                                     reason=Why.INTERNAL_ERROR))
            except Exception as settle_error:
                log.warning("could not dead-letter after an internal error",
                            message_id=message_id(delivery), error=str(settle_error)[:300])
        finally:
            running.pop(runner, None)
            if not handed:  # else the settler counts it once settled
                self.in_flight -= 1
                self.processed += 1
                self._signal()

    async def _process(self, delivery: Delivery, runner: int) -> bool:
        """Decide the outcome of ``delivery`` once, then conclude it; True: it was
        handed to the settler (which concludes it)."""
        msg = decode(self.runtime.codec, delivery)
        if isinstance(msg, tuple):
            await self._conclude(delivery, *msg)
            return False
        running[runner] = msg
        task = self.runtime.registry.get(msg.task)
        outcome = screen(msg, task, self.runtime.results.is_revoked, self.name)
        if outcome is not None:
            await self._conclude(delivery, msg, outcome)
            return False
        assert task is not None
        try:
            args, kwargs = task.bind(msg.args, msg.kwargs)
        except ArgumentsError as e:
            await self._conclude(delivery, msg,
                                 Outcome.failure(error_info(e, Why.BAD_ARGUMENTS)))
            return False
        if self._admission is None:
            return await self._start(delivery, msg, task, args, kwargs)
        admitted, delay = await self._admission.admit(msg)
        if delay is not None:
            self.deferred += 1
            self.processed -= 1  # a deferral is not counted as handled (see _handle)
            await self._conclude(delivery, msg, Outcome(kind=Kind.DEFERRED, delay_s=delay))
            return False
        try:
            return await self._start(delivery, msg, task, args, kwargs)
        finally:
            await self._admission.done(admitted, msg)

    async def _start(self, delivery: Delivery, msg: TaskMessage, task: Task[Any, Any],
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Claim ``msg`` if it runs at most once, run it, conclude (True: a plain
        success handed to the settler, which stores it, then acks)."""
        holder = ""
        if msg.once:
            holder = f"{self.name}:{uuid.uuid4().hex}"
            outcome = await self._flow.claim(msg, holder)
            if outcome is not None:
                await self._conclude(delivery, msg, outcome)
                return False
        at = now_ms()
        count = count_of(delivery)
        self._running[msg.id] = (msg.task, at)
        try:
            self._states.note(Result(id=msg.id, task=msg.task, state=State.STARTED,
                                     attempt=msg.attempt, delivery_count=count,
                                     worker=self.name, started_ms=at))
            if self._listeners:
                self.runtime.transition(started(msg, self.name, at))
            soft = task.soft_timeout
            ctx = CurrentTask(msg, delivery_count=count, worker=self.name, states=self._states,
                              started_ms=at, home=self._home, lend=self.lend_slot,
                              soft=(soft, time.monotonic() + soft) if soft and task.kind == "thread"
                              else None)
            token = current.set(ctx)
            ran: Outcome | None = None
            try:
                with anyio.CancelScope() as scope:  # cancelled by handle.cancel()
                    self._live[msg.id] = (scope, ctx, task.kind)
                    if self.runtime.results.is_revoked(msg.id):  # revoked as it started
                        self._revoked(msg.id)
                    ran = await self._run(delivery, msg, task, args, kwargs, holder, at)
            finally:
                current.reset(token)
                self._live.pop(msg.id, None)
            outcome = cancelled(msg, at) if ctx.cancelled or ran is None else ran
            hooked = task.hooked or self._hooked
            if hooked or ctx.meta or ctx.last_progress is not None:
                outcome = dataclasses.replace(outcome, ctx=ctx)
            if (outcome.kind is Kind.SUCCESS and not hooked and not holder and not msg.links
                    and msg.chord is None):  # gates hear done() as the body ends (_process)
                self._states.discard(msg.id)  # a STARTED record must not follow it
                self._settler.add(delivery, msg, outcome, self._flow.success(msg, outcome, count))
                return True
            await self._conclude(delivery, msg, outcome, task if hooked else None)
            return False
        finally:
            self._running.pop(msg.id, None)

    async def _run(self, delivery: Delivery, msg: TaskMessage, task: Task[Any, Any],
                   args: tuple[Any, ...], kwargs: dict[str, Any], holder: str, started: int
                   ) -> Outcome:
        """Run the task body; what it returned or raised, judged once."""
        timeout = msg.timeout if msg.timeout is not None else task.timeout
        if timeout is None:
            timeout = self._default_limit
        call: Callable[[], Awaitable[Any]]
        if self._chain is None:
            def call() -> Awaitable[Any]:
                return execute(task, args, kwargs, timeout, threads=self._threads,
                               processes=self.processes)
        else:
            context = TaskContext(message=msg, task=task, args=args, kwargs=kwargs,
                                  timeout=timeout, delivery_count=count_of(delivery),
                                  worker=self.name)
            chain = self._chain

            def call() -> Awaitable[Any]:
                return chain(context)
        error: BaseException | None = None
        value: Any = None
        try:
            value = await (self._flow.keeping_claim(msg, holder, named(msg, call)) if holder
                           else call())
        except Exception as e:
            error = e
        except anyio.get_cancelled_exc_class() as e:
            if anyio.current_effective_deadline() == -math.inf:
                ctx = current.get()
                if ctx is None or not ctx.cancelled:
                    await self._handed_back(msg)
                raise  # cancelled from outside: shutdown (the broker gets it back) or revoked
            error = e  # the task body raised CancelledError by itself: a failure
        # the task has run: from here on, nothing may dead-letter it but its own outcome
        try:
            outcome = judge(msg, task, value, error, started)
            return outcome if error is None else dataclasses.replace(outcome, exc=error)
        except Exception as e:
            return Outcome(kind=Kind.RELEASE, value=e, delay_s=RELEASE_DELAY_S, ran=True)

    def _revoked(self, task_id: str) -> None:
        """A revocation reached this worker: stop the tasks running under that
        id or waited on by it (a canvas): an async or process task at once
        (its scope is cancelled: the next await / the pool process is
        killed), a thread task is told (``ctx.cancelled``). Never raises."""
        for live_id, (scope, ctx, kind) in list(self._live.items()):
            if live_id == task_id or task_id in ctx.message.downstream:
                if not ctx.cancelled:
                    log.info("cancelling a running task", task_id=live_id, task=ctx.name,
                             revoked=task_id)
                ctx.cancel()
                if kind != "thread":
                    scope.cancel()

    async def _handed_back(self, msg: TaskMessage) -> None:
        """A running task cancelled by a stop goes back to the broker: its
        record says PENDING again rather than STARTED (best effort, bounded)."""
        self._states.discard(msg.id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(_HAND_BACK_WRITE_S):
            try:
                await self.runtime.results.put(Result(id=msg.id, task=msg.task,
                                                      state=State.PENDING, attempt=msg.attempt))
            except Exception as e:
                log.debug("could not mark a handed-back task PENDING", task_id=msg.id,
                          error=str(e)[:300])
