"""Retry policy: when to try again, pure and testable without a loop."""

from __future__ import annotations

import random

import msgspec

from runtime.errors import ConfigError
from runtime.options import check_options

__all__ = ["Backoff", "RetryPolicy", "next_delay"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Exponential backoff with full jitter and a cap, or a schedule.

    With ``intervals`` (``retry_intervals=[1, 5, 30]``) the delay before retry
    ``n`` is ``intervals[n - 1]`` exactly, the last one repeating.

    The delay before retry ``n`` (1-based) is drawn uniformly from
    ``[base * factor**(n-1) * (1 - jitter), base * factor**(n-1)]``, capped at
    ``max_delay_s``.
    """

    retries: int = 0
    backoff_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.5
    #: seconds before each retry (the last repeats), instead of the backoff
    intervals: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_options("retry policy", ConfigError, retries=self.retries)
        if any(not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1e9)
               for d in self.intervals):
            raise ConfigError(f"retry policy: retry_intervals must be seconds, each 0 or more "
                              f"and finite, got {list(self.intervals)!r}; e.g. [1, 5, 30]")
        if not (self.backoff_s >= 0 and self.max_delay_s >= 0):
            raise ConfigError(f"retry policy: backoff_s and max_delay_s must be 0 or more seconds, "
                              f"got {self.backoff_s} and {self.max_delay_s}; give 0 for no wait")
        if not self.factor >= 1.0:
            raise ConfigError(f"retry policy: factor must be 1 or more (a growing backoff), got "
                              f"{self.factor}; give 1 for a constant delay")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"retry policy: jitter must be within 0..1, got {self.jitter}; give "
                              "0 for exact delays, 1 for full jitter")


def next_delay(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Seconds to wait before the retry that follows failed ``attempt`` (1-based)."""
    if attempt < 1:
        raise ConfigError(f"next_delay: attempt counts from 1 (the attempt that failed), got "
                          f"{attempt}; pass the failed attempt's number")
    if policy.intervals:
        return float(policy.intervals[min(attempt, len(policy.intervals)) - 1])
    try:
        raw = min(policy.backoff_s * policy.factor ** (attempt - 1), policy.max_delay_s)
    except OverflowError:
        raw = policy.max_delay_s
    if policy.jitter == 0.0:
        return raw
    low = raw * (1.0 - policy.jitter)
    return (rng or random).uniform(low, raw)


class Backoff:
    """Delays for retrying an operation in place (a result-store write while
    the store is down): exponential from ``first_s``, capped at ``cap_s``,
    each drawn from ``[d * (1 - jitter), d]`` so that many waiters do not
    retry in step. Never zero, so a retry loop never spins."""

    __slots__ = ("_delay", "_rng", "cap_s", "factor", "first_s", "jitter")

    def __init__(self, first_s: float = 0.05, cap_s: float = 5.0, *, factor: float = 2.0,
                 jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if not 0 < first_s <= cap_s:
            raise ValueError(f"need 0 < first_s <= cap_s, got first_s={first_s}, cap_s={cap_s}")
        if factor < 1.0 or not 0.0 <= jitter < 1.0:
            raise ValueError(f"need factor >= 1 and 0 <= jitter < 1, got {factor}, {jitter}")
        self.first_s = first_s
        self.cap_s = cap_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random
        self._delay = first_s

    def next(self) -> float:
        """The delay before the next try (grows until the cap)."""
        delay = self._delay
        self._delay = min(delay * self.factor, self.cap_s)
        return self._rng.uniform(delay * (1.0 - self.jitter), delay)
