"""Rules with explicit times: intervals, cron with seconds, time zones, DST, bounds,
jitter and one-shots (pure functions of the time they are given)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest

from runtime.errors import ConfigError
from runtime.ops.scheduler import Rule, at, cron, every

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def ticks(rule: Rule, start: datetime, end: datetime) -> list[datetime]:
    out: list[datetime] = []
    t: datetime | None = start
    while True:
        t = rule.next_after(t)  # type: ignore[arg-type]
        if t is None or t > end:
            return out
        out.append(t)


def test_every_ticks_on_the_epoch_grid_so_schedulers_agree() -> None:
    rule = every(timedelta(seconds=10))
    assert rule.next_after(utc(2030, 1, 1, 0, 0, 3)) == utc(2030, 1, 1, 0, 0, 10)
    assert rule.next_after(utc(2030, 1, 1, 0, 0, 10)) == utc(2030, 1, 1, 0, 0, 20)
    assert rule.prev_at_or_before(utc(2030, 1, 1, 0, 0, 19)) == utc(2030, 1, 1, 0, 0, 10)
    assert rule.prev_at_or_before(utc(2030, 1, 1, 0, 0, 20)) == utc(2030, 1, 1, 0, 0, 20)


def test_every_with_start_and_end_is_anchored_and_bounded() -> None:
    start, end = utc(2030, 1, 1, 0, 0, 3), utc(2030, 1, 1, 0, 0, 33)
    rule = every(10, start=start, end=end)
    assert ticks(rule, utc(2029, 1, 1), utc(2031, 1, 1)) == [
        utc(2030, 1, 1, 0, 0, s) for s in (3, 13, 23, 33)]
    assert rule.prev_at_or_before(utc(2030, 1, 1, 0, 0, 2)) is None
    assert rule.prev_at_or_before(utc(2030, 1, 1, 0, 5)) == end


def test_cron_with_a_leading_seconds_field() -> None:
    rule = cron("*/15 * * * * *")
    assert ticks(rule, utc(2030, 1, 1, 0, 0, 3), utc(2030, 1, 1, 0, 1)) == [
        utc(2030, 1, 1, 0, 0, 15), utc(2030, 1, 1, 0, 0, 30), utc(2030, 1, 1, 0, 0, 45),
        utc(2030, 1, 1, 0, 1)]
    assert rule.prev_at_or_before(utc(2030, 1, 1, 0, 0, 44)) == utc(2030, 1, 1, 0, 0, 30)


def test_cron_in_a_time_zone_follows_its_offset_through_the_year() -> None:
    rule = cron("0 9 * * *", tz="America/New_York")
    assert rule.next_after(utc(2030, 1, 15)) == utc(2030, 1, 15, 14)  # EST, UTC-5
    assert rule.next_after(utc(2030, 7, 15)) == utc(2030, 7, 15, 13)  # EDT, UTC-4


def test_dst_spring_forward_a_0230_job_runs_once_at_the_end_of_the_gap() -> None:
    # 2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist
    rule = cron("30 2 * * *", tz="Europe/Berlin")
    got = ticks(rule, utc(2026, 3, 27, 12), utc(2026, 3, 30, 12))
    assert [t.astimezone(BERLIN).isoformat() for t in got] == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]


def test_dst_spring_forward_a_frequent_job_fires_once_for_the_whole_gap() -> None:
    rule = cron("*/30 * * * *", tz="Europe/Berlin")
    got = ticks(rule, utc(2026, 3, 29, 0, 15), utc(2026, 3, 29, 2, 0))
    assert [t.astimezone(BERLIN).strftime("%H:%M%z") for t in got] == [
        "01:30+0100", "03:00+0200", "03:30+0200", "04:00+0200"]


def test_dst_fall_back_a_0230_job_runs_once_at_the_first_occurrence() -> None:
    # 2026-10-25 in Berlin: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice
    rule = cron("30 2 * * *", tz="Europe/Berlin")
    got = ticks(rule, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert [t.astimezone(BERLIN).isoformat() for t in got] == [
        "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]


def test_dst_fall_back_a_frequent_job_does_not_repeat_the_hour() -> None:
    rule = cron("*/30 * * * *", tz="Europe/Berlin")
    got = ticks(rule, utc(2026, 10, 24, 23, 45), utc(2026, 10, 25, 2, 45))
    assert [t.astimezone(BERLIN).strftime("%H:%M%z") for t in got] == [
        "02:00+0200", "02:30+0200", "03:00+0100", "03:30+0100"]
    # in the repeated hour (02:40 CET), the last tick is 02:30 CEST, the next 03:00 CET
    second = datetime(2026, 10, 25, 2, 40, tzinfo=BERLIN, fold=1).astimezone(UTC)
    assert rule.prev_at_or_before(second) == got[1]
    assert rule.next_after(second) == got[2]


@pytest.mark.parametrize("expr", ["*/20 * * * *", "30 2 * * *", "*/10 2 * * * *"])
@pytest.mark.parametrize("day", [datetime(2026, 3, 29, tzinfo=UTC), datetime(2026, 10, 25, tzinfo=UTC)])
def test_prev_and_next_agree_around_dst_changes(expr: str, day: datetime) -> None:
    rule = cron(expr, tz="Europe/Berlin")
    t = day - timedelta(hours=2)
    while t < day + timedelta(hours=6):
        prev, nxt = rule.prev_at_or_before(t), rule.next_after(t)
        assert prev is not None and nxt is not None
        assert prev <= t < nxt
        assert rule.prev_at_or_before(nxt - timedelta(milliseconds=1)) == prev
        assert rule.next_after(prev) == nxt
        assert rule.prev_at_or_before(nxt) == nxt
        t += timedelta(minutes=7)


def test_jitter_stays_within_its_bounds_and_is_the_same_everywhere() -> None:
    rule = every(60, jitter=5)
    offsets = []
    for k in range(200):
        tick = utc(2030, 1, 1) + timedelta(minutes=k)
        fire = rule.fire_at("job", tick)
        assert tick <= fire < tick + timedelta(seconds=5)
        assert fire == every(60, jitter=5).fire_at("job", tick)  # another process agrees
        offsets.append((fire - tick).total_seconds())
    assert max(offsets) - min(offsets) > 2.5  # spread over the window, not constant
    assert every(60).fire_at("job", utc(2030, 1, 1)) == utc(2030, 1, 1)


def test_at_ticks_once() -> None:
    when = utc(2030, 5, 1, 12)
    rule = at(when)
    assert rule.next_after(utc(2030, 1, 1)) == when
    assert rule.next_after(when) is None
    assert rule.prev_at_or_before(when - timedelta(seconds=1)) is None
    assert rule.prev_at_or_before(utc(2031, 1, 1)) == when


def test_rules_survive_their_stored_form() -> None:
    for rule in (every(5, jitter=1.5, start=utc(2030, 1, 1)), cron("0 3 * * *", tz="Europe/Berlin"),
                 at(utc(2030, 1, 1))):
        data = msgspec.json.encode(rule)
        assert msgspec.json.decode(data, type=Rule) == rule


@pytest.mark.parametrize("make", [
    lambda: cron("61 * * * *"),
    lambda: cron("* * * *"),
    lambda: cron("0 3 * * *", tz="Mars/Olympus"),
    lambda: every(0),
    lambda: every(5, jitter=-1),
    lambda: at(datetime(2030, 1, 1)),
    lambda: every(5, start=utc(2030, 1, 2), end=utc(2030, 1, 1)),
])
def test_bad_rules_are_refused_with_a_config_error(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]
