"""Limits hold across real processes sharing one Redis: 3 caller processes
(``tests/limits/proc.py``) admit through their own ``LimitsGate``; what ran
when is recorded outside the limiter, from the callers' own clocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from runtime.ops.limits import Check, RedisLimitStore, parse_rate
from runtime.ops.limits.store import ADMIT
from tests.conftest import REDIS_URL
from tests.limits.proc import RATE

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RUN_S = 12.0


def spawn(mode: str, namespace: str, out: Path, number: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.limits.proc", mode, REDIS_URL,
                             namespace, str(out), str(number)], cwd=ROOT)


def records(paths: list[Path]) -> Iterator[dict[str, object]]:
    for p in paths:
        if p.exists():
            for line in p.read_text().splitlines():
                yield json.loads(line)


async def wait_all(procs: list[subprocess.Popen[bytes]], limit_s: float) -> None:
    with anyio.fail_after(limit_s):
        while any(p.poll() is None for p in procs):
            await anyio.sleep(0.1)
    assert [p.returncode for p in procs] == [0, 0, 0]


@pytest.fixture
def purge(namespace: str) -> Iterator[None]:
    yield
    async def run() -> None:
        store = RedisLimitStore(REDIS_URL, namespace=namespace)
        await store.purge()
        await store.aclose()
    anyio.run(run)


async def test_a_rate_holds_across_three_processes(tmp_path: Path, namespace: str,
                                                   purge: None) -> None:
    paths = [tmp_path / f"rate{i}.jsonl" for i in range(3)]
    procs = [spawn("rate", namespace, p, RUN_S) for p in paths]
    try:
        # generous: three interpreters start on a loaded 2-core machine
        await wait_all(procs, RUN_S + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    starts = sorted(float(r["t"]) for r in records(paths) if r["k"] == "START")  # type: ignore[arg-type]
    assert len({r["pid"] for r in records(paths)}) == 3  # every process took its share
    r = parse_rate(RATE)
    # steady rate over the whole run, after the initial burst
    steady = starts[r.burst - 1:]
    measured = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 20 * 0.95 <= measured <= 20 * 1.05, measured
    # no 1 s window holds more than the limit allows (count + burst - 1)
    worst = max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)
    assert worst <= r.window_max, (worst, r.window_max)


async def test_two_keys_of_limit_two_never_overlap_more(tmp_path: Path, namespace: str,
                                                        purge: None) -> None:
    paths = [tmp_path / f"sem{i}.jsonl" for i in range(3)]
    procs = [spawn("sem", namespace, p, 6.0) for p in paths]
    try:
        await wait_all(procs, 6.0 + 60)  # generous: see above
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    events: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
    for rec in records(paths):
        if rec["k"] in ("START", "END"):
            events[str(rec["key"])].append((float(rec["t"]), 1 if rec["k"] == "START" else -1))  # type: ignore[arg-type]
    for key, evs in events.items():
        evs.sort(key=lambda e: (e[0], e[1]))  # an END before a START at the same instant
        running = peak = 0
        for _, step in evs:
            running += step
            peak = max(peak, running)
        assert peak == 2, (key, peak)  # reached, never passed
        assert sum(1 for _, s in evs if s == 1) > 20  # both keys made progress


async def test_a_killed_holder_frees_its_permit_within_the_lease(tmp_path: Path, namespace: str,
                                                                 purge: None) -> None:
    lease_s = 2.0
    out = tmp_path / "hold.jsonl"
    proc = spawn("hold", namespace, out, lease_s)
    store = RedisLimitStore(REDIS_URL, namespace=namespace)

    def probe() -> Check:  # a third holder on a key of limit 2, as the gate builds it
        return Check(task="limits.rebuild", holder=f"probe{time.monotonic()}", sem_key="k",
                     limit=2, lease_ms=int(lease_s * 1000))

    try:
        with anyio.fail_after(60):  # generous: an interpreter starts on a loaded machine
            while not any(r["k"] == "HELD" for r in records([out])):
                await anyio.sleep(0.05)
        filler = Check(task="limits.rebuild", holder="filler", sem_key="k", limit=2,
                       lease_ms=600_000)
        assert (await store.admit(filler))[0] == ADMIT
        # the live holder renews: after two leases its permit is still held
        await anyio.sleep(lease_s * 2)
        assert (await store.admit(probe()))[0] != ADMIT
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        with anyio.fail_after(30):
            while (await store.admit(probe()))[0] != ADMIT:
                await anyio.sleep(0.05)
        # the point of the test is this deadline: the lease, plus a renewal
        # that may have landed just before the kill, plus polling slack
        assert time.monotonic() - killed <= lease_s + 1.5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await store.purge()
        await store.aclose()
