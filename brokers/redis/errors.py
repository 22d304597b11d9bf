"""Redis errors as ``brokers.base`` errors, and riding out outages.

* **Outages** (resets, blackholes, a restarted Redis): every error that means
  "the connection is not usable" (:func:`brokers.base.is_connection_failure`,
  uvloop's write on a closed transport included) is ``ConnectionLost``. A
  consumer rides out an outage of any length: it retries with doubling, capped
  (2 s), jittered pauses (:func:`backoff`), keeps the settlements it could not
  send and sends them once Redis is back (each is gated by its ``XACK``, so a
  resend is harmless), then drops its stale pooled connections and takes up the
  entries pending for it that it never heard of (a fetch whose reply was lost).
  It logs one line when an outage starts and one when it ends (:class:`Outage`).
  redis-py's own silent retry is off: a resent script might run twice.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import anyio
import redis.exceptions as rex
import structlog

from brokers.base import (
    BrokerError,
    ConnectionFailed,
    ConnectionLost,
    PublishError,
    is_connection_failure,
)

__all__ = ["CONNECTION_ERRORS", "Outage", "as_broker_error", "backoff", "mapped", "unwrapped"]

log = structlog.get_logger("brokers.redis")


#: redis-py's own "the connection is not usable" types (see ``is_connection_failure``).
CONNECTION_ERRORS: Final = (rex.ConnectionError, rex.TimeoutError)


@contextmanager
def mapped(what: str, *, publish: bool = False) -> Iterator[None]:
    """Let errors leave only as ``brokers.base`` types. The one place that decides
    what a connection failure is: :func:`brokers.base.is_connection_failure`."""
    try:
        yield
    except BrokerError:
        raise
    except (rex.AuthenticationError, rex.AuthorizationError) as e:
        raise ConnectionFailed(f"{what}: Redis refused the credentials: {e}; "
                               "check the user and password in the broker URL") from e
    except rex.ResponseError as e:
        text = str(e)
        if text.startswith("OOM") or isinstance(e, rex.OutOfMemoryError):
            text += ("; Redis reached maxmemory: raise it, drain the queues, or purge "
                     "dead letters")
        elif isinstance(e, rex.NoPermissionError) or text.startswith("NOPERM"):
            text += ("; the Redis user lacks a permission taskloom needs: grant it the "
                     "namespace's keys and channels (~<namespace>:* &<namespace>:*) and the "
                     "commands listed under 'Least privilege' in the README")
        cls = PublishError if publish else BrokerError
        raise cls(f"{what}: Redis replied with an error: {text}") from e
    except Exception as e:
        if is_connection_failure(e, CONNECTION_ERRORS):
            raise ConnectionLost(f"{what}: lost the connection to Redis "
                                 f"({type(e).__name__}: {e}); the operation may be retried "
                                 "once Redis is reachable") from e
        if isinstance(e, rex.RedisError):
            raise BrokerError(f"{what}: {type(e).__name__}: {e}") from e
        raise


#: Reconnection backoff of a consumer: first and longest pause (seconds).
BACKOFF_FIRST_S: Final = 0.05
BACKOFF_MAX_S: Final = 2.0


def backoff(failures: int) -> float:
    """The pause after ``failures`` failures in a row: doubling, capped, with
    jitter (so that the consumers of a fleet do not reconnect in lockstep)."""
    cap: float = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(max(failures - 1, 0), 16))
    return cap * random.uniform(0.5, 1.0)


class Outage:
    """One log line when a consumer loses Redis, one when it is back; the attempts
    in between go to the debug log. A single failure that the next attempt cures
    (a pooled connection that went stale in the outage just healed) is a blip,
    logged at debug only: the outage is announced at its second failure in a row."""

    __slots__ = ("announced", "consumer", "failures", "since")

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.since: float | None = None
        self.failures = 0
        self.announced = False

    def down(self, error: BrokerError) -> float:
        """Note a failure; how long to pause before the next attempt."""
        self.failures += 1
        if self.since is None:
            self.since = anyio.current_time()
        if self.failures >= 2 and not self.announced:
            self.announced = True
            log.warning("lost the connection to Redis; reconnecting with backoff until it "
                        "is back (held deliveries keep running; their settlements are sent "
                        "once it is)", consumer=self.consumer, error=str(error))
        else:
            log.debug("Redis unreachable", consumer=self.consumer, error=str(error),
                      failures=self.failures)
        return backoff(self.failures)

    def up(self) -> bool:
        """Note a success; whether it ended an outage (a blip included)."""
        if self.since is None:
            return False
        down_s = round(anyio.current_time() - self.since, 2)
        if self.announced:
            log.warning("Redis is reachable again; resuming", consumer=self.consumer,
                        down_s=down_s, failed_attempts=self.failures)
        else:
            log.debug("Redis answered again after one failed attempt", consumer=self.consumer,
                      down_s=down_s)
        self.since = None
        self.failures = 0
        self.announced = False
        return True


def as_broker_error(what: str, error: Exception, *, publish: bool = False) -> BrokerError:
    """The ``brokers.base`` error for a Redis error reply returned in place."""
    try:
        with mapped(what, publish=publish):
            raise error
    except BrokerError as e:
        return e
    return BrokerError(f"{what}: {error!r}")  # not a Redis error: still a broker error


@contextmanager
def unwrapped() -> Iterator[None]:
    """Let an exception group of one leave as its only exception (promise 10 of
    :mod:`brokers.base`): the consumer's task group wraps whatever crosses it,
    the caller's own exceptions included, and those must come out as themselves."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1 or isinstance(group.exceptions[0], BaseExceptionGroup):
            raise
        error = group.exceptions[0]
        context, suppress = error.__context__, error.__suppress_context__
        try:
            raise error  # its own cause and context are restored below
        finally:
            # raising it here made the group its context: give it its own back
            error.__context__, error.__suppress_context__ = context, suppress
            del error, group
