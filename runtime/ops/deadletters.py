"""Reading and removing dead letters one by one, per broker.

The Broker protocol lists dead letters (``dead_letters(queue, limit)``) but has
no way to remove one, which replay and purge need. A broker may offer the two
methods itself: ``dead_letter_entries(queue)``, every dead letter oldest first,
each an object with ``key`` (str), ``letter`` (``DeadLetter``) and ``at_ms``
(epoch ms or None) attributes (a broker cannot import this module's
``DeadEntry``), and ``remove_dead_letters(queue, keys) -> int``, which removes
one letter per key given (idempotent). For the brokers of this repository that
do not, this module reaches the same data:

- memory: the queue's list of ``DeadLetter`` objects;
- Redis: the dead-letter stream ``<ns>{<queue>}:dead`` (entry ids carry the
  time each letter was written; removal is ``XDEL``);
- AMQP: offers the two methods (``brokers.amqp.deadletters``: a lock per
  dead-letter queue, ``basic.get`` without ack, then ack the chosen and hand the
  others back in place).

Replay publishes (and awaits the confirm of) the new attempt before it removes
the dead letter, so a crash in between duplicates, never loses.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from brokers.base import DeadLetter, Envelope
from runtime.errors import ConfigError, TaskloomError
from runtime.ops.common import OpsUnavailable

__all__ = ["DeadEntry", "DeadLetterAdmin", "UnknownDeadLetter", "admin_for"]

_PAGE = 1000


class DeadEntry(msgspec.Struct, frozen=True):
    """A dead letter and the key that removes it; ``at_ms`` when known."""

    key: str
    letter: DeadLetter
    at_ms: int | None = None


class UnknownDeadLetter(TaskloomError):
    """Dead letters were asked for by id and some are not in the queue."""

    def __init__(self, queue: str, ids: list[str], why: str) -> None:
        self.queue = queue
        self.ids = ids
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"no dead letter of queue {queue!r} has the id {shown} ({why}); "
                         "nothing was done: list them with `taskloom dlq APP --queue "
                         f"{queue}` and check the id and the queue")


class DeadLetterAdmin(Protocol):
    async def entries(self, queue: str) -> list[DeadEntry]: ...

    async def remove(self, queue: str, keys: list[str]) -> int: ...


class _BrokerOwn:
    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def entries(self, queue: str) -> list[DeadEntry]:
        return [e if isinstance(e, DeadEntry) else DeadEntry(str(e.key), e.letter, e.at_ms)
                for e in await self.broker.dead_letter_entries(queue)]

    async def remove(self, queue: str, keys: list[str]) -> int:
        return int(await self.broker.remove_dead_letters(queue, keys))


class _Memory:
    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def entries(self, queue: str) -> list[DeadEntry]:
        return [DeadEntry(str(id(d)), d) for d in self.broker._queue(queue).dead]

    async def remove(self, queue: str, keys: list[str]) -> int:
        q = self.broker._queue(queue)
        gone = set(keys)
        before = len(q.dead)
        q.dead[:] = [d for d in q.dead if str(id(d)) not in gone]
        return before - len(q.dead)


class _Redis:
    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def entries(self, queue: str) -> list[DeadEntry]:
        client = self.broker._redis_client
        key = self.broker._queue(queue).dead
        out: list[DeadEntry] = []
        start = "-"
        try:
            while True:
                page = await client.xrange(key, start, "+", count=_PAGE)
                for entry_id, fields in page:
                    eid = entry_id.decode()
                    out.append(DeadEntry(eid, _letter(queue, eid, fields),
                                         int(eid.partition("-")[0])))
                if len(page) < _PAGE:
                    return out
                start = "(" + page[-1][0].decode()
        except Exception as e:
            raise OpsUnavailable(f"could not read the dead letters of queue {queue!r} "
                                 f"({type(e).__name__}: {e}); check that Redis is up") from e

    async def remove(self, queue: str, keys: list[str]) -> int:
        if not keys:
            return 0
        client = self.broker._redis_client
        try:
            return int(await client.xdel(self.broker._queue(queue).dead, *keys))
        except Exception as e:
            raise OpsUnavailable(f"could not remove dead letters of queue {queue!r} "
                                 f"({type(e).__name__}: {e}); check that Redis is up") from e


_ENVELOPE = msgspec.msgpack.Decoder(Envelope)


def _letter(queue: str, entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
    data = fields.get(b"e", b"")
    try:
        envelope = _ENVELOPE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        envelope = Envelope(id=entry_id, queue=queue, body=data,
                            headers={"taskloom-malformed": "true"})
    return DeadLetter(envelope=envelope, reason=fields.get(b"r", b"").decode(errors="replace"),
                      delivery_count=int(fields.get(b"c", 0)))


def admin_for(broker: Any) -> DeadLetterAdmin:
    if callable(getattr(broker, "remove_dead_letters", None)):
        return _BrokerOwn(broker)
    name = type(broker).__name__
    if name == "MemoryBroker":
        return _Memory(broker)
    if name == "RedisBroker":
        return _Redis(broker)
    raise ConfigError(f"replaying or purging dead letters one by one is not supported on "
                      f"{name}; read them with `taskloom dlq` and purge the whole dead-letter "
                      "queue with the broker's own tools")
