"""The ``Runtime``: owns the registry, broker, result store and codec.

    rt = Runtime()                      # memory broker + memory results
    rt = Runtime(broker="redis://127.0.0.1:6379/0")   # results in the same Redis
    rt = Runtime(broker="amqp://guest:guest@127.0.0.1/", results="redis://127.0.0.1/0")

    @rt.task(retries=3, timeout=10)
    async def add(x: int, y: int) -> int: ...

    async with rt, rt.worker():
        assert await run(add.s(1, 2)) == 3

Settings left out are read from ``TASKLOOM_*`` environment variables
(``runtime.config``); explicit arguments win.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, cast, overload

import anyio
import msgspec
import structlog

import brokers
from brokers.base import Broker, Envelope
from runtime import canvas
from runtime.admission import Gate
from runtime.codec import Format
from runtime.config import Environment, codec_from
from runtime.context import current
from runtime.errors import (
    ConfigError,
    ResultTimeout,
    TaskloomError,
    one_error,
)
from runtime.execution import ProcessRunner
from runtime.handle import TaskHandle
from runtime.hooks import Hooks
from runtime.lifecycle import Listener, Phase, Transition
from runtime.logs import ensure_logging
from runtime.messages import TaskMessage
from runtime.middleware import Middleware
from runtime.registry import Hook, Kind, Task, TaskDecorator, TaskRegistry
from runtime.reserving import checked_ids, send_reserved
from runtime.results import DEFAULT_TTL_S, ResultStore, share_keyring
from runtime.seams import open_listeners
from runtime.wiring import (
    check_task_id,
    check_time_limit,
    compile_call,
    declare,
    dedupe,
    default_results,
    install_limits_gate,
    results_for,
    retry_policy,
)
from runtime.worker import Worker

if TYPE_CHECKING:
    from runtime.ops.api import Operations
    from runtime.ops.scheduler import Misfire, Rule, Schedules

__all__ = ["Runtime", "TaskHandle", "run"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_RESULT_TIMEOUT_S = 300.0

Key = str | Callable[..., Any] | None  # a limiter key: an argument's name or a callable
Seconds = timedelta | float | None

log = structlog.get_logger("taskloom.runtime")




class Runtime(Hooks):
    """A task runtime. ``async with runtime:`` connects the broker and the
    result store; constructing one has no side effects."""

    def __init__(
        self,
        broker: str | Broker | None = None,
        results: str | ResultStore | None = None,
        *,
        namespace: str | None = None,
        codec: Format | None = None,
        compress_over: int | None = None,
        signing_keys: dict[str, bytes] | None = None,
        signing_key_id: str | None = None,
        encryption_keys: dict[str, bytes] | None = None,
        encryption_key_id: str | None = None,
        max_message_bytes: int | None = None,
        result_ttl_s: float | None = None,
        result_timeout_s: float | None = None,
        default_queue: str | None = None,
        middleware: Sequence[Middleware] = (),
        listeners: Sequence[Listener] = (),
        gates: Sequence[Gate] = (),
        index: bool = True,
        events: bool = True,
    ) -> None:
        """An argument left out (``None``) is read from its ``TASKLOOM_*`` variable
        (see ``runtime.config``), else takes its default; explicit arguments win.
        Without ``results``, a Redis broker keeps them in its own Redis and the
        memory broker in memory; RabbitMQ cannot carry them, so it needs
        ``results="redis://…"`` (a ``ConfigError`` at once otherwise;
        ``results="memory://"`` if every caller runs in the worker's process).
        ``index`` and ``events`` keep the task index and the event stream
        (``rt.ops``) beside the result store; either can be switched off.
        """
        env = Environment()
        if broker is None:
            broker = env.url("TASKLOOM_BROKER_URL") or "memory://"
        if results is None:
            results = env.url("TASKLOOM_RESULTS_URL")
        if namespace is None:
            namespace = env.text("TASKLOOM_NAMESPACE") or ""
        if result_ttl_s is None:
            result_ttl_s = env.seconds("TASKLOOM_RESULT_TTL_S") or DEFAULT_TTL_S
        if result_timeout_s is None:
            result_timeout_s = env.seconds("TASKLOOM_RESULT_TIMEOUT_S") or DEFAULT_RESULT_TIMEOUT_S
        if default_queue is None:
            default_queue = env.text("TASKLOOM_DEFAULT_QUEUE") or "default"
        self.namespace = namespace
        self.middleware = list(middleware)
        Hooks.__init__(self)
        #: hear of task transitions; read when the runtime opens
        self.listeners: list[Listener] = list(listeners)
        #: asked before a task runs; read when a worker is built
        self.gates: list[Gate] = list(gates)
        self._listeners: tuple[Listener, ...] = ()
        self._keep = (index, events)
        self._ops: Operations | None = None
        self._services: AsyncExitStack | None = None
        self._publish_hooks = [m for m in self.middleware
                               if type(m).before_publish is not Middleware.before_publish]
        self.broker: Broker = (
            brokers.from_url(broker, namespace=namespace) if isinstance(broker, str) else broker
        )
        if results is None:
            results = default_results(self.broker)
        self.results: ResultStore = (
            results_for(results, ttl_s=result_ttl_s, namespace=namespace)
            if isinstance(results, str) else results
        )
        self.codec = share_keyring(self.results, codec_from(  # results stored encrypted too
            env, codec, compress_over=compress_over, signing_keys=signing_keys,
            signing_key_id=signing_key_id, max_message_bytes=max_message_bytes,
            encryption_keys=encryption_keys, encryption_key_id=encryption_key_id))
        broker_limit = self.broker.capabilities.max_message_bytes
        if broker_limit is not None and self.codec.max_message_bytes > broker_limit:
            raise ConfigError(f"max_message_bytes {self.codec.max_message_bytes} is above the "
                              f"broker's limit of {broker_limit} bytes")
        self.registry = TaskRegistry()
        self.result_timeout_s = result_timeout_s
        self.default_queue = default_queue
        self._entered = 0
        ensure_logging()

    # -- tasks -------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        retries: int = 0,
        backoff: float = 1.0,
        backoff_factor: float = 2.0,
        max_backoff: float = 300.0,
        jitter: float = 0.5,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        timeout: float | None = None,
        expires: float | None = None,
        kind: Kind | None = None,
        retry_intervals: Sequence[float] | None = None,
        soft_timeout: float | None = None,
        result_ttl: float | None = None,
        failure_ttl: float | None = None,
        on_success: Hook | None = None,
        on_failure: Hook | None = None,
        on_retry: Hook | None = None,
        on_cancel: Hook | None = None,
        rate_limit: str | None = None, burst: int | None = None, rate_key: Key = None,
        concurrency_limit: int | None = None, concurrency_key: Key = None,
        lease: Seconds = None, unique_for: Seconds = None, unique_key: Key = None,
        debounce: Seconds = None, debounce_key: Key = None,
        schedule: Rule | None = None, misfire: Misfire = "skip",
    ) -> TaskDecorator: ...

    def task(  # type: ignore[misc]  # mypy cannot match ParamSpec overloads here
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        retries: int = 0,
        backoff: float = 1.0,
        backoff_factor: float = 2.0,
        max_backoff: float = 300.0,
        jitter: float = 0.5,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        timeout: float | None = None,
        expires: float | None = None,
        kind: Kind | None = None,
        retry_intervals: Sequence[float] | None = None,
        soft_timeout: float | None = None,
        result_ttl: float | None = None,
        failure_ttl: float | None = None,
        on_success: Hook | None = None,
        on_failure: Hook | None = None,
        on_retry: Hook | None = None,
        on_cancel: Hook | None = None,
        rate_limit: str | None = None, burst: int | None = None, rate_key: Key = None,
        concurrency_limit: int | None = None, concurrency_key: Key = None,
        lease: Seconds = None, unique_for: Seconds = None, unique_key: Key = None,
        debounce: Seconds = None, debounce_key: Key = None,
        schedule: Rule | None = None, misfire: Misfire = "skip",
    ) -> Task[P, R] | TaskDecorator:
        """Register a task. ``async def`` runs on the event loop, a plain
        ``def`` in a thread, ``kind="process"`` in a process pool.

        The task is typed ``Task[P, R]``: ``P`` the function's parameters, ``R``
        its result (an ``async def``'s awaited result), which ``.s()``,
        ``run()`` and ``TaskHandle.result()`` carry to the caller.

        ``retry_intervals``: seconds before each retry; ``soft_timeout``:
        ``SoftTimeLimitExceeded`` in the task first; ``result_ttl`` /
        ``failure_ttl``: retention; ``on_success/on_failure/on_retry/on_cancel``:
        hooks. Flow control (README): ``rate_limit``, ``burst``,
        ``concurrency_limit``, ``lease``, ``unique_for``, ``debounce``, each
        per ``*_key``; ``schedule=every(...)|cron(...)`` with ``misfire``."""

        def register(f: Callable[P, R]) -> Task[P, R]:
            steps = tuple(retry_intervals or ())
            policy = retry_policy(f, retries=retries or len(steps), backoff_s=backoff, jitter=jitter,
                                  factor=backoff_factor, max_delay_s=max_backoff, intervals=steps)
            t: Task[P, R] = Task(
                f,
                name=name or f"{f.__module__}.{f.__qualname__}",
                queue=queue or self.default_queue,
                priority=priority,
                retry=policy,
                retry_on=retry_on,
                timeout=timeout,
                expires=expires,
                kind=kind,
                owner=self,
                soft_timeout=soft_timeout,
                result_ttl=result_ttl,
                failure_ttl=failure_ttl,
                on_success=on_success,
                on_failure=on_failure,
                on_retry=on_retry,
                on_cancel=on_cancel,
            )
            self._check_time_limit(t)
            declare(self, t, dict(rate_limit=rate_limit, burst=burst, rate_key=rate_key,
                                  concurrency_limit=concurrency_limit, lease=lease,
                                  concurrency_key=concurrency_key, unique_for=unique_for,
                                  unique_key=unique_key, debounce=debounce,
                                  debounce_key=debounce_key), schedule, misfire)
            self.registry.add(t)
            return t

        if fn is not None:
            return register(fn)
        return cast(TaskDecorator, register)

    _check_time_limit = check_time_limit

    @property
    def default_time_limit(self) -> float | None:
        """The limit of tasks that set none: 90% of the broker's consumer timeout
        (RabbitMQ takes a message back after it), else no limit."""
        limit = self.broker.capabilities.consumer_timeout_s
        return None if limit is None else limit * 0.9

    def signature(self, name: str, *args: Any, **kwargs: Any) -> canvas.Signature[Any]:
        """A signature of the task named ``name``. If this runtime registered it,
        its arguments are checked at enqueue as ``task.s()``'s are. If not (a
        producer without the task's code), no argument can be checked here: the
        call goes to ``default_queue`` (``.set(queue=...)`` for another), and a
        worker without the task dead-letters it, which reaches the caller at
        once as ``TaskDeadLettered`` with reason ``unknown_task``."""
        task = self.registry.get(name) or self.registry.remote(
            name, queue=self.default_queue, owner=self)
        return task.s(*args, **kwargs)

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        with one_error:
            await self._open()
        return self

    async def _open(self) -> None:
        if self._entered == 0:
            for t in self.registry:
                self._check_time_limit(t)
            install_limits_gate(self)
            await self.broker.__aenter__()
            try:
                await self.results.__aenter__()
            except BaseException:
                await self.broker.__aexit__(None, None, None)
                raise
            from runtime.ops.api import listeners_for  # the operations side loads Redis

            listeners = [*self.listeners,
                         *listeners_for(self, index=self._keep[0], events=self._keep[1])]
            if listeners:
                self._services = await open_listeners(listeners)
                self._listeners = tuple(listeners)
        self._entered += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered -= 1
        if self._entered == 0:
            with one_error:
                try:
                    services, self._services, self._listeners = self._services, None, ()
                    ops, self._ops = self._ops, None
                    if ops is not None:
                        await ops.aclose()
                    if services is not None:
                        await services.aclose()
                finally:
                    try:
                        await self.results.__aexit__(exc_type, exc, tb)
                    finally:
                        await self.broker.__aexit__(exc_type, exc, tb)

    @property
    def ops(self) -> Operations:
        """What operators see and steer: tasks by state, workers, events, retry,
        replay, cancel by filter, pause (:class:`runtime.ops.api.Operations`); one
        per open runtime, closed with it."""
        from runtime.ops.api import Operations

        if self._ops is None:
            self._ops = Operations(self)
        return self._ops

    @property
    def schedules(self) -> Schedules:
        """Periodic and cron schedules (:mod:`runtime.ops.scheduler`)."""
        from runtime.ops.scheduler import schedules_for

        return schedules_for(self)

    def _require_started(self) -> None:
        if not self._entered:
            raise TaskloomError(
                "the runtime is not connected; use `async with runtime:` around enqueue/run"
            )

    @asynccontextmanager
    async def worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        prefetch: int | None = None,
        shutdown_grace_s: float = 30.0,
        processes: ProcessRunner | None = None,
    ) -> AsyncIterator[Worker]:
        """A worker embedded in this event loop, consuming every queue the
        runtime's tasks use (or ``queues``). Leaving the block drains it.

        An exception raised in the block leaves it as itself (after the drain),
        never wrapped in an ``ExceptionGroup``; so does a worker failure."""
        self._require_started()
        install_limits_gate(self)
        from runtime.ops.api import pauses_for  # paused queues, seen by every worker

        w = Worker(self, queues=queues, concurrency=concurrency, prefetch=prefetch,
                   shutdown_grace_s=shutdown_grace_s, processes=processes, pauses=pauses_for(self))
        raised: Exception | None = None
        with one_error:
            async with anyio.create_task_group() as tg:
                await tg.start(w.serve)
                try:
                    yield w
                except Exception as e:  # the user's: re-raised below, outside the task group
                    raised = e
                finally:
                    w.stop()
        if raised is not None:
            raise raised

    # -- enqueue -------------------------------------------------------------------

    async def enqueue(
        self,
        target: canvas.Composable[R],
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        expires: float | None = None,
    ) -> TaskHandle[R]:
        """Publish ``target`` (a signature or canvas); returns once the broker
        has it durably. Raises an EnqueueError subclass before anything is sent
        if the input is bad.

        ``task_id`` names the outcome (1 to 200 bytes of printable characters
        without spaces) and makes the enqueue idempotent: the id is reserved
        in the result store (an atomic put-if-absent, kept for the result
        TTL) before anything is sent. If the id already has a record (the task
        is pending, running, finished within the result TTL, or cancelled),
        nothing is sent and the handle of the existing task is returned with
        ``handle.duplicate`` set (``runtime.reserving``)."""
        self._require_started()
        if task_id is not None:
            check_task_id(task_id)
        messages, handle = self._compile(target, countdown=countdown, eta=eta, priority=priority,
                                         queue=queue, task_id=task_id, expires=expires)
        deduped = _deduped(target)  # unique_for / debounce (runtime.ops.limits)
        with one_error:
            if task_id is not None:
                return (await send_reserved(self, [(messages, handle, task_id)], dedupe=(
                    (lambda m, h: dedupe(self, m, h)) if deduped else None)))[0]
            if deduped:
                messages, handle = await dedupe(self, messages, handle)
            await self.publish(messages)
        return handle

    async def enqueue_many(self, targets: Iterable[canvas.Composable[R]], *,
                           rate: str | None = None,
                           task_ids: Sequence[str | None] | None = None) -> list[TaskHandle[R]]:
        """Publish many signatures or canvases in one batch; with ``rate``
        ("100/s"), in batches of the rate's burst spaced by it (a producer that
        must not flood the queue). Tasks with ``unique_for``/``debounce`` are
        enqueued one by one. ``task_ids`` (one per target, None for a
        generated one) are idempotent as in ``enqueue``, all reserved in one
        round trip; a target whose id is taken is not sent and its handle has
        ``duplicate`` set."""
        self._require_started()
        targets = list(targets)
        ids = checked_ids(len(targets), task_ids, paced=rate is not None)
        if rate is not None:
            from runtime.ops.limits import enqueue_paced

            return await enqueue_paced(self, targets, rate=rate)
        if any(_deduped(t) for t in targets):
            return [await self.enqueue(t, task_id=i) for t, i in zip(targets, ids, strict=True)]
        calls = [(*self._compile(t, task_id=i), i) for t, i in zip(targets, ids, strict=True)]
        with one_error:
            if task_ids is None:
                await self.publish([m for msgs, _, _ in calls for m in msgs])
                return [handle for _, handle, _ in calls]
            return await send_reserved(self, calls)

    async def run(self, target: canvas.Composable[R], *, timeout: float | None = None) -> R:
        """Enqueue ``target`` and await its result.

        The store listens for the id's completion before the publish (the id
        is fresh, known once compiled), so no read is needed to catch a fast
        result: on Redis, a confirmed SUBSCRIBE, the publish, and the
        completion message (``ResultStore.wait_sent``)."""
        self._require_started()
        if _deduped(target):  # the handle may be the first call's: wait on that one
            return await (await self.enqueue(target)).result(timeout)
        messages, handle = self._compile(target)
        ctx = current.get()  # inside a task: lend its slot while it waits (README)
        try:
            with one_error, (ctx.lend() if ctx is not None and ctx.lend is not None
                             else nullcontext()):
                result = await self.results.wait_sent(
                    handle.id, self.result_timeout_s if timeout is None else timeout,
                    lambda: self.publish(messages))
        except ResultTimeout as e:
            if ctx is None:
                raise
            raise ResultTimeout(e.task_id, e.timeout, e.state, task=messages[-1].task,
                                waiter=f"{ctx.name} {ctx.id}") from None
        typed: TaskHandle[R] = handle
        return typed._outcome(result)

    def call_headers(self, *, rate_limit: str | None = None,
                     concurrency_limit: int | None = None) -> dict[str, str]:
        """The headers of per-call limits (``.set(rate_limit=...)``), checked."""
        from runtime.ops.limits import call_headers

        return call_headers(rate_limit=rate_limit, concurrency_limit=concurrency_limit)

    def handle(self, task_id: str) -> TaskHandle[Any]:
        """A handle for a task enqueued elsewhere."""
        return TaskHandle(self, task_id)

    _compile = compile_call

    async def publish(self, messages: Sequence[TaskMessage], *, delay_s: float | None = None,
                      announce: bool = True) -> None:
        """Encode and publish task messages (used by enqueue and by workers).
        Listeners hear ENQUEUED (SCHEDULED when delayed) of each, once the
        broker has them, unless ``announce`` is false (a retry: the worker
        reports RETRYING itself)."""
        if not messages:
            return
        now = time.time()
        envelopes = []
        encode = self.codec.encode
        hooks = self._publish_hooks
        for original in messages:
            m = original
            for hook in hooks:
                m = hook.before_publish(m)
            body, headers = encode(m)
            delay = delay_s if delay_s is not None else (
                max(0.0, m.eta_ms / 1000 - now) if m.eta_ms else 0.0)
            envelopes.append(Envelope(id=m.id, queue=m.queue, body=body, headers=headers,
                                      priority=m.priority, delay_s=delay))
        if len(envelopes) == 1:
            await self.broker.publish(envelopes[0])
        else:
            await self.broker.publish_many(envelopes)
        if self._listeners and announce:
            self._announce(messages, envelopes, now)

    def _announce(self, messages: Sequence[TaskMessage], envelopes: Sequence[Envelope],
                  now: float) -> None:
        at = int(now * 1000)
        for m, env in zip(messages, envelopes, strict=True):
            delayed = env.delay_s > 0
            t = Transition(id=m.id, task=m.task, queue=m.queue, attempt=m.attempt, at_ms=at,
                           phase=Phase.SCHEDULED if delayed else Phase.ENQUEUED,
                           eta_ms=at + int(env.delay_s * 1000) if delayed else None,
                           parent_id=m.parent_id or "", root_id=m.root_id or "")
            self.transition(t)

    def transition(self, t: Transition) -> None:
        """Tell every listener of ``t`` (a listener that raises is logged). With
        encryption on, an error's text is left out (it stays sealed in the result
        store); its type is kept."""
        if t.error and self.codec.encrypts:
            t = msgspec.structs.replace(t, error="")
        for listener in self._listeners:
            try:
                listener.transition(t)
            except Exception as e:
                log.error("a lifecycle listener raised; it must not", listener=type(listener).__name__,
                          task_id=t.id, phase=t.phase.value, error_type=type(e).__name__,
                          exc_info=e)


def _deduped(target: canvas.Composable[Any]) -> bool:
    """Whether ``target`` is a call of a task with ``unique_for`` or ``debounce``."""
    limits = target.task.limits if isinstance(target, canvas.Signature) else None
    return limits is not None and (limits.unique_for_s is not None or
                                   limits.debounce_s is not None)


async def run(target: canvas.Composable[R], *, timeout: float | None = None) -> R:
    """Enqueue ``target`` on the runtime of its (first) task and await the result."""
    owner = target.owner
    if not isinstance(owner, Runtime):
        raise ConfigError(f"{target!r} belongs to no runtime; define its task with @runtime.task")
    return await owner.run(target, timeout=timeout)

