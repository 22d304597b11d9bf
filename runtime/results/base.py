"""Where results live: the ``ResultStore`` protocol every store keeps.

The contract (each promise has a test on every store, memory and Redis, in
``tests/results_contract``, tagged ``@pytest.mark.result_promise(n)``):

1. ``put`` then ``get`` (from any process of the app, on a shared store)
   returns the record as stored; ``get`` of an id never stored is None.
2. The first terminal result (SUCCESS, FAILURE, REVOKED) of an id wins; later
   writes of that id are ignored (``put`` returns False). A non-terminal state
   (STARTED, RETRY) never overwrites a terminal one. ``put_many`` keeps this
   per result and says which were stored.
3. Results expire after the store's ``ttl_s`` (or the record's own ``ttl_s``).
4. ``wait`` needs no polling: a notification wakes the waiter. It raises
   ``ResultTimeout`` after ``timeout`` seconds, never hangs.
5. A result that cannot be stored (unencodable, over ``max_result_bytes``)
   raises ``EncodeError`` / ``PayloadTooLarge`` and nothing is stored.
6. ``revoke`` stores REVOKED unless a terminal result exists, wakes waiters,
   and reaches ``is_revoked`` of every watching store of the app.
7. ``join`` counts distinct members of a group or chord: adding a member twice
   counts once. Once all ``size`` members are in, every call returns the
   values in member order (so a worker that completes the join after a crash
   can still continue it); before that it returns None.
8. ``claim`` takes an id for one execution (``SET NX`` with a TTL); the same
   holder claiming again renews it.
9. Expiry is told apart from absence: storing the first terminal result of an
   id also stores, in the same atomic write, a small marker that outlives the
   result (``marker_ttl_s``, see :func:`marker_ttl_s`; twice a record's own
   ``ttl_s`` if that is longer). ``wait`` of an id whose
   marker remains but whose result is gone raises ``ResultExpired`` at once;
   ``expired`` says so without waiting. The marker is additive: a record
   written by an older taskloom has none, and its expiry reads as absence
   (``wait`` then times out, as before).
10. ``reserve`` is an atomic put-if-absent (``SET NX``, the store's ``ttl_s``)
    of a PENDING record per id, in one round trip for many ids: True where the
    id had no record (it is now reserved), False where it had one (pending,
    running, finished or revoked). ``release`` deletes a reservation that is
    still only that (a worker's record replaces it), so a failed publish
    leaves the id free again.
11. ``wait_sent(id, timeout, send)`` (``run``: a fresh id, never sent) is
    listening for the id's result before it calls ``send``: a result stored
    at any moment from the start of ``send`` on (even by ``send`` itself)
    wakes it, with no read needed. An error of ``send`` propagates as is; a
    store unreachable before ``send`` raises ``ResultStoreUnavailable`` and
    nothing is sent; ``ResultTimeout`` after ``timeout`` s, the task sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import msgspec

from runtime.errors import EncodeError, PayloadTooLarge
from runtime.messages import ErrorInfo, Result, State

__all__ = ["CANCELLED", "DEFAULT_MAX_RESULT_BYTES", "DEFAULT_TTL_S", "MARKER_EXTRA_MAX_S",
           "MARKER_EXTRA_MIN_S", "ResultStore", "encode_result", "marker_ttl_s", "reservation"]

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_MAX_RESULT_BYTES = 16 * 1024 * 1024
#: How much longer than its result an expiry marker lives, at least and at most
#: (promise 9): ``marker_ttl_s``.
MARKER_EXTRA_MIN_S = 3600.0
MARKER_EXTRA_MAX_S = 7 * 24 * 3600.0

#: The error stored with a result revoked by ``TaskHandle.cancel()``.
CANCELLED = ErrorInfo(type="TaskCancelled", reason="cancelled",
                      message="cancelled by TaskHandle.cancel() before it finished")

_ENCODER = msgspec.msgpack.Encoder()


def marker_ttl_s(ttl_s: float) -> float:
    """How long the expiry marker of a result kept ``ttl_s`` lives: twice the
    result's TTL, at least one hour and at most seven days longer than it
    (default TTL of a day: two days). A marker costs Redis about 185 bytes, so
    markers take about as much memory as small results; a caller asking about
    an id that ended longer ago than this is told what it is told of an id
    never seen (``ResultTimeout``)."""
    return ttl_s + min(max(ttl_s, MARKER_EXTRA_MIN_S), MARKER_EXTRA_MAX_S)


def reservation(task_id: str) -> bytes:
    """The stored form of the PENDING record that reserves ``task_id``."""
    return b"N" + _ENCODER.encode(Result(id=task_id, state=State.PENDING))


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
        """The terminal result of ``task_id``; ``ResultTimeout`` after ``timeout`` s,
        ``ResultExpired`` at once if it finished but its result expired."""
        ...

    async def wait_sent(self, task_id: str, timeout: float,
                        send: Callable[[], Awaitable[None]]) -> Result:
        """``send()`` the task of a fresh ``task_id`` (generated, never sent
        nor reserved, so nothing can be stored under it yet), then ``wait``
        for its terminal result (``run``). The store is listening before
        ``send`` is called, so no read is needed to catch a fast result; an
        error of ``send`` propagates. ``ResultTimeout`` ``timeout`` s after
        the call, with the task sent."""
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

    async def expired(self, task_id: str) -> bool:
        """Whether ``task_id`` finished but its result has expired (promise 9)."""
        ...

    async def reserve(self, task_ids: Sequence[str]) -> list[bool]:
        """Put a PENDING record under each id that has none (promise 10)."""
        ...

    async def release(self, task_ids: Sequence[str]) -> None:
        """Delete the reservations of ``task_ids`` that are still only that."""
        ...
