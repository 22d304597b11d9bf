"""Logging set-up: structlog, filtered by level before any work is done."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging", "ensure_logging"]


def configure_logging(level: str | int = "INFO", *, json: bool = False) -> None:
    """Configure structlog for taskloom's processes (the CLI calls this).

    Calls below ``level`` cost one method lookup: the bound logger is built
    with the level filter compiled in.
    """
    if isinstance(level, str):
        resolved = logging.getLevelNamesMapping().get(level.upper())
        if resolved is None:
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = resolved
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def ensure_logging() -> None:
    """Give structlog a sane default (INFO, to stderr) unless the application
    configured it already."""
    if not structlog.is_configured():
        configure_logging("INFO")
