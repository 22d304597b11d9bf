"""A pass-through broker for tests that observe or change what a worker sees of
its deliveries, while every call reaches the real broker (an observer, not a
mock): ``PassThroughBroker(real, wrap)`` hands the worker ``wrap(delivery)``
for each real delivery; ``PassThroughDelivery`` forwards every settlement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from brokers.base import Consumer, Delivery


class PassThroughDelivery:
    """A real delivery; subclasses change what is seen or observe a settlement."""

    def __init__(self, inner: Delivery) -> None:
        self._inner = inner
        self.envelope: Any = inner.envelope
        self.delivery_count: Any = inner.delivery_count

    async def ack(self) -> None:
        await self._inner.ack()

    async def nack(self, *, delay_s: float = 0.0) -> None:
        await self._inner.nack(delay_s=delay_s)

    async def dead_letter(self, reason: str) -> None:
        await self._inner.dead_letter(reason)

    async def extend(self) -> None:
        await self._inner.extend()


class PassThroughConsumer:
    def __init__(self, inner: Consumer, wrap: Callable[[Delivery], Any]) -> None:
        self._inner = inner
        self._wrap = wrap

    async def receive(self) -> Any:
        return self._wrap(await self._inner.receive())

    def __aiter__(self) -> PassThroughConsumer:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()


class PassThroughBroker:
    """Delegates everything to ``inner``; deliveries pass through ``wrap``."""

    def __init__(self, inner: Any, wrap: Callable[[Delivery], Any]) -> None:
        self._inner = inner
        self._wrap = wrap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __aenter__(self) -> PassThroughBroker:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)

    @asynccontextmanager
    async def consume(self, queues: Sequence[str], *, prefetch: int
                      ) -> AsyncIterator[PassThroughConsumer]:
        async with self._inner.consume(queues, prefetch=prefetch) as consumer:
            yield PassThroughConsumer(consumer, self._wrap)
