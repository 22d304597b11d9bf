"""When a schedule ticks: ``every``, ``cron`` and ``at`` (pure, no I/O).

Every rule answers two questions about aware UTC datetimes: the first tick
strictly after ``t`` (``next_after``) and the last tick at or before ``t``
(``prev_at_or_before``); ``None`` when there is none (a one-shot that has
passed, a rule past its ``end``). A tick's *nominal* time names it (its task id
is derived from the schedule's name and that time); ``fire_at`` adds the rule's
jitter, a deterministic fraction of ``jitter`` seconds derived from the
schedule's name and the tick, so every scheduler process agrees on it.

``every(interval)`` ticks at ``anchor + k * interval``; the anchor is ``start``
when given, else the Unix epoch, so schedulers agree without coordinating.

``cron(expr, tz=...)`` takes 5 fields (minute hour day month weekday) or 6 with
a leading seconds field (``"*/10 * * * * *"``: every ten seconds), parsed by
croniter, evaluated on the wall clock of ``tz`` (an IANA name, UTC by default).

Daylight saving time, the rule (cronie's, the Linux cron daemon's):

- A wall time that does not exist (the spring-forward gap: 02:00-03:00 in
  Europe/Berlin on the last Sunday of March) fires *once*, at the instant the
  gap ends (03:00 local), however many of the rule's times fell in the gap. A
  ``"30 2 * * *"`` job runs once that day, at 03:00.
- A wall time that occurs twice (fall-back: 02:00-03:00 happens twice in
  Berlin on the last Sunday of October) fires once, at its first occurrence.
  A ``"30 2 * * *"`` job runs once that day; a ``"*/15 * * * *"`` job does not
  fire again during the repeated hour. Use ``every()`` for an exact interval.

``at(when)`` ticks once. All rules take ``start``/``end`` bounds (ticks before
``start`` or after ``end`` do not happen) and ``jitter`` (seconds).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import CroniterBadCronError, croniter  # type: ignore[import-untyped]

from runtime.errors import ConfigError

__all__ = ["At", "Cron", "Every", "Rule", "at", "cron", "every"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
#: Bound on the steps a cron search takes: near a DST change a search walks
#: through up to the changed hour (3,600 steps for an every-second rule).
_MAX_STEPS = 20_000


def _ms(t: datetime) -> int:
    return (t - _EPOCH) // _MS


def _from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _offset(t: datetime, zone: ZoneInfo) -> timedelta:
    return t.astimezone(zone).utcoffset() or timedelta(0)


def _aware(t: datetime, what: str) -> datetime:
    if t.tzinfo is None:
        raise ConfigError(f"{what} must be a timezone-aware datetime "
                          "(e.g. datetime(2030, 1, 1, tzinfo=UTC)), not a naive one")
    return t.astimezone(UTC)


class _Bounds(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    start_ms: int | None = None
    end_ms: int | None = None
    jitter_s: float = 0.0

    def fire_at(self, name: str, tick: datetime) -> datetime:
        """When the tick named ``tick`` is published: ``tick`` plus its jitter,
        in ``[tick, tick + jitter)``, the same in every process."""
        if self.jitter_s <= 0:
            return tick
        digest = hashlib.blake2b(f"{name}\0{_ms(tick)}".encode(), digest_size=8).digest()
        fraction = int.from_bytes(digest, "big") / 2**64
        return tick + timedelta(seconds=fraction * self.jitter_s)

    def _in_bounds(self, t: datetime | None) -> datetime | None:
        if t is None or (self.end_ms is not None and _ms(t) > self.end_ms):
            return None
        return t

    def _floor(self, after: datetime) -> datetime:
        """``next_after`` never returns a tick before ``start``."""
        if self.start_ms is not None and _ms(after) < self.start_ms:
            return _from_ms(self.start_ms) - _MS
        return after

    def _ceil(self, t: datetime) -> datetime | None:
        if self.end_ms is not None and _ms(t) > self.end_ms:
            t = _from_ms(self.end_ms)
        if self.start_ms is not None and _ms(t) < self.start_ms:
            return None
        return t

    def _check_start(self, t: datetime | None) -> datetime | None:
        if t is None or (self.start_ms is not None and _ms(t) < self.start_ms):
            return None
        return t


class Every(_Bounds, frozen=True, kw_only=True, tag="every"):
    """Ticks every ``interval_ms``, at ``anchor + k * interval`` (anchor: start, else epoch)."""

    interval_ms: int

    def _anchor(self) -> int:
        return self.start_ms if self.start_ms is not None else 0

    def next_after(self, after: datetime) -> datetime | None:
        base = _ms(self._floor(after)) - self._anchor()
        k = base // self.interval_ms + 1
        return self._in_bounds(_from_ms(self._anchor() + k * self.interval_ms))

    def prev_at_or_before(self, t: datetime) -> datetime | None:
        c = self._ceil(t)
        if c is None:
            return None
        k = (_ms(c) - self._anchor()) // self.interval_ms
        return self._check_start(_from_ms(self._anchor() + k * self.interval_ms))

    def describe(self) -> str:
        return f"every {timedelta(milliseconds=self.interval_ms)}"


class Cron(_Bounds, frozen=True, kw_only=True, tag="cron"):
    """Ticks at the wall-clock times of a cron expression in a time zone."""

    expr: str
    tz: str = "UTC"

    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def _seconds(self) -> bool:
        return len(self.expr.split()) == 6

    def _iter(self, local: datetime) -> Any:
        return croniter(self.expr, local, second_at_beginning=self._seconds())

    def _to_utc(self, naive: datetime, zone: ZoneInfo) -> datetime:
        """The instant of wall time ``naive``: its first occurrence, or the end
        of the gap when it does not exist (see the module's DST rule)."""
        first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
        if first.astimezone(zone).replace(tzinfo=None) == naive:
            return first
        # in a gap: fold=1 maps it before the transition, fold=0 after it; the
        # transition is the first instant whose offset is the later one
        lo = _ms(naive.replace(tzinfo=zone, fold=1).astimezone(UTC))
        hi = _ms(first)
        after_offset = first.astimezone(zone).utcoffset()
        while hi - lo > 1000:
            mid = (lo + hi) // 2
            if _from_ms(mid).astimezone(zone).utcoffset() == after_offset:
                hi = mid
            else:
                lo = mid
        return _from_ms(hi // 1000 * 1000)

    def next_after(self, after: datetime) -> datetime | None:
        after = self._floor(after)
        zone = self._zone()
        # from the wall time of ``after``: later wall times that map before it
        # (the repeated hour's first occurrence) are stepped over
        it = self._iter(after.astimezone(zone).replace(tzinfo=None))
        for _ in range(_MAX_STEPS):
            t = self._to_utc(it.get_next(datetime), zone)
            if t > after:
                return self._in_bounds(t)
        raise ConfigError(f"cron {self.expr!r} finds no time after {after.isoformat()}; "
                          "check the expression")

    def prev_at_or_before(self, t: datetime) -> datetime | None:
        c = self._ceil(t)
        if c is None:
            return None
        zone = self._zone()
        local = c.astimezone(zone).replace(tzinfo=None)
        # near a fall-back, wall times up to the change's size later map before c
        day = timedelta(days=1)
        skew = abs(_offset(c + day, zone) - _offset(c - day, zone))
        it = self._iter(local + skew + timedelta(seconds=1))
        for _ in range(_MAX_STEPS):
            found = self._to_utc(it.get_prev(datetime), zone)
            if found <= c:
                return self._check_start(found)
        raise ConfigError(f"cron {self.expr!r} finds no time before {c.isoformat()}; "
                          "check the expression")

    def describe(self) -> str:
        return f"cron {self.expr!r} {self.tz}"


class At(_Bounds, frozen=True, kw_only=True, tag="at"):
    """Ticks once, at ``when_ms``."""

    when_ms: int

    def next_after(self, after: datetime) -> datetime | None:
        when = _from_ms(self.when_ms)
        return self._in_bounds(when if when > self._floor(after) else None)

    def prev_at_or_before(self, t: datetime) -> datetime | None:
        c = self._ceil(t)
        when = _from_ms(self.when_ms)
        return self._check_start(when if c is not None and when <= c else None)

    def describe(self) -> str:
        return f"at {_from_ms(self.when_ms).isoformat()}"


Rule = Annotated[Every | Cron | At, "a schedule's rule"]


def _bounds(start: datetime | None, end: datetime | None, jitter: float | timedelta
            ) -> dict[str, Any]:
    jitter_s = jitter.total_seconds() if isinstance(jitter, timedelta) else float(jitter)
    if not 0 <= jitter_s < 10**9:
        raise ConfigError(f"jitter must be a non-negative number of seconds, not {jitter!r}")
    start_ms = _ms(_aware(start, "start")) if start is not None else None
    end_ms = _ms(_aware(end, "end")) if end is not None else None
    if start_ms is not None and end_ms is not None and end_ms < start_ms:
        raise ConfigError(f"end {end} is before start {start}; swap them or drop one")
    return {"start_ms": start_ms, "end_ms": end_ms, "jitter_s": jitter_s}


def every(interval: timedelta | float, *, start: datetime | None = None,
          end: datetime | None = None, jitter: float | timedelta = 0.0) -> Every:
    """Tick every ``interval`` (a timedelta or seconds, at least 1 ms)."""
    seconds = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
    interval_ms = round(seconds * 1000)
    if interval_ms < 1:
        raise ConfigError(f"every() needs an interval of at least 1 ms, not {interval!r}")
    return Every(interval_ms=interval_ms, **_bounds(start, end, jitter))


def cron(expr: str, *, tz: str = "UTC", start: datetime | None = None,
         end: datetime | None = None, jitter: float | timedelta = 0.0) -> Cron:
    """Tick at the times of ``expr`` (5 fields, or 6 with seconds first) on the
    wall clock of ``tz``; see the module docstring for daylight saving time."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron {expr!r} has {len(fields)} fields; give 5 (minute hour day "
                          "month weekday) or 6 with seconds first")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(f"unknown time zone {tz!r} ({e}); use an IANA name such as "
                          "'Europe/Berlin' or 'UTC'") from None
    try:
        croniter(expr, datetime(2000, 1, 1), second_at_beginning=len(fields) == 6)
    except (CroniterBadCronError, ValueError, KeyError) as e:
        raise ConfigError(f"bad cron expression {expr!r}: {e}; see `man 5 crontab`") from None
    return Cron(expr=" ".join(fields), tz=tz, **_bounds(start, end, jitter))


def at(when: datetime, *, jitter: float | timedelta = 0.0) -> At:
    """Tick once, at ``when`` (timezone-aware)."""
    return At(when_ms=_ms(_aware(when, "at(when)")), **_bounds(None, None, jitter))
