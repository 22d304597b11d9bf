"""The task index: ids by state, queue, task name and time, bounded by count and age.

``index_for(rt)`` gives the Redis index when the runtime's result store (or
broker) is Redis, else the in-process one. Both are ``runtime.lifecycle.Listener``
objects: ``transition`` appends to a buffer, ``serve`` writes it in batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.ops.common import redis_url_of
from runtime.ops.index.memory import MemoryIndex
from runtime.ops.index.model import IndexSettings, Page, Query, TaskSummary
from runtime.ops.index.redis import RedisIndex

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["IndexSettings", "MemoryIndex", "Page", "Query", "RedisIndex", "TaskIndex",
           "TaskSummary", "index_for"]

TaskIndex = MemoryIndex | RedisIndex


def index_for(rt: Runtime, settings: IndexSettings | None = None) -> TaskIndex:
    url = redis_url_of(rt)
    if url is None:
        return MemoryIndex(settings)
    return RedisIndex(url, namespace=rt.namespace, settings=settings)
