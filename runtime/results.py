"""Where results live: the ``ResultStore`` protocol and the in-memory store.

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

import importlib
import math
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import parse_qsl, urlsplit

import anyio
import msgspec

from brokers.base import redact_url
from runtime.errors import ConfigError, EncodeError, PayloadTooLarge, ResultTimeout
from runtime.messages import ErrorInfo, Result, State

__all__ = ["CANCELLED", "DEFAULT_MAX_RESULT_BYTES", "DEFAULT_TTL_S", "MemoryResultStore",
           "ResultStore", "encode_result", "results_from_url"]

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_MAX_RESULT_BYTES = 16 * 1024 * 1024

#: The error stored with a result revoked by ``TaskHandle.cancel()``.
CANCELLED = ErrorInfo(type="TaskCancelled", reason="cancelled",
                      message="cancelled by TaskHandle.cancel() before it finished")

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Result)


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


def results_from_url(url: str, *, ttl_s: float = DEFAULT_TTL_S,
                     namespace: str = "") -> ResultStore:
    """The result store ``url`` names: ``memory://``, or ``redis://``,
    ``rediss://`` or ``unix://`` (whose query may set ``ttl_s`` and
    ``max_result_bytes``). A ``ConfigError`` names the URL with its password
    redacted."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryResultStore(ttl_s=ttl_s)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"no result store handles {redact_url(url)!r}; use memory:// or "
                          "redis://host:port/db")
    # checked here, so that no error below can print the URL with its password
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "ttl_s":
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not 0 < number < math.inf:
                raise ConfigError(f"bad ttl_s={value!r} in result store URL {redact_url(url)!r}: "
                                  "use a positive number of seconds, e.g. ?ttl_s=3600") from None
        elif key == "max_result_bytes":
            try:
                size = int(value)
            except ValueError:
                size = 0
            if size <= 0:
                raise ConfigError(f"bad max_result_bytes={value!r} in result store URL "
                                  f"{redact_url(url)!r}: use a positive whole number of bytes, "
                                  "e.g. ?max_result_bytes=16777216") from None
    module = importlib.import_module("runtime.results_redis")
    store: ResultStore = module.RedisResultStore.from_url(url, ttl_s=ttl_s, namespace=namespace)
    return store


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

    async def revoke(self, task_id: str) -> bool:
        """Mark ``task_id`` REVOKED unless it has a terminal result; tell every
        worker (``is_revoked``). Whether it was revoked."""
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


class MemoryResultStore:
    """Results in this process; the embedded default."""

    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        self.ttl_s = ttl_s
        self.max_result_bytes = max_result_bytes
        # stored encoded, as a remote store would: what cannot be encoded fails
        # here too, and readers get decoded copies, never the worker's objects
        self._results: dict[str, tuple[float, Result, bytes]] = {}
        self._waiters: dict[str, anyio.Event] = {}
        self._revoked: set[str] = set()
        self._joins: dict[str, tuple[float, dict[int, Any]]] = {}
        self._claims: dict[str, tuple[float, str]] = {}

    @classmethod
    def from_url(cls, url: str = "memory://", *, ttl_s: float = DEFAULT_TTL_S,
                 namespace: str = "") -> MemoryResultStore:
        return cls(ttl_s=ttl_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def _live(self, task_id: str) -> Result | None:
        entry = self._results.get(task_id)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._results[task_id]
            return None
        return _DECODER.decode(entry[2])

    def _put(self, result: Result) -> bool:
        entry = self._results.get(result.id)
        if entry is not None and entry[0] >= time.monotonic() and entry[1].state.terminal:
            return False
        data = encode_result(result, self.max_result_bytes)
        self._results[result.id] = (time.monotonic() + self.ttl_s, result, data)
        if result.state.terminal:
            event = self._waiters.pop(result.id, None)
            if event is not None:
                event.set()
        return True

    async def put(self, result: Result) -> bool:
        return self._put(result)

    async def put_many(self, results: Sequence[Result]) -> list[bool]:
        return [self._put(r) for r in results]

    async def get(self, task_id: str) -> Result | None:
        return self._live(task_id)

    async def wait(self, task_id: str, timeout: float) -> Result:
        with anyio.move_on_after(timeout):
            while True:
                current = self._live(task_id)
                if current is not None and current.state.terminal:
                    return current
                event = self._waiters.get(task_id)
                if event is None:
                    event = self._waiters[task_id] = anyio.Event()
                await event.wait()
        current = self._live(task_id)
        raise ResultTimeout(task_id, timeout, current.state if current else State.PENDING)

    async def revoke(self, task_id: str) -> bool:
        stored = self._put(Result(id=task_id, state=State.REVOKED, error=CANCELLED,
                                  finished_ms=int(time.time() * 1000)))
        if stored:
            self._revoked.add(task_id)
        return stored

    def is_revoked(self, task_id: str) -> bool:
        return task_id in self._revoked

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await anyio.sleep_forever()

    async def join(self, join_id: str, index: int, size: int, value: Any) -> list[Any] | None:
        now = time.monotonic()
        entry = self._joins.get(join_id)
        if entry is None or entry[0] < now:
            entry = self._joins[join_id] = (now + self.ttl_s, {})
        members = entry[1]
        members.setdefault(index, value)
        if len(members) < size:
            return None
        return [members[i] for i in range(size)]

    async def claim(self, task_id: str, ttl_s: float, *, holder: str = "") -> bool:
        now = time.monotonic()
        held = self._claims.get(task_id)
        if held is not None and held[0] > now and (held[1] != holder or not holder):
            return False
        self._claims[task_id] = (now + ttl_s, holder)
        return True
