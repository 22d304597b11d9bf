"""What the operations modules share: where their state lives and how to reach it.

State lives beside the result store: on its Redis when the result store (or,
failing that, the broker) is Redis, else in this process. Redis keys follow the
scheduler's style, one hash tag per namespace (``ns`` is the runtime's
namespace, ``taskloom`` by default)::

    {ns}:ops:{<ns>}:...
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from runtime.errors import ResultStoreUnavailable

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["OpsUnavailable", "now_ms", "ops_prefix", "redis_client", "redis_url_of"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0


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
    """A redis-py asyncio client; ``blocking`` ones have no read timeout (XREAD BLOCK)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                   socket_timeout=None if blocking else _SOCKET_TIMEOUT_S,
                                   health_check_interval=30 if blocking else 0)
