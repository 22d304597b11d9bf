"""Result-store calls retried in place while the store is down.

A finished task's result write (and a chord join, and a once-only task's
claim) must not fail the task, nor settle its delivery, because the store is
unreachable: :class:`StoreRetry` awaits the call again with a capped,
jittered backoff until it succeeds or the caller is cancelled (the worker
stopped: the delivery stays unsettled and the broker delivers it again). One
warning marks an outage (once calls have failed for ``warn_after_s``) and one
info line its end; the retries between are counted, not logged, and a blip
that heals within ``warn_after_s`` (a stale pooled connection after a heal)
is only a debug line.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog

from brokers.base import BrokerConnectionError
from runtime.errors import DecodeError, EncodeError, PayloadTooLarge, ResultError, TaskloomError
from runtime.retry import Backoff

__all__ = ["StoreRetry", "type_name"]

log = structlog.get_logger("taskloom.worker")

T = TypeVar("T")


def type_name(exc: BaseException) -> str:
    """``exc``'s type as ``module.Qualname`` (``Qualname`` for builtins)."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class StoreRetry:
    """``await retry("store a result", lambda: store.put(r))``: one per worker,
    shared by its runners, so an outage is logged once whatever their number."""

    __slots__ = ("cap_s", "failures", "since", "warn_after_s", "warned")

    def __init__(self, *, cap_s: float = 5.0, warn_after_s: float = 1.0) -> None:
        self.cap_s = cap_s
        self.warn_after_s = warn_after_s
        #: When the current outage began (monotonic), None while the store works.
        self.since: float | None = None
        self.failures = 0
        self.warned = False

    async def __call__(self, doing: str, op: Callable[[], Awaitable[T]]) -> T:
        """``await op()`` until it succeeds.

        Only a value that can never be stored (``EncodeError``,
        ``PayloadTooLarge``), a bad stored value (``DecodeError``) or another
        taskloom error that no retry changes (``ConfigError``) is raised; any
        other error (``ResultStoreUnavailable``, a connection error under
        another name, a bug in a store) is retried, so a task that ran is
        never dead-lettered for it.
        """
        backoff: Backoff | None = None
        while True:
            started = time.monotonic()
            try:
                value = await op()
            except (EncodeError, PayloadTooLarge, DecodeError):
                raise
            except Exception as e:
                if isinstance(e, TaskloomError) and not isinstance(
                        e, (ResultError, BrokerConnectionError)):
                    raise
                self.failed(doing, e, started)
                backoff = backoff or Backoff(min(0.05, self.cap_s), self.cap_s)
                await anyio.sleep(backoff.next())
                continue
            if self.since is not None:
                self.recovered()
            return value

    def failed(self, doing: str, error: Exception, started: float | None = None) -> None:
        """Count a failure of a call begun at ``started`` (monotonic; now if not
        given): the outage began when its first failing call did, so a call that
        hung for a socket timeout before failing (a stalled store) counts its
        wait; the first failure once the outage lasts ``warn_after_s`` logs a
        warning."""
        self.failures += 1
        now = time.monotonic()
        if self.since is None:
            self.since = now if started is None else started
        if not self.warned and now - self.since >= self.warn_after_s:
            self.warned = True
            log.warning("result store unavailable; finished tasks are held unacknowledged and "
                        "their results retried until it is back", doing=doing,
                        error_type=type_name(error), error=str(error)[:300])

    def recovered(self) -> None:
        """A call succeeded: the end of an outage, if one was on, logs once."""
        if self.since is None:
            return
        down_s = round(time.monotonic() - self.since, 3)
        if self.warned:
            log.info("result store reachable again; resuming", down_s=down_s,
                     retries=self.failures)
        else:
            log.debug("result store call failed and succeeded on retry", down_s=down_s,
                      retries=self.failures)
        self.since = None
        self.failures = 0
        self.warned = False
