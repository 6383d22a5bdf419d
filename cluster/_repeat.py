"""Repeat schedules (SPEC §11): when each run of a repeating task is due.

Pure: no threads, no clock, no locks. Times are the cluster's monotonic seconds;
the cluster passes two conversions from its clock, ``now_wall(mono) -> aware
datetime`` and ``from_wall(datetime) -> mono``, which is all a cron schedule or an
``until`` needs of wall time.

``every``: run ``k`` is due at ``first + k * every``, computed from ``k`` (never
accumulated), so the schedule does not drift. ``cron``: the times of a 5-field
expression in the process's local time zone (``LOCAL``, which follows ``TZ`` and
``time.tzset()``), as ``cronsim`` computes them: it follows Debian cron on DST
transitions (a job at a fixed time that falls in the spring-forward gap runs once,
right after it; one in the repeated fall-back hour runs once; jobs whose minute or
hour field starts with ``*`` run at every real time, so an hourly job runs in both
folds and none runs in the gap).

Missed occurrences (a run still going, no worker free, a clock jump) collapse into
one run due at the latest occurrence not after now: it starts at once, and later
runs keep the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from ._validate import integer, seconds

if TYPE_CHECKING:
    from cronsim import CronSim

__all__ = ["LOCAL", "Repeat"]

_UTC = UTC
_US = timedelta(microseconds=1)
#: Slack for the round trip mono -> wall -> mono (microsecond rounding of datetimes,
#: float error of the clock's offset). Cron times are at least a minute apart.
_SLACK = timedelta(milliseconds=1)
#: Missed cron occurrences walked one by one before bisecting for the latest.
_WALK = 8
_CRON_EXTRA = "repeat(cron=...) needs the 'cron' extra: pip install 'cluster[cron]'"


# --------------------------------------------------------------------------- local time


def _to_utc(local: datetime) -> datetime:
    """A naive local time (its ``fold`` honoured) as a naive UTC time (C library rules)."""
    return local.astimezone(_UTC).replace(tzinfo=None)


def _to_local(utc: datetime) -> datetime:
    """A naive UTC time as a naive local time (C library rules)."""
    return utc.replace(tzinfo=_UTC).astimezone().replace(tzinfo=None)


class _LocalTime(tzinfo):
    """The process's local time zone, DST rules included, as a ``tzinfo``.

    ``datetime.astimezone()`` gives only a fixed offset (right for one instant, wrong
    across a DST change), and the zone's IANA name is not known in general; this
    asks the C library (``localtime``/``mktime``, through ``datetime``) for each
    time instead, so it follows ``TZ`` and ``time.tzset()``. It implements PEP 495:
    in a repeated hour ``fold=0`` is the first pass; in a gap ``fold=0`` takes the
    offset from before the transition (as ``zoneinfo`` does).
    """

    def _instant(self, dt: datetime) -> datetime:
        wall = dt.replace(tzinfo=None, fold=0)
        first = _to_utc(wall)
        second = _to_utc(wall.replace(fold=1))
        if first == second:
            return first
        early, late = min(first, second), max(first, second)
        if _to_local(early) == wall:  # both instants show this wall time: a repeated hour
            return late if dt.fold else early
        # a gap: the offset from before the transition maps the wall time later
        return early if dt.fold else late

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        if dt is None:
            return None
        return dt.replace(tzinfo=None) - self._instant(dt)

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None  # not known apart from the offset; nothing here needs it

    def tzname(self, dt: datetime | None) -> str | None:
        if dt is None:
            return None
        return self._instant(dt).replace(tzinfo=_UTC).astimezone().tzname()

    def fromutc(self, dt: datetime) -> datetime:
        if not isinstance(dt, datetime) or dt.tzinfo is not self:
            raise ValueError("fromutc: dt.tzinfo is not self")
        utc = dt.replace(tzinfo=None)
        wall = _to_local(utc)
        # The second pass of a repeated hour: fold=1 (C gives the first pass for fold=0).
        later = _to_utc(wall.replace(fold=1)) == utc and _to_utc(wall) != utc
        return wall.replace(tzinfo=self, fold=1 if later else 0)

    def __repr__(self) -> str:
        return "cluster.LOCAL"

    def __reduce__(self) -> str:
        return "LOCAL"


#: The process's local time zone (follows ``TZ`` and ``time.tzset()``), with DST.
LOCAL: tzinfo = _LocalTime()


# --------------------------------------------------------------------------- cron


_cronsim: Any = None


def _cron_class() -> type[CronSim]:
    """``cronsim.CronSim``, imported on first use (the ``cron`` extra)."""
    global _cronsim
    if _cronsim is None:
        try:
            from cronsim import CronSim
        except ImportError as exc:
            raise ImportError(_CRON_EXTRA) from exc
        _cronsim = CronSim
    cls: type[CronSim] = _cronsim
    return cls


def _check_cron(expr: object) -> str:
    if not isinstance(expr, str):
        raise TypeError(
            f"cron must be a str (a 5-field cron expression), got {type(expr).__name__}"
        )
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron must have 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}: {expr!r}"
        )
    normal = " ".join(fields)
    cron = _cron_class()
    try:
        next(cron(normal, datetime(2000, 1, 1)))
    except StopIteration:
        raise ValueError(f"cron {expr!r} never matches a date") from None
    except Exception as exc:  # CronSimError, and whatever else a malformed field raises
        raise ValueError(f"cron {expr!r} is not a valid cron expression: {exc}") from None
    return normal


def _utc_bound(until: datetime) -> datetime:
    """``until`` in UTC (naive: local time, as ``astimezone()`` reads it), where
    comparisons cannot ignore ``fold``; ``datetime.max``/``min`` (naive, whose UTC
    form is out of range) clamp to the ends of the range."""
    try:
        return until.astimezone(_UTC)
    except (OverflowError, ValueError):
        end = datetime.max if until.year > 5000 else datetime.min
        return end.replace(tzinfo=_UTC)


# --------------------------------------------------------------------------- Repeat


class Repeat:
    """An immutable repeat schedule: ``repeat(every=None, *, cron=None, count=None,
    until=None, stop_on_error=False)``.

    Exactly one of ``every`` (seconds > 0: int, float or ``timedelta``) and ``cron``
    (a 5-field expression, checked now; needs the ``cron`` extra). ``count``: at
    most that many runs (int >= 1). ``until``: no run is due, or starts, after
    this ``datetime`` (naive means local time). ``stop_on_error`` is carried for
    the cluster (a final error ends the series).
    """

    __slots__ = ("_until", "count", "cron", "every", "stop_on_error", "until")

    every: float | None
    cron: str | None
    count: int | None
    until: datetime | None
    stop_on_error: bool
    #: ``until`` in UTC (naive taken as local time).
    _until: datetime | None

    def __init__(
        self,
        every: float | timedelta | None = None,
        *,
        cron: str | None = None,
        count: int | None = None,
        until: datetime | None = None,
        stop_on_error: bool = False,
    ) -> None:
        if (every is None) == (cron is None):
            given = "both" if every is not None else "neither"
            raise ValueError(f"repeat() needs exactly one of every and cron, got {given}")
        set_ = object.__setattr__
        set_(self, "every", None if every is None else seconds(every, "every", positive=True))
        set_(self, "cron", None if cron is None else _check_cron(cron))
        set_(self, "count", None if count is None else integer(count, "count", minimum=1))
        if until is not None and not isinstance(until, datetime):
            raise TypeError(f"until must be a datetime, got {type(until).__name__}")
        set_(self, "until", until)
        set_(self, "_until", None if until is None else _utc_bound(until))
        if not isinstance(stop_on_error, bool):
            raise TypeError(f"stop_on_error must be a bool, got {type(stop_on_error).__name__}")
        set_(self, "stop_on_error", stop_on_error)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Repeat is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Repeat is immutable (cannot delete {name!r})")

    def __reduce__(self) -> tuple[object, ...]:  # pickle and copy through __init__
        return (_repeat, (self.every, self.cron, self.count, self.until, self.stop_on_error))

    def _key(self) -> tuple[object, ...]:
        return (self.every, self.cron, self.count, self._until, self.stop_on_error)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Repeat):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        what = f"every={self.every!r}" if self.cron is None else f"cron={self.cron!r}"
        return (
            f"Repeat({what}, count={self.count!r}, until={self.until!r}, "
            f"stop_on_error={self.stop_on_error!r})"
        )

    # -- the schedule --------------------------------------------------------------

    def first_due(
        self,
        start: float,
        *,
        now_wall: Callable[[float], datetime],
        from_wall: Callable[[datetime], float],
    ) -> float | None:
        """When run 0 is due, for a series that may start at ``start`` (mono).

        ``every``: ``start`` itself. ``cron``: the first cron time >= ``start``
        (less a millisecond of slack for the mono/wall round trip, so a start exactly
        on a cron time keeps it). ``None``: no run at all (``until`` is before it, or
        the expression has no time left).
        """
        if self.every is not None:
            if self._until is not None and now_wall(start).astimezone(_UTC) > self._until:
                return None
            return start
        due = self._cron_at_or_after(now_wall(start).astimezone(_UTC) - _SLACK)
        if due is None or (self._until is not None and due > self._until):
            return None
        return from_wall(due)

    def next_due(
        self,
        first: float,
        last_due: float,
        now: float,
        *,
        runs: int,
        now_wall: Callable[[float], datetime],
        from_wall: Callable[[datetime], float],
    ) -> float | None:
        """When the next run is due, after the run due at ``last_due`` ended at ``now``.

        ``first`` is run 0's due time, ``runs`` the runs started so far. The next
        occurrence after ``last_due``; if that is not after ``now`` (occurrences were
        missed), the latest occurrence not after ``now`` instead (one run, at once;
        the grid is kept). ``None`` ends the series: ``count`` runs were started, the
        run would be due or start after ``until``, or the expression has no time left.
        """
        if self.count is not None and runs >= self.count:
            return None
        if self.every is not None:
            due = self._every_next(first, last_due, now, self.every)
            if self._until is not None and now_wall(max(due, now)).astimezone(_UTC) > self._until:
                return None
            return due
        after = now_wall(last_due).astimezone(_UTC) + _SLACK
        wall_now = now_wall(now).astimezone(_UTC)
        cron_due = self._cron_at_or_after(after)
        if cron_due is None:
            return None
        if cron_due <= wall_now:
            cron_due = self._cron_latest(cron_due, wall_now)
        if self._until is not None and max(cron_due, wall_now) > self._until:
            return None
        return from_wall(cron_due)

    @staticmethod
    def _every_next(first: float, last_due: float, now: float, every: float) -> float:
        # The first grid point after last_due: k from a division, then nudged past
        # the float error of that division (first + k * every is what is compared).
        k = max(math.floor((last_due - first) / every) + 1, 0)
        while k > 0 and first + (k - 1) * every > last_due:
            k -= 1
        while first + k * every <= last_due:
            k += 1
        due = first + k * every
        if due > now:
            return due
        # Missed: the latest grid point <= now, in O(1) however long the gap.
        j = max(math.floor((now - first) / every), k)
        while j > k and first + j * every > now:
            j -= 1
        while first + (j + 1) * every <= now:
            j += 1
        return first + j * every

    def _cron_at_or_after(self, when: datetime) -> datetime | None:
        """The first cron time >= ``when`` (aware), in UTC; None if there is none.

        Comparisons are made in UTC: aware datetimes in one zone compare by wall time
        and ignore ``fold``. Debian's rule for fixed-time jobs makes cronsim walk
        naive wall time, so from inside a repeated hour its first answer can be the
        earlier pass of a time already gone: those are skipped.
        """
        assert self.cron is not None
        local = (when.astimezone(_UTC) - _US).astimezone(LOCAL)  # cronsim yields times > it
        target = when.astimezone(_UTC)
        times = _cron_class()(self.cron, local)
        for found in times:
            utc = found.astimezone(_UTC)
            if utc >= target:
                return utc
        return None  # cronsim found no time in 50 years

    def _cron_latest(self, due: datetime, now: datetime) -> datetime:
        """The latest cron time <= ``now``, given ``due``, a cron time <= ``now``.

        Walks a few occurrences (a short overrun), then bisects on where to search
        from: bounded work (about log2 of the gap in seconds) after any gap.
        """
        for _ in range(_WALK):
            following = self._cron_at_or_after(due + _US)
            if following is None or following > now:
                return due
            due = following
        # The answer is in [due, hi): due is a cron time <= now, and no cron time
        # lies in [hi, now]. Cron times are whole minutes apart, so once the window
        # is under a second, due is the answer.
        hi = now + _US
        while hi - due > timedelta(seconds=1):
            mid = due + (hi - due) / 2
            found = self._cron_at_or_after(mid)
            if found is None or found > now:
                hi = mid
            else:
                due = found
        return due


def _repeat(
    every: float | None, cron: str | None, count: int | None, until: datetime | None, stop: bool
) -> Repeat:
    return Repeat(every, cron=cron, count=count, until=until, stop_on_error=stop)
