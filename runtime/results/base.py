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
from typing import TYPE_CHECKING, Any, Protocol, Self

import anyio
import msgspec

from runtime.encryption import SealedResultError, missing_key
from runtime.errors import DecodeError, EncodeError, PayloadTooLarge
from runtime.messages import ErrorInfo, Result, State

if TYPE_CHECKING:
    from runtime.encryption import Keyring

__all__ = ["CANCELLED", "DEFAULT_MAX_RESULT_BYTES", "DEFAULT_TTL_S", "MARKER_EXTRA_MAX_S",
           "MARKER_EXTRA_MIN_S", "SEALED", "ResultStore", "decode_record", "encode_result", "marker_ttl_s",
           "reservation", "seal_value", "open_value"]

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
_RESULT = msgspec.msgpack.Decoder(Result)
_SEALED_RESULT = msgspec.msgpack.Decoder(tuple[str, Result, bytes])
_SECRETS = msgspec.msgpack.Decoder(tuple[Any, str, str])
_SEALED_VALUE = msgspec.msgpack.Decoder(tuple[str, bytes])
_VALUE = msgspec.msgpack.Decoder()
#: First byte of an encrypted record (after the state mark) or join value:
#: 0xC1, the one byte msgpack never uses, so a clear record never starts with it.
SEALED = b"\xc1"
_SEALED_BYTE = SEALED[0]


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


def encode_result(result: Result, limit: int, keyring: Keyring | None = None) -> bytes:
    """The stored form of ``result`` (without its state mark); EncodeError or
    PayloadTooLarge if it cannot be stored. With a ``keyring``, its value and
    error message and traceback are encrypted (:func:`_seal`)."""
    try:
        data = _ENCODER.encode(result) if keyring is None else _seal(result, keyring)
    except (TypeError, OverflowError, RecursionError) as e:
        raise EncodeError(f"the result of task {result.id} cannot be encoded: {e}") from None
    if len(data) > limit:
        raise PayloadTooLarge(len(data), limit, f"result of task {result.id}")
    return data


def _seal(result: Result, keyring: Keyring) -> bytes:
    """``SEALED || msgpack([key id, result without its secrets, box])``, the
    box holding ``msgpack([value, error message, error traceback])`` bound to
    the task id; a record with no secret to keep is stored clear."""
    error = result.error
    if result.value is None and (error is None or not (error.message or error.traceback)):
        return _ENCODER.encode(result)
    secrets = (result.value, error.message if error else "", error.traceback if error else "")
    kid, box = keyring.seal_result(_ENCODER.encode(secrets), result.id)
    bare = msgspec.structs.replace(
        result, value=None,
        error=None if error is None else msgspec.structs.replace(error, message="",
                                                                 traceback=""))
    return SEALED + _ENCODER.encode((kid, bare, box))


def decode_record(task_id: str, data: bytes | memoryview, keyring: Keyring | None) -> Result:
    """A stored record (without its state mark) as a ``Result``, decrypted if
    sealed: ``SealedResultError`` naming the key id if it cannot be,
    ``DecodeError`` if it is not a taskloom record."""
    try:
        if not data or data[0] != _SEALED_BYTE:
            return _RESULT.decode(data)
        kid, bare, box = _SEALED_RESULT.decode(data[1:])
    except msgspec.MsgspecError as e:
        raise DecodeError("bad_result", f"the stored result of task {task_id} "
                          f"cannot be decoded ({e}); it was not written by taskloom") from e
    if keyring is None:
        raise SealedResultError(task_id, kid, missing_key(task_id, kid, []))
    plain = keyring.open_result(box, kid, task_id, task_id)
    try:
        value, message, traceback = _SECRETS.decode(plain)
    except msgspec.MsgspecError as e:  # authenticated, so written by a taskloom
        raise DecodeError("bad_result", f"the decrypted result of task {task_id} cannot be "
                          f"decoded ({e})") from e
    error = bare.error
    if error is not None:
        error = msgspec.structs.replace(error, message=message, traceback=traceback)
    return msgspec.structs.replace(bare, value=value, error=error)


def seal_value(data: bytes, join_id: str, index: int, keyring: Keyring | None) -> bytes:
    """A join member's encoded value as stored: sealed (bound to the join id
    and member index) when there is a ``keyring``."""
    if keyring is None:
        return data
    kid, box = keyring.seal_result(data, f"{join_id}#{index}")
    return SEALED + _ENCODER.encode((kid, box))


def open_value(data: bytes, join_id: str, index: int, keyring: Keyring | None) -> Any:
    """A join member's value from its stored form (:func:`seal_value`)."""
    if data[:1] != SEALED:
        return _VALUE.decode(data)
    kid, box = _SEALED_VALUE.decode(data[1:])
    name = f"join {join_id} member {index}"
    if keyring is None:
        raise SealedResultError(join_id, kid, missing_key(name, kid, []))
    return _VALUE.decode(keyring.open_result(box, kid, f"{join_id}#{index}", name))


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
