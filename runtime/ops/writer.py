"""One writer on Redis for the task index and the event stream together.

What a task's path pays for both is ``transition(t)``: one append of the
``Transition`` the worker built anyway (no encoding, no I/O, no new object).
Everything else runs in ``serve``, off the task's path: it wakes on the first
item, lets a batch gather (``BatchWriter``'s linger; under load, whatever came
in during the previous write), turns each item into its event's JSON (one
msgspec call), joins a chunk of them into ONE argument, and sends one EVALSHA
of ``lua/transitions.lua`` per chunk, the chunks pipelined in one round trip.
The script appends the chunk to the stream as one entry (the joined JSON as it
came) and, from the same JSON, moves each task in the index: a task's several
steps in one batch (a fast task's STARTED and end) are one index write, and each
state's set is trimmed once per chunk instead of once per step.

With events off it only indexes; with the index off it only streams. Other
events (``publish``: worker heartbeats, scheduler ticks) go through the same
buffer, so the stream keeps the order in which they happened.

The keys and their layout are the index's and the stream's (see
:mod:`runtime.ops.index.redis`, layout 2, and :mod:`runtime.ops.events`, wire 2).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import redis.exceptions as rex
import structlog

from runtime.lifecycle import Transition
from runtime.ops.common import BatchWriter, OpsUnavailable, now_ms, ops_prefix, redis_client
from runtime.ops.event_types import Event, encode_event, task_json

if TYPE_CHECKING:
    from runtime.ops.index.model import IndexSettings

__all__ = ["RedisWriter"]

log = structlog.get_logger("taskloom.ops.writer")

_SOURCE = (resources.files("runtime.ops") / "lua" / "transitions.lua").read_text(
    encoding="utf-8")
_SHA = hashlib.sha1(_SOURCE.encode()).hexdigest()
#: Items kept while Redis is away; past it the oldest are dropped (counted in ``dropped``).
_MAX_PENDING = 200_000
#: Items per EVALSHA, one per round trip (``IndexSettings.batch`` with the index on):
#: a script call holds Redis, and so every other client, for its whole length.
_CHUNK = 128
#: How long a batch gathers before a round trip (and between rounds under load).
_LINGER_S = 0.05
_RETRY_MAX_S = 2.0


class RedisWriter(BatchWriter[Transition | bytes]):
    """Writes transitions (to the index and/or the stream) and events (to the
    stream) in batches; a ``runtime.lifecycle.Listener``."""

    def __init__(self, url: str, *, namespace: str = "", index: IndexSettings | None = None,
                 events_max_len: int | None = None) -> None:
        super().__init__(log=log, retry_message="could not write the task index and events; "
                                                "retrying")
        self.url = url
        self.prefix = ops_prefix(namespace)
        self.index = index
        self.events_key = self.prefix + "events" if events_max_len is not None else ""
        self.events_max_len = events_max_len or 0
        self.dropped = 0
        self._redis: Any = redis_client(url)
        self._lock = anyio.Lock()
        self._chunk = index.batch if index is not None else _CHUNK
        #: closed with this writer (the readers that share it)
        self.also_close: list[Any] = []

    # -- Listener ------------------------------------------------------------------

    def transition(self, t: Transition, /) -> None:
        pending = self._pending
        pending.append(t)
        if len(pending) == 1:
            self._wake.set()
        elif len(pending) > _MAX_PENDING:
            del pending[0]
            self.dropped += 1

    def publish(self, event: Event) -> None:
        """Append ``event`` to the stream (cheap; never raises); ignored with events off."""
        if not self.events_key:
            return
        pending = self._pending
        pending.append(encode_event(event))
        if len(pending) == 1:
            self._wake.set()
        elif len(pending) > _MAX_PENDING:
            del pending[0]
            self.dropped += 1

    async def aclose(self) -> None:
        try:
            with anyio.move_on_after(5.0, shield=True):
                await self.flush()
        except OpsUnavailable as e:
            log.warning("the task index and events lost writes on close", error=str(e),
                        lost=len(self._pending))
        finally:
            with anyio.CancelScope(shield=True):
                await self._redis.aclose()
                for reader in self.also_close:
                    await reader.aclose()

    # -- writing -------------------------------------------------------------------

    async def serve(self) -> None:
        """Let a batch gather for ``_LINGER_S``, then write it one chunk per round
        trip (Redis serves the worker's own commands between two chunks), going on
        without lingering only while full chunks wait; sleep on ``_wake`` when
        nothing is pending; back off while Redis is away."""
        delay = _LINGER_S
        while True:
            if not self._pending:
                self._wake = anyio.Event()
                await self._wake.wait()
            await anyio.sleep(_LINGER_S)  # let a batch gather
            try:
                async with self._lock:
                    await self._round()
                    while len(self._pending) >= self._chunk:
                        await self._round()
                delay = _LINGER_S
            except OpsUnavailable as e:
                log.warning("could not write the task index and events; retrying",
                            error=str(e), pending=len(self._pending))
                await anyio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def flush(self) -> None:
        """Write everything pending now (safe to call while ``serve`` runs)."""
        async with self._lock:
            while self._pending:
                await self._round()

    async def _round(self) -> None:
        """One round trip: the oldest pending items, one chunk."""
        batch = self._pending[:self._chunk]
        del self._pending[:len(batch)]
        try:
            await self._write(batch)
        except BaseException:
            self._pending[:0] = batch  # written again (at least once)
            if len(self._pending) > _MAX_PENDING:
                over = len(self._pending) - _MAX_PENDING
                del self._pending[:over]
                self.dropped += over
            raise

    def _args(self) -> list[Any]:
        index = self.index
        if index is None:
            return [self.prefix, 1, 0, 1, self.events_key, self.events_max_len, "0"]
        age = int(index.max_age_s * 1000)
        return [self.prefix, index.max_per_state, now_ms() - age, age + 86_400_000,
                self.events_key, self.events_max_len, "1"]

    async def _write(self, batch: list[Transition | bytes]) -> None:
        blob = b"\n".join([item if type(item) is bytes else task_json(item)  # type: ignore[arg-type]
                           for item in batch])
        args = self._args()
        try:
            try:
                await self._redis.evalsha(_SHA, 0, *args, len(batch), blob)
            except rex.NoScriptError:
                await self._redis.eval(_SOURCE, 0, *args, len(batch), blob)
        except Exception as e:
            raise OpsUnavailable(f"the task index and events on {self.url} cannot be written "
                                 f"({type(e).__name__}: {e}); check that Redis is up") from e
