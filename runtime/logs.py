"""Logging set-up: structlog, filtered by level before any work is done.

Importing taskloom configures nothing: the ``taskloom`` command (or the
application, with :func:`configure_logging`) does.

Tracebacks are rendered plain and bounded (the last frames of each
exception, a bounded total length) and **without local variables**: locals
hold signing keys, signatures, message bodies, arguments and results, and
rendering them (Rich, or structlog's dict tracebacks) can block the event loop
for seconds. ``configure_logging(show_locals=True)`` (the CLI's
``--log-locals``, or ``TASKLOOM_LOG_LOCALS=1``) turns them on for debugging.
"""

from __future__ import annotations

import logging
import sys
import traceback
from types import TracebackType
from typing import Any

import structlog

__all__ = ["LOG_LOCALS_ENV", "MAX_TRACEBACK_CHARS", "MAX_TRACEBACK_FRAMES", "configure_logging",
           "ensure_logging", "format_exception"]

#: The environment variable the CLI reads to log tracebacks with local variables.
LOG_LOCALS_ENV = "TASKLOOM_LOG_LOCALS"
#: Frames kept of each exception in a chain (the innermost ones).
MAX_TRACEBACK_FRAMES = 30
#: Characters kept of a rendered traceback (its start and its end).
MAX_TRACEBACK_CHARS = 8192
#: Each locals value is cut to this many characters when locals are shown.
_MAX_LOCAL_REPR = 200

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info(value: Any) -> _ExcInfo | None:
    """structlog's ``exc_info`` forms (True, an exception, a tuple) -> a tuple."""
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and value[1] is not None:
        return value
    if value is True or (value and not isinstance(value, tuple)):
        current = sys.exc_info()
        if current[1] is not None:
            return current
    return None


def format_exception(exc: BaseException | _ExcInfo, *, show_locals: bool = False,
                     max_frames: int = MAX_TRACEBACK_FRAMES,
                     max_chars: int = MAX_TRACEBACK_CHARS) -> str:
    """A plain traceback of ``exc``: the last ``max_frames`` frames of each
    exception of the chain, at most ``max_chars`` characters, and no local
    variables unless ``show_locals`` (each then cut to a short repr)."""
    info = _exc_info(exc)
    if info is None:
        return ""
    te = traceback.TracebackException(
        info[0], info[1], info[2], limit=-max_frames, capture_locals=show_locals,
        max_group_width=5, max_group_depth=3)
    if show_locals:
        _shorten_locals(te, set())
    text = "".join(te.format()).rstrip("\n")
    if len(text) > max_chars:
        head = max_chars // 4
        tail = max_chars - head
        cut = len(text) - head - tail
        text = f"{text[:head]}\n... ({cut} characters of traceback cut) ...\n{text[-tail:]}"
    return text


def _shorten_locals(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    for frame in te.stack:
        if frame.locals:
            frame.locals = {k: v if len(v) <= _MAX_LOCAL_REPR else v[:_MAX_LOCAL_REPR] + "..."
                            for k, v in frame.locals.items()}
    for nested in (te.__cause__, te.__context__, *(te.exceptions or ())):
        if nested is not None:
            _shorten_locals(nested, seen)


class _RenderException:
    """A processor: ``exc_info`` -> a plain, bounded ``exception`` string that
    both renderers print as it is (never Rich, never locals by default)."""

    def __init__(self, show_locals: bool) -> None:
        self.show_locals = show_locals

    def __call__(self, logger: Any, method: str,
                 event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
        value = event_dict.pop("exc_info", None)
        if value:
            info = _exc_info(value)
            if info is not None:
                event_dict["exception"] = format_exception(info, show_locals=self.show_locals)
        return event_dict


def _plain_traceback(sio: Any, exc_info: Any) -> None:
    """The console renderer's fallback formatter (exc_info reaching it unrendered)."""
    sio.write("\n" + format_exception(exc_info))


def configure_logging(level: str | int = "INFO", *, json: bool = False,
                      show_locals: bool = False) -> None:
    """Configure structlog for taskloom's processes (the CLI calls this).

    Calls below ``level`` cost one method lookup: the bound logger is built
    with the level filter compiled in. Tracebacks are plain and bounded, and
    show local variables (which may hold keys, message bodies, arguments and
    results) only with ``show_locals=True``, a debugging aid.
    """
    if isinstance(level, str):
        resolved = logging.getLevelNamesMapping().get(level.upper())
        if resolved is None:
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = resolved
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                           exception_formatter=_plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _RenderException(show_locals),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def ensure_logging() -> None:
    """Give structlog a sane default (INFO, to stderr, plain tracebacks without
    locals) unless the application configured it already. Called when a
    Runtime is built, never at import."""
    if not structlog.is_configured():
        configure_logging("INFO")
