"""Paused queues: a persisted set, a change notification, and a local view.

Redis (``P`` is ``{ns}:ops:{<ns>}:``)::

    P paused           set      the paused queue names
    P paused:changed   channel  PUBLISHed on every pause and resume

``is_paused(queue)`` answers from a local copy (no I/O), kept up to date by
``watch()``: a worker runs it beside its consumer and, on ``changed()``, takes
again only from the queues not paused. Enqueue is never affected.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import structlog

from runtime.ops.common import OpsUnavailable, ops_prefix, redis_client

__all__ = ["MemoryPauses", "Pauses", "RedisPauses"]

log = structlog.get_logger("taskloom.ops.pauses")


class _Changes:
    """Wake every waiter at the next change. Each wait makes its own event, so
    a view outlives any one event loop (a runtime reused across loops)."""

    def __init__(self) -> None:
        self._waiters: set[anyio.Event] = set()

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            waiter.set()

    async def wait(self) -> None:
        waiter = anyio.Event()
        self._waiters.add(waiter)
        try:
            await waiter.wait()
        finally:
            self._waiters.discard(waiter)


class MemoryPauses:
    """The paused queues of this process (the embedded default)."""

    def __init__(self) -> None:
        self._paused: set[str] = set()
        self._changed = _Changes()

    def is_paused(self, queue: str) -> bool:
        return queue in self._paused

    async def paused(self) -> set[str]:
        return set(self._paused)

    async def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause or resume ``queue``; whether that changed anything."""
        if (queue in self._paused) == paused:
            return False
        if paused:
            self._paused.add(queue)
        else:
            self._paused.discard(queue)
        self._changed.fire()
        return True

    async def changed(self) -> None:
        """Return at the next pause or resume."""
        await self._changed.wait()

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        return None


class RedisPauses:
    """The paused queues on Redis, shared by every process of the app."""

    def __init__(self, url: str, *, namespace: str = "") -> None:
        self.url = url
        prefix = ops_prefix(namespace)
        self.key = prefix + "paused"
        self.channel = prefix + "paused:changed"
        self._redis: Any = redis_client(url)
        self._local: set[str] = set()
        self._changed = _Changes()

    def is_paused(self, queue: str) -> bool:
        return queue in self._local

    async def paused(self) -> set[str]:
        try:
            members = await self._redis.smembers(self.key)
        except Exception as e:
            raise OpsUnavailable(f"could not read the paused queues on {self.url} "
                                 f"({type(e).__name__}: {e}); check that Redis is up") from e
        self._update({m.decode() for m in members})
        return set(self._local)

    def _update(self, names: set[str]) -> None:
        if names != self._local:
            self._local = names
            self._changed.fire()

    async def set_paused(self, queue: str, paused: bool) -> bool:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                (pipe.sadd if paused else pipe.srem)(self.key, queue)
                pipe.publish(self.channel, queue)
                done, _ = await pipe.execute()
        except Exception as e:
            raise OpsUnavailable(f"could not {'pause' if paused else 'resume'} queue {queue!r} "
                                 f"on {self.url} ({type(e).__name__}: {e}); check that Redis "
                                 "is up and try again (it is safe to repeat)") from e
        await self.paused()
        return bool(done)

    async def changed(self) -> None:
        await self._changed.wait()

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Keep ``is_paused`` current until cancelled: subscribe, then reload the
        set on every notification and after every reconnection."""
        started = False
        delay = 0.05
        while True:
            client: Any = redis_client(self.url, blocking=True)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self.paused()
                if not started:
                    started = True
                    task_status.started()
                delay = 0.05
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self.paused()
            except Exception as e:
                log.warning("lost the pause notifications; reconnecting", error=str(e))
                if not started:  # start anyway: nothing is paused that we know of
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with anyio.CancelScope(shield=True):
                    await pubsub.aclose()
                    await client.aclose()

    async def aclose(self) -> None:
        await self._redis.aclose()


Pauses = MemoryPauses | RedisPauses
