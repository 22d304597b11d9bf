"""The wire-level helpers of the Redis result store: its Lua scripts, commands
packed in RESP and sent in one write, and the decoding of stored records."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions as rex

from brokers.base import is_connection_failure
from brokers.redis.scripts import exchange
from runtime.errors import DecodeError, EncodeError, ResultError, ResultStoreUnavailable
from runtime.messages import Result
from runtime.results.base import decode_record
from runtime.results.notify import CONNECTION_ERRORS

if TYPE_CHECKING:
    from runtime.encryption import Keyring

__all__ = ["Script", "decode_stored", "execute", "glob_escape", "mapped", "pack", "pairs",
           "roundtrip"]

#: Redis replies that mean "not now" rather than "never": the caller may retry.
_TRANSIENT = ("LOADING", "READONLY", "OOM", "MISCONF", "BUSY", "MASTERDOWN", "TRYAGAIN",
              "CLUSTERDOWN")


class Script:
    """A Lua script of ``lua/`` (beside this module), read once at import."""

    __slots__ = ("sha", "source")

    def __init__(self, name: str) -> None:
        self.source = (resources.files(__package__) / "lua" / name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


def decode_stored(task_id: str, raw: bytes, keyring: Keyring | None) -> Result:
    """A stored record (mark byte + msgpack, or + a sealed record) as a ``Result``."""
    return decode_record(task_id, memoryview(raw)[1:], keyring)


async def execute(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def pack(args: Sequence[bytes]) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


async def roundtrip(client: aioredis.Redis, commands: list[bytes]) -> list[Any]:
    """Send packed commands in one write; their replies (errors in place), under
    one timeout for the whole exchange (:func:`brokers.redis.scripts.exchange`)."""
    return await exchange(client, commands, len(commands))


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def pairs(reply: Any) -> Iterator[tuple[str, float]]:
    """ZRANGE ... WITHSCORES as (member, score), whether RESP2 (flat) or RESP3 (pairs)."""
    if reply and isinstance(reply[0], list | tuple):
        for member, score in reply:
            yield member.decode(), float(score)
    else:
        for i in range(0, len(reply or ()), 2):
            yield reply[i].decode(), float(reply[i + 1])


@contextmanager
def mapped(where: str, doing: str) -> Iterator[None]:
    """Map redis-py errors to taskloom errors at the boundary: every connection
    failure (as :func:`brokers.base.is_connection_failure` sees it: resets,
    timeouts, a write on a transport a reset closed) is ``ResultStoreUnavailable``."""
    try:
        yield
    except (ResultError, DecodeError, EncodeError):
        raise
    except rex.ResponseError as e:
        if str(e).startswith(_TRANSIENT):
            raise ResultStoreUnavailable(
                f"could not {doing}: the result store at {where} refused for now "
                f"({e}); the call can be retried once Redis recovers") from e
        raise ResultError(f"could not {doing}: Redis at {where} refused: {e}") from e
    except Exception as e:
        if is_connection_failure(e, CONNECTION_ERRORS):
            raise ResultStoreUnavailable(
                f"could not {doing}: the result store at {where} is unreachable "
                f"({type(e).__name__}: {e}); check that Redis is running; "
                "the call can be retried") from e
        if isinstance(e, rex.RedisError):
            raise ResultError(f"could not {doing} in the result store at {where}: "
                              f"{type(e).__name__}: {e}") from e
        raise
