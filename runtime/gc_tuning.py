"""The cyclic garbage collector, tuned once a worker is up.

A worker allocates many short-lived objects per task (coroutines, cancel
scopes, messages, results), so the collector's young generation fills every
few tasks, and each full pass scans every object alive: after start-up, mostly
modules, classes and functions that live as long as the process. :func:`tune`
(called once per process, when the first worker starts consuming) collects
once, moves what is alive then out of the collector's sight (``gc.freeze()``:
never scanned again, never collected) and raises the young generation's
threshold, so collections run about ten times less often. Reference counting
still frees every acyclic object at once; only cyclic garbage waits longer.

It changes the whole process (a worker embedded in an application tunes the
application's collector too): ``TASKLOOM_WORKER_GC=default`` in the
environment, or ``Worker(tune_gc=False)``, leaves the collector alone.
"""

from __future__ import annotations

import gc
import os

import structlog

__all__ = ["YOUNG_THRESHOLD", "tune"]

log = structlog.get_logger("taskloom.worker")

#: The young generation's threshold once tuned (CPython's default: 700).
YOUNG_THRESHOLD = 10_000

#: Whether this process's collector is tuned already.
_TUNED: set[bool] = set()


def tune() -> bool:
    """Tune the collector for a worker, once per process; whether it did now."""
    if _TUNED or os.environ.get("TASKLOOM_WORKER_GC", "").strip().lower() == "default":
        return False
    _TUNED.add(True)
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young:  # 0: the collector is disabled; leave it so
        gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
    log.debug("garbage collector tuned for a worker", frozen=gc.get_freeze_count(),
              threshold=gc.get_threshold())
    return True
