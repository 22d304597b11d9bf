"""Checks and resolution the ``Runtime`` does when it is built or enqueues:
task ids, and which result store a broker's URL implies."""

from __future__ import annotations

from urllib.parse import urlsplit

from brokers.base import Broker
from brokers.memory import MemoryBroker
from runtime.errors import ConfigError, EnqueueError
from runtime.results import MemoryResultStore, ResultStore

__all__ = ["MAX_TASK_ID_BYTES", "check_task_id", "default_results", "results_for"]

#: the longest task id, in UTF-8 bytes (AMQP message ids are at most 255)
MAX_TASK_ID_BYTES = 200


def check_task_id(task_id: object) -> None:
    """Refuse a task id that is empty, too long, or has spaces or unprintable
    characters (EnqueueError saying which)."""
    if not isinstance(task_id, str) or not task_id:
        raise EnqueueError(f"task_id must be a non-empty string, not {task_id!r}; "
                           "leave it out to get a generated one")
    size = len(task_id.encode("utf-8", "surrogatepass"))
    if size > MAX_TASK_ID_BYTES:
        raise EnqueueError(f"task_id is {size} bytes long, over the limit of {MAX_TASK_ID_BYTES}; "
                           "use a shorter key (e.g. a hash of the long one)")
    bad = next((c for c in task_id if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise EnqueueError(f"task_id {task_id!r} contains {bad!r}; use printable characters "
                           "without spaces (e.g. letters, digits, '-', '_', ':', '.')")


def default_results(broker: Broker) -> str:
    """Where results go when no store is named: the broker's own Redis, or
    memory beside the memory broker; any other broker is refused."""
    if isinstance(broker, MemoryBroker):
        return "memory://"
    url = getattr(broker, "url", None)
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    if isinstance(url, str) and scheme in ("redis", "rediss", "unix"):
        return url  # the broker's Redis, without its query options
    kind = f"the {scheme}:// broker" if scheme else f"a {type(broker).__name__}"
    raise ConfigError(
        f"{kind} cannot carry results back to a caller, and no result store was given, so "
        "a caller in another process would wait its whole timeout for a result it can never "
        'see; pass results="redis://host:6379/0" (or set TASKLOOM_RESULTS_URL), or '
        'results="memory://" if every caller runs in the worker\'s process'
    )


def results_for(url: str, *, ttl_s: float, namespace: str) -> ResultStore:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryResultStore(ttl_s=ttl_s)
    if scheme in ("redis", "rediss", "unix"):
        from runtime.results.redis import RedisResultStore  # loads the Redis client only when used

        store: ResultStore = RedisResultStore.from_url(url, ttl_s=ttl_s, namespace=namespace)
        return store
    raise ConfigError(
        f"no result store handles {url!r}; use memory:// or redis://host:port/db"
    )
