"""Task options: the one place their values are checked.

A task's defaults (``@rt.task(priority=, timeout=, expires=, retries=)``), a
signature's call options (``task.s(...).set(...)``) and the overrides of
``enqueue(...)`` all go through :func:`check_options`, so the three agree on
what a priority, a time limit, an expiry, a countdown and a retry count may
be. The bounds are the wire format's (:mod:`runtime.messages`), so a value
accepted here never makes a message a worker refuses to decode.

The caller picks the error: ``ConfigError`` for a task's definition,
``EnqueueError`` for a call (nothing is sent).
"""

from __future__ import annotations

import math

from runtime.errors import TaskloomError
from runtime.messages import MAX_COUNT, MAX_PRIORITY, MAX_TIMEOUT_S

__all__ = ["check_options"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_options(
    where: str,
    error: type[TaskloomError],
    *,
    priority: object = None,
    countdown: object = None,
    expires: object = None,
    timeout: object = None,
    retries: object = None,
    soft_timeout: object = None,
    result_ttl: object = None,
    failure_ttl: object = None,
) -> None:
    """Raise ``error`` (saying what is wrong, where, and what to give
    instead) if an option given (not None) is out of its range:

    - ``priority``: an int within 0..9;
    - ``countdown``: finite seconds, 0 or more;
    - ``expires``, ``timeout``: finite seconds, more than 0 (at most ~31
      years for ``timeout``); leave them out for none;
    - ``retries``: an int, 0 or more;
    - ``soft_timeout``, ``result_ttl``, ``failure_ttl``: finite seconds, more than 0.
    """
    if priority is not None and not (_is_int(priority) and 0 <= priority <= MAX_PRIORITY):  # type: ignore[operator]
        raise error(f"{where}: priority must be an int within 0..{MAX_PRIORITY}, not "
                    f"{priority!r}; give one in that range (the broker serves higher first)")
    if countdown is not None:
        if not _is_seconds(countdown):
            raise error(f"{where}: countdown must be a finite number of seconds, not "
                        f"{countdown!r}; give the delay in seconds (or eta=, a datetime)")
        if countdown < 0:  # type: ignore[operator]
            raise error(f"{where}: countdown must not be negative, got {countdown}; give 0 "
                        "to run it now")
    for field, value in (("expires", expires), ("timeout", timeout),
                         ("soft_timeout", soft_timeout), ("result_ttl", result_ttl),
                         ("failure_ttl", failure_ttl)):
        if value is None:
            continue
        if not _is_seconds(value) or value <= 0:  # type: ignore[operator]
            raise error(f"{where}: {field} must be a positive, finite number of seconds, not "
                        f"{value!r}; leave it out for none")
    if timeout is not None and timeout > MAX_TIMEOUT_S:  # type: ignore[operator]
        raise error(f"{where}: timeout of {timeout}s is over the longest time limit of "
                    f"{MAX_TIMEOUT_S:g}s; give a shorter one or leave it out for none")
    if retries is not None and not (_is_int(retries) and 0 <= retries <= MAX_COUNT):  # type: ignore[operator]
        raise error(f"{where}: retries must be an int within 0..{MAX_COUNT}, not {retries!r}; "
                    "give 0 for no retries")
