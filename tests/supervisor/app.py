"""The application of the supervisor tests.

Configured by environment variables (worker processes import it fresh):

- ``TASKLOOM_TEST_BROKER``: broker URL (default ``memory://``)
- ``TASKLOOM_TEST_RESULTS``: result store URL (default ``memory://``)
- ``TASKLOOM_TEST_NS``: namespace
- ``TASKLOOM_TEST_LEDGER``: the ledger file; task bodies append one JSON line per
  event with ``os.write`` on an ``O_APPEND`` descriptor, so what ran is checked
  outside the system under test.
"""

from __future__ import annotations

import json
import os
import signal
import time

import anyio

from runtime import Runtime

rt = Runtime(
    broker=os.environ.get("TASKLOOM_TEST_BROKER", "memory://"),
    results=os.environ.get("TASKLOOM_TEST_RESULTS", "memory://"),
    namespace=os.environ.get("TASKLOOM_TEST_NS", ""),
)


def ledger(kind: str, **fields: object) -> None:
    path = os.environ.get("TASKLOOM_TEST_LEDGER")
    if not path:
        return
    record = {"k": kind, "pid": os.getpid(), "t": time.monotonic(), **fields}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, json.dumps(record).encode() + b"\n")
    finally:
        os.close(fd)


@rt.task(name="sv.work")
async def work(key: str, sleep_s: float = 0.0) -> str:
    ledger("START", key=key)
    await anyio.sleep(sleep_s)
    ledger("END", key=key)
    return key


@rt.task(name="sv.suicide")
async def suicide(key: str) -> None:
    """Kills its own worker process, every time."""
    ledger("START", key=key)
    os.kill(os.getpid(), signal.SIGKILL)


@rt.task(name="sv.block")
async def block(seconds: float) -> str:
    """Blocks the event loop (what the lag monitor is for)."""
    time.sleep(seconds)
    return "blocked"


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@rt.task(name="sv.crunch", kind="process")
def crunch(n: int) -> int:
    """Pure-Python CPU work in a pool process."""
    ledger("CRUNCH", n=n)
    return _fib(n)


@rt.task(name="sv.spin", kind="process", timeout=0.5)
def spin(key: str) -> None:
    """Never ends: past its time limit the pool kills its process."""
    ledger("SPIN", key=key)
    while True:
        pass


@rt.task(name="sv.pool_exit", kind="process")
def pool_exit(code: int) -> None:
    """Ends its pool process."""
    os._exit(code)


@rt.task(name="sv.fails", kind="process", retry_on=(ValueError,))
def fails(x: int) -> int:
    raise ValueError(f"bad value {x}")


@rt.task(name="sv.echo", kind="process")
def echo(items: list[int], scale: float = 1.0) -> dict[str, object]:
    print("a print in a pool process must not corrupt its frames")
    return {"sum": sum(items) * scale, "pid": os.getpid()}
