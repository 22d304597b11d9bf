"""Tasks of the canvas suite, defined on one runtime, with execution counters.

The workers of this suite are embedded in the test's event loop, so the
counters here see every execution, on every broker.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import anyio

from runtime import Runtime, chain, chord, group

#: The bound on each test's waiting (anyio.fail_after); the work takes milliseconds.
LIMIT = 20.0


class Tasks:
    """A set of tasks on ``rt``; ``runs[name]`` counts executions of each."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.runs: collections.Counter[str] = collections.Counter()
        #: the argument of every execution of the ``tsum`` body, in order
        self.bodies: list[list[int]] = []
        #: (task_id, error) of every execution of the ``on_error`` errback
        self.errbacks: list[tuple[str, dict[str, str]]] = []
        #: task key -> time.monotonic() when ``stamp`` ran
        self.stamps: dict[str, float] = {}
        #: keys of ``record`` executions, in the order they ran
        self.order: list[str] = []
        self.release = anyio.Event()
        self._finished: dict[tuple[str, int], anyio.Event] = collections.defaultdict(anyio.Event)
        runs = self.runs

        @rt.task(name="add")
        async def add(x: int, y: int) -> int:
            runs["add"] += 1
            return x + y

        @rt.task(name="tsum")
        async def tsum(xs: list[int]) -> int:
            runs["tsum"] += 1
            self.bodies.append(list(xs))
            return sum(xs)

        @rt.task(name="boom")
        async def boom(*args: Any) -> int:
            runs["boom"] += 1
            raise ValueError("boom")

        @rt.task(name="blocked")
        async def blocked(x: int) -> int:
            runs["blocked"] += 1
            await self.release.wait()
            runs["blocked_done"] += 1
            return x

        @rt.task(name="reverse")
        async def reverse(key: str, i: int, n: int) -> int:
            """Member ``i`` of ``n`` finishes only after member ``i + 1``: the
            members complete in reverse order (all must run at once)."""
            runs["reverse"] += 1
            if i + 1 < n:
                await self._finished[key, i + 1].wait()
            self._finished[key, i].set()
            return i * 10

        @rt.task(name="on_error")
        async def on_error(task_id: str, error: dict[str, str]) -> None:
            runs["on_error"] += 1
            self.errbacks.append((task_id, error))

        @rt.task(name="ident")
        async def ident(x: Any) -> Any:
            runs["ident"] += 1
            return x

        @rt.task(name="chunk_sum")
        def chunk_sum(xs: list[int]) -> list[int]:
            runs["chunk_sum"] += 1
            return [x * 10 for x in xs]

        @rt.task(name="stamp")
        async def stamp(key: str, prev: Any = None) -> str:
            runs["stamp"] += 1
            self.stamps[key] = time.monotonic()
            return key

        @rt.task(name="record")
        async def record(key: str) -> str:
            runs["record"] += 1
            self.order.append(key)
            return key

        # -- dynamic fan-out: tasks that return a canvas which replaces them

        @rt.task(name="replace_sig")
        async def replace_sig(x: int) -> Any:
            runs["replace_sig"] += 1
            return add.s(x, 100)

        @rt.task(name="replace_group")
        async def replace_group(n: int) -> Any:
            runs["replace_group"] += 1
            return group(add.s(i, i) for i in range(n))

        @rt.task(name="replace_chain")
        async def replace_chain(x: int) -> Any:
            runs["replace_chain"] += 1
            return chain(add.s(x, 1), add.s(2), add.s(3))

        @rt.task(name="replace_chord")
        async def replace_chord(n: int) -> Any:
            runs["replace_chord"] += 1
            return chord((add.s(i, i) for i in range(n)), tsum.s())

        @rt.task(name="replace_twice")
        async def replace_twice(x: int) -> Any:
            runs["replace_twice"] += 1
            return replace_chain.s(x) | replace_sig.s()

        self.add, self.tsum, self.boom, self.blocked = add, tsum, boom, blocked
        self.reverse, self.on_error, self.ident, self.chunk_sum = reverse, on_error, ident, chunk_sum
        self.stamp, self.record = stamp, record
        self.replace_sig, self.replace_group, self.replace_chain = (
            replace_sig, replace_group, replace_chain)
        self.replace_chord, self.replace_twice = replace_chord, replace_twice
