"""Messages to bytes and back: JSON (default) or MessagePack, optional zlib,
optional AES-256-GCM encryption (:mod:`runtime.encryption`), optional
HMAC-SHA256 signing, a size limit checked before any parsing.

Never pickle: only msgspec encodes and decodes, into typed Structs.

The envelope headers carry how the body was made:
``ct`` content type (``json`` | ``msgpack``), ``ce`` content encoding
(``zlib`` when compressed), ``kid`` and ``sig`` the signing key id and the
hex HMAC-SHA256 of the body (over the bytes as sent, compressed or not).

Encryption (``encryption_keys``): encode is serialize -> compress (over
``compress_over``) -> encrypt -> sign; decode runs it backwards: size ->
signature -> decrypt -> inflate -> parse. ``ce`` becomes ``aesgcm`` (or
``zlib+aesgcm``) and ``ekid`` names the encryption key; the body starts with
the task id in clear (layout in :mod:`runtime.encryption`), and the key id,
``ct``, ``ce`` and task id are bound as GCM associated data. Encrypt-then-sign:
the HMAC covers the ciphertext and the task id, so a forged or corrupted body
is refused before any decryption, signing keeps its meaning (who may send)
apart from encryption's (who may read), and a message whose encryption key was
removed still names a task id that the signature vouches for. A worker built before encryption
meets ``ce`` it does not know and dead-letters the message as
``decode_error`` ("unknown content encoding"): it never runs it. A codec with
encryption keys refuses a message that is not encrypted, and one without keys
refuses an encrypted one, both as ``bad_encryption``.

What the signature covers, and what the worker trusts: **only the body**.
Every decision the worker makes (which task, which arguments, which ids it
may write results for, retries, time limits, follow-ups) comes from the
decoded body, which the signature covers. The headers only say how to check
and read that body: ``kid`` picks the key, ``sig`` is checked against it, and
``ct``/``ce`` pick the decoder; a forged ``ct`` or ``ce`` can only make a
signed body fail to decode (JSON is never valid MessagePack for a message,
nor the reverse, nor either a zlib stream), never make it say something else.
What the broker adds (delivery count, envelope id, queue, priority) is not
signed and is used for logs and for the ``delivery_count`` recorded in a
result only, clamped to a bounded int, never to decide anything.

Every header is validated before use: a header that is not a string, an
unknown ``ct``/``ce``, a ``kid`` that is not a known key id or a ``sig`` that
is not 64 lowercase hex digits ends as ``decode_error`` or ``bad_signature``,
never as an internal error. Numbers in the body are bounded at decode time
(see :mod:`runtime.messages`); the worker then checks the message's canvas
references (``bad_message``), so a message only writes results for ids it owns.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from runtime.deadletters import DeadLetterReason
from runtime.encryption import DecryptError, Keyring, task_id_of
from runtime.errors import ConfigError, DecodeError, EncodeError, PayloadTooLarge
from runtime.messages import TaskMessage

__all__ = ["Codec", "Format"]

Format = Literal["json", "msgpack"]

DEFAULT_MAX_BYTES = 1024 * 1024

_TaskDecoder = msgspec.json.Decoder[TaskMessage] | msgspec.msgpack.Decoder[TaskMessage]

_DECODE_ERROR = DeadLetterReason.DECODE_ERROR
_BAD_SIGNATURE = DeadLetterReason.BAD_SIGNATURE
_TOO_LARGE = DeadLetterReason.TOO_LARGE
_BAD_ENCRYPTION = DeadLetterReason.BAD_ENCRYPTION
#: ``ce`` of an encrypted body -> ``ce`` of what decrypting it gives
_SEALED: dict[str, str | None] = {"aesgcm": None, "zlib+aesgcm": "zlib"}
_HEX = frozenset("0123456789abcdef")
_SIG_LEN = 64
_MAX_KID_LEN = 128


def _header(headers: Mapping[str, str], name: str, reason: DeadLetterReason) -> str | None:
    """Header ``name``, or None; anything but a string is ``reason``."""
    try:
        value = headers.get(name)
    except Exception:  # not a mapping at all: whatever the broker handed over
        raise DecodeError(_DECODE_ERROR, "the envelope headers are not a mapping") from None
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(reason, f"header {name!r} is not a string")


def _check_finite(value: Any, task: str) -> None:
    """JSON has no NaN or infinity (msgspec would write null): refuse them."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EncodeError(
                f"task {task!r}: {value!r} cannot be sent as JSON; "
                "pass a finite number or use codec='msgpack'"
            )
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(item, task)
    elif isinstance(value, dict):
        for item in value.values():
            _check_finite(item, task)


def _enc_hook(obj: Any) -> Any:
    raise NotImplementedError(
        f"a value of type {type(obj).__qualname__} cannot be encoded; pass JSON-like data "
        "(str, int, float, bool, None, list, dict, datetime, UUID, msgspec Structs, dataclasses)"
    )


class Codec:
    """Encodes task messages and results; one instance per runtime, reused."""

    def __init__(
        self,
        format: Format = "json",
        *,
        compress_over: int | None = None,
        signing_keys: Mapping[str, bytes] | None = None,
        signing_key_id: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_BYTES,
        encryption_keys: Mapping[str, bytes] | None = None,
        encryption_key_id: str | None = None,
    ) -> None:
        """``encryption_keys`` (key id -> 32 bytes) turns on AES-256-GCM;
        ``encryption_key_id`` picks the key that encrypts (needed when there
        are several). Raises ``ConfigError`` for a bad key or setting, or when
        the ``encryption`` extra is not installed."""
        if format not in ("json", "msgpack"):
            raise ConfigError(f"codec format must be 'json' or 'msgpack', not {format!r}")
        self.format: Format = format
        self.compress_over = compress_over
        self.max_message_bytes = max_message_bytes
        self._keys = dict(signing_keys or {})
        if signing_key_id is None and self._keys:
            signing_key_id = next(iter(self._keys))
        if signing_key_id is not None and signing_key_id not in self._keys:
            raise ConfigError(f"signing_key_id {signing_key_id!r} is not among the signing keys")
        self._kid = signing_key_id
        if encryption_key_id is not None and not encryption_keys:
            raise ConfigError(f"encryption_key_id {encryption_key_id!r} is set without "
                              "encryption_keys; give both, or neither")
        self._keyring = Keyring(encryption_keys, encryption_key_id) if encryption_keys else None
        encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
            msgspec.json.Encoder(enc_hook=_enc_hook)
            if format == "json"
            else msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        )
        self._encode: Callable[[Any], bytes] = encoder.encode
        self._task_decoders: dict[str, _TaskDecoder] = {
            "json": msgspec.json.Decoder(TaskMessage),
            "msgpack": msgspec.msgpack.Decoder(TaskMessage),
        }
        self._base_headers: dict[str, str] = {"ct": format}

    @property
    def signs(self) -> bool:
        return self._kid is not None

    @property
    def encrypts(self) -> bool:
        return self._keyring is not None

    @property
    def keyring(self) -> Keyring | None:
        """The encryption keys (None when encryption is off), shared with the
        result store so stored results are sealed with the same keys."""
        return self._keyring

    # -- values ----------------------------------------------------------------

    def encode_value(self, value: Any) -> bytes:
        """Encode any user value; raises EncodeError naming the bad type."""
        try:
            return self._encode(value)
        except (NotImplementedError, TypeError, OverflowError, RecursionError) as e:
            raise EncodeError(str(e) or "the value is nested too deeply") from None

    # -- task messages ------------------------------------------------------------

    def encode(self, message: TaskMessage) -> tuple[bytes, dict[str, str]]:
        """The body and headers of ``message``; raises EncodeError or PayloadTooLarge."""
        try:
            if self.format == "json" and (message.args or message.kwargs):
                _check_finite(message.args, message.task)
                _check_finite(message.kwargs, message.task)
            body = self._encode(message)
        except (NotImplementedError, TypeError, OverflowError, RecursionError) as e:
            raise EncodeError(f"task {message.task!r}: {e or 'a value is nested too deeply'}") from None
        if len(body) > self.max_message_bytes * 4:
            raise PayloadTooLarge(len(body), self.max_message_bytes, f"message for task {message.task!r}")
        headers = dict(self._base_headers)
        if self.compress_over is not None and len(body) > self.compress_over:
            body = zlib.compress(body, 6)
            headers["ce"] = "zlib"
        if self._keyring is not None:
            body = self._seal(body, headers, message.id)
        if len(body) > self.max_message_bytes:
            raise PayloadTooLarge(len(body), self.max_message_bytes, f"message for task {message.task!r}")
        if self._kid is not None:
            sig = hmac.new(self._keys[self._kid], body, hashlib.sha256).hexdigest()
            headers["kid"] = self._kid
            headers["sig"] = sig
        return body, headers

    def decode(self, body: bytes, headers: Mapping[str, str]) -> TaskMessage:
        """The message in ``body``; raises DecodeError with a DLQ reason
        (a :class:`~runtime.deadletters.DeadLetterReason`) for any input."""
        if not isinstance(body, bytes):
            if not isinstance(body, (bytearray, memoryview)):
                raise DecodeError(_DECODE_ERROR, f"the body is a {type(body).__name__}, not bytes")
            body = bytes(body)
        if len(body) > self.max_message_bytes:
            raise DecodeError(_TOO_LARGE, f"{len(body)} bytes, limit {self.max_message_bytes}")
        if self._keys:
            self._verify(body, headers)
        ce = _header(headers, "ce", _DECODE_ERROR)
        tid: str | None = None
        if ce is not None and ce in _SEALED:
            tid, body = self._open(body, headers, ce)
            ce = _SEALED[ce]
        elif self._keyring is not None:
            raise DecodeError(_BAD_ENCRYPTION, "the message is not encrypted and this worker "
                              "requires encryption: give the producer the same encryption_keys")
        if ce == "zlib":
            body = self._inflate(body)
        elif ce is not None:
            raise DecodeError(_DECODE_ERROR, f"unknown content encoding {ce[:32]!r}")
        ct = _header(headers, "ct", _DECODE_ERROR)
        decoder = self._task_decoders.get(ct if ct is not None else "json")
        if decoder is None:
            raise DecodeError(_DECODE_ERROR, f"unsupported content type {(ct or '')[:32]!r}")
        try:
            message: TaskMessage = decoder.decode(body)
        except msgspec.DecodeError as e:
            if "`$.v`" in str(e):
                raise DecodeError(_DECODE_ERROR, f"unsupported message version ({e}); this "
                                  "worker reads version 1: upgrade the worker") from None
            raise DecodeError(_DECODE_ERROR, str(e)) from None
        except RecursionError:
            raise DecodeError(_DECODE_ERROR, "the message is nested too deeply") from None
        except UnicodeDecodeError as e:  # text in the body that is not UTF-8
            raise DecodeError(_DECODE_ERROR, f"the body holds text that is not UTF-8 ({e.reason})"
                              ) from None
        if tid is not None and message.id != tid:
            raise DecryptError("the decrypted message's id is not the id its headers name")
        return message

    def _seal(self, body: bytes, headers: dict[str, str], task_id: str) -> bytes:
        keyring = self._keyring
        assert keyring is not None
        ce = "zlib+aesgcm" if "ce" in headers else "aesgcm"
        sealed = keyring.seal(body, ct=self.format, ce=ce, tid=task_id)
        headers["ce"] = ce
        headers["ekid"] = keyring.current
        return sealed

    def _open(self, body: bytes, headers: Mapping[str, str], ce: str) -> tuple[str, bytes]:
        """The task id and plaintext of ``body`` (its signature, if signing
        is on, already checked)."""
        kid = _header(headers, "ekid", _BAD_ENCRYPTION)
        if kid is None:
            raise DecryptError("the message is encrypted but has no 'ekid' header")
        if self._keyring is None:
            tid, _ = task_id_of(body)
            raise DecryptError(
                f"the message is encrypted (key id {kid[:64]!r}) and this worker has no "
                "encryption keys: configure encryption_keys (TASKLOOM_ENCRYPTION_KEYS)",
                task_id=tid, authenticated=bool(self._keys))
        ct = _header(headers, "ct", _DECODE_ERROR) or ""
        return self._keyring.open(body, kid=kid, ct=ct, ce=ce, authenticated=bool(self._keys))

    def _verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        kid = _header(headers, "kid", _BAD_SIGNATURE)
        sig = _header(headers, "sig", _BAD_SIGNATURE)
        if kid is None or sig is None:
            raise DecodeError(_BAD_SIGNATURE, "the message is not signed")
        key = self._keys.get(kid) if len(kid) <= _MAX_KID_LEN else None
        if key is None:
            raise DecodeError(_BAD_SIGNATURE, f"unknown signing key id {kid[:_MAX_KID_LEN]!r}")
        if len(sig) != _SIG_LEN or not _HEX.issuperset(sig):
            raise DecodeError(_BAD_SIGNATURE, "the signature is not 64 lowercase hex digits")
        expected = hmac.new(key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig):
            raise DecodeError(_BAD_SIGNATURE, "the signature does not match the body")

    def _inflate(self, body: bytes) -> bytes:
        d = zlib.decompressobj()
        try:
            out = d.decompress(body, self.max_message_bytes * 4)
        except zlib.error as e:
            raise DecodeError(_DECODE_ERROR, f"bad zlib data: {e}") from None
        if d.unconsumed_tail:
            raise DecodeError(_TOO_LARGE, "the message inflates past 4x the size limit")
        return out
