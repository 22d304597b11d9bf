"""Retry policy: when to try again, pure and testable without a loop."""

from __future__ import annotations

import random

import msgspec

__all__ = ["RetryPolicy", "next_delay"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Exponential backoff with full jitter and a cap.

    The delay before retry ``n`` (1-based) is drawn uniformly from
    ``[base * factor**(n-1) * (1 - jitter), base * factor**(n-1)]``, capped at
    ``max_delay_s``.
    """

    retries: int = 0
    backoff_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")
        if self.backoff_s < 0 or self.max_delay_s < 0:
            raise ValueError("backoff_s and max_delay_s must not be negative")
        if self.factor < 1.0:
            raise ValueError(f"factor must be 1 or more (a growing backoff), got {self.factor}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")


def next_delay(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Seconds to wait before the retry that follows failed ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    try:
        raw = min(policy.backoff_s * policy.factor ** (attempt - 1), policy.max_delay_s)
    except OverflowError:
        raw = policy.max_delay_s
    if policy.jitter == 0.0:
        return raw
    low = raw * (1.0 - policy.jitter)
    return (rng or random).uniform(low, raw)
