"""taskloom: an asyncio-native, broker-agnostic task runtime.

    from runtime import Runtime, run

    rt = Runtime()

    @rt.task(retries=3, timeout=10)
    async def add(x: int, y: int) -> int:
        return x + y

    async with rt, rt.worker():
        assert await run(add.s(1, 2)) == 3
"""

from runtime.app import Runtime, TaskHandle, run
from runtime.canvas import Signature, chain, chord, chunks, group, map, starmap
from runtime.errors import (
    ArgumentsError,
    ConfigError,
    DecodeError,
    EncodeError,
    EnqueueError,
    PayloadTooLarge,
    Reject,
    ResultError,
    ResultExpired,
    ResultStoreUnavailable,
    ResultTimeout,
    Retry,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskloomError,
    TaskTimeLimitExceeded,
    UnknownTaskError,
)
from runtime.messages import Result, State
from runtime.registry import Task
from runtime.worker import Worker

__all__ = [
    "ArgumentsError",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "EnqueueError",
    "PayloadTooLarge",
    "Reject",
    "Result",
    "ResultError",
    "ResultExpired",
    "ResultStoreUnavailable",
    "ResultTimeout",
    "Retry",
    "Runtime",
    "Signature",
    "State",
    "Task",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskError",
    "TaskHandle",
    "TaskTimeLimitExceeded",
    "TaskloomError",
    "UnknownTaskError",
    "Worker",
    "chain",
    "chord",
    "chunks",
    "group",
    "map",
    "run",
    "starmap",
]
