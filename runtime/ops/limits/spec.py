"""What a task's flow-control options mean: rates, the ``Limits`` struct, keys.

Pure (no I/O, imports only msgspec and the error tree), so the registry can hold
a ``Limits`` on each ``Task`` (see the wiring in ``runtime/ops/limits/__init__``).

A rate is ``"<count>/<unit>"`` with unit ``s``, ``m`` or ``h`` (``"20/s"``,
``"5/m"``, ``"100/h"``), optionally ``"20/s:burst=4"``. It is enforced as a
GCRA (generic cell rate algorithm): starts are spaced by the emission interval
``period / count``, and up to ``burst`` may start back to back after a quiet
spell. Any window of one period therefore holds at most ``count + burst``
starts (:attr:`Rate.window_max`; ``count + burst - 1`` for a half-open window
by Redis's clock, one more once the callers' clocks add their jitter). The
default burst is a tenth of the count (at least 1): it absorbs the lateness of
tasks coming back from the broker's delay store, which would otherwise be lost
for good and pull the rate below the limit.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import msgspec

from runtime.errors import ConfigError

__all__ = ["KeySpec", "Limits", "Rate", "key_value", "parse_rate"]

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*(?::\s*burst\s*=\s*(\d+)\s*)?$")

#: A key: the name of one of the task's arguments, or a callable on the arguments.
KeySpec = str | Callable[..., Any] | None


class Rate(msgspec.Struct, frozen=True, kw_only=True):
    """``count`` starts per ``period_s`` seconds, ``burst`` of them back to back."""

    count: int
    period_s: float
    burst: int

    @property
    def interval_ms(self) -> float:
        """The emission interval: the spacing of starts at the steady rate."""
        return self.period_s * 1000.0 / self.count

    @property
    def window_max(self) -> int:
        """The most starts any closed window of one period can hold (GCRA:
        ``floor((period + (burst - 1) * interval) / interval) + 1``)."""
        return self.count + self.burst

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}.get(self.period_s)
        text = f"{self.count}/{unit}" if unit else f"{self.count}/{self.period_s:g}s"
        return text if self.burst == _default_burst(self.count) else f"{text}:burst={self.burst}"


def _default_burst(count: int) -> int:
    return max(1, math.ceil(count / 10))


def parse_rate(text: str | Rate, *, burst: int | None = None, what: str = "rate_limit") -> Rate:
    """``"20/s"`` -> Rate; a ConfigError saying what is accepted otherwise."""
    if isinstance(text, Rate):
        return text if burst is None else _checked(text.count, text.period_s, burst, what)
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string like '20/s', '5/m' or '100/h', "
                          f"not {type(text).__name__} {text!r}")
    m = _RATE.match(text.lower())
    if m is None or m.group(3) not in _UNITS:
        raise ConfigError(f"{what}={text!r} is not a rate: write '<count>/<unit>' with unit s, m "
                          "or h (for example '20/s', '5/m', '100/h', or '20/s:burst=5')")
    count, multiple, unit, inline_burst = m.groups()
    period = _UNITS[unit] * (int(multiple) if multiple else 1)
    if inline_burst is not None and burst is not None and int(inline_burst) != burst:
        raise ConfigError(f"{what}={text!r} names burst={inline_burst} and burst={burst} is "
                          "also given: give it once")
    chosen = burst if burst is not None else (int(inline_burst) if inline_burst else None)
    return _checked(int(count), period, chosen, what)


def _checked(count: int, period: float, burst: int | None, what: str) -> Rate:
    if count < 1:
        raise ConfigError(f"{what}: the count must be at least 1 (to stop a task, pause its "
                          "queue or set a rate like '1/h')")
    if period <= 0:
        raise ConfigError(f"{what}: the period must be positive")
    if burst is None:
        burst = _default_burst(count)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise ConfigError(f"{what}: burst must be an integer of at least 1, not {burst!r}")
    return Rate(count=count, period_s=period, burst=burst)


def _seconds(value: timedelta | float | int | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"{what} must be a timedelta or seconds, not {value!r}")
    if not 0 < seconds < 10 * 365 * 86400 or math.isnan(seconds):
        raise ConfigError(f"{what} must be positive (and under ten years), not {seconds!r} s")
    return seconds


def _key(value: Any, what: str) -> KeySpec:
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str) and value.isidentifier():
        return value
    raise ConfigError(f"{what} must be the name of one of the task's arguments or a callable "
                      f"taking the task's arguments, not {value!r}")


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """A task's flow-control options, validated (``Limits.of(...)``).

    Keys are argument names or callables; a callable key is kept on the Task
    only (it never travels: limits are read from the worker's own registry).
    """

    rate: Rate | None = None
    rate_key: Any = None
    concurrency: int | None = None
    concurrency_key: Any = None
    #: seconds a concurrency permit is leased for before it must be renewed
    lease_s: float = 30.0
    unique_for_s: float | None = None
    unique_key: Any = None
    debounce_s: float | None = None
    debounce_key: Any = None

    @classmethod
    def of(
        cls,
        *,
        task: str = "task",
        rate_limit: str | Rate | None = None,
        burst: int | None = None,
        rate_key: KeySpec = None,
        concurrency_limit: int | None = None,
        concurrency_key: KeySpec = None,
        lease: timedelta | float | None = None,
        unique_for: timedelta | float | None = None,
        unique_key: KeySpec = None,
        debounce: timedelta | float | None = None,
        debounce_key: KeySpec = None,
        fn: Callable[..., Any] | None = None,
    ) -> Limits | None:
        """The limits of the options given (None when none is set); a
        ConfigError naming the task and the option otherwise. With ``fn``, a
        key naming an argument is checked against its signature."""
        where = f"task {task!r}"
        rate = None if rate_limit is None else parse_rate(rate_limit, burst=burst,
                                                          what=f"{where}: rate_limit")
        if rate is None and burst is not None:
            raise ConfigError(f"{where}: burst is given without rate_limit; add rate_limit=")
        if concurrency_limit is not None and (
                not isinstance(concurrency_limit, int) or isinstance(concurrency_limit, bool)
                or concurrency_limit < 1):
            raise ConfigError(f"{where}: concurrency_limit must be an integer of at least 1, "
                              f"not {concurrency_limit!r}")
        pairs = {"rate_key": (rate_key, rate), "concurrency_key": (concurrency_key,
                                                                  concurrency_limit),
                 "unique_key": (unique_key, unique_for), "debounce_key": (debounce_key, debounce)}
        for name, (key, option) in pairs.items():
            _key(key, f"{where}: {name}")
            if key is not None and option is None:
                limit = name.replace("_key", "")
                raise ConfigError(f"{where}: {name} is given without the limit it keys; add "
                                  f"{limit if limit != 'unique' else 'unique_for'}=...")
            if isinstance(key, str) and fn is not None:
                _check_argument(fn, key, f"{where}: {name}")
        lease_s = _seconds(lease, f"{where}: lease") or 30.0
        unique_s = _seconds(unique_for, f"{where}: unique_for")
        debounce_s = _seconds(debounce, f"{where}: debounce")
        if unique_s is not None and debounce_s is not None:
            raise ConfigError(f"{where}: unique_for and debounce contradict (keep the first call "
                              "or the last one): choose one")
        if rate is None and concurrency_limit is None and unique_s is None and debounce_s is None:
            return None
        return cls(rate=rate, rate_key=rate_key, concurrency=concurrency_limit,
                   concurrency_key=concurrency_key, lease_s=lease_s, unique_for_s=unique_s,
                   unique_key=unique_key, debounce_s=debounce_s, debounce_key=debounce_key)

    @property
    def gated(self) -> bool:
        """Whether a worker must ask before running the task."""
        return self.rate is not None or self.concurrency is not None or \
            self.debounce_s is not None


def _check_argument(fn: Callable[..., Any], name: str, what: str) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if name not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{what}={name!r} names no argument of {fn.__qualname__}"
                          f"{inspect.signature(fn)}; name one of {list(params)} or pass a "
                          "callable")


def key_value(key: KeySpec, fn: Callable[..., Any] | None, args: list[Any],
              kwargs: dict[str, Any]) -> str:
    """The limiter key of one call: ``""`` (the task-wide limit) without a key,
    else the named argument's value (defaults applied) or the callable's result,
    as text. Raises ConfigError when the call does not carry the argument."""
    if key is None:
        return ""
    if callable(key):
        try:
            value = key(*args, **kwargs)
        except Exception as e:
            raise ConfigError(f"the limiter key callable {key!r} raised {type(e).__name__}: "
                              f"{e}; make it accept the task's arguments") from e
    else:
        if fn is None:
            if key in kwargs:
                return _text(kwargs[key])
            raise ConfigError(f"the limiter key {key!r} is not among the call's keyword "
                              "arguments and the task's function is unknown")
        try:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(f"the call's arguments do not fit {fn.__qualname__}: {e}") from None
        bound.apply_defaults()
        if key in bound.arguments:
            value = bound.arguments[key]
        elif key in bound.kwargs:
            value = bound.kwargs[key]
        else:
            raise ConfigError(f"the limiter key {key!r} is not an argument of this call of "
                              f"{fn.__qualname__}; pass it, or give the argument a default")
    return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    return msgspec.json.encode(value).decode() if not isinstance(value, (int, float)) \
        else repr(value)
