"""SPEC §11 on the pure repeat schedule: ``Repeat.first_due`` and ``Repeat.next_due``.

No threads, no clock: monotonic times are plain floats and a ``Clock`` value maps
them to wall time the way the cluster's clock does (a fixed UTC origin). Cron and
DST tests set ``TZ`` and call ``time.tzset()``, and restore both.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import cronsim  # the cron extra is part of the test install ('.[test,cron]')
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import _repeat
from cluster._repeat import LOCAL, Repeat

MONO0 = 1000.0  # the clock's monotonic reading at WALL0


@dataclass(frozen=True)
class Clock:
    """Monotonic seconds <-> wall time, as the cluster's clock converts them."""

    wall0: datetime  # aware, UTC: the wall time at MONO0

    def now_wall(self, mono: float) -> datetime:
        return (self.wall0 + timedelta(seconds=mono - MONO0)).astimezone(LOCAL)

    def from_wall(self, when: datetime) -> float:
        return MONO0 + (when - self.wall0).total_seconds()

    def mono(self, when: datetime) -> float:
        return self.from_wall(when)

    def first(self, r: Repeat, start: float) -> float | None:
        return r.first_due(start, now_wall=self.now_wall, from_wall=self.from_wall)

    def next(self, r: Repeat, first: float, last: float, now: float, runs: int) -> float | None:
        return r.next_due(
            first, last, now, runs=runs, now_wall=self.now_wall, from_wall=self.from_wall
        )

    def series(self, r: Repeat, start: float, n: int) -> list[datetime]:
        """The first ``n`` due times (as UTC datetimes) when every run ends at once."""
        first = due = self.first(r, start)
        out: list[datetime] = []
        while due is not None and len(out) < n:
            out.append(self.utc(due))
            assert first is not None
            due = self.next(r, first, due, due, len(out))
        return out

    def utc(self, mono: float) -> datetime:
        """``mono`` as a UTC datetime, to the second (cron times are whole seconds)."""
        return self.wall0 + timedelta(seconds=round(mono - MONO0))


CLOCK = Clock(datetime(2024, 1, 1, tzinfo=UTC))


@pytest.fixture
def tz() -> Iterator[None]:
    """Let a test set ``TZ`` (via ``set_tz``); the old value is restored afterwards."""
    old = os.environ.get("TZ")
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def set_tz(name: str) -> None:
    os.environ["TZ"] = name
    time.tzset()


# -- construction -------------------------------------------------------------------


def test_repeat_needs_every_or_cron() -> None:
    with pytest.raises(ValueError, match=r"every.*cron"):
        Repeat()


def test_repeat_takes_only_one_of_every_and_cron() -> None:
    with pytest.raises(ValueError, match=r"every.*cron"):
        Repeat(5, cron="* * * * *")


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (timedelta(0), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
)
def test_every_must_be_positive_seconds(bad: object, kind: type[Exception]) -> None:
    with pytest.raises(kind, match="every"):
        Repeat(bad)  # type: ignore[arg-type]


def test_every_accepts_int_float_and_timedelta() -> None:
    assert Repeat(2).every == 2.0
    assert Repeat(0.25).every == 0.25
    assert Repeat(timedelta(minutes=1)).every == 60.0


@pytest.mark.parametrize(("bad", "kind"), [(0, ValueError), (True, TypeError), (1.0, TypeError)])
def test_count_must_be_an_int_of_at_least_one(bad: object, kind: type[Exception]) -> None:
    with pytest.raises(kind, match="count"):
        Repeat(1, count=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [date(2030, 1, 1), "2030-01-01", 1e9])
def test_until_must_be_a_datetime(bad: object) -> None:
    with pytest.raises(TypeError, match="until"):
        Repeat(1, until=bad)  # type: ignore[arg-type]


def test_stop_on_error_must_be_a_bool_and_is_carried() -> None:
    with pytest.raises(TypeError, match="stop_on_error"):
        Repeat(1, stop_on_error=1)  # type: ignore[arg-type]
    assert Repeat(1, stop_on_error=True).stop_on_error is True
    assert Repeat(1).stop_on_error is False


@pytest.mark.parametrize(
    "bad",
    [
        "61 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "x * * * *",
        "*/0 * * * *",
        "5-1 * * * *",
    ],
)
def test_a_bad_cron_expression_is_a_value_error_naming_cron(bad: str) -> None:
    with pytest.raises(ValueError, match="cron"):
        Repeat(cron=bad)


@pytest.mark.parametrize("bad", ["* * * *", "0 * * * * *", ""])
def test_cron_needs_exactly_five_fields(bad: str) -> None:
    with pytest.raises(ValueError, match=r"cron.*5 fields"):
        Repeat(cron=bad)


def test_a_cron_expression_that_never_matches_is_refused() -> None:
    # the 1st of a month *and* its 4th Monday: never
    with pytest.raises(ValueError, match=r"cron.*never"):
        Repeat(cron="1 1 */100 * MON#4")


def test_cron_must_be_a_str() -> None:
    with pytest.raises(TypeError, match="cron"):
        Repeat(cron=5)  # type: ignore[arg-type]


def test_cron_keeps_the_expression_with_its_whitespace_normalised() -> None:
    assert Repeat(cron="  */5   *  * * MON ").cron == "*/5 * * * MON"


def test_cron_without_the_extra_is_an_import_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cronsim", None)  # import cronsim now fails
    monkeypatch.setattr(_repeat, "_cronsim", None)
    with pytest.raises(ImportError, match=r"cluster\[cron\]"):
        Repeat(cron="* * * * *")


def test_every_needs_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cronsim", None)
    monkeypatch.setattr(_repeat, "_cronsim", None)
    r = Repeat(10)
    assert CLOCK.next(r, 0.0, 0.0, 1.0, 1) == 10.0


def test_repeat_is_immutable() -> None:
    r = Repeat(1)
    with pytest.raises(AttributeError):
        r.every = 2


@pytest.mark.parametrize(
    "r",
    [
        Repeat(5, count=3),
        Repeat(cron="0 9 * * MON", until=datetime(2030, 1, 1, tzinfo=UTC), stop_on_error=True),
    ],
    ids=repr,
)
def test_a_repeat_survives_pickle_and_deepcopy(r: Repeat) -> None:
    assert pickle.loads(pickle.dumps(r)) == r
    assert copy.deepcopy(r) == r


def test_repeats_with_equal_settings_are_equal() -> None:
    until = datetime(2030, 1, 1, tzinfo=UTC)
    assert Repeat(5, count=2, until=until) == Repeat(timedelta(seconds=5), count=2, until=until)
    assert hash(Repeat(cron="0 * * * *")) == hash(Repeat(cron="0  * * * *"))
    assert Repeat(5) != Repeat(6)


# -- every: the grid ----------------------------------------------------------------


def test_every_first_run_is_due_at_the_start() -> None:
    assert CLOCK.first(Repeat(30), 1234.5) == 1234.5


def test_a_thousand_runs_land_exactly_on_the_grid() -> None:
    every, first = 0.01, 1000.123
    r = Repeat(every)
    due, runs = first, 1
    for k in range(1, 1001):
        nxt = CLOCK.next(r, first, due, due + every * 0.37, runs)  # each run takes a while
        assert nxt == first + k * every
        due, runs = nxt, runs + 1


@settings(max_examples=300, deadline=None)
@given(
    every=st.floats(1e-3, 1e4),
    first=st.floats(0, 1e7),
    k=st.integers(0, 10**6),
    busy=st.floats(0, 0.999),
)
def test_the_next_run_is_the_next_grid_point_whatever_the_float_error(
    every: float, first: float, k: int, busy: float
) -> None:
    last = first + k * every
    nxt = CLOCK.next(Repeat(every), first, last, last + busy * every, k + 1)
    assert nxt is not None
    if first + (k + 1) * every > last + busy * every:  # not missed (float ties aside)
        assert nxt == first + (k + 1) * every
    assert nxt > last


def test_missed_runs_collapse_into_one_due_at_the_latest_grid_point() -> None:
    r = Repeat(10)
    first = 100.0
    now = first + 57 * 10 + 3  # the run due at 100 ran for 573 s
    assert CLOCK.next(r, first, first, now, 1) == first + 57 * 10


def test_after_a_collapse_later_runs_keep_the_grid() -> None:
    r = Repeat(10)
    first = 100.0
    collapsed = CLOCK.next(r, first, first, 673.0, 1)
    assert collapsed == 670.0
    assert CLOCK.next(r, first, 670.0, 671.5, 2) == 680.0


def test_a_run_ending_exactly_on_a_grid_point_makes_that_point_due_now() -> None:
    assert CLOCK.next(Repeat(10), 0.0, 0.0, 30.0, 1) == 30.0


@pytest.mark.timeout(10)
def test_collapse_after_a_huge_gap_is_arithmetic() -> None:
    every, first = 0.001, 0.0
    now = 1e9 + 0.0004  # a trillion missed occurrences
    due = CLOCK.next(Repeat(every), first, first, now, 1)
    assert due is not None
    assert due <= now < due + every
    assert due == first + round(due / every) * every


def test_the_grid_is_kept_from_first_not_from_when_runs_end() -> None:
    # runs that end late but before the next point never move the schedule
    r = Repeat(5)
    first, due = 2.0, 2.0
    for runs in range(1, 50):
        due_next = CLOCK.next(r, first, due, due + 4.9, runs)
        assert due_next == first + runs * 5
        assert due_next is not None
        due = due_next


# -- count and until ----------------------------------------------------------------


def test_count_limits_the_runs_started() -> None:
    r = Repeat(1, count=3)
    assert CLOCK.next(r, 0.0, 1.0, 1.5, 2) == 2.0
    assert CLOCK.next(r, 0.0, 2.0, 2.5, 3) is None


def test_count_one_is_a_single_run() -> None:
    r = Repeat(1, count=1)
    assert CLOCK.first(r, 0.0) == 0.0
    assert CLOCK.next(r, 0.0, 0.0, 0.5, 1) is None


def test_until_exactly_on_a_grid_point_includes_that_run() -> None:
    first = CLOCK.mono(datetime(2024, 1, 1, 12, 0, tzinfo=UTC))
    until = datetime(2024, 1, 1, 12, 0, 50, tzinfo=UTC)  # run 5 of every=10
    r = Repeat(10, until=until)
    assert CLOCK.next(r, first, first + 40, first + 41, 5) == first + 50
    assert CLOCK.next(r, first, first + 50, first + 51, 6) is None


def test_until_before_the_start_means_no_run() -> None:
    start = CLOCK.mono(datetime(2024, 1, 2, tzinfo=UTC))
    r = Repeat(10, until=datetime(2024, 1, 1, 23, 59, 59, tzinfo=UTC))
    assert CLOCK.first(r, start) is None


def test_until_equal_to_the_start_allows_the_first_run() -> None:
    start_at = datetime(2024, 1, 2, tzinfo=UTC)
    assert CLOCK.first(Repeat(10, until=start_at), CLOCK.mono(start_at)) is not None


def test_a_collapsed_run_that_would_start_after_until_ends_the_series() -> None:
    first = CLOCK.mono(datetime(2024, 1, 1, tzinfo=UTC))
    until = datetime(2024, 1, 1, 0, 0, 35, tzinfo=UTC)
    r = Repeat(10, until=until)
    # occurrences 10, 20, 30 were missed (all before until), but it is now 0:00:36
    assert CLOCK.next(r, first, first, first + 36, 1) is None
    # ending before until, the collapsed run still runs
    assert CLOCK.next(r, first, first, first + 34, 1) == first + 30


def test_until_may_be_the_largest_or_smallest_datetime(tz: None) -> None:
    set_tz("Europe/Berlin")  # datetime.max as local time is past year 9999 in UTC
    assert CLOCK.next(Repeat(10, until=datetime.max), 0.0, 0.0, 1.0, 1) == 10.0
    assert CLOCK.first(Repeat(10, until=datetime.min), 0.0) is None


def test_a_naive_until_is_local_time(tz: None) -> None:
    set_tz("Europe/Berlin")
    first = CLOCK.mono(datetime(2024, 1, 1, 11, 0, tzinfo=UTC))  # 12:00 in Berlin
    r = Repeat(60, until=datetime(2024, 1, 1, 12, 2))  # naive: 12:02 Berlin
    assert CLOCK.next(r, first, first + 60, first + 61, 2) == first + 120
    assert CLOCK.next(r, first, first + 120, first + 121, 3) is None


# -- cron ---------------------------------------------------------------------------


def test_cron_first_run_is_the_first_cron_time_at_or_after_the_start(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="*/15 * * * *")
    on_time = CLOCK.mono(datetime(2024, 5, 1, 10, 15, tzinfo=UTC))
    assert CLOCK.first(r, on_time) == on_time
    assert CLOCK.first(r, on_time + 0.5) == on_time + 15 * 60
    assert CLOCK.first(r, on_time - 1) == on_time


def test_cron_next_run_is_the_next_cron_time(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="0 9 * * MON-FRI")
    friday = datetime(2024, 5, 3, 9, 0, tzinfo=UTC)
    got = CLOCK.next(r, CLOCK.mono(friday), CLOCK.mono(friday), CLOCK.mono(friday) + 30, 1)
    assert got == CLOCK.mono(datetime(2024, 5, 6, 9, 0, tzinfo=UTC))  # Monday


@pytest.mark.parametrize(
    ("expr", "start", "expected"),
    [
        # the 31st: only in months that have one
        (
            "0 12 31 * *",
            datetime(2024, 1, 1),
            [(2024, 1, 31), (2024, 3, 31), (2024, 5, 31), (2024, 7, 31), (2024, 8, 31)],
        ),
        # the last day of the month, a leap February included
        (
            "0 0 L * *",
            datetime(2024, 1, 15),
            [(2024, 1, 31), (2024, 2, 29), (2024, 3, 31), (2024, 4, 30)],
        ),
        # the 29th of February: leap years only
        ("0 0 29 2 *", datetime(2023, 1, 1), [(2024, 2, 29), (2028, 2, 29), (2032, 2, 29)]),
        # across a year end
        ("0 0 1 * *", datetime(2024, 11, 2), [(2024, 12, 1), (2025, 1, 1), (2025, 2, 1)]),
    ],
)
def test_cron_at_month_ends(
    tz: None, expr: str, start: datetime, expected: list[tuple[int, int, int]]
) -> None:
    set_tz("UTC")
    got = CLOCK.series(Repeat(cron=expr), CLOCK.mono(start.replace(tzinfo=UTC)), len(expected))
    assert [(d.year, d.month, d.day) for d in got] == expected


def test_cron_missed_times_collapse_into_the_latest(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="*/5 * * * *")
    first = CLOCK.mono(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    now = CLOCK.mono(datetime(2024, 5, 1, 10, 17, 30, tzinfo=UTC))
    assert CLOCK.next(r, first, first, now, 1) == CLOCK.mono(
        datetime(2024, 5, 1, 10, 15, tzinfo=UTC)
    )


def test_cron_after_a_collapse_later_runs_keep_the_schedule(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="*/5 * * * *")
    first = CLOCK.mono(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    collapsed = CLOCK.mono(datetime(2024, 5, 1, 10, 15, tzinfo=UTC))
    assert CLOCK.next(r, first, collapsed, collapsed + 2, 2) == collapsed + 300


def test_cron_a_run_ending_exactly_on_a_cron_time_makes_it_due_now(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="* * * * *")
    first = CLOCK.mono(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    assert CLOCK.next(r, first, first, first + 180, 1) == first + 180


class CountingCronSim(cronsim.CronSim):
    """cronsim's own class, counting how often a schedule is set up."""

    made = 0

    def __init__(self, expr: str, dt: datetime, reverse: bool = False) -> None:
        type(self).made += 1
        super().__init__(expr, dt, reverse)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("expr", "gap"),
    [
        ("* * * * *", timedelta(days=31)),
        ("* * * * *", timedelta(days=3650)),
        ("*/7 3-5 * * 1,3", timedelta(days=400)),
        ("0 0 29 2 *", timedelta(days=365 * 30)),
    ],
)
def test_cron_collapse_after_a_long_gap_is_bounded_work(
    tz: None, monkeypatch: pytest.MonkeyPatch, expr: str, gap: timedelta
) -> None:
    set_tz("UTC")
    monkeypatch.setattr(_repeat, "_cronsim", CountingCronSim)
    CountingCronSim.made = 0
    r = Repeat(cron=expr)
    start = datetime(2020, 1, 1, 0, 0, 30, tzinfo=UTC)
    first = CLOCK.first(r, CLOCK.mono(start))
    assert first is not None
    now_at = CLOCK.utc(first) + gap + timedelta(seconds=17.25)
    due = CLOCK.next(r, first, first, CLOCK.mono(now_at), 1)
    assert due is not None
    # it is the latest cron time <= now: cronsim itself says the next one is later
    latest = CLOCK.utc(due).replace(tzinfo=UTC)
    assert latest <= now_at
    assert next(cronsim.CronSim(expr, latest.replace(tzinfo=None))) > now_at.replace(tzinfo=None)
    assert CountingCronSim.made < 100  # not one per missed time


def test_cron_until_exactly_on_a_cron_time_includes_it(tz: None) -> None:
    set_tz("UTC")
    until = datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    r = Repeat(cron="*/15 * * * *", until=until)
    first = CLOCK.mono(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    assert CLOCK.next(r, first, first + 900, first + 901, 2) == CLOCK.mono(until)
    assert CLOCK.next(r, first, CLOCK.mono(until), CLOCK.mono(until) + 1, 3) is None


def test_cron_first_run_after_until_means_no_run(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="0 12 * * *", until=datetime(2024, 5, 1, 11, 0, tzinfo=UTC))
    assert CLOCK.first(r, CLOCK.mono(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))) is None


def test_cron_count(tz: None) -> None:
    set_tz("UTC")
    r = Repeat(cron="* * * * *", count=2)
    first = CLOCK.mono(datetime(2024, 5, 1, tzinfo=UTC))
    assert CLOCK.next(r, first, first, first + 1, 1) == first + 60
    assert CLOCK.next(r, first, first + 60, first + 61, 2) is None


# -- cron across DST (Europe/Berlin 2024: 02:00 -> 03:00 on 31 March, 03:00 -> 02:00
#    on 27 October), following cronsim, which follows Debian cron ------------------

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(year: int, month: int, day: int, hour: int, minute: int, *, fold: int = 0) -> float:
    """A Berlin wall time as the clock's monotonic seconds."""
    return CLOCK.mono(datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold))


def in_berlin(times: list[datetime]) -> list[str]:
    return [t.astimezone(BERLIN).isoformat() for t in times]


def test_spring_forward_a_fixed_time_in_the_gap_runs_once_right_after_it(tz: None) -> None:
    set_tz("Europe/Berlin")
    got = CLOCK.series(Repeat(cron="30 2 * * *"), berlin(2024, 3, 30, 3, 0), 3)
    assert in_berlin(got) == [
        "2024-03-31T03:00:00+02:00",  # 02:30 does not exist that day
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]


def test_fall_back_a_fixed_time_in_the_repeated_hour_runs_once(tz: None) -> None:
    set_tz("Europe/Berlin")
    got = CLOCK.series(Repeat(cron="30 2 * * *"), berlin(2024, 10, 26, 3, 0), 3)
    assert in_berlin(got) == [
        "2024-10-27T02:30:00+02:00",  # the first 02:30 only
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]


def test_fall_back_an_hourly_job_runs_in_both_passes(tz: None) -> None:
    set_tz("Europe/Berlin")
    got = CLOCK.series(Repeat(cron="0 * * * *"), berlin(2024, 10, 27, 0, 30), 5)
    assert in_berlin(got) == [
        "2024-10-27T01:00:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]


def test_spring_forward_an_hourly_job_skips_the_missing_hour(tz: None) -> None:
    set_tz("Europe/Berlin")
    got = CLOCK.series(Repeat(cron="0 * * * *"), berlin(2024, 3, 31, 0, 30), 3)
    assert in_berlin(got) == [
        "2024-03-31T01:00:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T04:00:00+02:00",
    ]


def test_fall_back_starting_in_the_second_pass_does_not_go_back(tz: None) -> None:
    set_tz("Europe/Berlin")
    start = berlin(2024, 10, 27, 2, 15, fold=1)  # 02:15 CET, after 02:30 CEST has passed
    assert in_berlin(CLOCK.series(Repeat(cron="30 2 * * *"), start, 1)) == [
        "2024-10-28T02:30:00+01:00"
    ]


def test_every_is_unaffected_by_dst(tz: None) -> None:
    set_tz("Europe/Berlin")
    first = berlin(2024, 3, 31, 1, 30)
    got = CLOCK.series(Repeat(3600), first, 3)
    assert in_berlin(got) == [
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:30:00+02:00",
        "2024-03-31T04:30:00+02:00",
    ]


def test_cron_collapse_across_the_fall_back_hour(tz: None) -> None:
    set_tz("Europe/Berlin")
    r = Repeat(cron="*/20 * * * *")
    first = berlin(2024, 10, 27, 1, 0)
    now = berlin(2024, 10, 27, 2, 50, fold=1)  # a run from 01:00 CEST to 02:50 CET
    assert CLOCK.next(r, first, first, now, 1) == berlin(2024, 10, 27, 2, 40, fold=1)


ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
EXPRESSIONS = [
    "30 2 * * *",
    "0 * * * *",
    "*/30 * * * *",
    "*/20 2 * * *",
    "0 */2 * * *",
    "15 1,2,3 * * *",
    "0 3 * * *",
    "45 1 * * SUN",
    "* 2 * * *",
]


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    expr=st.sampled_from(EXPRESSIONS),
    start=st.datetimes(datetime(2024, 1, 1), datetime(2025, 12, 31)),
    fold=st.integers(0, 1),
)
def test_cron_times_match_cronsim_in_the_zone_itself(
    zone: str, expr: str, start: datetime, fold: int
) -> None:
    # what cronsim gives with the IANA zone directly, as UTC instants from the start
    tzinfo = ZoneInfo(zone)
    start_at = start.replace(tzinfo=tzinfo, fold=fold).astimezone(UTC)
    expected: list[datetime] = []
    for t in cronsim.CronSim(expr, (start_at - timedelta(microseconds=1)).astimezone(tzinfo)):
        if t.astimezone(UTC) >= start_at:
            expected.append(t.astimezone(UTC))
        if len(expected) == 6:
            break
    old = os.environ.get("TZ")
    try:
        set_tz(zone)
        got = CLOCK.series(Repeat(cron=expr), CLOCK.mono(start_at), 6)
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
    assert got == expected


# -- LOCAL: the process's zone, with its DST rules ----------------------------------


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_local_agrees_with_zoneinfo_through_a_year(tz: None, zone: str) -> None:
    set_tz(zone)
    tzinfo = ZoneInfo(zone)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for step in range(366 * 48):  # every half hour of 2024: both transitions included
        utc = start + timedelta(minutes=30 * step)
        mine, theirs = utc.astimezone(LOCAL), utc.astimezone(tzinfo)
        assert (mine.replace(tzinfo=None), mine.fold) == (theirs.replace(tzinfo=None), theirs.fold)
        assert mine.utcoffset() == theirs.utcoffset()
        assert mine.astimezone(UTC) == utc


@pytest.mark.parametrize(
    ("wall", "fold", "offset_hours"),
    [
        (datetime(2024, 10, 27, 2, 30), 0, 2),  # the first pass (CEST)
        (datetime(2024, 10, 27, 2, 30), 1, 1),  # the second pass (CET)
        (datetime(2024, 3, 31, 2, 30), 0, 1),  # in the gap, PEP 495: the offset before
        (datetime(2024, 3, 31, 2, 30), 1, 2),
        (datetime(2024, 7, 1, 12, 0), 0, 2),
        (datetime(2024, 1, 1, 12, 0), 1, 1),
    ],
)
def test_local_offsets_follow_pep_495(
    tz: None, wall: datetime, fold: int, offset_hours: int
) -> None:
    set_tz("Europe/Berlin")
    assert wall.replace(tzinfo=LOCAL, fold=fold).utcoffset() == timedelta(hours=offset_hours)
    zone = wall.replace(tzinfo=BERLIN, fold=fold).utcoffset()
    assert zone == timedelta(hours=offset_hours)


def test_local_follows_tzset(tz: None) -> None:
    noon = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
    set_tz("Asia/Tokyo")
    assert noon.astimezone(LOCAL).hour == 21
    set_tz("America/New_York")
    assert noon.astimezone(LOCAL).hour == 8


def test_local_pickles_as_itself() -> None:
    assert pickle.loads(pickle.dumps(LOCAL)) is LOCAL
