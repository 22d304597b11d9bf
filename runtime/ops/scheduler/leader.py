"""One leader among any number of schedulers: a lease with fencing.

``Leader.leading()`` waits until this process holds the lease (``SET NX PX``
with a random token, prefixed by a fencing counter taken with ``INCR``), then
runs the caller's block while a renewal task extends the lease every third of
its length with a compare-and-renew Lua script. When a renewal finds another
token (the lease expired while this process was paused) or Redis stays
unreachable for longer than the lease minus a margin, the block is cancelled and
``leading()`` returns; the caller then waits for the lease again. Leaving the
block releases the lease (compare-and-delete), so a stopped leader is replaced
at once and a killed one within the lease time.

A follower does not poll: it sleeps until the lease's remaining time has passed
(``PTTL``), then tries to take it.

Fencing: every write a leader makes (a tick's claim, a schedule's state) checks,
in the same Lua call, that the lease still holds its token; a leader that lost
its lease while paused is refused, however late it wakes up.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import structlog

from runtime.errors import ConfigError, ResultStoreUnavailable
from runtime.ops.scheduler.store import ScheduleStore

__all__ = ["Leader", "Lease"]

log = structlog.get_logger("taskloom.scheduler")

#: How long to wait before trying again when the store cannot be reached.
_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Lease:
    """The lease this process holds: its token and fencing number."""

    token: str
    fence: int


class Leader:
    """Elects one leader per store; ``lease_s`` bounds how long a dead leader
    blocks the others."""

    def __init__(self, store: ScheduleStore, *, lease_s: float = 10.0, name: str = "") -> None:
        if not 0.3 <= lease_s < math.inf:
            raise ConfigError(f"lease_s must be at least 0.3 seconds, not {lease_s!r}")
        self.store = store
        self.lease_s = lease_s
        self.name = name
        self._lease_ms = int(lease_s * 1000)

    async def acquire(self) -> Lease:
        """Wait until this process holds the lease."""
        while True:
            try:
                got = await self.store.acquire(self._lease_ms)
                if got is not None:
                    token, fence = got
                    log.info("scheduler leads", scheduler=self.name, fence=fence)
                    return Lease(token, fence)
                wait_s = await self.store.lease_ttl_ms() / 1000
            except ResultStoreUnavailable as e:
                log.warning("cannot reach the schedule store; trying again", error=str(e))
                wait_s = _RETRY_S
            # sleep until the holder's lease would end (it renews well before then)
            await anyio.sleep(min(max(wait_s, 0.01), self.lease_s))

    async def _renew(self, lease: Lease, scope: anyio.CancelScope) -> None:
        every = self.lease_s / 3
        # past this, Redis may have expired the lease: stop acting as the leader
        valid_until = anyio.current_time() + self.lease_s * 0.9
        while True:
            await anyio.sleep(every)
            try:
                sent_at = anyio.current_time()
                if not await self.store.renew(lease.token, self._lease_ms):
                    log.warning("scheduler lost its lease to another; stepping down",
                                scheduler=self.name, fence=lease.fence)
                    break
                valid_until = sent_at + self.lease_s * 0.9
            except ResultStoreUnavailable as e:
                log.warning("cannot renew the scheduler lease", error=str(e))
                if anyio.current_time() + every >= valid_until:
                    log.warning("scheduler lease may have expired; stepping down",
                                scheduler=self.name, fence=lease.fence)
                    break
        scope.cancel()

    @asynccontextmanager
    async def leading(self) -> AsyncIterator[Lease]:
        """Hold the lease for the block; the block is cancelled if the lease is lost."""
        lease = await self.acquire()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew, lease, tg.cancel_scope)
                try:
                    yield lease
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.store.release(lease.token)
                except ResultStoreUnavailable as e:
                    log.warning("could not release the scheduler lease; it expires by itself",
                                error=str(e))
