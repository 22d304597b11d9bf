"""Trace context crosses the broker: the execution span is a child of the caller's span."""

from __future__ import annotations

import anyio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from runtime import Runtime, TaskError
from runtime.middleware import CallNext, Middleware, TaskContext
from runtime.tracing import TracingMiddleware


async def test_execution_span_is_a_child_of_the_enqueuing_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = Runtime(middleware=[TracingMiddleware(provider)])

    @rt.task(name="traced.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @rt.task(name="traced.boom")
    async def boom() -> None:
        raise ValueError("nope")

    tracer = provider.get_tracer("test")
    with anyio.fail_after(5):
        async with rt, rt.worker(concurrency=2):
            with tracer.start_as_current_span("caller") as caller:
                assert await rt.run(add.s(1, 2)) == 3
                try:
                    await rt.run(boom.s())
                except TaskError as e:
                    assert e.is_(ValueError)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    run_span = spans["run traced.add"]
    assert run_span.kind is SpanKind.CONSUMER
    assert run_span.parent is not None
    assert run_span.parent.span_id == caller.get_span_context().span_id
    assert run_span.context.trace_id == caller.get_span_context().trace_id
    assert run_span.attributes is not None and run_span.attributes["taskloom.task"] == "traced.add"
    failed = spans["run traced.boom"]
    assert not failed.status.is_ok
    assert any(e.name == "exception" for e in failed.events)


async def test_middleware_wraps_execution_in_list_order() -> None:
    seen: list[str] = []

    class Tag(Middleware):
        def __init__(self, tag: str) -> None:
            self.tag = tag

        async def execute(self, ctx: TaskContext, call_next: CallNext) -> object:
            seen.append(f"{self.tag}>")
            try:
                return await call_next(ctx)
            finally:
                seen.append(f"<{self.tag}")

    rt = Runtime(middleware=[Tag("a"), Middleware(), Tag("b")])

    @rt.task(name="mw.noop")
    async def noop() -> str:
        seen.append("body")
        return "ok"

    with anyio.fail_after(5):
        async with rt, rt.worker(concurrency=1):
            assert await rt.run(noop.s()) == "ok"
    assert seen == ["a>", "b>", "body", "<b", "<a"]
