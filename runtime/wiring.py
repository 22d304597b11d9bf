"""Checks and resolution the ``Runtime`` does when it is built or enqueues:
task ids, which result store a broker's URL implies, and the flow-control and
schedule options of ``@rt.task`` (the operations side is imported only by
tasks that use them: ``import runtime`` loads no Redis)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from brokers.base import Broker
from brokers.memory import MemoryBroker
from runtime import canvas
from runtime.errors import BrokerConnectionError, ConfigError, EnqueueError, ResultError
from runtime.handle import TaskHandle
from runtime.messages import ChainNode, ChordNode, GroupNode, Node, SigNode, TaskMessage, TaskOptions
from runtime.results import MemoryResultStore, ResultStore
from runtime.retry import RetryPolicy

if TYPE_CHECKING:
    from runtime.app import Runtime
    from runtime.ops.scheduler import Misfire, Rule
    from runtime.registry import Task

__all__ = ["MAX_TASK_ID_BYTES", "check_task_id", "check_time_limit", "compile_call", "declare",
           "default_results", "dedupe", "install_limits_gate", "known_id", "results_for",
           "retry_policy"]

log = structlog.get_logger("taskloom.runtime")

#: the longest task id, in UTF-8 bytes (AMQP message ids are at most 255)
MAX_TASK_ID_BYTES = 200


def check_task_id(task_id: object) -> None:
    """Refuse a task id that is empty, too long, or has spaces or unprintable
    characters (EnqueueError saying which)."""
    if not isinstance(task_id, str) or not task_id:
        raise EnqueueError(f"task_id must be a non-empty string, not {task_id!r}; "
                           "leave it out to get a generated one")
    size = len(task_id.encode("utf-8", "surrogatepass"))
    if size > MAX_TASK_ID_BYTES:
        raise EnqueueError(f"task_id is {size} bytes long, over the limit of {MAX_TASK_ID_BYTES}; "
                           "use a shorter key (e.g. a hash of the long one)")
    bad = next((c for c in task_id if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise EnqueueError(f"task_id {task_id!r} contains {bad!r}; use printable characters "
                           "without spaces (e.g. letters, digits, '-', '_', ':', '.')")


def default_results(broker: Broker) -> str:
    """Where results go when no store is named: the broker's own Redis, or
    memory beside the memory broker; any other broker is refused."""
    if isinstance(broker, MemoryBroker):
        return "memory://"
    url = getattr(broker, "url", None)
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    if isinstance(url, str) and scheme in ("redis", "rediss", "unix"):
        return url  # the broker's Redis, without its query options
    kind = f"the {scheme}:// broker" if scheme else f"a {type(broker).__name__}"
    raise ConfigError(
        f"{kind} cannot carry results back to a caller, and no result store was given, so "
        "a caller in another process would wait its whole timeout for a result it can never "
        'see; pass results="redis://host:6379/0" (or set TASKLOOM_RESULTS_URL), or '
        'results="memory://" if every caller runs in the worker\'s process'
    )


def results_for(url: str, *, ttl_s: float, namespace: str) -> ResultStore:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryResultStore(ttl_s=ttl_s)
    if scheme in ("redis", "rediss", "unix"):
        from runtime.results.redis import RedisResultStore  # loads the Redis client only when used

        store: ResultStore = RedisResultStore.from_url(url, ttl_s=ttl_s, namespace=namespace)
        return store
    raise ConfigError(
        f"no result store handles {url!r}; use memory:// or redis://host:port/db"
    )


def retry_policy(fn: Any, **options: Any) -> RetryPolicy:
    """A task's retry policy (a ConfigError naming the task if it is bad)."""
    try:
        return RetryPolicy(**options)
    except ValueError as e:
        raise ConfigError(f"task {fn.__qualname__}: {e}") from None


def declare(rt: Runtime, task: Task[Any, Any], limits: dict[str, Any],
            schedule: Rule | None, misfire: Misfire) -> None:
    """Give ``task`` its flow-control limits (``Limits.of``, a ConfigError at
    decoration) and declare its schedule, if any option is given."""
    if any(v is not None for v in limits.values()):
        from runtime.ops.limits import Limits

        task.limits = Limits.of(task=task.name, fn=task.fn, **limits)
    if schedule is not None:
        from runtime.ops.scheduler import schedules_for

        schedules_for(rt).declare(task.name, task.s(), schedule, misfire=misfire)
    elif misfire != "skip":
        raise ConfigError(f"task {task.name!r}: misfire= is given without schedule=; add "
                          "schedule=every(...) or cron(...)")


def install_limits_gate(rt: Runtime) -> None:
    """Add a ``LimitsGate`` to ``rt.gates`` once, if a registered task has a
    rate, concurrency or debounce limit (tasks without limits cost nothing)."""
    if not any(t.limits is not None and t.limits.gated for t in rt.registry):
        return
    from runtime.ops.limits import LimitsGate

    if not any(isinstance(g, LimitsGate) for g in rt.gates):
        rt.gates.append(LimitsGate(rt))


async def dedupe(rt: Runtime, messages: list[TaskMessage], handle: TaskHandle[Any]
                 ) -> tuple[list[TaskMessage], TaskHandle[Any]]:
    """``unique_for``/``debounce`` of a one-message enqueue: the messages to
    publish (none for a duplicate) and the handle to return."""
    from runtime.ops.limits import before_enqueue

    decision = await before_enqueue(rt, messages[0])
    if decision.existing_id is None:
        return [decision.message], handle
    return [], type(handle)(rt, decision.existing_id, handle._return_type, duplicate=True)


def check_time_limit(rt: Runtime, task: Task[Any, Any]) -> None:
    """A time limit must stay below the broker's consumer timeout (tasks
    without one get ``default_time_limit``, which does)."""
    limit = rt.broker.capabilities.consumer_timeout_s
    if limit is None:
        return
    if task.timeout is not None and task.timeout >= limit:
        raise ConfigError(
            f"task {task.name!r} has timeout={task.timeout}, but the broker takes back "
            f"messages held longer than its consumer timeout of {limit:g}s, which would run "
            f"the task twice; give it timeout < {limit:g} or raise the broker's "
            "consumer_timeout"
        )


async def known_id(rt: Runtime, task_id: str) -> bool:
    """Whether the result store has a record of ``task_id``. When the store
    cannot say, the enqueue goes ahead (it depends on the broker alone)."""
    try:
        return await rt.results.get(task_id) is not None
    except (ResultError, BrokerConnectionError) as e:
        log.warning("cannot check whether the task id is taken; enqueuing it anyway",
                    task_id=task_id, error=str(e))
        return False


def compile_call(
    rt: Runtime,
    target: canvas.Composable[Any],
    *,
    countdown: float | None = None,
    eta: datetime | None = None,
    priority: int | None = None,
    queue: str | None = None,
    task_id: str | None = None,
    expires: float | None = None,
) -> tuple[list[TaskMessage], TaskHandle[Any]]:
    if not isinstance(target, (canvas.Signature, canvas.Chain, canvas.Group, canvas.Chord)):
        raise EnqueueError(
            f"enqueue takes a signature or canvas (task.s(...), chain, group, chord), "
            f"not {type(target).__qualname__}; did you call the task instead of task.s()?"
        )
    if countdown is not None and eta is not None:
        raise EnqueueError("give countdown or eta, not both")
    if eta is not None:
        if eta.tzinfo is None:
            raise EnqueueError("eta must be a timezone-aware datetime (e.g. datetime.now(UTC))")
        countdown = max(0.0, eta.timestamp() - time.time())
    overrides = None
    if (countdown is not None or priority is not None or queue is not None
            or expires is not None):
        overrides = TaskOptions(countdown=countdown, priority=priority, queue=queue,
                                expires=expires)
        canvas.check_call_options(f"enqueue({target!r})", overrides)
    if isinstance(target, canvas.Signature) and not target.errbacks:
        message = canvas.message_for(target, task_id=task_id, overrides=overrides)
        messages = [message]
        handle: TaskHandle[Any] = TaskHandle(rt, message.id, target.task.return_type)
        node: Node | None = None
    else:
        node = canvas.to_node(target, final=task_id)
        messages = canvas.start(node, rt.registry, overrides=overrides)
        handle = TaskHandle(rt, canvas.final_id(node))
    limit = rt.broker.capabilities.consumer_timeout_s
    if limit is not None:
        for m in messages:
            _refuse_time_limit(limit, m.task, m.id, m.timeout)
        if node is not None:
            _check_canvas_time_limits(limit, node)
    return messages, handle


def _check_canvas_time_limits(limit: float, node: Node) -> None:
    """Every step of a canvas, the later ones too (the worker publishes them
    when their turn comes, too late to refuse)."""
    match node:
        case SigNode():
            _refuse_time_limit(limit, node.task, node.id, node.options.timeout)
            for errback in node.errbacks:
                _check_canvas_time_limits(limit, errback)
        case GroupNode(members=children) | ChainNode(steps=children):
            for child in children:
                _check_canvas_time_limits(limit, child)
        case ChordNode():
            for child in node.header:
                _check_canvas_time_limits(limit, child)
            if node.body is not None:
                _check_canvas_time_limits(limit, node.body)


def _refuse_time_limit(limit: float, task: str, task_id: str, timeout: float | None) -> None:
    """A per-call ``.set(timeout=...)`` must stay below the broker's consumer
    timeout, as ``check_time_limit`` requires of the task's own option (a
    message held past it is taken back and run twice)."""
    if timeout is None or timeout < limit:
        return
    raise EnqueueError(
        f"{task!r} (id {task_id}) was given timeout={timeout:g}, but the broker takes back "
        f"messages held longer than its consumer timeout of {limit:g}s, which would run the "
        f"task twice; nothing was sent. Give .set(timeout=...) a value below {limit:g} or "
        f"raise the broker's consumer_timeout"
    )
