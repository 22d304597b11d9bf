"""Payload encryption: AES-256-GCM with key ids and rotation (the
``encryption`` extra, ``pip install 'taskloom[encryption]'``).

A :class:`Keyring` holds every key a process may decrypt with (key id ->
32 bytes) and the one it encrypts with. Rotation: add the new key, make it the
current one on every producer and worker, keep the old one until no message
encrypted with it can still be in a queue or a dead-letter store, then remove it.
A message naming a key id that is not configured is dead-lettered
(``bad_encryption``), never run.

The sealed body is ``len(tid) (2 bytes) || tid || nonce || ciphertext || tag``:
the task id in clear (the broker's envelope already shows it), then a fresh
random 96-bit nonce per message (``os.urandom``). With random nonces one key
should not seal more than about 2**32 messages: rotate well before (NIST SP
800-38D, 8.3). The ``ekid`` header names the key.

The associated data binds the key id, the content type and encoding and the
task id: change a header or move a ciphertext under another task id and the
tag fails; the codec also checks the decrypted message's own id against it.
The task name and everything else (args, kwargs, follow-ups, results carried
to the next chain step as arguments) are inside the ciphertext. Because the
task id is part of the body, a signature (signing is applied after
encryption) vouches for it even when the key to read the rest is missing:
that is what lets a worker record a ``bad_encryption`` failure under that id
for its caller (see :class:`DecryptError`).

Stored results (:func:`runtime.results.base.encode_result`): the value and
the error message and traceback are sealed with :meth:`Keyring.seal_result`
under the current key, with associated data of their own scheme, the key id
and the task id (join values: join id and member index); a record names its
key id, and one whose key is not configured raises :class:`SealedResultError`.

``cryptography`` is imported only when a :class:`Keyring` is built, so the
core works without the extra.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from runtime.deadletters import DeadLetterReason
from runtime.errors import ConfigError, DecodeError, EncodeError, ResultError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["INSTALL_HINT", "DecryptError", "Keyring", "SealedResultError", "parse_keys"]

#: What to run when ``cryptography`` is missing.
INSTALL_HINT = "pip install 'taskloom[encryption]'"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
#: Longest task id (UTF-8 bytes) an encrypted body can name.
_MAX_TID = 0xFFFF
#: A key id: what the ``ekid`` header carries (and the env list can spell).
_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Prefix of the associated data: the scheme and its version.
_AAD_PREFIX = b"taskloom/aes-256-gcm/1"
_REASON = DeadLetterReason.BAD_ENCRYPTION
#: Prefix of the associated data of a stored result (or join value): another
#: domain than messages', so neither can pass for the other.
_RESULT_AAD_PREFIX = b"taskloom/result/aes-256-gcm/1"


class DecryptError(DecodeError):
    """An encrypted message that cannot be read (reason ``bad_encryption``).

    ``task_id`` is the id the message claims; ``authenticated`` says whether
    something the worker trusts vouches for it (a verified signature), so that
    a failure may be recorded under that id for its caller."""

    def __init__(self, detail: str, *, task_id: str = "", authenticated: bool = False) -> None:
        super().__init__(_REASON, detail)
        self.task_id = task_id
        self.authenticated = authenticated


class SealedResultError(DecodeError, ResultError):
    """A stored result (or join value) that cannot be decrypted: its key id is
    not configured here, or it does not authenticate (tampered, or moved
    under another task id). ``task_id`` and ``key_id`` name the record.

    A ``ResultError`` for callers; a ``DecodeError`` (reason ``bad_encryption``)
    so that a worker meeting one does not retry it as a store outage: the
    delivery is dead-lettered and the worker goes on."""

    def __init__(self, task_id: str, key_id: str, detail: str) -> None:
        self.task_id = task_id
        self.key_id = key_id
        DecodeError.__init__(self, _REASON, detail)


def _aesgcm() -> type[AESGCM]:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:
        raise ConfigError(
            f"payload encryption needs the 'cryptography' package ({e}): {INSTALL_HINT}"
        ) from None
    return AESGCM


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def _check_kid(kid: object, where: str) -> str:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise ConfigError(f"{where}: key id {str(kid)[:70]!r} is not 1-64 characters of "
                          "A-Z a-z 0-9 . _ -; rename the key")
    return kid


def _aad_head(kid: str, ct: str, ce: str) -> bytes:
    """The associated data up to the task id framing (which follows it)."""
    return b"\0".join((_AAD_PREFIX, kid.encode(), ct.encode(), ce.encode(), b""))


class Keyring:
    """Seals and opens message bodies; one per codec, reused.

    ``keys`` maps key id -> 32-byte key; ``current`` is the key id that
    encrypts (optional when there is one key). Raises ``ConfigError`` naming
    the key id for a bad key, or saying what to install without the extra."""

    __slots__ = ("_aad_heads", "_ciphers", "_invalid_tag", "_nonce", "current")

    def __init__(self, keys: Mapping[str, bytes], current: str | None = None, *,
                 nonce: Callable[[int], bytes] = os.urandom) -> None:
        if not keys:
            raise ConfigError("encryption_keys is empty: give at least one key id and "
                              "32-byte key, or leave encryption off")
        for kid, key in keys.items():
            _check_kid(kid, "encryption_keys")
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
                size = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else \
                    f"a {type(key).__name__}"
                raise ConfigError(f"encryption key {kid!r} is {size}; AES-256-GCM needs "
                                  f"exactly {KEY_BYTES} bytes (e.g. os.urandom(32))")
        if current is None:
            if len(keys) > 1:
                raise ConfigError(f"encryption_key_id is needed to pick which of "
                                  f"{sorted(keys)} encrypts")
            current = next(iter(keys))
        if current not in keys:
            raise ConfigError(f"encryption_key_id {current!r} is not among the encryption "
                              f"keys {sorted(keys)}")
        cipher = _aesgcm()
        self._ciphers = {kid: cipher(bytes(key)) for kid, key in keys.items()}
        self.current = current
        self._nonce = nonce
        self._invalid_tag: type[Exception] = _invalid_tag()
        #: (key id, ct, ce) -> associated data head; a few entries (key ids known)
        self._aad_heads: dict[tuple[str, str, str], bytes] = {}

    def _aad(self, kid: str, ct: str, ce: str, framing: bytes) -> bytes:
        key = (kid, ct, ce)
        head = self._aad_heads.get(key)
        if head is None:
            head = _aad_head(kid, ct, ce)
            if len(self._aad_heads) < 64:  # ct/ce come from headers: bound the cache
                self._aad_heads[key] = head
        return head + framing

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._ciphers)

    def seal(self, body: bytes, *, ct: str, ce: str, tid: str) -> bytes:
        """``body`` encrypted with the current key, bound to ``tid`` and the
        headers: ``len(tid) (2 bytes) || tid || nonce || ciphertext || tag``."""
        framing = _framing(tid)
        nonce = self._nonce(NONCE_BYTES)
        aad = self._aad(self.current, ct, ce, framing)
        return framing + nonce + self._ciphers[self.current].encrypt(nonce, body, aad)

    def open(self, body: bytes, *, kid: str, ct: str, ce: str,
             authenticated: bool) -> tuple[str, bytes]:
        """The task id and plaintext of ``body``; raises :class:`DecryptError`
        for an unknown key id, a malformed body or a failed tag (tampered,
        wrong key, headers changed)."""
        tid, framing = task_id_of(body)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecryptError(
                f"encryption key id {kid[:64]!r} is not configured on this worker (it has "
                f"{sorted(self._ciphers)}); add the key back to encryption_keys to read it",
                task_id=tid, authenticated=authenticated)
        start = len(framing) + NONCE_BYTES
        if len(body) < start + TAG_BYTES:
            raise DecryptError(f"the encrypted body of task {tid[:64]!r} is too short to hold a "
                               "nonce and a tag")
        try:
            plain = cipher.decrypt(body[len(framing):start], body[start:],
                                   self._aad(kid, ct, ce, framing))
        except self._invalid_tag:
            raise DecryptError(
                f"the message of task {tid[:64]!r} does not authenticate under encryption key "
                f"{kid!r}: tampered, encrypted with another key under that id, or its headers "
                "were changed") from None
        return tid, plain


    # -- stored results ------------------------------------------------------

    def seal_result(self, plain: bytes, name: str) -> tuple[str, bytes]:
        """The current key id and ``nonce || ciphertext || tag`` of ``plain``,
        bound to ``name`` (the task id, or join id and member)."""
        kid = self.current
        nonce = self._nonce(NONCE_BYTES)
        return kid, nonce + self._ciphers[kid].encrypt(nonce, plain, _result_aad(kid, name))

    def open_result(self, box: bytes, kid: str, name: str, task_id: str) -> bytes:
        """The plaintext of a :meth:`seal_result` box; :class:`SealedResultError`
        naming ``task_id`` and ``kid`` if the key is missing or the tag fails."""
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SealedResultError(task_id, kid, missing_key(task_id, kid, sorted(self._ciphers)))
        try:
            return cipher.decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], _result_aad(kid, name))
        except (self._invalid_tag, ValueError):
            raise SealedResultError(
                task_id, kid, f"the stored result of task {task_id[:64]!r} does not "
                f"authenticate under encryption key {kid[:64]!r}: tampered, moved from another "
                "task id, or encrypted with another key under that id") from None


def missing_key(task_id: str, kid: str, have: list[str]) -> str:
    """What to say of a stored result whose key ``kid`` is not configured."""
    where = f"only {have}" if have else "no encryption_keys"
    return (f"the stored result of task {task_id[:64]!r} is encrypted with key id "
            f"{kid[:64]!r}, which this runtime does not have (it has {where}); add that key to "
            "encryption_keys (TASKLOOM_ENCRYPTION_KEYS) to read it")


def _result_aad(kid: str, name: str) -> bytes:
    return b"\0".join((_RESULT_AAD_PREFIX, kid.encode(), name.encode()))


def _framing(tid: str) -> bytes:
    raw = tid.encode()
    if len(raw) > _MAX_TID:
        raise EncodeError(f"task id of {len(raw)} bytes is too long to encrypt (limit {_MAX_TID})")
    return len(raw).to_bytes(2, "big") + raw


def task_id_of(body: bytes) -> tuple[str, bytes]:
    """The task id an encrypted ``body`` names, and its framing bytes;
    DecryptError when the body is too short or the id is not UTF-8."""
    size = int.from_bytes(body[:2], "big")
    if len(body) < 2 + size:
        raise DecryptError("the encrypted body is too short to name its task id")
    framing = body[:2 + size]
    try:
        return framing[2:].decode(), framing
    except UnicodeDecodeError:
        raise DecryptError("the task id of the encrypted body is not UTF-8") from None


def decode_key(kid: str, text: str, where: str) -> bytes:
    """A base64 (standard or URL-safe) 32-byte key; ConfigError naming ``kid``."""
    raw = text.strip().encode()
    try:
        key = base64.b64decode(raw.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: encryption key {kid!r} is not valid base64; encode 32 "
                          "random bytes, e.g. python -c \"import base64,os; "
                          "print(base64.b64encode(os.urandom(32)).decode())\"") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: encryption key {kid!r} decodes to {len(key)} bytes; "
                          f"AES-256-GCM needs exactly {KEY_BYTES}")
    return key


def parse_keys(text: str, where: str) -> dict[str, bytes]:
    """``id1:base64key,id2:base64key`` -> {id: key}; ConfigError naming the
    key id (never the key) for anything wrong."""
    keys: dict[str, bytes] = {}
    for n, item in enumerate(text.split(","), 1):
        if not item.strip():
            continue
        kid, sep, encoded = item.partition(":")
        kid = kid.strip()
        if not sep:
            raise ConfigError(f"{where}: entry {n} has no ':'; write id1:base64key,id2:base64key")
        _check_kid(kid, where)
        if kid in keys:
            raise ConfigError(f"{where}: encryption key id {kid!r} is given twice")
        keys[kid] = decode_key(kid, encoded, where)
    if not keys:
        raise ConfigError(f"{where}: no keys; write id1:base64key,id2:base64key")
    return keys
