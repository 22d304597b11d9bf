"""The live feed: an in-process hub fanning events out to server-sent-event
subscribers, and what feeds it (the ops event stream when it exists, the
dashboard's own submissions and result watches, queue/worker snapshots)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["EventHub", "sse"]

_BUFFER = 256        # events a slow subscriber may fall behind before it misses some
_KEEPALIVE_S = 15.0  # a comment line so proxies keep the connection open
_MAX_SUBSCRIBERS = 200


class EventHub:
    def __init__(self) -> None:
        self._subs: set[MemoryObjectSendStream[dict[str, Any]]] = set()

    def publish(self, event: dict[str, Any]) -> None:
        for s in list(self._subs):
            try:
                s.send_nowait(event)
            except anyio.WouldBlock:
                pass   # a slow subscriber misses this one; the next snapshot catches it up
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subs.discard(s)

    @property
    def full(self) -> bool:
        return len(self._subs) >= _MAX_SUBSCRIBERS

    def subscribe(self) -> MemoryObjectReceiveStream[dict[str, Any]]:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](_BUFFER)
        self._subs.add(send)
        return receive


async def sse(receive: MemoryObjectReceiveStream[dict[str, Any]], first: list[dict[str, Any]]
              ) -> AsyncIterator[str]:
    """Server-sent events: ``first`` (the current state), then each event."""
    with receive:
        for event in first:
            yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"
        while True:
            with anyio.move_on_after(_KEEPALIVE_S):
                event = await receive.receive()
                yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"
                continue
            yield ": keep-alive\n\n"
