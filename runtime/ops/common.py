"""What the operations modules share: where their state lives and how to reach it.

State lives beside the result store: on its Redis when the result store (or,
failing that, the broker) is Redis, else in this process. Redis keys follow the
scheduler's style, one hash tag per namespace (``ns`` is the runtime's
namespace, ``taskloom`` by default)::

    {ns}:ops:{<ns>}:...
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import urlsplit

import anyio
import redis.exceptions as rex

from runtime.errors import ResultStoreUnavailable, TaskloomError

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["BatchWriter", "OpsUnavailable", "now_ms", "ops_prefix", "redis_client",
           "redis_errors", "redis_url_of"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0
#: How long ``BatchWriter.serve`` lets items gather before writing them (fewer,
#: larger round trips keep the cost to the worker's event loop small).
_LINGER_S = 0.05
_RETRY_MAX_S = 2.0

T = TypeVar("T")


class OpsUnavailable(ResultStoreUnavailable):
    """The Redis that holds the task index, the events or the pauses cannot be
    reached; the call can be retried once it is back."""


def now_ms() -> int:
    return int(time.time() * 1000)


def redis_url_of(rt: Runtime) -> str | None:
    """The Redis URL of the result store, else of the broker, else None (memory)."""
    for owner in (rt.results, rt.broker):
        url = getattr(owner, "url", None)
        if isinstance(url, str) and urlsplit(url).scheme.lower() in _REDIS_SCHEMES:
            return url
    return None


def ops_prefix(namespace: str) -> str:
    ns = namespace or "taskloom"
    return f"{ns}:ops:{{{ns}}}:"


def redis_client(url: str, *, blocking: bool = False) -> Any:
    """A redis-py asyncio client; ``blocking`` ones have no read timeout (XREAD BLOCK).
    RESP2, as the result store's: with RESP3 redis-py 8.1 skips its check of a
    pooled connection the server closed, so the first call after a Redis restart
    would fail on it (redis-py#4252)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                   socket_timeout=None if blocking else _SOCKET_TIMEOUT_S,
                                   health_check_interval=30 if blocking else 0, protocol=2)


@contextmanager
def redis_errors(error: type[TaskloomError], url: str, doing: str) -> Iterator[None]:
    """Turn redis-py's errors inside the block into ``error``, saying what to do."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, OSError) as e:
        raise error(
            f"could not {doing}: Redis at {url} is unreachable ({type(e).__name__}: "
            f"{e}); check that redis-server is running; the call can be retried") from e
    except rex.RedisError as e:
        raise error(
            f"could not {doing}: Redis at {url} refused ({type(e).__name__}: {e}); "
            "the call can be retried once Redis recovers") from e


class BatchWriter(Generic[T]):
    """Items gathered synchronously in ``_pending`` (the first one sets ``_wake``)
    and written by ``flush`` from ``serve``: one round trip per linger, retried
    with backoff while Redis is away."""

    def __init__(self, *, log: Any, retry_message: str) -> None:
        self._pending: list[T] = []
        self._wake = anyio.Event()
        self._log = log
        self._retry_message = retry_message

    async def flush(self) -> None:
        raise NotImplementedError

    async def serve(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            # gather a batch: one round trip per linger, not one per transition
            await anyio.sleep(_LINGER_S)
            self._wake = anyio.Event()
            try:
                await self.flush()
                delay = 0.05
            except OpsUnavailable as e:
                self._log.warning(self._retry_message, error=str(e),
                                  pending=len(self._pending))
                self._wake.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
