"""Logging set-up: structlog, filtered by level before any work is done."""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog
from opentelemetry import propagate, trace

from runtime.messages import TaskMessage
from runtime.middleware import CallNext, Middleware, TaskContext

__all__ = ["TracingMiddleware", "configure_logging", "ensure_logging"]


def configure_logging(level: str | int = "INFO", *, json: bool = False) -> None:
    """Configure structlog for taskloom's processes (the CLI calls this).

    Calls below ``level`` cost one method lookup: the bound logger is built
    with the level filter compiled in.
    """
    if isinstance(level, str):
        resolved = logging.getLevelNamesMapping().get(level.upper())
        if resolved is None:
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = resolved
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def ensure_logging() -> None:
    """Give structlog a sane default (INFO, to stderr) unless the application
    configured it already."""
    if not structlog.is_configured():
        configure_logging("INFO")


class TracingMiddleware(Middleware):
    """OpenTelemetry tracing: the caller's trace context rides in each
    message's headers (W3C traceparent), and every execution is a CONSUMER
    span, child of the span that enqueued it.

        Runtime(..., middleware=[TracingMiddleware()])
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("taskloom", tracer_provider=tracer_provider)

    def before_publish(self, message: TaskMessage) -> TaskMessage:
        carrier = dict(message.headers)
        propagate.inject(carrier)
        if len(carrier) == len(message.headers):
            return message
        return msgspec.structs.replace(message, headers=carrier)

    async def execute(self, ctx: TaskContext, call_next: CallNext) -> Any:
        msg = ctx.message
        parent = propagate.extract(msg.headers)
        with self._tracer.start_as_current_span(
            f"run {msg.task}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "taskloom.task_id": msg.id,
                "taskloom.task": msg.task,
                "taskloom.attempt": msg.attempt,
                "taskloom.delivery_count": ctx.delivery_count,
                "taskloom.queue": msg.queue,
                "taskloom.worker": ctx.worker,
            },
        ):
            return await call_next(ctx)
