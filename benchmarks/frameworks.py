"""taskloom and its peers: how each is installed, configured, started and counted.

Each framework's settings per workload are its documented best for that
workload; they are written into every run's record (``Run.settings``) and
printed under the results table. Same task bodies (benchmarks/apps/work.py),
same payloads, same servers for all.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import redis.asyncio as aredis

from benchmarks import servers as srv
from benchmarks.config import APPS_DIR, BENCH_DIR, VENVS_DIR, Params, Servers

__all__ = ["FRAMEWORK_TYPES", "Framework", "RunContext", "Counting", "WorkerPlan", "make_frameworks"]

Counter = Callable[[], Awaitable[int]]


@dataclass(frozen=True)
class Counting:
    """How many of a run's tasks are done: ``done`` is cheap and polled often
    (it may run ahead by a key or two); ``exact`` is asked once ``done`` says
    all are done, and polling goes on until it agrees."""

    done: Counter
    exact: Counter


@dataclass(frozen=True)
class RunContext:
    """What one run needs to know."""

    workload: str  # throughput | enqueue | latency | io | cpu | memory | scale | pool | limits
    broker: str  # memory | redis | amqp
    namespace: str  # unique to the run: queue names, key prefixes
    servers: Servers
    params: Params
    cpu_loops: int = 0
    owner: str = ""  # the suite's id, marking the Redis databases it owns

    @property
    def task_kind(self) -> str:
        return {"io": "sleep", "cpu": "cpu", "pool": "cpu"}.get(self.workload, "noop")


@dataclass(frozen=True)
class WorkerPlan:
    """How to start a framework's worker(s) for a workload."""

    commands: list[list[str]]
    settings: dict[str, object] = field(default_factory=dict)  # BENCH_SETTINGS for the app
    describe: str = ""
    concurrency: int = 0  # tasks at once, all processes together

    def text(self) -> str:
        shown = " & ".join(" ".join(_short(a) for a in c) for c in self.commands)
        if self.settings:
            shown += f"  [{', '.join(f'{k}={v}' for k, v in self.settings.items())}]"
        return shown


def _pool(p: Params) -> int:
    """Redis connections for the io workload: redis-py's pools stop at 100 by
    default, too few for 1,000 tasks at once in the threaded/greenlet peers."""
    return p.io_concurrency + 100


def _short(arg: str) -> str:
    for root in (str(VENVS_DIR) + "/", str(Path(sys.executable).parent) + "/"):
        if arg.startswith(root):
            return arg[len(root):].rsplit("/bin/", maxsplit=1)[-1]
    return arg


class Framework:
    """Base: a framework run from its own venv, its results in the peer Redis DBs."""

    name = ""
    brokers: tuple[str, ...] = ("redis", "amqp")
    requirements: tuple[str, ...] = ()
    distributions: tuple[str, ...] = ()
    client_notes: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self.bin = VENVS_DIR / self.name / "bin"

    @property
    def python(self) -> str:
        return str(self.bin / "python")

    def supports(self, broker: str) -> bool:
        return broker in self.brokers

    def queue(self, ctx: RunContext) -> str:
        return ctx.namespace

    def env(self, ctx: RunContext, plan: WorkerPlan | None) -> dict[str, str]:
        s = ctx.servers
        return {
            "BENCH_BROKER": ctx.broker,
            "BENCH_BROKER_URL": s.amqp_url if ctx.broker == "amqp" else s.peer_broker_url,
            "BENCH_RESULT_URL": s.peer_result_url,
            "BENCH_QUEUE": self.queue(ctx),
            "BENCH_NAMESPACE": ctx.namespace,
            "BENCH_SETTINGS": json.dumps(plan.settings if plan else {}),
            "PYTHONPATH": str(APPS_DIR),
        }

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        raise NotImplementedError

    def options(self, ctx: RunContext) -> tuple[int, int, int]:
        """(processes, concurrency, prefetch) of an in-process worker."""
        return 1, 100, 100

    def client_note(self, ctx: RunContext) -> str:
        return self.client_notes.get("latency" if ctx.workload == "latency" else "enqueue", "")

    @asynccontextmanager
    async def counter(self, ctx: RunContext, n: int) -> AsyncIterator[Counting]:
        """Counts finished tasks: one result key per task in the result database."""
        client = aredis.Redis.from_url(ctx.servers.peer_result_url)
        try:
            async def done() -> int:
                return int(await client.dbsize()) - 1  # less the owner marker

            yield Counting(done, done)
        finally:
            await client.aclose()

    def amqp_names(self, ctx: RunContext) -> tuple[list[str], list[str]]:
        """(queues, exchanges) a run declares on RabbitMQ."""
        return [], []

    def prepare(self, ctx: RunContext) -> None:
        """Before a run: start from empty databases."""
        srv.reset_peer_dbs(ctx.servers, ctx.owner)

    def cleanup(self, ctx: RunContext) -> None:
        """After a run: drop everything the run left on the servers."""
        srv.reset_peer_dbs(ctx.servers, ctx.owner)
        if ctx.broker == "amqp":
            queues, exchanges = self.amqp_names(ctx)
            srv.amqp_delete(ctx.servers.amqp_url, queues, exchanges)


class Taskloom(Framework):
    name = "taskloom"
    brokers = ("memory", "redis", "amqp")
    distributions = ("taskloom", "redis", "hiredis", "aio-pika", "anyio", "msgspec", "uvloop")
    client_notes: ClassVar[dict[str, str]] = {
        "enqueue": "Runtime.enqueue_many() in batches of 1,000 (publish returns once stored)",
        "latency": "await rt.run(noop.s(i)): results awaited without polling",
    }

    @property
    def python(self) -> str:
        return sys.executable

    def env(self, ctx: RunContext, plan: WorkerPlan | None) -> dict[str, str]:
        s = ctx.servers
        url = {"memory": "memory://", "redis": s.redis_url, "amqp": s.amqp_url}[ctx.broker]
        return {
            "BENCH_BROKER": ctx.broker,
            "BENCH_BROKER_URL": url,
            # on AMQP the results go to Redis: the benchmark's result database
            # (namespaced), where they can be counted
            "BENCH_RESULT_URL": s.peer_result_url if ctx.broker == "amqp" else "",
            "BENCH_QUEUE": "bench",
            "BENCH_NAMESPACE": ctx.namespace,
            "BENCH_SETTINGS": "{}",
            "BENCH_LOG_LEVEL": "WARNING",
            # kind="process" tasks (a process pool) only where they are used
            "BENCH_PROCESS_TASKS": ("1" if ctx.broker == "memory" and ctx.workload in ("cpu", "pool")
                                    else ""),
            # tasks with rate and concurrency limits (a LimitsGate) only where they are used
            "BENCH_LIMITS": (json.dumps({"rate": ctx.params.limits_rate,
                                         "concurrency": ctx.params.limits_concurrency})
                             if ctx.workload == "limits" else ""),
            # the checkout the suite runs from, not whatever taskloom is installed
            "PYTHONPATH": os.pathsep.join((str(APPS_DIR), str(BENCH_DIR.parent))),
        }

    def queue(self, ctx: RunContext) -> str:
        return "bench"  # the runtime puts it under the run's namespace

    def options(self, ctx: RunContext) -> tuple[int, int, int]:
        """(processes, concurrency, prefetch) for the workload."""
        p = ctx.params
        if ctx.workload == "io":
            return 1, p.io_concurrency, p.io_concurrency
        if ctx.workload in ("cpu", "pool"):
            return p.cpu_processes, 1, 1
        if ctx.workload == "scale":
            return 2, 100, 100
        return 1, 100, 100

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        if ctx.broker == "memory":
            return None  # the memory broker lives in one process: see harness.inproc_*
        processes, concurrency, prefetch = self.options(ctx)
        cmd = [sys.executable, "-m", "runtime.cli", "--log-level", "WARNING", "worker",
               "taskloom_app:rt", "--concurrency", str(concurrency), "--prefetch", str(prefetch)]
        if processes > 1:
            cmd += ["--processes", str(processes)]
        return WorkerPlan([cmd], concurrency=processes * concurrency)

    @asynccontextmanager
    async def counter(self, ctx: RunContext, n: int) -> AsyncIterator[Counting]:
        """Redis: finished = acknowledged (taskloom acks only after the result is
        stored), from the queue's stats. AMQP cannot count another process's
        unacked deliveries, so there the result keys are counted, in the
        benchmark's own result database."""
        if ctx.broker == "amqp":
            client = aredis.Redis.from_url(ctx.servers.peer_result_url)
            try:
                # what the database holds before the worker starts: the owner marker,
                # and the producer's task index and event stream (on by default)
                base = int(await client.dbsize())

                async def approx() -> int:  # new results + the workers' heartbeat keys
                    return int(await client.dbsize()) - base

                async def exact() -> int:
                    count = 0
                    async for _ in client.scan_iter(match=f"{ctx.namespace}:result:*",
                                                    count=1000):
                        count += 1
                    return count

                yield Counting(approx, exact)
            finally:
                await client.aclose()
            return
        import brokers

        broker = brokers.from_url(self.env(ctx, None)["BENCH_BROKER_URL"],
                                  namespace=ctx.namespace)
        async with broker:
            async def done() -> int:
                stats = await broker.stats(self.queue(ctx))
                if stats.dead:
                    raise RuntimeError(f"{stats.dead} tasks were dead-lettered")
                return n - (stats.ready + stats.delayed + stats.in_flight)

            yield Counting(done, done)

    def amqp_names(self, ctx: RunContext) -> tuple[list[str], list[str]]:
        found = srv.amqp_leftovers(ctx.namespace)
        if found is not None:
            return found
        # no rabbitmqctl here: the names brokers/amqp.py documents (no delays are used)
        q = f"{ctx.namespace}.{self.queue(ctx)}"
        return [q, f"{q}.dlq"], [f"{ctx.namespace}.taskloom.dlx", f"{ctx.namespace}.taskloom.delay"]

    def prepare(self, ctx: RunContext) -> None:
        if ctx.broker == "amqp":
            srv.reset_peer_dbs(ctx.servers, ctx.owner)

    def cleanup(self, ctx: RunContext) -> None:
        if ctx.broker == "memory":
            return
        srv.redis_delete_matching(ctx.servers.redis_url, ctx.namespace)
        if ctx.broker == "amqp":
            srv.reset_peer_dbs(ctx.servers, ctx.owner)
            queues, exchanges = self.amqp_names(ctx)
            srv.amqp_delete(ctx.servers.amqp_url, queues, exchanges)


class Raw(Framework):
    """The raw-client baselines (benchmarks/baselines.py): no framework, the
    fastest loops redis-py and aio-pika do in one process; run by the harness
    directly (``harness.measure_raw``), from the project's environment."""

    name = "raw"
    brokers = ("redis", "amqp")
    distributions = ("redis", "hiredis", "aio-pika", "aiormq", "uvloop")
    client_notes: ClassVar[dict[str, str]] = {
        "enqueue": "redis: pipelined XADD, 1,000 a pipeline; amqp: persistent publishes with "
                   "confirms, 1,000 in flight a batch",
        "latency": "client subscribed (PSUBSCRIBE) on a held connection before publishing; "
                   "redis: XADD -> worker XREADGROUP BLOCK -> SET + PUBLISH; amqp: confirmed "
                   "publish -> consumer SET + PUBLISH in Redis + ack",
    }

    @property
    def python(self) -> str:
        return sys.executable

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        return None

    def prepare(self, ctx: RunContext) -> None:
        """The baselines clean up after themselves (keys and queue under the namespace)."""

    def cleanup(self, ctx: RunContext) -> None:
        srv.redis_delete_matching(ctx.servers.redis_url, ctx.namespace)
        srv.redis_delete_matching(ctx.servers.peer_result_url, ctx.namespace)


class Celery(Framework):
    name = "celery"
    requirements = ("celery[redis]>=5.4", "hiredis", "gevent>=24.2")
    distributions = ("celery", "kombu", "redis", "hiredis", "amqp", "gevent")
    client_notes: ClassVar[dict[str, str]] = {
        "enqueue": "no batch API: apply_async() in a loop on one producer (as group() does)",
        "latency": "delay(i).get(): Redis backend, results pushed by pub/sub",
    }

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        p = ctx.params
        base = [str(self.bin / "celery"), "-A", "celery_app", "worker", "-l", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if ctx.workload == "io":  # sync-only: the gevent pool runs blocking sleeps at 1,000
            return WorkerPlan([[*base, "-P", "gevent", "-c", str(p.io_concurrency)]],
                              settings={"redis_pool": _pool(p)}, concurrency=p.io_concurrency)
        if ctx.workload == "cpu":  # Celery's guide for CPU-bound tasks: prefork, -O fair, 1
            return WorkerPlan([[*base, "-P", "prefork", "-c", str(p.cpu_processes),
                                "-O", "fair", "--prefetch-multiplier", "1"]],
                              concurrency=p.cpu_processes)
        # short tasks in one process: the solo pool, a high prefetch multiplier
        return WorkerPlan([[*base, "-P", "solo", "--prefetch-multiplier", "100"]], concurrency=1)

    def amqp_names(self, ctx: RunContext) -> tuple[list[str], list[str]]:
        return [self.queue(ctx)], [self.queue(ctx)]


class Taskiq(Framework):
    name = "taskiq"
    requirements = ("taskiq>=0.11", "taskiq-redis>=1.0", "taskiq-aio-pika>=0.4", "hiredis",
                    "uvloop")
    distributions = ("taskiq", "taskiq-redis", "taskiq-aio-pika", "redis", "hiredis",
                     "aio-pika", "uvloop")
    client_notes: ClassVar[dict[str, str]] = {
        "enqueue": "no batch API: kiq() calls, 1,000 at a time with asyncio.gather (uvloop)",
        "latency": "kiq() then wait_result(check_interval=0.001): results polled every 1 ms",
    }

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        p = ctx.params
        base = [str(self.bin / "taskiq"), "worker", "taskiq_app:broker", "--log-level", "WARNING"]
        if ctx.workload == "io":
            c = p.io_concurrency
            return WorkerPlan([[*base, "--workers", "1", "--max-async-tasks", str(c)]],
                              settings={"prefetch": c, "redis_pool": _pool(p)}, concurrency=c)
        if ctx.workload == "cpu":
            return WorkerPlan([[*base, "--workers", str(p.cpu_processes), "--max-async-tasks", "1",
                                "--max-threadpool-threads", "1"]],
                              settings={"prefetch": 1}, concurrency=p.cpu_processes)
        return WorkerPlan([[*base, "--workers", "1", "--max-async-tasks", "100"]],
                          settings={"prefetch": 100}, concurrency=100)

    def amqp_names(self, ctx: RunContext) -> tuple[list[str], list[str]]:
        q = self.queue(ctx)
        return [q, f"{q}.dead_letter"], [q]


class Dramatiq(Framework):
    name = "dramatiq"
    requirements = ("dramatiq[redis,rabbitmq]>=1.17", "hiredis", "gevent>=24.2")
    distributions = ("dramatiq", "redis", "hiredis", "pika", "gevent")
    client_notes: ClassVar[dict[str, str]] = {
        "enqueue": "no batch API: send() in a loop (group().run() loops too)",
        "latency": "send(i).get_result(block=True): Redis backend, blocking pop",
    }

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        p = ctx.params
        if ctx.workload == "io":  # sync-only: dramatiq-gevent, greenlets as threads
            c = p.io_concurrency
            return WorkerPlan([[str(self.bin / "dramatiq-gevent"), "dramatiq_app",
                                "--processes", "1", "--threads", str(c)]],
                              settings={"redis_pool": _pool(p)}, concurrency=c)
        if ctx.workload == "cpu":
            return WorkerPlan([[str(self.bin / "dramatiq"), "dramatiq_app",
                                "--processes", str(p.cpu_processes), "--threads", "1"]],
                              concurrency=p.cpu_processes)
        return WorkerPlan([[str(self.bin / "dramatiq"), "dramatiq_app", "--processes", "1",
                            "--threads", "8"]], concurrency=8)

    def amqp_names(self, ctx: RunContext) -> tuple[list[str], list[str]]:
        q = self.queue(ctx)
        return [q, f"{q}.DQ", f"{q}.XQ"], []


class Arq(Framework):
    name = "arq"
    brokers = ("redis",)
    requirements = ("arq>=0.26", "uvloop")
    distributions = ("arq", "redis", "hiredis", "uvloop")
    client_notes: ClassVar[dict[str, str]] = {
        "enqueue": "no batch API: enqueue_job() calls, 1,000 at a time with asyncio.gather (uvloop)",
        "latency": "enqueue_job() then job.result(poll_delay=0.001): results polled every 1 ms",
    }

    def worker(self, ctx: RunContext) -> WorkerPlan | None:
        p = ctx.params
        cmd = [str(self.bin / "arq"), "arq_app.WorkerSettings", "--custom-log-dict",
               "arq_app.LOG_CONFIG"]
        if ctx.workload == "io":
            return WorkerPlan([cmd], settings={"max_jobs": p.io_concurrency, "poll_delay": 0.01},
                              concurrency=p.io_concurrency)
        if ctx.workload == "cpu":  # arq runs one process: start one per core
            return WorkerPlan([cmd] * p.cpu_processes, settings={"max_jobs": 1, "poll_delay": 0.01},
                              concurrency=p.cpu_processes)
        poll = 0.001 if ctx.workload == "latency" else 0.01
        return WorkerPlan([cmd], settings={"max_jobs": 100, "poll_delay": poll}, concurrency=100)

    def env(self, ctx: RunContext, plan: WorkerPlan | None) -> dict[str, str]:
        env = super().env(ctx, plan)
        env["BENCH_RESULT_URL"] = ctx.servers.peer_broker_url  # arq keeps results beside jobs
        return env

    @asynccontextmanager
    async def counter(self, ctx: RunContext, n: int) -> AsyncIterator[Counting]:
        """arq removes a job from its queue (a sorted set) when it stores the result."""
        client = aredis.Redis.from_url(ctx.servers.peer_broker_url)
        try:
            async def done() -> int:
                return n - int(await client.zcard(self.queue(ctx)))

            yield Counting(done, done)
        finally:
            await client.aclose()


FRAMEWORK_TYPES: dict[str, type[Framework]] = {
    t.name: t for t in (Taskloom, Raw, Celery, Taskiq, Dramatiq, Arq)
}


def make_frameworks(names: list[str]) -> list[Framework]:
    return [FRAMEWORK_TYPES[n]() for n in names]
