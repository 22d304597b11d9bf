"""What the task index and the event stream cost a Redis worker (issue 14's target:
under 15% of no-op throughput).

    .venv/bin/python -m benchmarks.index_cost                   # 5,000 tasks, 3 repeats
    .venv/bin/python -m benchmarks.index_cost --tasks 20000 --repeats 5

Each run: a producer runtime enqueues ``tasks`` no-op tasks (not timed; with
the listeners in the same mode as the worker, so ENQUEUED is indexed as in a
deployment) and closes; then a worker runtime opens, and the timed window
runs from starting its embedded worker (concurrency 50, on uvloop) until the
queue is idle AND the listeners have written everything they heard (the index
and the stream hold every task's end). "off" runs with ``index=False,
events=False``; "on" with both on (the default). Modes are interleaved
(off, on, then on, off, ...) so a change of machine load hits both.

Columns: tasks/s over the window; worker CPU (this process's user+sys time
in the window) per task; Redis CPU (``INFO cpu`` of the server, user+sys)
per task; the ratio of "on" to "off" throughput (medians). The machine may be
shared: read the figures beside ``uptime``'s load. Under load, throughput
follows the CPU of every process on the machine, so the Redis and worker CPU
per task are the steadier figures; run on a redis-server of your own
(``TASKLOOM_BENCH_REDIS_URL``) so that Redis CPU is this benchmark's alone.

Then, by Redis command, what "on" adds per task (``INFO commandstats``, median
of "on" minus median of "off"): calls and microseconds per task. ``evalsha``
includes the commands its scripts call; "script itself" is what "on" adds of
``evalsha`` less what it adds of the commands the writer's script calls (an
estimate of the Lua work: parsing the batch and building strings). Redis times
a command by the clock, so on a loaded machine these include the time its
thread waited for a core: read them for proportions, and the Redis CPU column
for the total.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import anyio
import redis.asyncio as aioredis

from runtime import Runtime
from runtime.lifecycle import Listener
from runtime.ops.api import listeners_for
from runtime.ops.common import ops_prefix
from runtime.ops.index import IndexSettings

REDIS_URL = os.environ.get("TASKLOOM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
_BATCH = 500


@dataclass(frozen=True)
class Run:
    mode: str  # "off" or "on"
    tasks: int
    wall_s: float
    cpu_s: float  # this process (the worker), user + sys
    redis_cpu_s: float
    #: per Redis command: (calls, usec) in the window
    commands: dict[str, tuple[int, float]]

    @property
    def rate(self) -> float:
        return self.tasks / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.tasks * 1e6

    @property
    def redis_us(self) -> float:
        return self.redis_cpu_s / self.tasks * 1e6


def _runtime(namespace: str) -> Runtime:
    rt = Runtime(REDIS_URL, results=REDIS_URL, namespace=namespace, index=False, events=False)

    @rt.task(name="noop", queue="cost")
    async def noop(i: int) -> int:
        return i

    return rt


async def _redis_cpu(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _commands(client: Any) -> dict[str, tuple[int, float]]:
    info = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"]))
            for k, v in info.items()}


def _delta(after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]
           ) -> dict[str, tuple[int, float]]:
    zero = (0, 0.0)
    return {k: (c - before.get(k, zero)[0], u - before.get(k, zero)[1])
            for k, (c, u) in after.items()}


async def _drained(listeners: Sequence[Listener]) -> None:
    """Wait until every listener has written what it heard."""
    for listener in listeners:
        flush = getattr(listener, "flush", None)
        if flush is not None:
            await flush()


async def _purge(client: Any, rt: Runtime, namespace: str) -> None:
    await rt.broker.purge_namespace()  # type: ignore[attr-defined]
    await rt.results.purge_namespace()  # type: ignore[attr-defined]
    keys = [k async for k in client.scan_iter(match=ops_prefix(namespace) + "*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.unlink(*keys[i:i + 500])


async def measure(mode: str, tasks: int, concurrency: int, batch: int | None = None) -> Run:
    namespace = f"bench-ixcost-{uuid.uuid4().hex[:8]}"
    client: Any = aioredis.Redis.from_url(REDIS_URL)
    on = mode == "on"
    settings: bool | IndexSettings = True if batch is None else IndexSettings(batch=batch)
    try:
        producer = _runtime(namespace)
        if on:
            producer.listeners.extend(listeners_for(producer, index=settings))
        async with producer:
            noop = producer.registry.get("noop")
            assert noop is not None
            for i in range(0, tasks, _BATCH):
                await producer.enqueue_many([noop.s(j) for j in range(i, min(tasks, i + _BATCH))])
        rt = _runtime(namespace)
        listeners = listeners_for(rt, index=settings) if on else []
        rt.listeners.extend(listeners)
        async with rt:
            stats0 = await _commands(client)
            redis0, cpu0, t0 = await _redis_cpu(client), time.process_time(), time.perf_counter()
            async with rt.worker(queues=["cost"], concurrency=concurrency) as w:
                await w.idle()
            await _drained(listeners)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            redis_cpu = await _redis_cpu(client) - redis0
            commands = _delta(await _commands(client), stats0)
            await _purge(client, rt, namespace)
    finally:
        await client.aclose()
    return Run(mode, tasks, wall, cpu, redis_cpu, commands)


def _table(runs: Sequence[Run], out: IO[str]) -> None:
    out.write(f"{'run':>4} {'mode':<4} {'tasks/s':>9} {'worker us/task':>15} "
              f"{'redis us/task':>14}\n")
    for i, r in enumerate(runs):
        out.write(f"{i // 2 + 1:>4} {r.mode:<4} {r.rate:>9,.0f} {r.cpu_us:>15.1f} "
                  f"{r.redis_us:>14.1f}\n")
    med: dict[str, tuple[float, float, float]] = {}
    for mode in ("off", "on"):
        mine = [r for r in runs if r.mode == mode]
        med[mode] = (statistics.median(r.rate for r in mine),
                     statistics.median(r.cpu_us for r in mine),
                     statistics.median(r.redis_us for r in mine))
    out.write("median:\n")
    out.write(f"{'mode':<4} {'tasks/s':>9} {'worker us/task':>15} {'redis us/task':>14} "
              f"{'ratio on/off':>13}\n")
    for mode in ("off", "on"):
        rate, cpu, rcpu = med[mode]
        ratio = f"{rate / med['off'][0]:.3f}" if mode == "on" else "1.000"
        out.write(f"{mode:<4} {rate:>9,.0f} {cpu:>15.1f} {rcpu:>14.1f} {ratio:>13}\n")
    cost = (1 - med["on"][0] / med["off"][0]) * 100
    out.write(f"throughput cost of index+events: {cost:+.1f}% (target: under 15%)\n")
    _by_command(runs, out)


#: The commands ``lua/transitions.lua`` calls: what "on" adds of each (a difference, so
#: the worker's own use of them cancels) is subtracted from what it adds of ``evalsha``.
_SCRIPT_CALLS = ("get", "set", "del", "hincrby", "hdel", "zadd", "zrem", "zcard", "zrange",
                 "zrangebyscore", "zremrangebyscore", "xadd", "xtrim")


def _by_command(runs: Sequence[Run], out: IO[str]) -> None:
    def per_task(mode: str, name: str) -> tuple[float, float]:
        mine = [r for r in runs if r.mode == mode]
        calls = statistics.median(r.commands.get(name, (0, 0.0))[0] / r.tasks for r in mine)
        us = statistics.median(r.commands.get(name, (0, 0.0))[1] / r.tasks for r in mine)
        return calls, us

    names = sorted({k for r in runs for k in r.commands})
    added = {n: tuple(a - b for a, b in zip(per_task("on", n), per_task("off", n),
                                            strict=True)) for n in names}
    rows = [(n, c, u) for n, (c, u) in added.items() if abs(u) >= 0.05 or abs(c) >= 0.01]
    rows.sort(key=lambda r: -r[2])
    out.write('Redis commands: what "on" adds per task (median on - median off)\n')
    out.write(f"{'command':<18} {'calls/task':>10} {'us/task':>8}\n")
    for name, calls, us in rows:
        out.write(f"{name:<18} {calls:>10.3f} {us:>8.2f}\n")
    nested = sum(added.get(n, (0.0, 0.0))[1] for n in _SCRIPT_CALLS)
    script = added.get("evalsha", (0.0, 0.0))[1] - nested
    out.write(f"{'script itself':<18} {'':>10} {script:>8.2f}  (evalsha less its "
              "commands above)\n")


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> list[Run]:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index_cost",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--batch", type=int, default=None,
                        help="IndexSettings.batch (transitions per script call)")
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: F401
        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:  # pragma: no cover
        options = {}
    load = os.getloadavg()
    out.write(f"no-op tasks on Redis ({REDIS_URL}): {args.tasks} per run, {args.repeats} "
              f"repeats, concurrency {args.concurrency}; load {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}\n")
    runs: list[Run] = []
    for r in range(args.repeats):
        pair = {mode: anyio.run(measure, mode, args.tasks, args.concurrency, args.batch,
                                backend_options=options)
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off"))}
        runs += [pair["off"], pair["on"]]
    _table(runs, out)
    load = os.getloadavg()
    out.write(f"load after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    return runs


if __name__ == "__main__":
    main()
