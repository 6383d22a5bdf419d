"""SPEC §11 with real worker threads: repeating tasks on a ``FakeClock``.

The fixed-rate grid, ``Result.run``, every subscriber getting every run,
``handle.results()``, ``count``/``until``, runs that never overlap and collapse
when occurrences are missed, failing runs, ``stop_on_error``, retries inside a
run, callbacks per run, ``info().runs``/``next_run_at``, cron schedules in a
fixed time zone (DST, month ends), and how a series ends: cancel, and ``stop()``
at each point of a run's life. The pure schedule has its own unit tests
(``test_repeat.py``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from queue import Empty, SimpleQueue
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from _semantics_tasks import (
    START,
    WAIT,
    Script,
    eventually,
    in_thread,
    retry_schedule,
    settle,
    step,
    stop_began,
    waiting,
)
from conftest import EventFactory

from cluster import (
    UNLIMITED,
    Cluster,
    ExponentialBackoff,
    FixedBackoff,
    Result,
    TaskCancelledError,
    TaskHandle,
    TaskState,
    TaskTimeoutError,
    current,
)
from cluster.testing import FakeClock

BERLIN = ZoneInfo("Europe/Berlin")
T = TypeVar("T")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=START)


def make(clock: FakeClock, workers: int = 2) -> Cluster:
    cluster = Cluster(workers=workers, clock=clock)
    cluster.run()
    return cluster


@pytest.fixture
def c(clock: FakeClock, new_event: EventFactory) -> Iterator[Cluster]:
    """A running two-worker cluster on the fake clock, always shut down."""
    cluster = make(clock)
    yield cluster
    new_event.release_all()
    cluster.cancel()
    cluster.stop(timeout=WAIT)


def drain(q: SimpleQueue[T]) -> list[T]:
    """Everything in ``q`` now."""
    out: list[T] = []
    while True:
        try:
            out.append(q.get_nowait())
        except Empty:
            return out


def runs_of(results: list[Result[Any]]) -> list[tuple[int, Any]]:
    return [(r.run, r.value if r.ok else type(r.error).__name__) for r in results]


def counter() -> Any:
    """A task returning 0, 1, 2, ... on successive calls."""
    calls = iter(range(10**9))
    return lambda: next(calls)


# ---------------------------------------------------------------- the grid


def test_runs_land_exactly_on_the_fixed_rate_grid(c: Cluster, clock: FakeClock) -> None:
    t0 = clock.monotonic()
    times: list[float] = []

    def seven_seconds_of_work() -> None:
        times.append(clock.monotonic())
        clock.advance(7)  # the run takes 7 s: the grid must not drift by it

    c.add_task(seven_seconds_of_work).repeat(every=60).submit()
    settle(c)
    for _ in range(4):
        step(c, clock, 53)
    assert [t - t0 for t in times] == [0, 60, 120, 180, 240]


def test_the_grid_starts_at_the_first_start_time(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock)
    h = c.add_task(f).with_delay(25).repeat(every=timedelta(seconds=10)).with_cache().submit()
    settle(c)
    assert f.calls == 0
    assert c.info(h.id).next_run_at == START + timedelta(seconds=25)
    step(c, clock, 25)
    step(c, clock, 10)
    step(c, clock, 10)
    assert f.times == [25, 35, 45]


def test_nothing_runs_between_grid_points(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock)
    c.add_task(f).repeat(every=60).submit()
    settle(c)
    step(c, clock, 59.999)
    assert f.calls == 1
    step(c, clock, 0.001)
    assert f.calls == 2


# ---------------------------------------------------------------- Results


def test_every_subscriber_gets_every_runs_result_in_order(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(counter()).with_delay(1).repeat(every=60, count=4).submit()
    first, second = c.subscribe(h.id), h.subscribe()
    step(c, clock, 1)
    for _ in range(3):
        step(c, clock, 60)
    assert h.done()
    expected = [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert runs_of(drain(first)) == expected
    assert runs_of(drain(second)) == expected


def test_a_subscriber_that_comes_late_gets_the_runs_from_then_on(
    c: Cluster, clock: FakeClock
) -> None:
    h = c.add_task(counter()).repeat(every=60, count=3).submit()
    settle(c)  # run 0 is over
    late = h.subscribe()
    step(c, clock, 60)
    step(c, clock, 60)
    assert runs_of(drain(late)) == [(1, 1), (2, 2)]


def test_wait_and_result_give_the_last_runs_result(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(counter()).repeat(every=60, count=3).submit()
    settle(c)
    assert h.wait(0.05) is None  # the series goes on
    step(c, clock, 60)
    step(c, clock, 60)
    result = h.wait(WAIT)
    assert result is not None and (result.run, result.value) == (2, 2)
    assert h.result(0) == 2


def test_results_iterates_the_runs_and_ends_with_the_series(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(counter()).repeat(every=60, count=5).submit()
    it = h.results(timeout=WAIT)
    first_seen = threading.Event()

    def drive_until_the_iterator_listens() -> None:
        # Until the main thread got its first Result, keep the series moving.
        for _ in range(4):
            if first_seen.wait(0.05):
                return
            step(c, clock, 60)

    driver, _ = in_thread(drive_until_the_iterator_listens)
    first = next(it)
    first_seen.set()
    driver.join(WAIT)
    rest = []
    for _ in range(4 - first.run):
        step(c, clock, 60)
        rest.append(next(it))
    assert [r.run for r in rest] == list(range(first.run + 1, 5))
    assert [r.value for r in [first, *rest]] == [r.run for r in [first, *rest]]
    with pytest.raises(StopIteration):
        next(it)  # the last run ended the series
    assert h.done()


def test_results_of_a_finished_series_is_its_last_result(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(counter()).repeat(every=60, count=2).submit()
    settle(c)
    step(c, clock, 60)
    assert [(r.run, r.value) for r in h.results(timeout=WAIT)] == [(1, 1)]


def test_results_sees_a_run_that_ends_after_results_was_called(
    c: Cluster, clock: FakeClock
) -> None:
    h = c.add_task(counter()).with_delay(1).repeat(every=60, count=3).submit()
    it = h.results(timeout=1)
    step(c, clock, 1)  # run 0 ends
    assert next(it).run == 0


def test_result_run_of_a_task_that_does_not_repeat_is_zero(c: Cluster) -> None:
    result = c.add_task(lambda: "once").submit().wait(WAIT)
    assert result is not None and result.run == 0


# ---------------------------------------------------------------- count and until


def test_count_limits_the_runs(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock)
    h = c.add_task(f).repeat(every=60, count=3).with_cache().submit()
    settle(c)
    for _ in range(5):
        step(c, clock, 60)
    assert f.times == [0, 60, 120]
    info = c.info(h.id)
    assert (info.state, info.runs, info.next_run_at) == (TaskState.SUCCEEDED, 3, None)


def test_count_one_is_a_single_run(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(lambda: "only").repeat(every=60, count=1).submit()
    result = h.wait(WAIT)
    assert result is not None and (result.run, result.value) == (0, "only")


def test_a_run_due_exactly_at_until_runs_and_none_after(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock)
    h = c.add_task(f).repeat(every=60, until=START + timedelta(seconds=180)).with_cache().submit()
    settle(c)
    for _ in range(5):
        step(c, clock, 60)
    assert f.times == [0, 60, 120, 180]
    assert c.info(h.id).state is TaskState.SUCCEEDED
    assert h.result(0) == "done"


def test_until_between_grid_points_ends_the_series_after_the_last_run_before_it(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock)
    naive_local = (START + timedelta(seconds=150)).astimezone().replace(tzinfo=None)
    h = c.add_task(f).repeat(every=60, until=naive_local).submit()  # naive: local time
    settle(c)
    step(c, clock, 60)
    step(c, clock, 60)
    assert f.times == [0, 60, 120]
    assert h.done()  # ended with the run at 120: the next would start after until
    step(c, clock, 60)
    assert f.calls == 3


# ---------------------------------------------------------------- runs never overlap


def test_a_run_still_going_when_occurrences_pass_collapses_them_into_one_run(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    active = 0
    most = 0
    times: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
            times.append(clock.monotonic())
        if len(times) == 1:
            gate.wait(WAIT)
        with lock:
            active -= 1

    h = c.add_task(run).repeat(every=60).submit()  # two workers: overlap is possible
    q = h.subscribe()
    eventually(lambda: times == [0])
    clock.advance(130)  # 60 and 120 pass while run 0 is still going
    assert h.wait(0.1) is None
    assert times == [0]
    gate.set()
    settle(c)
    assert times == [0, 130]  # ONE run for both, at once
    step(c, clock, 50)
    assert times == [0, 130, 180]  # and the grid is kept
    assert most == 1
    assert [r.run for r in drain(q)] == [0, 1, 2]


def test_a_run_that_moves_the_clock_past_occurrences_collapses_them(
    c: Cluster, clock: FakeClock
) -> None:
    times: list[float] = []

    def run() -> None:
        times.append(clock.monotonic())
        if len(times) == 1:
            clock.advance(150)  # a long first run: 60 and 120 pass

    c.add_task(run).repeat(every=60).submit()
    settle(c)
    assert times == [0, 150]
    step(c, clock, 30)
    step(c, clock, 60)
    assert times == [0, 150, 180, 240]


def test_a_clock_jump_past_several_occurrences_gives_one_run(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock)
    h = c.add_task(f).repeat(every=60).with_cache().submit()
    settle(c)
    step(c, clock, 200)  # 60, 120 and 180 are missed
    assert f.times == [0, 200]
    assert c.info(h.id).next_run_at == START + timedelta(seconds=240)


def test_occurrences_missed_while_no_worker_was_free_collapse_into_one_run(
    clock: FakeClock, new_event: EventFactory
) -> None:
    c = make(clock, workers=1)
    try:
        gate = new_event()
        f = Script(clock)
        c.add_task(f).repeat(every=60).submit()
        settle(c)
        step(c, clock, 50)
        blocker = c.add_task(gate.wait, WAIT).submit()
        clock.advance(150)  # 60, 120 and 180 pass while the only worker is busy
        gate.set()
        assert blocker.wait(WAIT) is not None
        settle(c)
        assert f.times == [0, 200]
    finally:
        gate.set()
        c.cancel()
        c.stop(timeout=WAIT)


def test_cron_a_clock_jump_past_several_times_gives_one_run(tz: Any) -> None:
    tz("UTC")
    clock = FakeClock(start=datetime(2024, 5, 1, 12, 1))
    c = make(clock)
    try:
        seen: list[str] = []
        c.add_task(lambda: seen.append(clock.now().strftime("%H:%M"))).repeat(
            cron="*/5 * * * *"
        ).submit()
        settle(c)
        step(c, clock, timedelta(minutes=4))
        step(c, clock, timedelta(minutes=15))  # 12:10, 12:15 and 12:20 are missed
        assert seen == ["12:05", "12:20"]
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


# ---------------------------------------------------------------- failing runs, retries


def test_a_failing_run_is_delivered_and_the_series_goes_on(c: Cluster, clock: FakeClock) -> None:
    boom = ValueError("boom")
    builder = c.add_task(Script(clock, "a", boom, "c")).with_delay(1)
    handle = builder.repeat(every=60, count=3).with_cache().submit()
    q = handle.subscribe()
    step(c, clock, 1)
    step(c, clock, 60)
    step(c, clock, 60)
    results = drain(q)
    assert runs_of(results) == [(0, "a"), (1, "ValueError"), (2, "c")]
    assert results[1].error is boom
    assert c.info(handle.id).state is TaskState.SUCCEEDED


def test_stop_on_error_ends_the_series_with_that_error(c: Cluster, clock: FakeClock) -> None:
    boom = ValueError("boom")
    f = Script(clock, "a", boom, "never")
    h = c.add_task(f).with_delay(1).repeat(every=60, stop_on_error=True).with_cache().submit()
    q = h.subscribe()
    step(c, clock, 1)
    step(c, clock, 60)
    result = h.wait(WAIT)
    assert result is not None and result.error is boom and result.run == 1
    info = c.info(h.id)
    assert (info.state, info.error, info.next_run_at) == (TaskState.FAILED, boom, None)
    step(c, clock, 60)
    assert f.calls == 2
    assert runs_of(drain(q)) == [(0, "a"), (1, "ValueError")]


def test_stop_on_error_waits_for_the_runs_retries_first(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ConnectionError(), "recovered", ValueError("final"))
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=1, backoff=FixedBackoff(5))
        .repeat(every=60, stop_on_error=True)
        .submit()
    )
    assert retry_schedule(c, clock, h) == pytest.approx([5], abs=1e-6)
    assert not h.done()
    step(c, clock, 55)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, ValueError) and result.run == 1


def test_retries_happen_within_a_run_and_budgets_reset_after_a_success(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock, ConnectionError(), "r0", ConnectionError(), "r1", ConnectionError(), "r2")
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=1, backoff=FixedBackoff(5))
        .repeat(every=60, count=3)
        .submit()
    )
    q = h.subscribe()
    settle(c)
    for gap in (5, 55, 5, 55, 5):
        step(c, clock, gap)
    assert f.times == [0, 5, 60, 65, 120, 125]  # retries do not move the grid
    assert runs_of(drain(q)) == [(0, "r0"), (1, "r1"), (2, "r2")]


def test_the_backoff_restarts_at_zero_in_every_run(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ConnectionError(), ConnectionError(), "r0", ConnectionError(), "r1")
    h = (
        c.add_task(f)
        .with_retry(3)
        .with_backoff(ExponentialBackoff(1, 2))
        .repeat(every=60, count=2)
        .submit()
    )
    assert retry_schedule(c, clock, h) == pytest.approx([1, 2], abs=1e-6)
    step(c, clock, 57)  # run 1 at 60
    assert waiting(c, clock, h) == pytest.approx(1, abs=1e-6)  # not 4
    step(c, clock, 1)
    assert h.result(WAIT) == "r1"


def test_a_run_that_exhausts_its_retries_is_delivered_and_the_next_run_has_fresh_budget(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock, ConnectionError("a"), ConnectionError("b"), ConnectionError("c"), "r1")
    h = c.add_task(f).with_retry(1).with_delay(1).repeat(every=60, count=2).submit()
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    step(c, clock, 60)
    results = drain(q)
    assert runs_of(results) == [(0, "ConnectionError"), (1, "r1")]
    assert str(results[0].error) == "b"
    assert f.times == [1, 1, 61, 61]


def test_a_run_that_times_out_is_delivered_and_the_series_goes_on(
    c: Cluster, clock: FakeClock
) -> None:
    starts: list[float] = []

    def run() -> str:
        starts.append(clock.monotonic())
        if len(starts) == 2:
            current().cancelled.wait(WAIT)  # run 1 hangs until its timeout
            return "too late"
        return "in time"

    h = c.add_task(run).with_delay(1).repeat(every=60, count=3).with_timeout(10).submit()
    q = h.subscribe()
    step(c, clock, 1)
    clock.advance(60)
    eventually(lambda: len(starts) == 2)  # run 1 started: its deadline is set
    step(c, clock, 10)
    step(c, clock, 50)
    results = drain(q)
    assert [(r.run, r.value) for r in results] == [(0, "in time"), (1, None), (2, "in time")]
    assert isinstance(results[1].error, TaskTimeoutError)
    assert starts == [1, 61, 121]


def test_an_async_series_keeps_the_grid_and_delivers_every_run(
    c: Cluster, clock: FakeClock
) -> None:
    completed: SimpleQueue[Any] = SimpleQueue()

    async def tick() -> float:
        return clock.monotonic()

    h = (
        c.add_task(tick)
        .with_delay(1)
        .repeat(every=60, count=3)
        .on_complete(lambda tid, value, error: completed.put(value))
        .submit()
    )
    q = h.subscribe()
    step(c, clock, 1)
    step(c, clock, 60)
    step(c, clock, 60)
    result = h.wait(WAIT)
    assert result is not None and (result.run, result.value) == (2, 121)
    assert [(r.run, r.value) for r in drain(q)] == [(0, 1), (1, 61), (2, 121)]
    assert [completed.get(timeout=WAIT) for _ in range(3)] == [1, 61, 121]


def test_callbacks_run_once_per_run(c: Cluster, clock: FakeClock) -> None:
    completed: SimpleQueue[tuple[str, Any, BaseException | None]] = SimpleQueue()
    failed: SimpleQueue[tuple[str, BaseException]] = SimpleQueue()
    boom = ValueError("boom")
    h = (
        c.add_task(Script(clock, "a", boom, "c"))
        .with_retry(0)
        .repeat(every=60, count=3)
        .on_complete(lambda tid, value, error: completed.put((tid, value, error)))
        .on_failure(lambda tid, error: failed.put((tid, error)))
        .submit()
    )
    settle(c)
    step(c, clock, 60)
    step(c, clock, 60)
    assert h.wait(WAIT) is not None
    c.stop(timeout=WAIT)  # every callback has run once stop() returns
    assert drain(completed) == [(h.id, "a", None), (h.id, None, boom), (h.id, "c", None)]
    assert drain(failed) == [(h.id, boom)]


def test_info_shows_runs_and_the_next_run(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, "r0", ConnectionError(), "r1", "r2")
    h = (
        c.add_task(f)
        .with_delay(30)
        .with_retry(1)
        .with_backoff(FixedBackoff(5))
        .repeat(every=60, count=3)
        .with_cache()
        .submit()
    )
    info = c.info(h.id)
    assert (info.runs, info.next_run_at) == (0, START + timedelta(seconds=30))
    step(c, clock, 30)
    info = c.info(h.id)
    assert (info.state, info.runs) == (TaskState.DELAYED, 1)
    assert info.next_run_at == START + timedelta(seconds=90)
    step(c, clock, 60)  # run 1 fails and waits 5 s to retry
    info = c.info(h.id)
    assert (info.state, info.runs, info.next_run_at) == (TaskState.RETRYING, 2, None)
    assert info.next_attempt_at == START + timedelta(seconds=95)
    step(c, clock, 5)
    assert c.info(h.id).next_run_at == START + timedelta(seconds=150)
    step(c, clock, 60)
    info = c.info(h.id)
    assert (info.state, info.runs, info.next_run_at) == (TaskState.SUCCEEDED, 3, None)
    assert info.value == "r2"


# ---------------------------------------------------------------- cron, in a fixed zone


@pytest.fixture
def tz() -> Iterator[Any]:
    """``set_tz(name)`` for the test; ``TZ`` is restored afterwards."""
    old = os.environ.get("TZ")

    def set_tz(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield set_tz
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def run_to_next(c: Cluster, clock: FakeClock, h: TaskHandle[Any]) -> None:
    """Advance the fake clock exactly to the series' next run, and let it run."""
    when = c.info(h.id).next_run_at
    assert when is not None
    step(c, clock, (when - clock.now()).total_seconds())


def cron_series(tz: Any, zone: str, start: datetime, expr: str, runs: int) -> list[str]:
    """The local times (ISO, with offset) at which ``runs`` runs of ``expr`` start."""
    tz(zone)
    clock = FakeClock(start=start)  # naive: local time in ``zone``
    c = make(clock)
    try:
        seen: list[str] = []
        h = (
            c.add_task(lambda: seen.append(clock.now().astimezone(ZoneInfo(zone)).isoformat()))
            .repeat(cron=expr)
            .submit()
        )
        settle(c)
        for _ in range(runs):
            run_to_next(c, clock, h)
        return seen
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


def test_cron_every_five_minutes_runs_at_five_ten_fifteen(tz: Any) -> None:
    assert cron_series(tz, "Europe/Berlin", datetime(2024, 5, 1, 12, 2, 30), "*/5 * * * *", 3) == [
        "2024-05-01T12:05:00+02:00",
        "2024-05-01T12:10:00+02:00",
        "2024-05-01T12:15:00+02:00",
    ]


def test_cron_runs_not_a_moment_before_its_time(tz: Any) -> None:
    tz("Europe/Berlin")
    clock = FakeClock(start=datetime(2024, 5, 1, 12, 2, 30))
    c = make(clock)
    try:
        f = Script(clock)
        h = c.add_task(f).repeat(cron="*/5 * * * *").with_cache().submit()
        settle(c)
        assert f.calls == 0
        assert c.info(h.id).next_run_at == datetime(2024, 5, 1, 12, 5, tzinfo=BERLIN)
        step(c, clock, 149)
        assert f.calls == 0
        step(c, clock, 1)
        assert f.times == [150]
        assert c.info(h.id).next_run_at == datetime(2024, 5, 1, 12, 10, tzinfo=BERLIN)
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


def test_cron_a_run_going_past_cron_times_collapses_them(tz: Any) -> None:
    tz("UTC")
    clock = FakeClock(start=datetime(2024, 5, 1, 12, 1))
    c = make(clock)
    try:
        seen: list[str] = []

        def run() -> None:
            seen.append(clock.now().strftime("%H:%M:%S"))
            if len(seen) == 1:
                clock.advance(timedelta(minutes=16))  # 12:10 and 12:15 pass

        c.add_task(run).repeat(cron="*/5 * * * *").submit()
        settle(c)
        step(c, clock, timedelta(minutes=4))
        assert seen == ["12:05:00", "12:21:00"]  # one run, at once
        step(c, clock, timedelta(minutes=4))
        assert seen == ["12:05:00", "12:21:00", "12:25:00"]
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


def test_cron_across_the_spring_forward_gap(tz: Any) -> None:
    # Europe/Berlin, 31 March 2024: 02:00 -> 03:00; "30 2" does not exist that day.
    assert cron_series(tz, "Europe/Berlin", datetime(2024, 3, 30, 12, 0), "30 2 * * *", 3) == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]


def test_cron_across_the_fall_back_hour_runs_a_fixed_time_once(tz: Any) -> None:
    # Europe/Berlin, 27 October 2024: 03:00 -> 02:00; 02:30 happens twice.
    assert cron_series(tz, "Europe/Berlin", datetime(2024, 10, 26, 12, 0), "30 2 * * *", 3) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]


def test_cron_hourly_runs_in_both_passes_of_the_fall_back_hour(tz: Any) -> None:
    assert cron_series(tz, "Europe/Berlin", datetime(2024, 10, 27, 0, 30), "0 * * * *", 4) == [
        "2024-10-27T01:00:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
    ]


def test_cron_on_the_31st_skips_shorter_months(tz: Any) -> None:
    assert cron_series(tz, "Europe/Berlin", datetime(2024, 1, 15), "0 0 31 * *", 4) == [
        "2024-01-31T00:00:00+01:00",
        "2024-03-31T00:00:00+01:00",  # midnight, before that night's change to CEST
        "2024-05-31T00:00:00+02:00",
        "2024-07-31T00:00:00+02:00",
    ]


def test_cron_with_count_and_until(tz: Any) -> None:
    tz("UTC")
    clock = FakeClock(start=datetime(2024, 5, 1, 12, 0))
    c = make(clock)
    try:
        counted = c.add_task(counter()).repeat(cron="*/5 * * * *", count=2).submit()
        until = (
            c.add_task(counter())
            .repeat(cron="*/5 * * * *", until=datetime(2024, 5, 1, 12, 10))
            .submit()
        )
        settle(c)
        for _ in range(4):
            step(c, clock, timedelta(minutes=5))
        last = [counted.wait(0), until.wait(0)]
        assert [(r.run, r.value) for r in last if r is not None] == [(1, 1), (2, 2)]
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


# ---------------------------------------------------------------- the end of a series


def test_cancel_between_runs_ends_the_series_with_one_more_result(
    c: Cluster, clock: FakeClock
) -> None:
    h = c.add_task(counter()).with_delay(1).repeat(every=60).with_cache().submit()
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    assert h.cancel() is True
    results = drain(q)
    assert len(results) == 2 and results[0].ok
    cancelled = results[1]
    assert isinstance(cancelled.error, TaskCancelledError) and cancelled.run == 1
    assert h.wait(0) == cancelled
    assert c.info(h.id).state is TaskState.CANCELLED
    step(c, clock, 120)
    assert drain(q) == []
    assert h.cancel() is False


def test_cancel_during_a_run_delivers_the_cancellation_as_that_runs_result(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    calls: list[int] = []

    def run() -> str:
        calls.append(1)
        if len(calls) == 2:
            gate.wait(WAIT)
        return "ran"

    h = c.add_task(run).with_delay(1).repeat(every=60).with_cache().submit()
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    clock.advance(60)  # run 1 starts and blocks
    eventually(lambda: c.info(h.id).state is TaskState.RUNNING)
    assert c.cancel_task(h.id) is True
    result = h.wait(WAIT)  # at once, while the run is still blocked
    assert result is not None and isinstance(result.error, TaskCancelledError)
    assert result.run == 1
    gate.set()
    settle(c)
    step(c, clock, 120)
    assert calls == [1, 1]
    assert [(r.run, r.ok) for r in drain(q)] == [(0, True), (1, False)]
    assert c.info(h.id).state is TaskState.CANCELLED


def test_stop_while_a_run_is_going_ends_the_series_with_that_runs_result(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    f = Script(clock, "r0", lambda: gate.wait(WAIT) and "r1", "never")
    h = c.add_task(f).with_delay(1).repeat(every=60).submit()
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    clock.advance(60)
    eventually(lambda: f.calls == 2)
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT))
    eventually(lambda: stop_began(c))
    assert h.wait(0.05) is None  # the stop waits for the run
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive() and out == [None]
    assert runs_of(drain(q)) == [(0, "r0"), (1, "r1")]  # no extra Result
    result = h.wait(0)
    assert result is not None and (result.run, result.value) == (1, "r1")
    assert f.calls == 2


def test_stop_while_waiting_for_the_next_run_ends_with_a_shutdown_cancellation(
    c: Cluster, clock: FakeClock
) -> None:
    h = c.add_task(counter()).with_delay(1).repeat(every=60).submit()
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    c.stop(timeout=WAIT)  # returns: nothing waits for the fake clock
    results = drain(q)
    assert runs_of(results[:1]) == [(0, 0)]
    assert len(results) == 2
    last = results[1]
    assert isinstance(last.error, TaskCancelledError) and last.run == 1
    assert "shutdown" in str(last.error)
    assert h.wait(0) == last


def test_stop_while_a_run_waits_to_retry_honours_the_backoff_then_ends_with_that_run(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock, "r0", ConnectionError(), "r1 after its retry", "never")
    h = (
        c.add_task(f)
        .with_retry(2)
        .with_backoff(FixedBackoff(30))
        .with_delay(1)
        .repeat(every=60)
        .submit()
    )
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    step(c, clock, 60)  # run 1 fails, waits 30 s to retry
    assert c.info(h.id).state is TaskState.RETRYING
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT))
    eventually(lambda: stop_began(c))
    assert h.wait(0.05) is None  # the retry is still to come
    assert c.info(h.id).state is TaskState.RETRYING
    clock.advance(30)
    stopper.join(WAIT)
    assert not stopper.is_alive() and out == [None]
    assert runs_of(drain(q)) == [(0, "r0"), (1, "r1 after its retry")]
    assert f.calls == 3


def test_stop_while_a_run_waits_on_an_unlimited_retry_ends_it_with_its_last_error(
    c: Cluster, clock: FakeClock
) -> None:
    last = ConnectionError("run 1's last error")
    f = Script(clock, "r0", last, "never")
    h = (
        c.add_task(f)
        .with_retry(UNLIMITED)
        .with_backoff(FixedBackoff(30))
        .with_delay(1)
        .repeat(every=60)
        .submit()
    )
    q = h.subscribe()
    step(c, clock, 1)
    step(c, clock, 60)
    c.stop(timeout=WAIT)  # at once: an UNLIMITED retry is not waited for
    results = drain(q)
    assert [(r.run, r.ok) for r in results] == [(0, True), (1, False)]
    assert results[1].error is last


def test_stop_with_cancel_pending_cancels_a_run_waiting_to_retry(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock, "r0", ConnectionError(), "never")
    h = (
        c.add_task(f)
        .with_retry(2)
        .with_backoff(FixedBackoff(30))
        .with_delay(1)
        .repeat(every=60)
        .submit()
    )
    q = h.subscribe()
    step(c, clock, 1)  # run 0, after the subscription
    step(c, clock, 60)
    c.stop(timeout=WAIT, cancel_pending=True)
    results = drain(q)
    assert [r.ok for r in results] == [True, False]
    assert isinstance(results[1].error, TaskCancelledError)
    assert f.calls == 2


# ---------------------------------------------------------------- validation (§3, §7)


@pytest.mark.parametrize(
    ("kwargs", "kind", "name"),
    [
        ({}, ValueError, "every"),
        ({"every": 60, "cron": "* * * * *"}, ValueError, "every"),
        ({"every": 0}, ValueError, "every"),
        ({"every": -5}, ValueError, "every"),
        ({"every": timedelta(0)}, ValueError, "every"),
        ({"every": "60"}, TypeError, "every"),
        ({"every": 60, "count": 0}, ValueError, "count"),
        ({"every": 60, "count": 1.5}, TypeError, "count"),
        ({"cron": "61 * * * *"}, ValueError, "cron"),
        ({"cron": "* * * *"}, ValueError, "cron"),
        ({"cron": "every minute"}, ValueError, "cron"),
        ({"every": 60, "until": "2030-01-01"}, TypeError, "until"),
        ({"every": 60, "until": 1893456000}, TypeError, "until"),
        ({"every": 60, "stop_on_error": 1}, TypeError, "stop_on_error"),
        ({"every": 60, "stop_on_error": "yes"}, TypeError, "stop_on_error"),
    ],
)
def test_repeat_refuses_bad_arguments_at_the_call(
    c: Cluster, kwargs: dict[str, Any], kind: type[Exception], name: str
) -> None:
    builder = c.add_task(int)
    with pytest.raises(kind, match=name):
        builder.repeat(**kwargs)
    assert builder.repeat(every=1, count=1).submit().wait(WAIT) is not None  # still usable
