"""Periodic and cron tasks, with exactly one scheduler publishing at a time.

    from runtime.ops.scheduler import cron, every, run_scheduler, schedules_for

Modules: ``rules`` (every, cron, at: when ticks happen, DST), ``store``
(definitions, pauses, last runs, lease and claims: Redis or memory),
``leader`` (the lease with fencing), ``scheduler`` (the loop and misfire
policy), ``api`` (``Schedules``, ``run_scheduler``).
"""

from runtime.ops.scheduler.api import (
    ScheduleInfo,
    ScheduleNotFound,
    Schedules,
    run_scheduler,
    schedules_for,
    store_for,
)
from runtime.ops.scheduler.rules import At, Cron, Every, Rule, at, cron, every
from runtime.ops.scheduler.scheduler import Clock, Scheduler, SystemClock, task_id_for
from runtime.ops.scheduler.store import (
    MemoryScheduleStore,
    Misfire,
    RedisScheduleStore,
    ScheduleDef,
    SchedulerUnavailable,
    ScheduleState,
    ScheduleStore,
)

__all__ = [
    "At",
    "Clock",
    "Cron",
    "Every",
    "MemoryScheduleStore",
    "Misfire",
    "RedisScheduleStore",
    "Rule",
    "ScheduleDef",
    "ScheduleInfo",
    "ScheduleNotFound",
    "ScheduleState",
    "ScheduleStore",
    "Scheduler",
    "SchedulerUnavailable",
    "Schedules",
    "SystemClock",
    "at",
    "cron",
    "every",
    "run_scheduler",
    "schedules_for",
    "store_for",
    "task_id_for",
]
