"""API keys: made by ``taskloom keys add``, kept hashed in a TOML key file.

A key is ``tlk_`` and 43 url-safe characters (256 random bits), shown once
when it is made. The file keeps, per key name, its scope, a random salt and
``sha256(salt + key)``: a key of that much entropy needs no slow hash, and
checking one costs microseconds per request. Comparisons are constant-time.
The file looks like::

    [keys.ops]
    scope = "admin"
    salt = "5f0c…"
    sha256 = "9a1e…"
    created = "2026-11-28T05:00:00+00:00"
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec

from runtime.errors import ConfigError

__all__ = ["ApiKey", "KeyRing", "Scope", "add_key", "load_keys", "new_key"]

Scope = Literal["admin", "read"]
SCOPES: tuple[Scope, ...] = ("admin", "read")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PREFIX = "tlk_"


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    scope: Scope
    salt: str
    sha256: str
    created: str = ""


def _digest(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def new_key(name: str, scope: str) -> tuple[str, ApiKey]:
    """A fresh secret and its stored form (the secret is never stored)."""
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r} is not valid; use 1 to 64 letters, digits, '_', '.' "
                          "or '-'")
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    secret = _PREFIX + secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return secret, ApiKey(name=name, scope=scope, salt=salt, sha256=_digest(salt, secret),
                          created=created)


class KeyRing:
    """The keys a dashboard accepts; ``check`` finds the one a bearer token is."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = {k.name: k for k in keys}

    def __len__(self) -> int:
        return len(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or None; every stored key is compared (constant time)."""
        found = None
        for key in self.keys.values():
            if hmac.compare_digest(_digest(key.salt, token), key.sha256):
                found = key
        return found


def _load_table(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"the key file {str(path)!r} does not exist; make a key with "
                          f"`taskloom keys add NAME --scope admin --file {path}`") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"the key file {str(path)!r} is not valid TOML ({e}); remake it with "
                          "`taskloom keys add`") from None


def load_keys(path: str | os.PathLike[str]) -> KeyRing:
    """The keys of a key file; ConfigError naming the problem if it is unusable."""
    p = Path(path)
    table = _load_table(p)
    raw = table.get("keys", {})
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{str(p)!r}: [keys] must be a table of keys; remake it with "
                          "`taskloom keys add`")
    keys = []
    for name, fields in raw.items():
        try:
            keys.append(msgspec.convert({**fields, "name": name}, ApiKey))
        except (msgspec.ValidationError, TypeError) as e:
            raise ConfigError(f"{str(p)!r}: key {name!r} is not valid ({e}); remove it and add it "
                              "again with `taskloom keys add`") from None
    return KeyRing(keys)


def _toml(key: ApiKey) -> str:
    return (f'\n[keys."{key.name}"]\nscope = "{key.scope}"\nsalt = "{key.salt}"\n'
            f'sha256 = "{key.sha256}"\ncreated = "{key.created}"\n')


def add_key(path: str | os.PathLike[str], name: str, scope: str) -> str:
    """Add (or replace) key ``name`` in the key file (made 0600 if new); returns the secret."""
    p = Path(path)
    ring = load_keys(p) if p.exists() else KeyRing()
    secret, key = new_key(name, scope)
    ring.keys[name] = key
    text = "# taskloom API keys: hashes only (`taskloom keys add` prints each key once)\n"
    text += "".join(_toml(k) for k in ring.keys.values())
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, p)
    return secret
