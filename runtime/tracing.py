"""OpenTelemetry tracing of tasks: :class:`TracingMiddleware`.

The enqueuing span's context rides in each message's headers (W3C
``traceparent``), so an execution in another process is a child of the span
that enqueued it. Importing ``runtime`` does not load OpenTelemetry: this
module loads on first use of ``runtime.TracingMiddleware``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from opentelemetry import propagate, trace

from runtime.messages import TaskMessage
from runtime.middleware import CallNext, Middleware, TaskContext

__all__ = ["TracingMiddleware"]


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
