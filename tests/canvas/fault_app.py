"""The app of the chord redelivery fault tests, run in worker processes:

    python -m runtime.cli worker tests.canvas.fault_app:rt --concurrency 2

with ``TASKLOOM_CANVAS_BROKER``, ``TASKLOOM_CANVAS_RESULTS``, ``TASKLOOM_CANVAS_NS``,
``TASKLOOM_CANVAS_DIR`` (ledger files and kill markers) and ``TASKLOOM_CANVAS_KILL``
(where a worker process SIGKILLs itself, once across all processes) in the
environment. The test process builds its own runtime with :func:`build` (same
task names, ``kill=""``).

Kill points (each taken at most once: the first process to create the
point's marker file with ``O_EXCL`` kills itself):

- ``member``: inside a header member called with ``crash=True``, after its
  ledger record (its side effect), before it returns (so before its ack);
- ``join``: in the result store, right after the member that completes the
  chord's join was counted, before the body is published;
- ``body_published``: right after the chord body's message was published,
  before the member that completed the join is acked;
- ``body_started``: inside the chord body, after its ledger record, before it
  returns (the body's own worker dies mid-run);
- ``after_body_stored``: when the chain step after the body is about to be
  published: the body's result is stored, its follow-up not yet sent, its
  delivery not acked.

Ledger records (tests/faults/ledger.py format): ``MEMBER(i)``, ``BODY(values)``,
``AFTER(total)``, ``KILL_SELF(where, i)``, and ``EXEC(task, id, dc)`` for every
execution (by a middleware: the message id and its delivery count, for
failure messages).
"""

from __future__ import annotations

import contextvars
import functools
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.app import Runtime
from runtime.messages import TaskMessage
from runtime.middleware import CallNext, Middleware, TaskContext
from runtime.results.redis import RedisResultStore
from tests.faults.ledger import LedgerWriter

__all__ = ["AFTER", "BODY", "KILL_POINTS", "MEMBER", "build"]

MEMBER = "canvas.fault.member"
BODY = "canvas.fault.body"
AFTER = "canvas.fault.after"
KILL_POINTS = ("member", "join", "body_published", "body_started", "after_body_stored")
TASK_TIMEOUT_S = 30.0

#: the header index whose join the current worker task counted last
_joined: contextvars.ContextVar[int | None] = contextvars.ContextVar("joined", default=None)


@functools.cache
def _ledger(directory: str) -> LedgerWriter:
    return LedgerWriter(Path(directory) / f"worker-{os.getpid()}.jsonl")


class Faults:
    """The ledger and the kill point of one process."""

    def __init__(self, directory: str, kill: str) -> None:
        if kill and kill not in KILL_POINTS:
            raise ValueError(f"unknown kill point {kill!r}; use one of {KILL_POINTS}")
        self.directory = directory
        self.kill = kill

    def write(self, kind: str, **fields: Any) -> None:
        _ledger(self.directory).write(kind, **fields)

    def maybe_die(self, where: str, **fields: Any) -> None:
        """SIGKILL this process if ``where`` is the kill point and no process took it yet."""
        if where != self.kill:
            return
        try:
            fd = os.open(Path(self.directory) / f"killed-{where}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        self.write("KILL_SELF", where=where, **fields)
        os.kill(os.getpid(), signal.SIGKILL)


class Executions(Middleware):
    """Writes ``EXEC(task, id, dc)`` before every execution."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    async def execute(self, ctx: TaskContext, call_next: CallNext) -> Any:
        self.faults.write("EXEC", task=ctx.message.task, id=ctx.message.id, dc=ctx.delivery_count)
        return await call_next(ctx)


class FaultyStore(RedisResultStore):
    """The Redis result store, with the ``join`` kill point."""

    faults: Faults

    async def join(self, join_id: str, index: int, size: int, value: Any) -> list[Any] | None:
        values = await super().join(join_id, index, size, value)
        if values is not None:
            _joined.set(index)
            self.faults.maybe_die("join", i=index)
        return values


class FaultyRuntime(Runtime):
    """A runtime with the ``body_published`` and ``after_body_stored`` kill points."""

    faults: Faults

    async def publish(self, messages: Sequence[TaskMessage], *,
                      delay_s: float | None = None) -> None:
        tasks = {m.task for m in messages}
        if AFTER in tasks:
            self.faults.maybe_die("after_body_stored")
        await super().publish(messages, delay_s=delay_s)
        if BODY in tasks:
            self.faults.maybe_die("body_published", i=_joined.get())


def build(broker: str, results: str, namespace: str, directory: str, kill: str = ""
          ) -> FaultyRuntime:
    """The fault-test runtime: ``member``, ``body`` and ``after`` tasks."""
    faults = Faults(directory, kill)
    store = FaultyStore(results, namespace=namespace)
    store.faults = faults
    rt = FaultyRuntime(broker=broker, results=store, namespace=namespace,
                       middleware=[Executions(faults)])
    rt.faults = faults

    @rt.task(name=MEMBER, timeout=TASK_TIMEOUT_S)
    async def member(i: int, crash: bool = False) -> int:
        faults.write("MEMBER", i=i)
        if crash:
            faults.maybe_die("member", i=i)
        return i * 7

    @rt.task(name=BODY, timeout=TASK_TIMEOUT_S)
    async def body(values: list[int]) -> int:
        faults.write("BODY", values=values)
        faults.maybe_die("body_started")
        return sum(values)

    @rt.task(name=AFTER, timeout=TASK_TIMEOUT_S)
    async def after(total: int) -> int:
        faults.write("AFTER", total=total)
        return total + 1

    return rt


def __getattr__(name: str) -> Any:
    if name == "rt":
        env = os.environ
        rt = build(env["TASKLOOM_CANVAS_BROKER"], env["TASKLOOM_CANVAS_RESULTS"],
                   env["TASKLOOM_CANVAS_NS"], env["TASKLOOM_CANVAS_DIR"],
                   env.get("TASKLOOM_CANVAS_KILL", ""))
        globals()["rt"] = rt
        return rt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
