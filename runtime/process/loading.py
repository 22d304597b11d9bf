"""What every taskloom process needs before it serves: loading the
application (``package.module:attr``) and dying with its parent.

Both the worker processes (:mod:`runtime.process.serve`) and the process
pool's children (:mod:`runtime.process.pool_child`) use these, so they sit in
a module of their own that imports neither (no import cycle).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
from typing import Any

import structlog

from runtime.app import Runtime
from runtime.errors import ConfigError

__all__ = ["die_with_parent", "load_runtime"]

log = structlog.get_logger("taskloom.serve")

_PR_SET_PDEATHSIG = 1


def load_runtime(spec: str) -> Runtime:
    """``package.module:attr`` -> the Runtime it names; ConfigError if it cannot."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected the application as module:attribute (e.g. app.tasks:rt), "
                          f"got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r}: {e} (run from the directory that "
                          "holds the package, or install it)") from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Runtime):
        raise ConfigError(f"{spec} is a {type(obj).__qualname__}, not a taskloom Runtime")
    return obj


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies
    (``PR_SET_PDEATHSIG``); whether that is in place. If ``parent_pid`` is
    given and is no longer the parent, the parent died already: ``sig`` now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning("could not set PR_SET_PDEATHSIG; relying on the parent pipe alone")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return ok
