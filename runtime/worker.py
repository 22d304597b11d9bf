"""The worker: consume → decode → execute → store → follow up → ack.

Late ack: a delivery is settled only after its outcome is stored and its
follow-ups (next chain step, retry, join) are published, so a worker dying at
any point leaves the message to be delivered again (at least once).

While the result store is down, every write (and join, and claim) is retried
in place with a capped, jittered backoff until it succeeds, holding the
delivery unsettled; one log line marks the start of an outage and one its
end. If the worker is stopped meanwhile, the delivery is left unsettled and
goes back to the broker. Once a task has run, nothing unexpected (a bug, a
broker error while sending follow-ups) turns it into a dead letter: its
delivery is released (``nack``) to run again.

Dead-letter reasons: :class:`runtime.deadletters.DeadLetterReason`, the one
list, documented in the README.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec
import structlog

from brokers.base import BrokerConnectionError, Consumer, Delivery
from runtime import canvas
from runtime.deadletters import DeadLetterReason as Why
from runtime.errors import (
    ArgumentsError,
    ConfigError,
    DecodeError,
    EncodeError,
    EnqueueError,
    PayloadTooLarge,
    Reject,
    Retry,
)
from runtime.execution import ProcessRunner, TimeLimit, execute
from runtime.messages import (
    MAX_COUNT,
    ChordRef,
    ErrorInfo,
    Result,
    SigNode,
    State,
    TaskMessage,
    check_references,
)
from runtime.middleware import CallNext, Middleware, TaskContext, build_chain
from runtime.persist import StoreRetry, type_name
from runtime.retry import next_delay

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["Worker"]

log = structlog.get_logger("taskloom.worker")

#: The cap of the backoff between result-store retries while it is down.
_STORE_RETRY_MAX_S = 5.0
#: How long a delivery released after an unexpected error stays invisible.
_RELEASE_DELAY_S = 5.0
#: Longest message id (set by whoever published) written to a log line.
_MAX_ID_IN_LOG = 200


#: How long a claim on an at-most-once message outlives a dead holder.
CLAIM_LEASE_S = 6.0


def _claim_key(msg: TaskMessage) -> str:
    return f"{msg.id}#{msg.attempt}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error_info(exc: BaseException, reason: Why) -> ErrorInfo:
    return ErrorInfo(
        type=type_name(exc),
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        reason=reason.value,
    )


def _count(delivery: Delivery) -> int:
    """The broker's delivery count, whatever the broker handed over, as an int
    in 0..MAX_COUNT (it is not signed: recorded in results, never decided on)."""
    try:
        count = delivery.delivery_count
    except Exception:
        return 0
    if not isinstance(count, int) or isinstance(count, bool):
        return 0
    return min(max(count, 0), MAX_COUNT)


def _message_id(delivery: Delivery) -> str:
    """The envelope id for a log line (not signed: any string, cut short)."""
    try:
        value = delivery.envelope.id
    except Exception:
        return "?"
    return value[:_MAX_ID_IN_LOG] if isinstance(value, str) else "?"


def _reason(value: str, default: Why) -> Why:
    try:
        return Why(value)
    except ValueError:
        return default


class Worker:
    """Runs the tasks of one runtime from its queues.

    ``await tg.start(worker.serve)`` returns once the worker is consuming;
    ``worker.stop()`` stops taking work and drains within ``shutdown_grace_s``.
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
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        self.runtime = runtime
        self.queues = list(queues) if queues else runtime.registry.queues() or ["default"]
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else concurrency
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, got {self.prefetch}")
        self.shutdown_grace_s = shutdown_grace_s
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
        self.processed = 0
        self.failed = 0
        self._changed: anyio.Event | None = None
        self._persist = StoreRetry(cap_s=_STORE_RETRY_MAX_S)

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
        async with anyio.create_task_group() as services:
            await services.start(rt.results.watch)
            async with rt.broker.consume(self.queues, prefetch=self.prefetch) as consumer:
                log.info("worker started", worker=self.name, queues=self.queues,
                         concurrency=self.concurrency)
                async with anyio.create_task_group() as runners:
                    for _ in range(self.concurrency):
                        runners.start_soon(self._runner, consumer)
                    task_status.started()
            services.cancel_scope.cancel()
        log.info("worker stopped", worker=self.name, processed=self.processed, failed=self.failed)

    async def _runner(self, consumer: Consumer) -> None:
        """Receive a delivery, run it, repeat: ``concurrency`` of these share the
        consumer, so no task is spawned per message.

        :meth:`stop` cancels only the runners waiting in ``receive`` (they are
        in ``_receiving``); a runner busy with a task finishes it within the
        grace period (the deadline set on its scope) and then sees that the
        worker is stopping. :meth:`kill` cancels every runner.
        """
        receive = consumer.receive
        receiving = self._receiving
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                while not self._stopping:
                    receiving.add(scope)
                    try:
                        delivery = await receive()
                    except anyio.EndOfStream:
                        return
                    finally:
                        receiving.discard(scope)
                    await self._handle(delivery)
            finally:
                self._scopes.discard(scope)

    def stop(self) -> None:
        """Stop taking work; in-flight tasks get ``shutdown_grace_s`` to finish,
        then are cancelled and handed back to the broker."""
        if self._stopping:
            return
        self._stopping = True
        deadline = anyio.current_time() + self.shutdown_grace_s
        for scope in list(self._scopes):
            if scope in self._receiving:
                scope.cancel()
            else:
                scope.deadline = deadline

    def kill(self) -> None:
        """Stop now: cancel running tasks too; their deliveries go back to the broker."""
        self.stop()
        for scope in list(self._scopes):
            scope.cancel()

    async def idle(self) -> None:
        """Return once nothing is in flight here and the queues hold nothing
        ready, delayed or unacked (burst mode for tests and scripts)."""
        broker = self.runtime.broker
        while True:
            changed = self._changed = self._changed or anyio.Event()
            if self.in_flight == 0:
                busy = False
                for queue in self.queues:
                    stats = await broker.stats(queue)
                    if stats.ready or stats.delayed or stats.in_flight:
                        busy = True
                        break
                if not busy and self.in_flight == 0:
                    return
            await changed.wait()

    def _signal(self) -> None:
        if self.in_flight:
            return  # idle() only returns once nothing is in flight
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def _execute(self, ctx: TaskContext) -> Any:
        return await execute(ctx.task, ctx.args, ctx.kwargs, ctx.timeout, threads=self._threads,
                             processes=self.processes)

    # -- one delivery ------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        self.in_flight += 1
        try:
            await self._process(delivery)
        except BrokerConnectionError as e:
            # the broker will redeliver what we could not settle
            log.warning("could not settle a delivery; the broker will redeliver it",
                        message_id=_message_id(delivery), error=str(e)[:300])
        except Exception as e:
            # a bug of ours before the task ran: it must not stop the worker or
            # loop the message forever (after it ran, _process releases instead)
            log.error("internal error handling a delivery; dead-lettering it",
                      message_id=_message_id(delivery), error_type=type_name(e), exc_info=e)
            try:
                await delivery.dead_letter(Why.INTERNAL_ERROR)
            except Exception as settle_error:
                log.warning("could not dead-letter after an internal error",
                            message_id=_message_id(delivery), error=str(settle_error)[:300])
        finally:
            self.in_flight -= 1
            self.processed += 1
            self._signal()

    async def _process(self, delivery: Delivery) -> None:
        rt = self.runtime
        env = delivery.envelope
        try:
            msg = rt.codec.decode(env.body, env.headers)
        except DecodeError as e:
            log.error("dead-lettering an undecodable message", message_id=_message_id(delivery),
                      reason=e.reason, error=str(e)[:300])
            await delivery.dead_letter(_reason(e.reason, Why.DECODE_ERROR))
            return
        wrong = check_references(msg)
        if wrong is not None:
            log.error("dead-lettering a message whose canvas references do not hold",
                      task_id=msg.id, task=msg.task[:_MAX_ID_IN_LOG], error=wrong[:300])
            await delivery.dead_letter(Why.BAD_MESSAGE)
            return
        task = rt.registry.get(msg.task)
        if task is None:
            log.error("dead-lettering a message for an unknown task", task_id=msg.id,
                      task=msg.task[:_MAX_ID_IN_LOG])
            await self._fail(msg, delivery, ErrorInfo(
                type="UnknownTaskError", reason=Why.UNKNOWN_TASK.value,
                message=f"no task named {msg.task!r} is registered on worker {self.name}"))
            return
        revoked = rt.results.is_revoked
        if revoked(msg.id) or (msg.downstream and any(revoked(i) for i in msg.downstream)):
            log.info("skipping a cancelled task", task_id=msg.id, task=msg.task)
            await self._end(msg, State.REVOKED, ErrorInfo(
                type="TaskCancelled", reason="cancelled",
                message="the task (or the canvas it belongs to) was cancelled"))
            await delivery.ack()
            return
        if msg.expires_ms is not None and _now_ms() > msg.expires_ms:
            log.info("discarding an expired task", task_id=msg.id, task=msg.task)
            info = ErrorInfo(type="Expired", reason="expired",
                             message="the task expired before it ran")
            await self._end(msg, State.REVOKED, info)
            if msg.errbacks:
                await self._errbacks(msg, msg.errbacks, info)
            await delivery.ack()
            return
        holder = ""
        if msg.once:
            holder = f"{self.name}:{uuid.uuid4().hex}"
            if not await self._claim(msg, delivery, holder):
                return
        try:
            args, kwargs = task.bind(msg.args, msg.kwargs)
        except ArgumentsError as e:
            await self._fail(msg, delivery, _error_info(e, Why.BAD_ARGUMENTS))
            return
        started = _now_ms()
        timeout = msg.timeout if msg.timeout is not None else task.timeout
        if timeout is None:
            timeout = self._default_limit
        outcome: Callable[[], Awaitable[None]]
        try:
            call: Callable[[], Awaitable[Any]]
            if self._chain is None:
                call = functools.partial(execute, task, args, kwargs, timeout,
                                         threads=self._threads, processes=self.processes)
            else:
                call = functools.partial(self._chain, TaskContext(
                    message=msg, task=task, args=args, kwargs=kwargs, timeout=timeout,
                    delivery_count=_count(delivery), worker=self.name))
            value = await (self._keeping_claim(msg, holder, call) if holder else call())
        except Reject as e:
            outcome = functools.partial(self._fail, msg, delivery, _error_info(e, Why.REJECTED),
                                        started)
        except Retry as e:
            outcome = functools.partial(self._retry_or_fail, msg, delivery, e, e.delay_s, started)
        except TimeLimit as e:
            outcome = functools.partial(self._retry_or_fail, msg, delivery, e, None, started,
                                        type_name="TaskTimeLimitExceeded")
        except Exception as e:
            if isinstance(e, task.retry_on):
                outcome = functools.partial(self._retry_or_fail, msg, delivery, e, None, started)
            else:
                outcome = functools.partial(self._fail, msg, delivery,
                                            _error_info(e, Why.FAILED), started)
        except anyio.get_cancelled_exc_class() as e:
            if anyio.current_effective_deadline() == -math.inf:
                raise  # cancelled from outside: shutdown; the broker gets it back
            # the task body raised CancelledError by itself: a failure like any other
            outcome = functools.partial(self._fail, msg, delivery, _error_info(e, Why.FAILED),
                                        started)
        else:
            outcome = functools.partial(self._finish, msg, delivery, value, started)
        # the task has run: from here on, nothing may dead-letter it but its own outcome
        try:
            await outcome()
        except Exception as e:
            await self._release(msg, delivery, e)

    async def _finish(self, msg: TaskMessage, delivery: Delivery, value: Any,
                      started: int) -> None:
        try:
            if isinstance(value, (canvas.Signature, canvas.Chain, canvas.Group, canvas.Chord)):
                await self._replace(msg, value)
                await delivery.ack()
                return
            await self._succeed(msg, delivery, value, started)
        except EnqueueError as e:
            # a follow-up (next step, chord body, replacement) cannot be sent
            await self._fail(msg, delivery, _error_info(e, Why.BAD_FOLLOW_UP), started)

    async def _release(self, msg: TaskMessage, delivery: Delivery, error: Exception) -> None:
        """After the task ran, something unexpected kept its outcome from being
        stored, followed up or settled: hand the delivery back to run again
        (at least once) rather than dead-letter a task that may have succeeded."""
        if isinstance(error, BrokerConnectionError):
            log.warning("could not send what follows a task or settle it; releasing it to run "
                        "again", task_id=msg.id, task=msg.task, error=str(error)[:300])
        else:
            log.error("internal error after a task ran; releasing it to run again",
                      task_id=msg.id, task=msg.task, error_type=type_name(error), exc_info=error)
        try:
            await delivery.nack(delay_s=_RELEASE_DELAY_S)
        except Exception as e:
            # unsettled: the broker gives it back when the consumer's connection ends
            log.warning("could not release a delivery; the broker will redeliver it",
                        task_id=msg.id, error=str(e)[:300])

    async def _succeed(self, msg: TaskMessage, delivery: Delivery, value: Any,
                       started: int) -> None:
        result = Result(id=msg.id, task=msg.task, state=State.SUCCESS, value=value,
                        attempt=msg.attempt, delivery_count=_count(delivery),
                        worker=self.name, started_ms=started, finished_ms=_now_ms())
        try:
            await self._store(result)
        except (PayloadTooLarge, EncodeError) as e:
            await self._fail(msg, delivery, _error_info(e, Why.BAD_RESULT), started)
            return
        await self._follow_up(msg, value)
        await delivery.ack()
        log.debug("task succeeded", task_id=msg.id, task=msg.task, attempt=msg.attempt,
                  duration_ms=result.finished_ms - started if result.finished_ms else None)

    async def _follow_up(self, msg: TaskMessage, value: Any) -> None:
        """What comes after ``msg`` succeeded with ``value``: the next chain
        step, or its part of a join."""
        if msg.links:
            await self.runtime.publish(canvas.start(
                msg.links[0], self.runtime.registry, prev=value, links=msg.links[1:],
                ref=msg.chord, parent_id=msg.id, root_id=msg.root_id))
        elif msg.chord is not None:
            await self._join(msg.chord, value, msg)

    async def _join(self, ref: ChordRef, value: Any, msg: TaskMessage) -> None:
        """Count ``value`` into ``ref``; the call that finds it complete goes on."""
        rt = self.runtime
        values = await self._persist("join", lambda: rt.results.join(ref.id, ref.index, ref.size,
                                                                     value))
        if values is None:
            return
        if ref.body is not None:
            await rt.publish(canvas.start(ref.body, rt.registry, prev=values, links=ref.links,
                                          ref=ref.outer, parent_id=msg.id, root_id=msg.root_id,
                                          once=True))
            return
        await self._store(Result(id=ref.id, state=State.SUCCESS, value=values,
                                 worker=self.name, finished_ms=_now_ms()))
        if ref.links:
            await rt.publish(canvas.start(ref.links[0], rt.registry, prev=values,
                                          links=ref.links[1:], ref=ref.outer,
                                          parent_id=msg.id, root_id=msg.root_id, once=True))
        elif ref.outer is not None:
            await self._join(ref.outer, values, msg)

    async def _replace(self, msg: TaskMessage, value: canvas.Canvas) -> None:
        """The task returned a canvas: run it in this task's place."""
        rt = self.runtime
        node = canvas.to_node(value, final=msg.id, first=True)
        await rt.publish(canvas.start(node, rt.registry, links=msg.links, ref=msg.chord,
                                      parent_id=msg.id, root_id=msg.root_id))

    async def _retry_or_fail(self, msg: TaskMessage, delivery: Delivery, exc: BaseException,
                             delay_s: float | None, started: int, *,
                             type_name: str | None = None) -> None:
        task = self.runtime.registry[msg.task]
        retries = msg.retries if msg.retries is not None else task.retry.retries
        info = _error_info(exc, Why.FAILED)
        if type_name is not None:
            info = ErrorInfo(type=type_name, message=info.message, traceback=info.traceback,
                             reason=Why.TIME_LIMIT.value)
        if msg.attempt > retries:
            await self._fail(msg, delivery, info, started)
            return
        delay = delay_s if delay_s is not None else next_delay(msg.attempt, task.retry)
        log.info("retrying a task", task_id=msg.id, task=msg.task, attempt=msg.attempt,
                 retries=retries, delay_s=round(delay, 3), error=f"{info.type}: {info.message[:300]}")
        await self._store(Result(id=msg.id, task=msg.task, state=State.RETRY, error=info,
                                 attempt=msg.attempt, delivery_count=_count(delivery),
                                 worker=self.name, started_ms=started))
        again = msgspec.structs.replace(msg, attempt=msg.attempt + 1)
        await self.runtime.publish([again], delay_s=delay)
        await delivery.ack()

    async def _fail(self, msg: TaskMessage, delivery: Delivery, info: ErrorInfo,
                    started: int | None = None) -> None:
        """A failure for good: store it (and on everything waiting downstream,
        ids the codec checked this message owns), run the errbacks once,
        dead-letter the message with ``info.reason``."""
        self.failed += 1
        reason = _reason(info.reason, Why.FAILED)
        log.warning("task failed", task_id=msg.id, task=msg.task, attempt=msg.attempt,
                    reason=reason.value, error=f"{info.type}: {info.message[:300]}")
        now = _now_ms()
        failure = Result(id=msg.id, task=msg.task, state=State.FAILURE, error=info,
                         attempt=msg.attempt, delivery_count=_count(delivery),
                         worker=self.name, started_ms=started, finished_ms=now)
        upstream = ErrorInfo(type=info.type, message=info.message, traceback=info.traceback,
                             reason=f"upstream:{msg.id}")
        results = [failure] + [
            Result(id=i, state=State.FAILURE, error=upstream, worker=self.name, finished_ms=now)
            for i in msg.downstream
        ]
        await self._store_many(results)
        if msg.errbacks:
            await self._errbacks(msg, msg.errbacks, info)
        await delivery.dead_letter(reason)

    async def _errbacks(self, msg: TaskMessage, errbacks: list[SigNode], info: ErrorInfo) -> None:
        rt = self.runtime
        error = {"type": info.type, "message": info.message, "reason": info.reason}
        out: list[TaskMessage] = []
        for node in errbacks:
            fed = msgspec.structs.replace(node, args=[msg.id, error, *node.args], immutable=True)
            try:
                out.extend(canvas.start(fed, rt.registry, parent_id=msg.id, root_id=msg.root_id,
                                        once=True))
            except EnqueueError as e:
                log.error("cannot run an errback", task_id=msg.id, errback=node.task, error=str(e))
        try:
            await rt.publish(out)
        except EnqueueError as e:
            log.error("cannot publish errbacks", task_id=msg.id, error=str(e))

    async def _end(self, msg: TaskMessage, state: State, info: ErrorInfo) -> None:
        """Store a terminal non-success for ``msg`` and everything waiting on it."""
        now = _now_ms()
        upstream = ErrorInfo(type=info.type, message=info.message, traceback=info.traceback,
                             reason=f"upstream:{msg.id}")
        await self._store_many(
            [Result(id=msg.id, task=msg.task, state=state, error=info, attempt=msg.attempt,
                    worker=self.name, finished_ms=now)]
            + [Result(id=i, state=state, error=upstream, worker=self.name, finished_ms=now)
               for i in msg.downstream])

    async def _claim(self, msg: TaskMessage, delivery: Delivery, holder: str) -> bool:
        """At most one execution per id (chord bodies, steps after a join,
        errbacks): the claim is a short lease, renewed while the task runs, so a
        holder that dies frees it within ``CLAIM_LEASE_S``."""
        rt = self.runtime
        existing = await self._persist("read", lambda: rt.results.get(msg.id))
        unfinished = existing is None or not existing.state.terminal
        if unfinished and await self._persist("claim", lambda: rt.results.claim(
                _claim_key(msg), CLAIM_LEASE_S, holder=holder)):
            # it may have finished between the look and the claim
            existing = await self._persist("read", lambda: rt.results.get(msg.id))
            if existing is None or not existing.state.terminal:
                return True
        if existing is not None and existing.state.terminal:
            log.info("skipping a duplicate of a task that ran already", task_id=msg.id)
            if existing.state is State.SUCCESS:
                # its worker may have died before sending what follows: send it
                # (what follows is idempotent: joins count ids, next steps claim)
                await self._follow_up(msg, existing.value)
            await delivery.ack()
        else:
            log.info("a duplicate is running elsewhere; checking again later", task_id=msg.id)
            await delivery.nack(delay_s=CLAIM_LEASE_S / 2)
        return False

    async def _keeping_claim(self, msg: TaskMessage, holder: str,
                             call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` while renewing the claim of ``msg``; its exception, if
        any, is raised as it is (not in an exception group)."""
        outcome: list[Any] = []
        failure: list[Exception] = []

        async def body() -> None:
            try:
                outcome.append(await call())
            except Exception as e:
                failure.append(e)
            finally:
                tg.cancel_scope.cancel()

        async def renew() -> None:
            while True:
                await anyio.sleep(CLAIM_LEASE_S / 3)
                try:
                    await self.runtime.results.claim(_claim_key(msg), CLAIM_LEASE_S,
                                                     holder=holder)
                except Exception as e:
                    # the store is down: the claim may lapse (a duplicate may
                    # then run, visibly); the task itself goes on
                    self._persist.failed("renew a claim", e)
                else:
                    self._persist.recovered()

        async with anyio.create_task_group() as tg:
            tg.start_soon(renew)
            tg.start_soon(body)
        if failure:
            raise failure[0]
        return outcome[0]

    # -- the result store, retried in place while it is down ----------------------------

    async def _store(self, result: Result) -> None:
        await self._store_many([result])

    async def _store_many(self, results: list[Result]) -> None:
        store = self.runtime.results
        if len(results) == 1:
            await self._persist("store a result", lambda: store.put(results[0]))
        else:
            await self._persist("store results", lambda: store.put_many(results))
