"""Per-deployment settings read from the environment.

``Runtime()`` takes each of these from its argument when one is given in code,
else from the environment variable, else from the default. An empty variable
counts as unset. A value that cannot be used is a ``ConfigError`` naming the
variable, raised when the runtime is built.

Variable (``Runtime`` argument): value, default.

- ``TASKLOOM_BROKER_URL`` (``broker``): ``memory://``, ``redis://…``, ``amqp://…``;
  ``memory://``.
- ``TASKLOOM_RESULTS_URL`` (``results``): ``memory://`` or ``redis://…``; the broker's
  Redis, ``memory://`` beside the memory broker, required with RabbitMQ.
- ``TASKLOOM_NAMESPACE`` (``namespace``): a prefix for every queue and key; none.
- ``TASKLOOM_DEFAULT_QUEUE`` (``default_queue``): a queue name; ``default``.
- ``TASKLOOM_CODEC`` (``codec``): ``json`` or ``msgpack``; ``json``.
- ``TASKLOOM_MAX_MESSAGE_BYTES`` (``max_message_bytes``): a positive integer; 1048576.
- ``TASKLOOM_RESULT_TTL_S`` (``result_ttl_s``): positive seconds; 86400.
- ``TASKLOOM_RESULT_TIMEOUT_S`` (``result_timeout_s``): positive seconds; 300.
- ``TASKLOOM_ENCRYPTION_KEYS`` (``encryption_keys``): ``id1:base64key,id2:base64key``,
  each key 32 bytes in standard or URL-safe base64; none (encryption off).
- ``TASKLOOM_ENCRYPTION_KEY_ID`` (``encryption_key_id``): the key id that
  encrypts; optional with one key.

A bad key is a ``ConfigError`` naming the variable and the key id, never the key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import get_args

from runtime.codec import DEFAULT_MAX_BYTES, Codec, Format
from runtime.encryption import parse_keys
from runtime.errors import ConfigError

__all__ = ["VARIABLES", "Environment", "codec_from"]

#: variable -> the Runtime argument it stands for
VARIABLES: dict[str, str] = {
    "TASKLOOM_BROKER_URL": "broker",
    "TASKLOOM_RESULTS_URL": "results",
    "TASKLOOM_NAMESPACE": "namespace",
    "TASKLOOM_DEFAULT_QUEUE": "default_queue",
    "TASKLOOM_CODEC": "codec",
    "TASKLOOM_MAX_MESSAGE_BYTES": "max_message_bytes",
    "TASKLOOM_RESULT_TTL_S": "result_ttl_s",
    "TASKLOOM_RESULT_TIMEOUT_S": "result_timeout_s",
    "TASKLOOM_ENCRYPTION_KEYS": "encryption_keys",
    "TASKLOOM_ENCRYPTION_KEY_ID": "encryption_key_id",
}


class Environment:
    """Typed reads of the ``TASKLOOM_*`` variables (``os.environ`` unless given)."""

    __slots__ = ("_env",)

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def _bad(self, name: str, value: str, expected: str) -> ConfigError:
        return ConfigError(
            f"environment variable {name}={value!r} is not valid: expected {expected}; "
            f"fix or unset it, or pass {VARIABLES[name]}=... to Runtime()"
        )

    def text(self, name: str) -> str | None:
        return self._raw(name)

    def url(self, name: str) -> str | None:
        value = self._raw(name)
        if value is not None and "://" not in value:
            raise self._bad(name, value, "a URL such as redis://127.0.0.1:6379/0")
        return value

    def codec(self, name: str) -> Format | None:
        value = self._raw(name)
        if value is None:
            return None
        formats: tuple[Format, ...] = get_args(Format)
        for known in formats:
            if value.lower() == known:
                return known
        raise self._bad(name, value, " or ".join(formats))

    def seconds(self, name: str) -> float | None:
        value = self._raw(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number <= 0:
            raise self._bad(name, value, "a positive number of seconds, e.g. 30 or 0.5")
        return number

    def positive_int(self, name: str) -> int | None:
        value = self._raw(name)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number <= 0:
            raise self._bad(name, value, "a positive whole number, e.g. 1048576")
        return number

    def encryption_keys(self, name: str) -> dict[str, bytes] | None:
        """``id1:base64key,id2:base64key`` -> {id: 32-byte key}."""
        value = self._raw(name)
        if value is None:
            return None
        return parse_keys(value, f"environment variable {name}")


def codec_from(env: Environment, codec: Format | None, *, compress_over: int | None,
               signing_keys: dict[str, bytes] | None, signing_key_id: str | None,
               max_message_bytes: int | None, encryption_keys: dict[str, bytes] | None,
               encryption_key_id: str | None) -> Codec:
    """The runtime's codec: arguments left out are read from their ``TASKLOOM_*``
    variables, else take their defaults."""
    if encryption_keys is None:
        encryption_keys = env.encryption_keys("TASKLOOM_ENCRYPTION_KEYS")
    if encryption_key_id is None:
        encryption_key_id = env.text("TASKLOOM_ENCRYPTION_KEY_ID")
    if codec is None:
        codec = env.codec("TASKLOOM_CODEC") or "json"
    if max_message_bytes is None:
        max_message_bytes = env.positive_int("TASKLOOM_MAX_MESSAGE_BYTES") or DEFAULT_MAX_BYTES
    return Codec(codec, compress_over=compress_over, signing_keys=signing_keys,
                 signing_key_id=signing_key_id, max_message_bytes=max_message_bytes,
                 encryption_keys=encryption_keys, encryption_key_id=encryption_key_id)
