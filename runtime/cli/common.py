"""What every ``taskloom`` command shares: loading the application, running a
one-shot coroutine, and reporting an operational error as one line (what
failed, what to do) with exit code 1, never a traceback."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import anyio
import click
import structlog

from brokers.base import TaskloomError
from runtime.app import Runtime
from runtime.process.loading import load_runtime as _load
from runtime.process.serve import EXIT_CONFIG, parse_size

__all__ = ["CHATTY_CLIENTS", "DropTransportErrors", "Size", "age", "command_name", "describe",
           "event_loop_backend", "fail", "load_runtime", "log", "operational", "queue_names", "run"]

log = structlog.get_logger("taskloom.cli")

T = TypeVar("T")

#: Client libraries that log a connection failure on their own (stdlib logging)
#: before raising it; one-shot commands report the error once, themselves.
CHATTY_CLIENTS = ("aiormq", "aio_pika")


class DropTransportErrors(logging.Filter):
    """aiormq logs "error when creating transport" and then raises the same
    error, which taskloom maps and reports (or retries) itself: drop the echo."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


def command_name() -> str:
    ctx = click.get_current_context(silent=True)
    return f"taskloom {ctx.info_name}" if ctx is not None and ctx.info_name else "taskloom"


def operational(error: BaseException) -> BaseException | None:
    """The error to report if ``error`` is operational (a server down or
    unreachable, a bad URL or setting): a taskloom error or an OSError, alone or
    as every leaf of an exception group; None for anything else (a bug)."""
    if isinstance(error, BaseExceptionGroup):
        leaves = [operational(e) for e in error.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
        return None
    if isinstance(error, (TaskloomError, OSError)):
        return error
    # a client's own error that escaped the mapping to taskloom's (a server down)
    for module, name in (("redis.exceptions", "RedisError"), ("aiormq.exceptions", "AMQPError")):
        loaded = sys.modules.get(module)
        cls: type[BaseException] | None = getattr(loaded, name, None)
        if cls is not None and isinstance(error, cls):
            return error
    return None


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, TaskloomError):
        return text  # taskloom's errors say what to do
    return (f"{type(error).__name__}: {text}; check that the servers named in the "
            "application's URLs run and are reachable")


def fail(what: str, error: BaseException, **fields: Any) -> NoReturn:
    """One error line (what failed, what to do), exit code 1; the traceback
    only at --log-level DEBUG."""
    log.debug("traceback of the error below", exc_info=error)
    log.error(f"{command_name()}: {what}", **fields, error=describe(error))
    sys.exit(EXIT_CONFIG)


def load_runtime(spec: str) -> Runtime:
    """``package.module:attr`` -> the Runtime it names; one error line and
    exit code 1 if it cannot be loaded."""
    try:
        return _load(spec)
    except TaskloomError as e:  # not importable, not a Runtime, a bad URL or setting
        fail("cannot load the application", e, app=spec)
    except Exception as e:  # the application's module raised while being imported
        where = ""
        if isinstance(e, SyntaxError) and e.filename:
            where = f"{e.filename}:{e.lineno}"
        elif e.__traceback__ is not None:
            last = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{last.filename}:{last.lineno}"
        log.debug("traceback of the error below", exc_info=e)
        log.error(f"{command_name()}: cannot load the application: importing it raised "
                  f"{type(e).__name__}", app=spec, error=str(e), at=where,
                  hint="fix the module; --log-level DEBUG shows the traceback")
        sys.exit(EXIT_CONFIG)


def run(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    """``anyio.run(fn)`` for a one-shot command: an operational error is one
    line and exit code 1, never a traceback."""
    for name in CHATTY_CLIENTS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return anyio.run(fn, backend_options=event_loop_backend())
    except Exception as e:
        reported = operational(e)
        if reported is None:
            raise
        fail(what, reported)


def event_loop_backend() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return {}
    return {"use_uvloop": True}


class Size(click.ParamType):  # type: ignore[type-arg, unused-ignore]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if size <= 0:
            self.fail("must be more than 0 bytes", param, ctx)
        return size


def queue_names(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(q.strip() for q in text.split(",") if q.strip())
    return names or None


def age(ms: int) -> str:
    if not ms:
        return "-"
    seconds = max(0.0, time.time() - ms / 1000)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
