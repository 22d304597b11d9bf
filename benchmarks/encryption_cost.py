"""Encryption benchmark: encode + decode µs per task message, with and without
AES-256-GCM payload encryption (and with signing and compression beside it).

    .venv/bin/python -m benchmarks.encryption_cost                  # 20,000 messages
    .venv/bin/python -m benchmarks.encryption_cost --messages 2000 --repeats 3

Each row times ``codec.encode(message)`` then ``codec.decode(body, headers)``
for ``messages`` distinct messages (the best of ``repeats`` rounds, the setups
interleaved in each, to keep other load on the machine out of the figure), for a small message (two
arguments, as most tasks send) and a 4 KiB one. Only the codec is timed: no
broker, no worker. "overhead" is the row's cost minus the plain row's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import IO, Any

from runtime.codec import Codec
from runtime.messages import TaskMessage

KEYS = {"k1": os.urandom(32), "k2": os.urandom(32)}
SIGNING = {"s1": os.urandom(32)}

#: name -> Codec keyword arguments
SETUPS: dict[str, dict[str, Any]] = {
    "plain": {},
    "encrypted": {"encryption_keys": KEYS, "encryption_key_id": "k2"},
    "signed": {"signing_keys": SIGNING},
    "signed+encrypted": {"signing_keys": SIGNING, "encryption_keys": KEYS,
                         "encryption_key_id": "k2"},
    "zlib>1KiB": {"compress_over": 1024},
    "zlib>1KiB+encrypted": {"compress_over": 1024, "encryption_keys": KEYS,
                            "encryption_key_id": "k2"},
}


def _messages(n: int, payload: int) -> list[TaskMessage]:
    return [TaskMessage(id=uuid.uuid4().hex, task="bench.task",
                        args=[i, "x" * payload], kwargs={"flag": True}) for i in range(n)]


def _once(codec: Codec, messages: Sequence[TaskMessage]) -> float:
    """µs per message of encode + decode, over ``messages``."""
    encode, decode = codec.encode, codec.decode
    start = time.perf_counter()
    for m in messages:
        body, headers = encode(m)
        decode(body, headers)
    return (time.perf_counter() - start) / len(messages) * 1e6


def _best(codecs: dict[str, Codec], messages: Sequence[TaskMessage], repeats: int
          ) -> dict[str, float]:
    """The best of ``repeats`` runs per codec, the codecs interleaved in each
    round so that load from elsewhere falls on all of them alike."""
    best = dict.fromkeys(codecs, float("inf"))
    for _ in range(repeats):
        for name, codec in codecs.items():
            best[name] = min(best[name], _once(codec, messages))
    return best


def main(argv: Sequence[str] | None = None, out: IO[str] = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encryption_cost")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    out.write(f"encode+decode per message, best of {args.repeats} x {args.messages} messages\n")
    out.write(f"{'payload':>8} {'format':>8} {'setup':>20} {'body B':>7} {'us/msg':>8} "
              f"{'overhead':>9}\n")
    for payload in (16, 4096):
        messages = _messages(args.messages, payload)
        for fmt in ("json", "msgpack"):
            codecs = {name: Codec(fmt, **kw) for name, kw in SETUPS.items()}
            best = _best(codecs, messages, args.repeats)
            plain = best["plain"]
            for name, codec in codecs.items():
                us = best[name]
                size = len(codec.encode(messages[0])[0])
                extra = f"{us - plain:+8.2f}" if name != "plain" else f"{'':>8}"
                out.write(f"{payload:>8} {fmt:>8} {name:>20} {size:>7} {us:>8.2f} {extra:>9}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
