"""Where results live: the ``ResultStore`` protocol every store keeps.

Rules every store keeps (tested in tests/results_contract):

- The first terminal result (SUCCESS, FAILURE, REVOKED) of an id wins; later
  writes of that id are ignored (``put`` returns False). A non-terminal state
  (STARTED, RETRY) never overwrites a terminal one.
- Results expire after the store's ``ttl_s``.
- ``wait`` needs no polling: a notification wakes the waiter. It raises
  ``ResultTimeout`` after ``timeout`` seconds, never hangs.
- ``join`` counts distinct members of a group or chord: adding a member twice
  counts once. Once all ``size`` members are in, every call returns the
  values in member order (so a worker that completes the join after a crash
  can still continue it); before that it returns None.
- ``claim`` takes an id for one execution (``SET NX`` with a TTL); the same
  holder claiming again renews it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import msgspec

from runtime.errors import EncodeError, PayloadTooLarge
from runtime.messages import ErrorInfo, Result

__all__ = ["CANCELLED", "DEFAULT_MAX_RESULT_BYTES", "DEFAULT_TTL_S", "ResultStore", "encode_result"]

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_MAX_RESULT_BYTES = 16 * 1024 * 1024

#: The error stored with a result revoked by ``TaskHandle.cancel()``.
CANCELLED = ErrorInfo(type="TaskCancelled", reason="cancelled",
                      message="cancelled by TaskHandle.cancel() before it finished")

_ENCODER = msgspec.msgpack.Encoder()


def encode_result(result: Result, limit: int) -> bytes:
    """The stored form of ``result``; EncodeError or PayloadTooLarge if it
    cannot be stored."""
    try:
        data = _ENCODER.encode(result)
    except (TypeError, OverflowError, RecursionError) as e:
        raise EncodeError(f"the result of task {result.id} cannot be encoded: {e}") from None
    if len(data) > limit:
        raise PayloadTooLarge(len(data), limit, f"result of task {result.id}")
    return data


class ResultStore(Protocol):
    """Storage for task results, joins and claims."""

    ttl_s: float

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def put(self, result: Result) -> bool:
        """Store ``result`` under its id (first terminal wins); whether it was stored."""
        ...

    async def put_many(self, results: Sequence[Result]) -> list[bool]:
        """``put`` for many results in one round trip."""
        ...

    async def get(self, task_id: str) -> Result | None: ...

    async def wait(self, task_id: str, timeout: float) -> Result:
        """The terminal result of ``task_id``; ``ResultTimeout`` after ``timeout`` s."""
        ...

    def updates(self, task_id: str) -> AsyncIterator[Result]:
        """Each new record of ``task_id`` (STARTED, progress, RETRY...) as it is
        stored, ending with the terminal one; no polling."""
        ...

    async def revoke(self, task_id: str) -> bool:
        """Mark ``task_id`` REVOKED unless it has a terminal result; tell every
        worker (``is_revoked``). Whether it was revoked."""
        ...

    def listen_revoked(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(task_id)`` (cheap, sync) on each revocation the store
        learns of (workers stop running tasks with it); returns the way to stop."""
        ...

    def is_revoked(self, task_id: str) -> bool:
        """Whether ``task_id`` is known revoked (a local view, no I/O)."""
        ...

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Keep ``is_revoked`` up to date until cancelled (run by workers)."""
        ...

    async def join(self, join_id: str, index: int, size: int, value: Any) -> list[Any] | None:
        """Count member ``index`` of ``size`` into join ``join_id``."""
        ...

    async def claim(self, task_id: str, ttl_s: float, *, holder: str = "") -> bool:
        """Take ``task_id`` for one execution for ``ttl_s`` seconds; False if
        another holder has it. The same holder claiming again renews it."""
        ...
