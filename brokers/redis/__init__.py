"""The Redis Streams broker: consumer groups, late ack, leases, delays, priorities.

Every queue is ten priority streams read by one consumer group, a sorted set of
delayed messages and a dead-letter stream, all under one hash tag
(:mod:`.keys` holds the layout and the entry format). The work that must be
atomic runs in Lua scripts (``lua/*.lua``, loaded by :mod:`.scripts`).

Where each part lives and what it promises:

* :mod:`.broker` — :class:`RedisBroker`: connecting, publishing, consuming,
  stats, purge, dead letters.
* :mod:`.consumer` — :class:`RedisConsumer`: fetching, leases (heartbeat and
  reclaim), delays, closing, the size budget, recovery from a lost group.
* :mod:`.delivery` — :class:`RedisDelivery` and the batched settlements.
* :mod:`.errors` — Redis errors as :mod:`brokers.base` errors; riding out outages.
* :mod:`.options` — :class:`RedisBrokerOptions` and the URL's query parameters.
* :mod:`.keys`, :mod:`.scripts` — the key layout; the Lua scripts and ``EVALSHA``.
"""

from __future__ import annotations

from brokers.redis.broker import RedisBroker
from brokers.redis.consumer import RedisConsumer
from brokers.redis.delivery import RedisDelivery
from brokers.redis.options import RedisBrokerOptions

__all__ = ["RedisBroker", "RedisBrokerOptions", "RedisConsumer", "RedisDelivery"]
