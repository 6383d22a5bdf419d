"""SPEC §18 with real worker threads: ``Cluster(clock=FakeClock())``.

Start times, delays, backoff, ``RetryAfter``, TTL, timeouts and ``info()``
timestamps follow the fake clock; the timeouts a caller passes stay in real time;
``advance()`` returns at once; and whole schedules (a day of repeats, a ten-retry
exponential backoff) run in a fraction of a second of wall time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _semantics_tasks import (
    START,
    WAIT,
    Script,
    in_thread,
    retry_schedule,
    settle,
    step,
    waiting,
)
from conftest import EventFactory

from cluster import (
    Cluster,
    ExponentialBackoff,
    FixedBackoff,
    ProcessExecutor,
    RetryAfter,
    RetryMode,
    StopTimeoutError,
    TaskCancelledError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
    as_completed,
    current,
)
from cluster.testing import FakeClock

#: A guard against hangs only: these schedules take milliseconds.
WALL_GUARD = 20.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=START)


@pytest.fixture
def c(clock: FakeClock, new_event: EventFactory) -> Iterator[Cluster]:
    """A running two-worker cluster on the fake clock, always shut down."""
    cluster = Cluster(workers=2, clock=clock)
    cluster.run()
    yield cluster
    new_event.release_all()
    cluster.cancel()
    cluster.stop(timeout=WAIT)


# ---------------------------------------------------------------- the clock itself


def test_a_fake_clock_starts_at_its_start_time() -> None:
    assert FakeClock(start=START).now() == START
    naive = datetime(2031, 6, 1, 8, 30)  # local time
    assert FakeClock(start=naive).now() == naive.astimezone()


def test_a_fake_clock_starts_at_the_real_now_by_default() -> None:
    before = datetime.now(UTC)
    now = FakeClock().now()
    after = datetime.now(UTC)
    assert now.tzinfo is not None
    assert before - timedelta(seconds=1) <= now <= after + timedelta(seconds=1)


def test_a_fake_clock_start_must_be_a_datetime() -> None:
    with pytest.raises(TypeError, match="start"):
        FakeClock(start="2030-01-01")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="start"):
        FakeClock(start=1893456000)  # type: ignore[arg-type]


def test_the_clock_moves_only_when_told(c: Cluster, clock: FakeClock) -> None:
    mono, now = clock.monotonic(), clock.now()
    assert c.add_task(lambda: "work").submit().result(WAIT) == "work"
    assert (clock.monotonic(), clock.now()) == (mono, now)


@pytest.mark.parametrize(
    ("by", "seconds"), [(2.5, 2.5), (7, 7.0), (timedelta(minutes=2), 120.0), (0, 0.0)]
)
def test_advance_moves_monotonic_and_wall_time_together(by: Any, seconds: float) -> None:
    clock = FakeClock(start=START)
    mono = clock.monotonic()
    clock.advance(by)
    assert clock.monotonic() - mono == seconds
    assert clock.now() == START + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (-1, ValueError),
        (-0.001, ValueError),
        (timedelta(seconds=-1), ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (None, TypeError),
    ],
)
def test_advance_refuses_a_bad_step_and_does_not_move(bad: Any, kind: type[Exception]) -> None:
    clock = FakeClock(start=START)
    with pytest.raises(kind, match="seconds"):
        clock.advance(bad)
    assert clock.now() == START


def test_advance_wakes_every_cluster_on_the_clock(clock: FakeClock) -> None:
    clusters = [Cluster(workers=1, clock=clock) for _ in range(2)]
    try:
        for one in clusters:
            one.run()
        handles = [one.add_task(lambda: "due").with_delay(10).submit() for one in clusters]
        clock.advance(10)
        assert [h.result(WAIT) for h in handles] == ["due", "due"]
    finally:
        for one in clusters:
            one.cancel()
            one.stop(timeout=WAIT)


# ---------------------------------------------------------------- start times and delays


def test_with_start_time_follows_the_fake_clock(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock)
    h = c.add_task(f).with_start_time(START + timedelta(seconds=30)).with_cache().submit()
    settle(c)
    step(c, clock, 29.5)
    assert f.calls == 0
    assert c.info(h.id).state is TaskState.DELAYED
    step(c, clock, 0.5)
    assert f.times == [30]
    assert c.info(h.id).started_at == START + timedelta(seconds=30)


def test_a_naive_start_time_is_local_time_on_the_fake_clock(c: Cluster, clock: FakeClock) -> None:
    local = (START + timedelta(minutes=5)).astimezone().replace(tzinfo=None)
    f = Script(clock)
    c.add_task(f).with_start_time(local).submit()
    step(c, clock, 299)
    assert f.calls == 0
    step(c, clock, 1)
    assert f.times == [300]


def test_a_start_time_in_the_fake_past_runs_at_once(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(lambda: "now").with_start_time(START - timedelta(days=1)).submit()
    assert h.result(WAIT) == "now"


@pytest.mark.parametrize("delay", [10, 0.25, timedelta(minutes=10)])
def test_with_delay_follows_the_fake_clock(c: Cluster, clock: FakeClock, delay: Any) -> None:
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    f = Script(clock)
    c.add_task(f).with_delay(delay).submit()
    settle(c)
    step(c, clock, seconds * 0.99)
    assert f.calls == 0
    step(c, clock, seconds * 0.01)
    assert f.calls == 1


def test_tasks_made_due_by_one_advance_run_in_priority_then_start_order(
    clock: FakeClock,
) -> None:
    c = Cluster(workers=1, clock=clock)  # one worker: a strict order
    order: list[str] = []
    try:
        for name, delay, priority in [
            ("late-low", 30, 0),
            ("early-low", 10, 0),
            ("high", 20, 5),
            ("mid", 25, 2),
            ("early-low-2", 10, 0),
        ]:
            c.add_task(order.append, name).with_delay(delay).with_priority(priority).submit()
        c.run()
        step(c, clock, 30)
        assert order == ["high", "mid", "early-low", "early-low-2", "late-low"]
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


def test_a_task_advancing_the_clock_itself_makes_others_due(c: Cluster, clock: FakeClock) -> None:
    later = c.add_task(lambda: "later").with_delay(10).submit()
    mover = c.add_task(clock.advance, 10).submit()
    assert mover.result(WAIT) is None
    assert later.result(WAIT) == "later"


# ---------------------------------------------------------------- backoff and RetryAfter


@pytest.mark.timeout(60)
def test_a_ten_retry_exponential_backoff_runs_in_fake_time(c: Cluster, clock: FakeClock) -> None:
    errors = [ConnectionError(f"attempt {i}") for i in range(11)]
    f = Script(clock, *errors)
    wall = time.monotonic()
    h = c.add_task(f).with_retry(10).with_backoff(ExponentialBackoff(1, 2)).submit()
    delays = retry_schedule(c, clock, h)
    result = h.wait(WAIT)
    assert time.monotonic() - wall < WALL_GUARD
    assert delays == pytest.approx([2.0**n for n in range(10)], abs=1e-5)
    assert result is not None and result.error is errors[-1]
    assert f.calls == 11
    assert clock.monotonic() == pytest.approx(1023, abs=1e-3)  # 17 minutes, in fake time


def test_a_retry_never_comes_before_its_backoff(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ConnectionError(), "ok")
    h = c.add_task(f).with_retry(1).with_backoff(FixedBackoff(timedelta(hours=1))).submit()
    settle(c)
    assert waiting(c, clock, h) == pytest.approx(3600, abs=1e-6)
    step(c, clock, 3599.9)
    assert f.calls == 1
    step(c, clock, 0.1)
    assert h.result(WAIT) == "ok"
    assert f.times == [0, 3600]


def test_retry_after_follows_the_fake_clock(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, RetryAfter(timedelta(hours=1)), "ok")
    h = c.add_task(f).with_retry(1).submit()
    settle(c)
    step(c, clock, 3599)
    assert f.calls == 1
    step(c, clock, 1)
    assert h.result(WAIT) == "ok"


def test_an_immediate_retry_sleeps_on_the_fake_clock(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ConnectionError(), "ok")
    h = (
        c.add_task(f)
        .with_retry(1)
        .with_backoff(FixedBackoff(5))
        .with_retry_mode(RetryMode.IMMEDIATE)
        .submit()
    )
    settle(c)  # the first attempt failed; its worker sleeps the backoff
    assert f.calls == 1
    assert h.wait(0.1) is None  # 5 fake seconds never pass by themselves
    clock.advance(5)
    assert h.result(WAIT) == "ok"
    assert f.times == [0, 5]


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_wait_idle_after_advance_waits_for_a_due_immediate_retry(
    c: Cluster, clock: FakeClock, kind: str
) -> None:
    # Ten tasks one after another: a correct wait_idle() passes every time; the
    # race it pins shows in nearly every try, so ten make its failure certain.
    for _ in range(10):
        calls: list[int] = []

        def sync_task(calls: list[int] = calls) -> str:
            calls.append(current().attempt)
            if len(calls) == 1:
                raise ConnectionError
            return "ok"

        async def async_task(sync_task: Any = sync_task) -> str:
            return str(sync_task())

        fn: Any = sync_task if kind == "thread" else async_task
        h = (
            c.add_task(fn)
            .with_retry(1)
            .with_backoff(FixedBackoff(5))
            .with_retry_mode(RetryMode.IMMEDIATE)
            .submit()
        )
        settle(c)
        assert calls == [0]
        step(c, clock, 5)
        assert calls == [0, 1], "wait_idle() returned before the due retry ran"
        assert h.result(WAIT) == "ok"


@pytest.mark.timeout(60)
def test_wait_idle_waits_for_the_callbacks_of_an_async_series_run(
    c: Cluster, clock: FakeClock
) -> None:
    calls: list[int] = []

    async def tick() -> int:
        return 1

    c.add_task(tick).repeat(every=1).on_complete(lambda *_: calls.append(1)).submit()
    settle(c)
    for run in range(1, 3000):  # a correct wait_idle() passes every time
        assert len(calls) == run, f"run {run - 1}'s callback had not run"
        step(c, clock, 1)


# ---------------------------------------------------------------- TTL


def test_a_cached_result_lives_for_its_ttl_in_fake_time(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(lambda: "kept").with_id("cached").with_cache(ttl=60).submit()
    assert h.result(WAIT) == "kept"
    step(c, clock, 59)
    assert c.subscribe("cached").get(timeout=WAIT).value == "kept"
    assert c.info("cached").state is TaskState.SUCCEEDED
    step(c, clock, 2)
    with pytest.raises(TaskNotFoundError):
        c.subscribe("cached")
    with pytest.raises(TaskNotFoundError):
        c.info("cached")
    again = c.add_task(lambda: "new").with_id("cached").submit()  # the id is free again
    assert again.result(WAIT) == "new"


def test_a_ttl_does_not_pass_in_real_time(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(lambda: "kept").with_cache(ttl=0.01).submit()
    assert h.result(WAIT) == "kept"
    assert h.wait(0.1) is not None  # 0.1 real seconds: 0 fake seconds
    assert c.info(h.id).value == "kept"


# ---------------------------------------------------------------- timeouts


def test_a_timeout_fires_when_the_clock_passes_it_and_not_before(
    c: Cluster, clock: FakeClock
) -> None:
    reasons: list[str | None] = []
    told = threading.Event()

    def blocked() -> None:
        ctx = current()
        ctx.cancelled.wait(WAIT)
        reasons.append(ctx.reason)
        told.set()

    h = c.add_task(blocked).with_timeout(30).with_cache().submit()
    wait_for_state(c, h.id, TaskState.RUNNING)  # its deadline is set when it starts
    clock.advance(29)
    assert h.wait(0.2) is None
    clock.advance(2)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    info = c.info(h.id)
    assert info.state is TaskState.TIMED_OUT
    assert info.finished_at == START + timedelta(seconds=31)
    # The abandoned attempt goes on in user code: wait_idle does not wait for it.
    assert told.wait(WAIT)
    assert reasons == ["timeout"]


def test_a_short_fake_timeout_does_not_pass_in_real_time(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    h = c.add_task(gate.wait, WAIT).with_timeout(0.01).submit()
    assert h.wait(0.3) is None
    gate.set()
    assert h.result(WAIT) is True


def test_a_timed_out_attempt_is_retried_after_its_backoff_in_fake_time(
    c: Cluster, clock: FakeClock
) -> None:
    starts: list[float] = []

    def blocked() -> None:
        starts.append(clock.monotonic())
        current().cancelled.wait(WAIT)

    h = (
        c.add_task(blocked)
        .with_timeout(30)
        .with_retry_rule(TaskTimeoutError, retries=1, backoff=FixedBackoff(5))
        .with_cache()
        .submit()
    )
    wait_for_state(c, h.id, TaskState.RUNNING)
    clock.advance(30)
    wait_for_state(c, h.id, TaskState.RETRYING)
    assert waiting(c, clock, h) == pytest.approx(5, abs=1e-6)
    assert isinstance(c.info(h.id).last_error, TaskTimeoutError)
    clock.advance(5)
    wait_for_state(c, h.id, TaskState.RUNNING)
    clock.advance(30)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    assert starts == [0, 35]
    assert c.info(h.id).attempts == 2


@pytest.mark.timeout(120)
def test_a_process_task_is_killed_when_the_fake_clock_passes_its_timeout(
    clock: FakeClock,
) -> None:
    c = Cluster(workers=1, clock=clock, executors={"cpu": ProcessExecutor(1)})
    c.run()
    try:
        h = c.add_task(time.sleep, 30).with_executor("cpu").with_timeout(10).submit()
        wait_for_state(c, h.id, TaskState.RUNNING, timeout=60)
        assert h.wait(0.2) is None
        began = time.monotonic()
        clock.advance(10)
        result = h.wait(WAIT)
        assert result is not None and isinstance(result.error, TaskTimeoutError)
        assert time.monotonic() - began < WAIT  # not the 30 real seconds of the call
    finally:
        c.cancel()
        c.stop(timeout=WAIT)


def wait_for_state(c: Cluster, task_id: str, state: TaskState, timeout: float = WAIT) -> None:
    """Poll ``info().state`` (set by cluster threads) for up to ``timeout`` real seconds."""
    end = time.monotonic() + timeout
    while c.info(task_id).state is not state:
        assert time.monotonic() < end, f"{task_id} never reached {state}"
        time.sleep(0.002)


# ---------------------------------------------------------------- info() timestamps


def test_info_timestamps_are_fake_clock_times(c: Cluster, clock: FakeClock) -> None:
    def three_seconds_of_work() -> str:
        clock.advance(3)
        return "done"

    h = c.add_task(three_seconds_of_work).with_delay(10).with_cache().submit()
    info = c.info(h.id)
    assert (info.submitted_at, info.start_at, info.started_at) == (
        START,
        START + timedelta(seconds=10),
        None,
    )
    step(c, clock, 10)
    info = c.info(h.id)
    assert info.state is TaskState.SUCCEEDED
    assert info.submitted_at == START
    assert info.started_at == START + timedelta(seconds=10)
    assert info.finished_at == START + timedelta(seconds=13)


# ---------------------------------------------------------------- caller timeouts: real time


def test_handle_wait_and_result_time_out_in_real_time(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(lambda: "later").with_delay(1).submit()
    began = time.monotonic()
    assert h.wait(0.05) is None
    with pytest.raises(TimeoutError):
        h.result(0.05)
    with pytest.raises(TimeoutError):
        next(iter(as_completed([h], timeout=0.05)))
    assert time.monotonic() - began < WAIT
    clock.advance(1)
    assert h.result(WAIT) == "later"


def test_wait_idle_times_out_in_real_time(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    c.add_task(gate.wait, WAIT).submit()
    began = time.monotonic()
    assert c.wait_idle(0.05) is False  # a task is running
    assert time.monotonic() - began < WAIT
    gate.set()
    assert c.wait_idle(WAIT) is True


def test_wait_idle_does_not_wait_for_what_is_not_due_yet(c: Cluster, clock: FakeClock) -> None:
    c.add_task(lambda: None).with_delay(3600).submit()
    c.add_task(Script(clock, ConnectionError())).with_retry(1).with_backoff(
        FixedBackoff(60)
    ).submit()
    c.add_task(lambda: None).repeat(every=60).submit()
    assert c.wait_idle(WAIT) is True


def test_stop_times_out_in_real_time_and_cancels_what_is_left(c: Cluster, clock: FakeClock) -> None:
    h = c.add_task(lambda: "never due").with_delay(3600).submit()
    began = time.monotonic()
    with pytest.raises(StopTimeoutError):
        c.stop(timeout=0.2)  # graceful would wait for the fake hour
    assert time.monotonic() - began < WAIT
    result = h.wait(0)
    assert result is not None and isinstance(result.error, TaskCancelledError)


def test_advance_returns_at_once_without_waiting_for_the_tasks_it_made_due(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    started = threading.Event()

    def blocked() -> str:
        started.set()
        gate.wait(WAIT)
        return "released"

    h = c.add_task(blocked).with_delay(5).submit()
    advancer, _ = in_thread(lambda: clock.advance(5))
    advancer.join(WAIT)
    assert not advancer.is_alive(), "advance() waited for the task it made due"
    assert started.wait(WAIT)
    assert not h.done()
    gate.set()
    assert h.result(WAIT) == "released"


# ---------------------------------------------------------------- whole schedules


@pytest.mark.timeout(60)
def test_a_day_of_repeats_runs_in_fake_time(c: Cluster, clock: FakeClock) -> None:
    times: list[float] = []
    wall = time.monotonic()
    h = c.add_task(lambda: times.append(clock.monotonic())).repeat(every=60).with_cache()
    handle = h.submit()
    settle(c)
    for _ in range(1440):
        step(c, clock, 60)
    assert time.monotonic() - wall < WALL_GUARD
    assert len(times) == 1441
    assert times == [60.0 * k for k in range(1441)]  # exactly on the grid
    assert clock.now() == START + timedelta(days=1)
    info = c.info(handle.id)
    assert info.runs == 1441
    assert info.next_run_at == START + timedelta(days=1, seconds=60)


def test_an_async_task_follows_the_fake_clock(c: Cluster, clock: FakeClock) -> None:
    seen: list[float] = []

    async def tick() -> str:
        seen.append(clock.monotonic())
        return "ticked"

    h = c.add_task(tick).with_delay(45).submit()
    step(c, clock, 44)
    assert seen == []
    step(c, clock, 1)
    assert h.result(WAIT) == "ticked"
    assert seen == [45]
