"""The application of the cross-process cancel tests (``test_cancel_cli.py``).

A ``taskloom worker tests.task_context.cli_cancel_app:rt`` subprocess builds it
from CANCEL_BROKER, CANCEL_RESULTS (empty: the broker's own Redis) and
CANCEL_NS; the tasks append lines to the ledger file named by CANCEL_LEDGER,
outside the system under test. The test process calls :func:`build` with the
same settings to get a client that knows the same task names.
"""

from __future__ import annotations

import os
import time

import anyio

from runtime import Runtime

LONG = "cli_cancel.long"
NOTE = "cli_cancel.note"


def _append(ledger: str, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def build(broker: str, results: str | None, namespace: str, ledger: str) -> Runtime:
    rt = Runtime(broker=broker, results=results or None, namespace=namespace)

    @rt.task(name=LONG)
    async def long(tag: str) -> str:
        _append(ledger, f"started {tag} {time.time():.6f}")
        try:
            await anyio.sleep(60)
            _append(ledger, f"after {tag} {time.time():.6f}")  # the cancel must prevent this
        except BaseException as e:  # record when (and how) the body stopped, then go on
            _append(ledger, f"stopped {tag} {time.time():.6f} {type(e).__name__}")
            raise
        return tag

    @rt.task(name=NOTE)
    async def note(tag: str) -> str:
        _append(ledger, f"note {tag} {time.time():.6f}")
        return tag

    return rt


if "CANCEL_NS" in os.environ:
    rt = build(os.environ["CANCEL_BROKER"], os.environ.get("CANCEL_RESULTS"),
               os.environ["CANCEL_NS"], os.environ["CANCEL_LEDGER"])
