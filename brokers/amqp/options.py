"""The options of :class:`~brokers.amqp.AmqpBroker` and the parsing of its URL.

An ``amqp://`` or ``amqps://`` URL: its path is the vhost (``/`` when empty);
query parameters named like :class:`AmqpBrokerOptions` fields configure the
broker; TLS files (``cafile``, ``capath``, ``cadata``, ``certfile``,
``keyfile``) and the connection ``name`` go to aio-pika; any other parameter is
refused. The default ``guest`` user is refused towards a host that is not a
loopback address unless ``allow_guest=true``.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec

from brokers.base import ConfigError, redact_url

__all__ = ["DEFAULT_DELIVERY_LIMIT", "AmqpBrokerOptions", "check_url", "connect_url",
           "parse_url"]

#: ``x-delivery-limit`` of quorum queues when the URL gives none.
DEFAULT_DELIVERY_LIMIT: Final = 10


class AmqpBrokerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of :class:`AmqpBroker`, given as query parameters of its URL:
    ``amqp://user:pass@host:5672/vhost?queue_type=quorum&delivery_limit=5``."""

    #: ``classic`` (priorities) or ``quorum`` (replicated, counts deliveries and
    #: dead-letters poison messages by itself after ``delivery_limit``).
    queue_type: Literal["classic", "quorum"] = "classic"
    #: Quorum queues only: deliveries after which RabbitMQ dead-letters a message
    #: with reason ``delivery_limit`` (default 10; always set explicitly).
    delivery_limit: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: Classic queues only: ``x-max-priority`` (0 = no priorities).
    max_priority: Annotated[int, msgspec.Meta(ge=0, le=255)] = 9
    #: The server's ``consumer_timeout`` (rabbitmq.conf; default 30 min): a delivery
    #: held unacked longer is taken back. Task time limits must stay below it.
    consumer_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    #: AMQP heartbeat in seconds (0 = off): RabbitMQ drops a silent client after
    #: ~2x this, the client a silent server after ~3x (aiormq). Default 10 s
    #: (RabbitMQ's own default of 60 s leaves a dead link unnoticed for minutes).
    heartbeat: Annotated[int, msgspec.Meta(ge=0)] = 10
    #: Consumer watchdog period in seconds (0 = off). A consumer that could take
    #: more deliveries but received none for a period asks RabbitMQ (a passive
    #: queue declare on a channel of its own) how many messages are ready. No
    #: answer within a period, or ready messages at two checks in a row with no
    #: delivery in between (acks or deliveries lost on the way: the server
    #: believes the consumer is full), and it logs ``amqp.consumer_stalled`` once
    #: and reconnects; unsettled deliveries are then redelivered.
    watchdog_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    #: Seconds to wait for the connection at ``async with``.
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    #: Seconds a publish waits for its confirm (or for a lost connection to come
    #: back, or for a resource alarm to clear) before it raises.
    publish_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: Seconds between reconnection attempts after the connection dropped.
    reconnect_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    #: Messages ``publish_many`` sends before awaiting their confirms together.
    publish_chunk: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Largest message the runtime may send (RabbitMQ 4.x default ``max_message_size``).
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1)] = 16 * 1024 * 1024
    #: Allow the default ``guest`` user towards a host that is not loopback.
    allow_guest: bool = False

    def __post_init__(self) -> None:
        if self.delivery_limit is not None and self.queue_type != "quorum":
            raise ConfigError("delivery_limit needs queue_type=quorum: classic queues have "
                             "no delivery limit")


#: URL query parameters passed through to aio-pika (TLS files, connection name).
_PASSTHROUGH: Final = frozenset({"cafile", "capath", "cadata", "keyfile", "certfile", "name"})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _vhost_of(path: str) -> str:
    """The vhost of a URL path, as aiormq reads it ('' and '/' are '/')."""
    return unquote(path[1:]) if len(path) > 1 else "/"


def check_url(url: str, namespace: str, options: AmqpBrokerOptions) -> str:
    """Refuse what a broker must not start with; the vhost of ``url``."""
    if "*" in namespace or "#" in namespace:
        raise ConfigError(f"namespace {namespace!r} must contain neither '*' nor '#'")
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"not an AMQP URL: {redact_url(url)} (use amqp:// or amqps://)")
    host = parts.hostname or "localhost"
    user = unquote(parts.username) if parts.username else "guest"
    if user == "guest" and not is_loopback(host) and not options.allow_guest:
        raise ConfigError(
            f"refusing the default 'guest' user towards {host!r}, which is not a loopback "
            "address (RabbitMQ refuses it too, and default credentials are unsafe): create "
            "a user for this application, or add ?allow_guest=true to the URL")
    return _vhost_of(parts.path)


def parse_url(url: str) -> tuple[str, AmqpBrokerOptions]:
    """``url`` without taskloom's options (what aio-pika is given), and the options."""
    parts = urlsplit(url)
    known = set(AmqpBrokerOptions.__struct_fields__)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in known:
            ours[key] = value
        elif key in _PASSTHROUGH:
            theirs.append((key, value))
        else:
            raise ConfigError(
                f"unknown AMQP broker option {key!r} in {redact_url(url)}; known options: "
                f"{', '.join(sorted(known | _PASSTHROUGH))}")
    try:
        options = msgspec.convert(ours, AmqpBrokerOptions, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid AMQP broker option in {redact_url(url)}: {e}") from None
    return urlunsplit(parts._replace(query=urlencode(theirs))), options


def connect_url(url: str, options: AmqpBrokerOptions) -> str:
    """``url`` with the heartbeat and reconnect interval aio-pika reads from it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [("heartbeat", str(options.heartbeat)),
              ("reconnect_interval", str(options.reconnect_interval_s))]
    return urlunsplit(parts._replace(query=urlencode(query)))
