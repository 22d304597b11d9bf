"""Flow control across workers: rate limits, per-key concurrency limits,
deduplication and debounce (issue 16).

    from runtime.ops.limits import Limits, LimitsGate, before_enqueue, enqueue_paced

Modules: ``spec`` (rates, the ``Limits`` struct, keys; pure), ``store`` (the
limiter state: one Lua call per check on Redis, an in-process twin in memory),
``gate`` (``LimitsGate``, the worker's :class:`runtime.admission.Gate`),
``api`` (``before_enqueue``, ``enqueue_paced``, ``set_limit``,
``limits_state``, ``store_for``).
"""

from runtime.ops.limits.api import (
    Decision,
    LimitState,
    before_enqueue,
    enqueue_paced,
    limits_state,
    set_limit,
)
from runtime.ops.limits.gate import (
    HEADER_CONCURRENCY,
    HEADER_RATE,
    SUPERSEDED_DELAY_S,
    LimitsGate,
    call_headers,
    limits_of,
)
from runtime.ops.limits.spec import Limits, Rate, key_value, parse_rate
from runtime.ops.limits.store import (
    Check,
    LimitStore,
    LimitsUnavailable,
    MemoryLimitStore,
    RedisLimitStore,
    store_for,
)

__all__ = [
    "HEADER_CONCURRENCY",
    "HEADER_RATE",
    "Check",
    "Decision",
    "LimitState",
    "LimitStore",
    "Limits",
    "LimitsGate",
    "LimitsUnavailable",
    "MemoryLimitStore",
    "Rate",
    "RedisLimitStore",
    "SUPERSEDED_DELAY_S",
    "before_enqueue",
    "call_headers",
    "enqueue_paced",
    "key_value",
    "limits_of",
    "limits_state",
    "parse_rate",
    "set_limit",
    "store_for",
]
