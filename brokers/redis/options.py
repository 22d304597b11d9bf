"""Options of the Redis broker and the parsing of its URL."""

from __future__ import annotations

from typing import Annotated, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis

from brokers.base import ConfigError, redact_url

__all__ = ["ENVELOPE_HEADROOM", "RedisBrokerOptions", "parse_url"]


class RedisBrokerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of :class:`RedisBroker`, given as query parameters of its URL:
    ``redis://host:6379/0?lease_s=60&max_deliveries=10``."""

    #: An entry whose consumer has not touched it for this long is reclaimed by
    #: another consumer (``XAUTOCLAIM`` min-idle). Live consumers heartbeat their
    #: deliveries every ``lease_s / 3``.
    lease_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: Deliveries after which a message goes to the dead-letter stream with reason
    #: ``delivery_limit`` (nacks, releases and reclaims all count); 0 = no limit.
    max_deliveries: Annotated[int, msgspec.Meta(ge=0)] = 5
    #: Longest single ``XREAD BLOCK`` of an idle consumer (wakes are push-driven).
    block_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: Longest sleep of the delayed-message timer (bounds lateness of delays
    #: published by other processes).
    delay_tick_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    #: First part of consumer names (``<name>-<pid>-<random>``); default the host name.
    consumer_name: str = ""
    #: Consumer group name.
    group: Annotated[str, msgspec.Meta(min_length=1)] = "taskloom"
    #: Messages per script call in ``publish_many``.
    publish_chunk: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Under load, settlements and fetches wait up to this long (or until a quarter
    #: of the prefetch has accumulated) to share a round trip. A consumer that was
    #: idle for longer sends at once, so this adds no latency at low rates. 0 = never wait.
    batch_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 0.002
    #: Largest message body accepted (the runtime's ``max_message_bytes`` may not
    #: exceed it). A stream entry longer than this (plus 64 KiB for the envelope)
    #: is dead-lettered inside Redis as ``too_large``: its bytes never reach a worker.
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1)] = 16 * 1024 * 1024
    #: Bytes of message bodies one consumer fetches and holds at most (at least one
    #: message at a time): bounds a worker's memory whatever the entry sizes.
    fetch_bytes: Annotated[int, msgspec.Meta(ge=1)] = 8 * 1024 * 1024
    #: Replicas that must hold a published message before ``publish`` returns
    #: (Redis ``WAIT`` on the publishing connection); 0 = do not wait. When fewer
    #: acknowledge within ``replica_timeout_ms`` the publish raises ``PublishError``:
    #: the message is on the primary only and may not survive a failover (retry it
    #: with the same task id). Replicas hold it in memory: not a guarantee against
    #: every failure, but what a Sentinel-style failover to a live replica keeps.
    min_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: How long a publish waits for ``min_replicas`` (milliseconds, at least 1:
    #: ``WAIT`` with 0 would block forever).
    replica_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 100


def parse_url(url: str) -> tuple[str, RedisBrokerOptions]:
    """Split a ``redis://``, ``rediss://`` or ``unix://`` URL into the URL for
    redis-py and the broker's options: query parameters named like
    :class:`RedisBrokerOptions` fields configure the broker, the others stay in
    the URL for redis-py."""
    parts = urlsplit(url)
    known = set(RedisBrokerOptions.__struct_fields__)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in known:
            ours[key] = value
        else:
            theirs.append((key, value))
    try:
        options = msgspec.convert(ours, RedisBrokerOptions, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid Redis broker option in {redact_url(url)}: {e}; "
                         f"known options: {', '.join(sorted(known))}") from None
    rest = urlunsplit(parts._replace(query=urlencode(theirs)))
    check_client_url(rest, ours=sorted(known))
    return rest, options


def check_client_url(url: str, *, ours: list[str]) -> None:
    """Refuse, before any connection, a URL whose query redis-py cannot use:
    redis-py hands unknown parameters to its connection class, which fails at
    connect with a ``TypeError`` that names neither the URL nor the choices.
    ``ours`` are the parameters the caller reads itself (listed in the message)."""
    try:
        aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError) as e:
        given = [key for key, _ in parse_qsl(urlsplit(url).query)]
        raise ConfigError(
            f"invalid Redis URL {redact_url(url)}: {str(e).rstrip('.')}; query parameters {given} go to "
            f"redis-py (socket_timeout, socket_connect_timeout, health_check_interval, "
            f"client_name, ssl_cert_reqs, ...) unless they are taskloom's: "
            f"{', '.join(ours)}") from None


#: An entry may exceed ``max_message_bytes`` by this much: the envelope's id,
#: queue and headers around the body.
ENVELOPE_HEADROOM: Final = 64 * 1024
