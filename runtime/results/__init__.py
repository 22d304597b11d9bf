"""Result stores: the ``ResultStore`` protocol (:mod:`runtime.results.base`),
the in-memory store (:mod:`runtime.results.memory`), the Redis store
(:mod:`runtime.results.redis`, imported only when a ``redis://`` URL names it)
and :func:`results_from_url`, which picks one from a URL."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

import structlog

from brokers.base import redact_url
from runtime.errors import ConfigError
from runtime.results.base import (
    CANCELLED,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TTL_S,
    ResultStore,
    encode_result,
)
from runtime.results.memory import MemoryResultStore

if TYPE_CHECKING:
    from runtime.codec import Codec

__all__ = ["CANCELLED", "DEFAULT_MAX_RESULT_BYTES", "DEFAULT_TTL_S", "MemoryResultStore",
           "ResultStore", "encode_result", "results_from_url", "share_keyring"]

log = structlog.get_logger(__name__)


def share_keyring(store: ResultStore, codec: Codec) -> Codec:
    """Give ``store`` the encryption keys of ``codec`` (the Runtime calls this
    once, the store being built before the codec): results are then stored
    with their value and error details encrypted. A store without
    ``use_keyring`` (a custom one) keeps storing them in clear: said once.
    Returns ``codec``."""
    keyring = codec.keyring
    use_keyring = getattr(store, "use_keyring", None)
    if keyring is None:
        return codec
    if use_keyring is None:
        log.warning("this result store cannot encrypt results: their values are stored in "
                    "clear; give it a use_keyring(keyring) method", store=type(store).__name__)
    else:
        use_keyring(keyring)
    return codec


def results_from_url(url: str, *, ttl_s: float = DEFAULT_TTL_S,
                     namespace: str = "") -> ResultStore:
    """The result store ``url`` names: ``memory://``, or ``redis://``,
    ``rediss://`` or ``unix://`` (whose query may set ``ttl_s`` and
    ``max_result_bytes``). A ``ConfigError`` names the URL with its password
    redacted."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryResultStore(ttl_s=ttl_s)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"no result store handles {redact_url(url)!r}; use memory:// or "
                          "redis://host:port/db")
    # checked here, so that no error below can print the URL with its password
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "ttl_s":
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not 0 < number < math.inf:
                raise ConfigError(f"bad ttl_s={value!r} in result store URL {redact_url(url)!r}: "
                                  "use a positive number of seconds, e.g. ?ttl_s=3600") from None
        elif key == "max_result_bytes":
            try:
                size = int(value)
            except ValueError:
                size = 0
            if size <= 0:
                raise ConfigError(f"bad max_result_bytes={value!r} in result store URL "
                                  f"{redact_url(url)!r}: use a positive whole number of bytes, "
                                  "e.g. ?max_result_bytes=16777216") from None
    from runtime.results.redis import RedisResultStore  # the Redis client loads only when used

    store: ResultStore = RedisResultStore.from_url(url, ttl_s=ttl_s, namespace=namespace)
    return store
