"""The app the ledger rows H1 and H2 run in their worker processes
(``tests.chaos.rows.app:rt``).

One no-op task, ``rows.noop(key, payload)``: it writes START and END to the
ledger (the chaos soak's writer, ``tests.chaos.app.ledger``) under ``key`` and
ignores ``payload`` (empty for H1, ~200 bytes for H2). Built from the same
environment variables as ``tests/chaos/app.py`` (``tests.faults.harness.worker_env``).
"""

from __future__ import annotations

import os
from typing import Any

from runtime import Runtime
from tests.chaos.app import TASK_TIMEOUT_S, ledger
from tests.faults.ledger import new_exec_id

__all__ = ["NOOP", "build"]

NOOP = "rows.noop"


def build(broker: str, results: str | None = None, namespace: str = "") -> Runtime:
    rt = Runtime(broker=broker, results=results, namespace=namespace)

    # both arguments required: an all-positional call skips inspect.bind (the hot path)
    @rt.task(name=NOOP, timeout=TASK_TIMEOUT_S)
    async def noop(key: str, payload: str) -> None:
        x = new_exec_id()
        ledger().write("START", id=key, x=x)
        ledger().write("END", id=key, x=x, ok=True)

    return rt


def __getattr__(name: str) -> Any:
    if name == "rt":
        rt = build(os.environ["TASKLOOM_FAULT_BROKER"],
                   os.environ.get("TASKLOOM_FAULT_RESULTS") or None,
                   os.environ["TASKLOOM_FAULT_NS"])
        globals()["rt"] = rt
        return rt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
