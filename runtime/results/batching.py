"""Gathering concurrent calls into one round trip (the Redis result store's
writes and reads).

The caller that opens a batch flushes it, after the flush in flight if any;
callers arriving meanwhile join the batch and await the same flush.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

from runtime.errors import ResultError, ResultStoreUnavailable

__all__ = ["Batcher"]

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class _Batch(Generic[_In, _Out]):
    """Calls gathered for one flush, and its outcome."""

    __slots__ = ("done", "error", "items", "outcomes")

    def __init__(self) -> None:
        self.items: list[_In] = []
        self.outcomes: list[_Out] = []
        self.error: BaseException | None = None
        self.done = anyio.Event()


class Batcher(Generic[_In, _Out]):
    """Gathers concurrent calls into one round trip. The caller that opens a
    batch flushes it, after the flush in flight if any; callers arriving in the
    meantime join the open batch and await that same flush."""

    def __init__(self, flush: Callable[[list[_In]], Awaitable[list[_Out]]]) -> None:
        self._flush = flush
        self._open: _Batch[_In, _Out] | None = None
        self._lock = anyio.Lock()

    async def submit(self, items: Sequence[_In]) -> list[_Out]:
        batch = self._open
        leader = batch is None
        if batch is None:
            batch = self._open = _Batch()
        start = len(batch.items)
        batch.items.extend(items)
        if leader:
            # Shielded: the callers that joined this batch depend on its flush.
            with anyio.CancelScope(shield=True):
                try:
                    async with self._lock:
                        if self._open is batch:
                            self._open = None
                        batch.outcomes = await self._flush(batch.items)
                except BaseException as e:
                    batch.error = e
                    raise
                finally:
                    batch.done.set()
        else:
            await batch.done.wait()
            if batch.error is not None:
                error = batch.error
                if isinstance(error, ResultStoreUnavailable):
                    raise ResultStoreUnavailable(str(error)) from error
                raise ResultError(str(error)) from error
        return batch.outcomes[start:start + len(items)]
