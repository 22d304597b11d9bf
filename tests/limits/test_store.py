"""The GCRA and the leased semaphore, on memory and on the shared Redis, with
time given by the test (``now_ms``): the same answers from both stores."""

from __future__ import annotations

import pytest

from runtime.ops.limits import Check, LimitStore, parse_rate
from runtime.ops.limits.store import ADMIT, CONCURRENCY, RATE, SUPERSEDED, tokens

T0 = 1_000_000_000_000.0  # an epoch-ms "now" the test moves by hand


def rate_check(holder: str, rate: str = "10/s", key: str = "") -> Check:
    r = parse_rate(rate)
    return Check(task="t", holder=holder, rate_key=key, interval_ms=r.interval_ms, burst=r.burst,
                 count=r.count)


async def test_gcra_spaces_starts_by_the_interval(store: LimitStore) -> None:
    # 10/s: interval 100 ms, default burst 1
    assert await store.admit(rate_check("a"), T0) == (ADMIT, 0)
    status, delay = await store.admit(rate_check("b"), T0 + 10)
    assert status == RATE and delay == pytest.approx(90)  # b reserved the slot at T0 + 100
    assert (await store.admit(rate_check("b"), T0 + 100))[0] == ADMIT
    status, delay = await store.admit(rate_check("c"), T0 + 100)
    assert status == RATE and delay == pytest.approx(100)


async def test_gcra_allows_the_burst_then_the_rate(store: LimitStore) -> None:
    # 20/s:burst=4 -> 4 back to back, then one per 50 ms
    admitted = [(await store.admit(rate_check(f"x{i}", "20/s:burst=4"), T0))[0]
                for i in range(5)]
    assert admitted == [ADMIT] * 4 + [RATE]
    # x4 comes back for its reserved slot and starts; a newcomer then waits
    assert (await store.admit(rate_check("x4", "20/s:burst=4"), T0 + 50))[0] == ADMIT
    assert (await store.admit(rate_check("y", "20/s:burst=4"), T0 + 50))[0] == RATE


async def test_gcra_keys_are_independent_and_the_window_holds(store: LimitStore) -> None:
    r = parse_rate("20/s:burst=3")
    starts: list[float] = []
    # 5 s of demand, a new caller every 7 ms; a deferred caller comes back when told
    due: list[tuple[float, str]] = [(T0 + 7 * i, f"h{i}") for i in range(5000 // 7)]
    while due:
        due.sort()
        now, holder = due.pop(0)
        status, delay = await store.admit(rate_check(holder, "20/s:burst=3", key="k1"), now)
        if status == ADMIT:
            if now < T0 + 5000:
                starts.append(now)
        elif now < T0 + 5000:
            due.append((now + delay, holder))
    # key k2 is untouched by k1's spending
    assert (await store.admit(rate_check("other", "20/s:burst=3", key="k2"), now))[0] == ADMIT
    assert max(sum(1 for s in starts if t <= s < t + 1000) for t in starts) <= r.window_max
    assert 20 * 5 - 3 <= len(starts) <= 20 * 5 + r.burst


async def test_semaphore_holds_the_limit_per_key(store: LimitStore) -> None:
    def sem(holder: str, key: str) -> Check:
        return Check(task="t", holder=holder, sem_key=key, limit=2, lease_ms=1000, retry_ms=250)

    assert (await store.admit(sem("a", "k1"), T0))[0] == ADMIT
    assert (await store.admit(sem("b", "k1"), T0))[0] == ADMIT
    # the holders are brand new and no hold time is known: retry_ms, the least spacing
    assert await store.admit(sem("c", "k1"), T0) == (CONCURRENCY, 250)
    assert (await store.admit(sem("c", "k2"), T0))[0] == ADMIT  # another key: its own permits
    assert (await store.admit(sem("a", "k1"), T0))[0] == ADMIT  # a redelivery keeps its permit
    await store.release("t", "k1", "a")
    assert (await store.admit(sem("c", "k1"), T0 + 1))[0] == ADMIT
    snaps = {(s.kind, s.key): s for s in await store.snapshot(T0 + 2)}
    assert snaps[("concurrency", "k1")].held == 2
    assert snaps[("concurrency", "k1")].deferred == 1


async def test_a_lapsed_lease_frees_its_permit_and_renewal_keeps_it(store: LimitStore) -> None:
    def sem(holder: str) -> Check:
        return Check(task="t", holder=holder, sem_key="k", limit=1, lease_ms=1000)

    assert (await store.admit(sem("dead"), T0))[0] == ADMIT
    assert (await store.admit(sem("alive"), T0 + 999))[0] == CONCURRENCY
    assert (await store.admit(sem("alive"), T0 + 1000))[0] == ADMIT  # "dead" never renewed
    await store.renew([("t", "k", "alive")], 1000, T0 + 1900)
    assert (await store.admit(sem("late"), T0 + 2500))[0] == CONCURRENCY  # renewed to 2900
    assert (await store.admit(sem("late"), T0 + 2900))[0] == ADMIT


async def test_a_rate_refusal_gives_back_the_permit_it_took(store: LimitStore) -> None:
    r = parse_rate("1/s")
    both = Check(task="t", holder="a", rate_key="", interval_ms=r.interval_ms, burst=1,
                 sem_key="", limit=1, lease_ms=60_000)
    assert (await store.admit(both, T0))[0] == ADMIT
    await store.release("t", "", "a")
    assert (await store.admit(Check(task="t", holder="b", rate_key="", interval_ms=1000,
                                    burst=1, sem_key="", limit=1), T0 + 1))[0] == RATE
    # b was refused by the rate: its permit is not held, so c gets the only one
    assert (await store.admit(Check(task="t", holder="c", sem_key="", limit=1), T0 + 2))[0] \
        == ADMIT


async def test_unique_and_debounce_records(store: LimitStore) -> None:
    assert await store.claim_unique("t", "doc1", "first", 60_000, T0) is None
    assert await store.claim_unique("t", "doc1", "second", 60_000, T0) == "first"
    assert await store.claim_unique("t", "doc2", "third", 60_000, T0) is None
    await store.mark_latest("t", "doc1", "one", 60_000, T0)
    await store.mark_latest("t", "doc1", "two", 60_000, T0)
    deb = Check(task="t", holder="one", debounce_key="doc1")
    assert await store.admit(deb, T0) == (SUPERSEDED, "two")
    assert (await store.admit(Check(task="t", holder="two", debounce_key="doc1"), T0))[0] \
        == ADMIT


async def test_overrides_round_trip(store: LimitStore) -> None:
    await store.set_override("t", {"rate_limit": "5/s"})
    assert await store.overrides() == {"t": {"rate_limit": "5/s"}}
    await store.set_override("t", None)
    assert await store.overrides() == {}


def test_tokens_of_a_bucket() -> None:
    assert tokens(0, T0, 100, 4) == 4  # idle: full
    assert tokens(T0 + 100, T0, 100, 4) == 3  # one interval spent of a burst of 4
    assert tokens(T0 + 400, T0, 100, 4) == 0


async def test_an_unreachable_redis_is_a_retryable_error_that_says_so() -> None:
    from runtime.ops.limits import LimitsUnavailable, RedisLimitStore

    store = RedisLimitStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        with pytest.raises(LimitsUnavailable, match=r"unreachable.*can be retried"):
            await store.admit(rate_check("a"))
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_a_redis_that_lost_its_scripts_still_answers(namespace: str) -> None:
    """Checks go by EVALSHA; a Redis whose script cache was flushed (a restart)
    answers NOSCRIPT, and the store loads the script and answers as before."""
    import redis.asyncio as aioredis

    from runtime.ops.limits import RedisLimitStore
    from tests.conftest import REDIS_URL

    store = RedisLimitStore(REDIS_URL, namespace=namespace)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await store.admit(rate_check("a"), T0) == (ADMIT, 0)
        # SCRIPT FLUSH is server-wide but harmless to other clients: they reload on NOSCRIPT
        await raw.script_flush()
        status, delay = await store.admit(rate_check("b"), T0 + 10)
        assert status == RATE and delay == pytest.approx(90)
    finally:
        await raw.aclose()
        await store.purge()
        await store.aclose()
