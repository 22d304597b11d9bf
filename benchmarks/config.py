"""What a benchmark run is made of: workloads, brokers, frameworks, sizes, servers."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "APPS_DIR",
    "BENCH_DIR",
    "BASELINE",
    "BROKERS",
    "FRAMEWORKS",
    "METRICS",
    "RESULTS_DIR",
    "VENVS_DIR",
    "WORKLOADS",
    "Metric",
    "Params",
    "Run",
    "Servers",
    "Status",
]

BENCH_DIR = Path(__file__).resolve().parent
APPS_DIR = BENCH_DIR / "apps"
VENVS_DIR = BENCH_DIR / "venvs"
RESULTS_DIR = BENCH_DIR / "results"

WORKLOADS = ("throughput", "enqueue", "latency", "io", "cpu", "memory", "scale", "pool",
             "limits")
BROKERS = ("memory", "redis", "amqp")
#: ``raw``: the raw-client baselines (benchmarks/baselines.py), taskloom's ratios' denominators
FRAMEWORKS = ("taskloom", "raw", "celery", "taskiq", "dramatiq", "arq")
BASELINE = "raw"

Status = Literal["ok", "failed", "n/a"]


@dataclass(frozen=True)
class Metric:
    """One figure of the comparison table."""

    workload: str
    key: str
    label: str
    unit: str
    higher_is_better: bool
    job: str = ""  # only records of this job carry it ("" = any)


METRICS = (
    Metric("throughput", "tasks_per_s", "throughput", "tasks/s", True),
    Metric("throughput", "cpu_us_per_task", "worker CPU per task", "µs", False),
    Metric("enqueue", "tasks_per_s", "enqueue", "tasks/s", True),
    Metric("latency", "p50_ms", "latency p50", "ms", False),
    Metric("latency", "p99_ms", "latency p99", "ms", False),
    Metric("io", "tasks_per_s", "io (50 ms sleeps)", "tasks/s", True),
    Metric("io", "efficiency", "io efficiency", "%", True),
    Metric("cpu", "tasks_per_s", "cpu (2 processes)", "tasks/s", True),
    Metric("cpu", "efficiency", "cpu efficiency", "%", True),
    Metric("memory", "worker_rss_mib", "worker peak RSS", "MiB", False, job="drain"),
    Metric("memory", "producer_rss_mib", "producer peak RSS (queued)", "MiB", False,
           job="producer"),
    Metric("memory", "queued_worker_rss_mib", "worker peak RSS (queued)", "MiB", False,
           job="producer"),
    Metric("scale", "one_process_per_s", "1 worker process", "tasks/s", True),
    Metric("scale", "tasks_per_s", "2 worker processes", "tasks/s", True),
    Metric("scale", "speedup", "2 processes ÷ 1", "x", True),
    Metric("pool", "wall_s", "pool of 2: wall", "s", False),
    Metric("pool", "efficiency", "pool of 2: ideal ÷ wall", "%", True),
    Metric("pool", "startup_s", "pool start-up (apart)", "s", False),
    Metric("limits", "alone_per_s", "no-op drain alone", "tasks/s", True),
    Metric("limits", "rate_noop_per_s", "no-op drain, rate-limited waiting", "tasks/s", True),
    Metric("limits", "rate_ratio", "rate-limited waiting ÷ alone", "x", True),
    Metric("limits", "rate_ran_during", "rate-limited run during the drain", "tasks", True),
    Metric("limits", "rate_ran", "rate-limited run (observed window)", "tasks", True),
    Metric("limits", "rate_observed_per_s", "rate-limited observed rate", "tasks/s", False),
    Metric("limits", "rate_max_1s", "rate-limited most starts in 1 s", "tasks", False),
    Metric("limits", "conc_noop_per_s", "no-op drain, concurrency-limited waiting", "tasks/s",
           True),
    Metric("limits", "conc_ratio", "concurrency-limited waiting ÷ alone", "x", True),
    Metric("limits", "conc_ran_during", "concurrency-limited run during the drain", "tasks",
           True),
    Metric("limits", "conc_ran", "concurrency-limited run (observed window)", "tasks", True),
    Metric("limits", "conc_observed_per_s", "concurrency-limited observed rate", "tasks/s",
           False),
    Metric("limits", "conc_peak", "concurrency-limited peak running per key", "tasks", False),
)


@dataclass(frozen=True)
class Params:
    """Workload sizes. The defaults are the ones the comparison is quoted at."""

    throughput_n: int = 20_000
    latency_n: int = 1_000
    latency_warmup: int = 50
    io_n: int = 5_000
    io_sleep_s: float = 0.05
    io_concurrency: int = 1_000
    cpu_n: int = 400
    cpu_task_ms: float = 20.0
    cpu_processes: int = 2
    producer_n: int = 1_000_000
    #: the process-pool efficiency workload: tasks of pool_task_ms CPU in a pool of 2
    pool_n: int = 40
    pool_task_ms: float = 100.0
    #: the limits workload (issue 16): limited tasks waiting beside a drain of
    #: limits_n no-ops (a drain of about 4 s at this machine's rate: long enough that
    #: the start of a run is not most of it); each run watches them for
    #: limits_observe_s from the worker's start (or until the no-ops are done, if later)
    limits_n: int = 60_000
    limits_m: int = 100
    limits_rate: str = "5/s"
    limits_concurrency: int = 2
    limits_keys: int = 2
    limits_hold_s: float = 0.25
    limits_observe_s: float = 10.0
    #: the raw Redis baseline's XREADGROUP loops in flight in its one process
    raw_streams: int = 4
    #: messages per enqueue_many() call (taskloom) / concurrent calls (async peers)
    batch: int = 1_000
    #: how often the harness looks at the result store while a worker drains a queue
    poll_s: float = 0.005
    #: a run that has not finished after this long fails (seconds)
    timeout_s: float = 900.0

    def scaled(self, factor: float) -> Params:
        """Smaller sizes (for smoke tests): every count times ``factor``."""

        def n(v: int) -> int:
            return max(1, int(v * factor))

        return dataclasses.replace(
            self, throughput_n=n(self.throughput_n), latency_n=n(self.latency_n),
            latency_warmup=max(1, n(self.latency_warmup)), io_n=n(self.io_n),
            cpu_n=max(self.cpu_processes, n(self.cpu_n)), producer_n=n(self.producer_n),
            pool_n=max(self.cpu_processes, n(self.pool_n)),
            limits_n=n(self.limits_n), limits_m=max(self.limits_keys, n(self.limits_m)))


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@dataclass(frozen=True)
class Servers:
    """Where the brokers are. taskloom isolates itself by namespace on ``redis_url``'s
    database; the peers (whose key names are fixed) get databases of their own,
    which the benchmark owns and empties (FLUSHDB) between runs."""

    redis_url: str = field(default_factory=lambda: os.environ.get(
        "TASKLOOM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    amqp_url: str = field(default_factory=lambda: os.environ.get(
        "TASKLOOM_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    #: (broker database, result database) for the peers: never the shared one
    peer_dbs: tuple[int, int] = (5, 6)

    def redis_db(self, db: int) -> str:
        return _with_db(self.redis_url, db)

    @property
    def peer_broker_url(self) -> str:
        return self.redis_db(self.peer_dbs[0])

    @property
    def peer_result_url(self) -> str:
        return self.redis_db(self.peer_dbs[1])

    def describe(self) -> dict[str, str]:
        def redact(url: str) -> str:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))

        return {"redis": redact(self.redis_url), "amqp": redact(self.amqp_url),
                "peer_redis_dbs": ",".join(map(str, self.peer_dbs))}


@dataclass
class Run:
    """One measurement: one framework, one workload, one broker, one repeat."""

    workload: str
    broker: str
    framework: str
    repeat: int
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    job: str = ""  # drain | latency | producer: the measurement that made the figures

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)
