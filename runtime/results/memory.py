"""The in-memory result store: results in this process, the embedded default."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio

from runtime.errors import ResultExpired, ResultTimeout
from runtime.messages import Result, State
from runtime.results.base import (
    CANCELLED,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TTL_S,
    decode_record,
    encode_result,
    reservation,
)
from runtime.results.base import (
    marker_ttl_s as marker_ttl,
)

if TYPE_CHECKING:
    from runtime.encryption import Keyring

__all__ = ["MemoryResultStore"]


class MemoryResultStore:
    """Results in this process; the embedded default."""

    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
                 marker_ttl_s: float | None = None) -> None:
        self.ttl_s = ttl_s
        self.max_result_bytes = max_result_bytes
        #: how long an expiry marker outlives the end of its task (promise 9)
        self.marker_ttl_s = marker_ttl(ttl_s) if marker_ttl_s is None else marker_ttl_s
        # id -> monotonic expiry of its marker; pruned as it grows
        self._finished: dict[str, float] = {}
        self._prune_finished_at = 1024
        # stored encoded, as a remote store would: what cannot be encoded fails
        # here too, and readers get decoded copies, never the worker's objects
        self._results: dict[str, tuple[float, State, bytes]] = {}
        self._waiters: dict[str, anyio.Event] = {}
        self._revoked: set[str] = set()
        self._joins: dict[str, tuple[float, dict[int, Any]]] = {}
        self._claims: dict[str, tuple[float, str]] = {}
        self._changes: dict[str, anyio.Event] = {}  # ids watched by updates()
        self._on_revoked: list[Callable[[str], None]] = []
        self._keyring: Keyring | None = None

    def use_keyring(self, keyring: Keyring | None) -> None:
        """Encrypt the value and error details of the results stored from now
        on with ``keyring``'s current key, and decrypt with any of its keys
        (the Runtime passes its codec's)."""
        self._keyring = keyring

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
        return decode_record(task_id, entry[2], self._keyring)

    def _put(self, result: Result) -> bool:
        entry = self._results.get(result.id)
        if entry is not None and entry[0] >= time.monotonic() and entry[1].terminal:
            return False
        data = encode_result(result, self.max_result_bytes, self._keyring)
        self._results[result.id] = (time.monotonic() + (result.ttl_s or self.ttl_s), result.state,
                                    data)
        if self._changes:
            changed = self._changes.pop(result.id, None)
            if changed is not None:
                changed.set()
        if result.state.terminal:
            self._mark_finished(result)
            event = self._waiters.pop(result.id, None)
            if event is not None:
                event.set()
        return True

    def _mark_finished(self, result: Result) -> None:
        now = time.monotonic()
        self._finished[result.id] = now + max(self.marker_ttl_s, 2 * (result.ttl_s or 0.0))
        if len(self._finished) >= self._prune_finished_at:
            self._finished = {k: t for k, t in self._finished.items() if t > now}
            self._prune_finished_at = max(1024, 2 * len(self._finished))

    def _gone(self, task_id: str) -> bool:
        """Whether ``task_id`` has an expiry marker (its record may be gone)."""
        return task_id in self._finished and self._finished[task_id] > time.monotonic()

    async def expired(self, task_id: str) -> bool:
        return self._gone(task_id) and self._live(task_id) is None

    async def reserve(self, task_ids: Sequence[str]) -> list[bool]:
        out = []
        now = time.monotonic()
        for task_id in task_ids:
            if self._live(task_id) is not None:
                out.append(False)
                continue
            self._results[task_id] = (now + self.ttl_s, State.PENDING, reservation(task_id)[1:])
            out.append(True)
        return out

    async def release(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            entry = self._results.get(task_id)
            if entry is not None and entry[1] is State.PENDING:
                del self._results[task_id]

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
                if current is None and self._gone(task_id):
                    raise ResultExpired(task_id, self.ttl_s)
                event = self._waiters.get(task_id)
                if event is None:
                    event = self._waiters[task_id] = anyio.Event()
                await event.wait()
        current = self._live(task_id)
        raise ResultTimeout(task_id, timeout, current.state if current else State.PENDING)

    async def wait_sent(self, task_id: str, timeout: float,
                        send: Callable[[], Awaitable[None]]) -> Result:
        started = anyio.current_time()
        await send()  # in-process: nothing is stored before the wait below reads
        try:
            return await self.wait(task_id, timeout - (anyio.current_time() - started))
        except ResultTimeout as e:
            raise ResultTimeout(task_id, timeout, e.state) from None

    async def updates(self, task_id: str) -> AsyncIterator[Result]:
        """Each new record of ``task_id`` (state, progress) until a terminal one."""
        last: Result | None = None
        while True:
            changed = self._changes.get(task_id)
            if changed is None:
                changed = self._changes[task_id] = anyio.Event()
            current = self._live(task_id)
            if current is not None and current != last:
                last = current
                yield current
                if current.state.terminal:
                    return
            await changed.wait()

    async def revoke(self, task_id: str) -> bool:
        stored = self._put(Result(id=task_id, state=State.REVOKED, error=CANCELLED,
                                  finished_ms=int(time.time() * 1000)))
        if stored:
            self._revoked.add(task_id)
            for callback in list(self._on_revoked):
                callback(task_id)
        return stored

    def listen_revoked(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(task_id)`` on each revocation; returns the way to stop."""
        self._on_revoked.append(callback)
        return lambda: self._on_revoked.remove(callback)

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
