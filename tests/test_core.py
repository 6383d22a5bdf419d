"""SPEC §3-§5 on the thread-free scheduling core: ``Scheduler`` and ``retry_delay``.

Every method of the core takes ``now`` (monotonic seconds), so these tests drive it
with plain floats: no threads, no sleeps, no clock.
"""

from __future__ import annotations

import logging
import math
import random
from datetime import timedelta

import pytest
from _core_helpers import (
    assert_balanced,
    counters,
    ctx_of,
    fail,
    gauges,
    make_task,
    pop_one,
    succeed,
)

from cluster import (
    DuplicateTaskError,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    RetryMode,
    TaskCancelledError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
)
from cluster._core import DONE, REQUEUED, SLEEP, STALE, ReadyQueue, Scheduler, retry_delay
from cluster._task import Task

IMMEDIATE = RetryMode.IMMEDIATE


class Boom(Exception):
    """The error our fake tasks fail with."""


def drain(s: Scheduler, now: float) -> list[str | None]:
    """Pop (and succeed) every task due at ``now``; their ids in dispatch order."""
    order: list[str | None] = []
    while (t := s.pop(now)) is not None:
        order.append(t.id)
        assert succeed(s, t, None, now) == DONE
    return order


def submit_all(s: Scheduler, tasks: list[Task], now: float) -> None:
    for t in tasks:
        s.submit(t, now)


# -- ordering (SPEC §4) ----------------------------------------------------------


def test_due_tasks_pop_highest_priority_first() -> None:
    s = Scheduler()
    submit_all(s, [make_task(f"p{p}", priority=p) for p in (0, 5, -3, 2, 9)], 0.0)
    assert drain(s, 0.0) == ["p9", "p5", "p2", "p0", "p-3"]


def test_equal_priority_pops_by_start_time_including_past_starts() -> None:
    s = Scheduler()
    # All due at now=100; starts in the past, submitted out of start order.
    starts = {"a": 50.0, "b": 10.0, "c": 99.0, "d": -5.0, "e": 100.0}
    submit_all(s, [make_task(k, start=v) for k, v in starts.items()], 100.0)
    assert drain(s, 100.0) == ["d", "b", "a", "c", "e"]


def test_start_none_means_start_at_submit_time() -> None:
    s = Scheduler()
    s.submit(make_task("late"), 20.0)  # start = 20
    s.submit(make_task("early", start=15.0), 21.0)
    assert s.tasks["late"].start == 20.0
    assert drain(s, 21.0) == ["early", "late"]


def test_equal_priority_and_start_pop_in_submission_order() -> None:
    s = Scheduler()
    ids = [f"x{i}" for i in range(20)]
    submit_all(s, [make_task(i, start=7.0) for i in ids], 7.0)
    assert drain(s, 7.0) == ids


def test_priority_beats_earlier_start_and_submission_order() -> None:
    s = Scheduler()
    s.submit(make_task("old-low", priority=0, start=0.0), 10.0)
    s.submit(make_task("new-high", priority=1, start=10.0), 10.0)
    assert drain(s, 10.0) == ["new-high", "old-low"]


def test_ordering_key_is_priority_then_start_then_submission() -> None:
    rng = random.Random(1234)
    s = Scheduler()
    specs = [(f"k{i}", rng.randint(-2, 2), float(rng.randint(0, 5))) for i in range(300)]
    for tid, prio, start in specs:
        s.submit(make_task(tid, priority=prio, start=start), 10.0)
    expected = [tid for tid, _, _ in sorted(specs, key=lambda x: (-x[1], x[2], int(x[0][1:])))]
    assert drain(s, 10.0) == expected


def test_not_yet_due_task_never_pops_before_its_start_whatever_priority() -> None:
    s = Scheduler()
    assert s.submit(make_task("future", priority=10**9, start=5.0), 0.0) is False
    assert s.tasks["future"].state is TaskState.DELAYED
    for now in (0.0, 1.0, 4.999999):
        assert s.pop(now) is None
    assert s.tasks["future"].state is TaskState.DELAYED


def test_due_low_priority_runs_while_high_priority_waits_for_its_start() -> None:
    s = Scheduler()
    s.submit(make_task("future", priority=100, start=5.0), 0.0)
    assert s.submit(make_task("now", priority=-100), 0.0) is True
    assert pop_one(s, 1.0).id == "now"
    assert s.pop(1.0) is None


def test_next_due_reports_start_of_earliest_waiting_task() -> None:
    s = Scheduler()
    assert s.next_due() is None
    s.submit(make_task("b", start=8.0), 0.0)
    s.submit(make_task("a", start=3.5), 0.0)
    s.submit(make_task("due"), 0.0)  # due tasks do not count
    assert s.next_due() == 3.5
    assert pop_one(s, 0.0).id == "due"
    assert s.next_due() == 3.5


def test_next_due_skips_cancelled_waiting_tasks() -> None:
    s = Scheduler()
    a = make_task("a", start=3.0)
    s.submit(a, 0.0)
    s.submit(make_task("b", start=8.0), 0.0)
    s.cancel(a, "cancelled", 1.0)
    assert s.next_due() == 8.0
    s.cancel(s.tasks["b"], "cancelled", 1.0)
    assert s.next_due() is None


def test_delayed_task_is_due_exactly_at_its_start() -> None:
    s = Scheduler()
    s.submit(make_task("d", start=2.0), 0.0)
    assert s.pop(1.9999) is None
    assert pop_one(s, 2.0).id == "d"


def test_promoted_task_competes_on_priority_when_now_advances() -> None:
    s = Scheduler()
    s.submit(make_task("low"), 0.0)
    s.submit(make_task("mid", priority=1), 0.0)
    s.submit(make_task("high-later", priority=5, start=3.0), 0.0)
    assert gauges(s) == (2, 1, 0)
    assert pop_one(s, 1.0).id == "mid"
    # At t=3 the delayed task is promoted and beats the one that waited longer.
    assert pop_one(s, 3.0).id == "high-later"
    assert pop_one(s, 3.0).id == "low"


def test_promotion_moves_delayed_to_queued_gauge() -> None:
    s = Scheduler()
    s.submit(make_task("hold"), 0.0)
    for i in range(3):
        s.submit(make_task(f"d{i}", start=1.0 + i), 0.0)
    assert gauges(s) == (1, 3, 0)
    assert pop_one(s, 2.5).id == "hold"  # promotes d0, d1
    assert gauges(s) == (2, 1, 1)
    assert s.tasks["d0"].state is TaskState.PENDING
    assert s.tasks["d2"].state is TaskState.DELAYED
    assert s.next_due() == 3.0


# -- requeued retries ------------------------------------------------------------


def test_requeued_retry_keeps_priority_and_is_due_at_failure_time_plus_backoff() -> None:
    s = Scheduler()
    t = make_task("r", priority=7, retries=1, backoff=FixedBackoff(2.0))
    s.submit(t, 0.0)
    assert pop_one(s, 1.0) is t
    assert fail(s, t, Boom(), 10.0) == REQUEUED
    assert t.state is TaskState.RETRYING
    assert t.priority == 7
    assert t.start == 12.0
    assert s.next_due() == 12.0
    for i in range(3):
        s.submit(make_task(f"low{i}", priority=6), 10.0)
    assert pop_one(s, 11.99).id == "low0"
    assert pop_one(s, 12.0) is t  # priority 7 beats the priority-6 tasks waiting since t=10
    assert ctx_of(t).attempt == 1
    assert t.attempts == 2
    assert t.started_at == 12.0


def test_requeued_retry_releases_the_worker_gauge() -> None:
    s = Scheduler()
    t = make_task("r", retries=1, backoff=FixedBackoff(1.0))
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert gauges(s) == (0, 0, 1)
    fail(s, t, Boom(), 0.5)
    assert gauges(s) == (0, 1, 0)
    assert s.retried == 1
    pop_one(s, 1.5)
    assert gauges(s) == (0, 0, 1)


def test_requeued_retry_with_zero_backoff_is_due_at_once() -> None:
    s = Scheduler()
    t = make_task("r", retries=1)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert fail(s, t, Boom(), 4.0) == REQUEUED
    assert t.start == 4.0
    assert pop_one(s, 4.0) is t


def test_requeued_retry_ranks_by_its_new_start_among_equal_priorities() -> None:
    s = Scheduler()
    t = make_task("r", retries=1, backoff=FixedBackoff(1.0))
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    s.submit(make_task("before", start=2.0), 0.0)  # submitted after r, due before its retry
    s.submit(make_task("after", start=4.0), 0.0)
    fail(s, t, Boom(), 2.0)  # retry due at 3.0
    assert drain(s, 10.0) == ["before", "r", "after"]


# -- backoff strategies -------------------------------------------------------------


def test_fixed_backoff_is_constant() -> None:
    b = FixedBackoff(1.5)
    assert [b(a) for a in (0, 1, 7, 10**6)] == [1.5, 1.5, 1.5, 1.5]


def test_backoff_accepts_timedelta() -> None:
    assert FixedBackoff(timedelta(milliseconds=250))(0) == 0.25
    assert LinearBackoff(timedelta(seconds=1), timedelta(seconds=2))(3) == 7.0


def test_linear_backoff_is_base_plus_step_times_attempt() -> None:
    b = LinearBackoff(1.0, 0.5)
    assert [b(a) for a in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]


def test_linear_backoff_max_caps_the_delay() -> None:
    b = LinearBackoff(1.0, 2.0, max=4.0)
    assert [b(a) for a in range(5)] == [1.0, 3.0, 4.0, 4.0, 4.0]
    assert b(10**9) == 4.0


def test_exponential_backoff_is_base_times_multiplier_power_attempt() -> None:
    b = ExponentialBackoff(0.5, 3.0)
    assert [b(a) for a in range(5)] == [0.5, 1.5, 4.5, 13.5, 40.5]
    assert ExponentialBackoff(1.0)(10) == 1024.0  # default multiplier 2


def test_exponential_backoff_max_caps_the_delay() -> None:
    b = ExponentialBackoff(1.0, 2.0, max=10.0)
    assert [b(a) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@pytest.mark.parametrize("attempt", [1100, 10**6, 10**12])
def test_exponential_backoff_overflow_is_capped_by_max(attempt: int) -> None:
    assert ExponentialBackoff(1.0, 2.0, max=60.0)(attempt) == 60.0


def test_exponential_backoff_overflow_without_max_does_not_raise() -> None:
    delay = ExponentialBackoff(1.0, 2.0)(10**6)
    assert delay >= 1e300  # effectively "forever", not an OverflowError


def test_exponential_backoff_zero_base_stays_zero_for_huge_attempt() -> None:
    # base * multiplier ** attempt is 0 for base 0, however large the attempt.
    b = ExponentialBackoff(0.0, 2.0)
    assert b(1023) == 0.0
    assert b(10**6) == 0.0


def test_exponential_backoff_rejects_multiplier_below_one() -> None:
    with pytest.raises(ValueError, match="multiplier"):
        ExponentialBackoff(1.0, 0.5)


def test_retry_delay_passes_zero_based_retry_number_to_backoff() -> None:
    seen: list[int] = []

    def backoff(attempt: int) -> float:
        seen.append(attempt)
        return 10.0 * attempt

    s = Scheduler()
    t = make_task("r", retries=3, backoff=backoff)
    s.submit(t, 0.0)
    now = 0.0
    for expected_delay in (0.0, 10.0, 20.0):
        t = pop_one(s, now)
        assert fail(s, t, Boom(), now) == REQUEUED
        assert t.start == now + expected_delay
        now = t.start
    assert seen == [0, 1, 2]


# -- jitter --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_jitter_factor_stays_within_one_plus_minus_ratio(ratio: float) -> None:
    rng = random.Random(7)
    t = make_task("j", retries=1, backoff=FixedBackoff(10.0), jitter=ratio)
    t.attempts = 1
    delays = [retry_delay(t, Boom(), rng) for _ in range(2000)]
    assert all(d is not None for d in delays)
    values = [d for d in delays if d is not None]
    lo, hi = 10.0 * (1 - ratio), 10.0 * (1 + ratio)
    assert all(lo <= d <= hi for d in values), (min(values), max(values))
    # Spread over the range, not a constant.
    assert min(values) < lo + 0.05 * (hi - lo)
    assert max(values) > hi - 0.05 * (hi - lo)


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    def run(seed: int) -> list[float]:
        s = Scheduler(rng=random.Random(seed))
        t = make_task("j", retries=5, backoff=FixedBackoff(4.0), jitter=0.3)
        s.submit(t, 0.0)
        starts: list[float] = []
        now = 0.0
        for _ in range(5):
            t = pop_one(s, now)
            fail(s, t, Boom(), now)
            assert t.start is not None
            starts.append(t.start - now)
            now = t.start
        return starts

    first = run(42)
    assert run(42) == first
    assert run(43) != first
    assert all(4.0 * 0.7 <= d <= 4.0 * 1.3 for d in first)


def test_no_jitter_gives_the_exact_backoff() -> None:
    t = make_task("j", retries=1, backoff=FixedBackoff(3.25))
    t.attempts = 1
    assert retry_delay(t, Boom(), random.Random(0)) == 3.25


# -- retry budget and decisions -----------------------------------------------------------


def test_n_retries_allow_at_most_n_plus_one_attempts() -> None:
    s = Scheduler()
    t = make_task("r", retries=2)
    s.submit(t, 0.0)
    codes = []
    for _ in range(3):
        t = pop_one(s, 0.0)
        codes.append(fail(s, t, Boom(), 0.0))
    assert codes == [REQUEUED, REQUEUED, DONE]
    assert t.attempts == 3
    assert t.state is TaskState.FAILED
    assert isinstance(t.error, Boom)
    assert s.pop(100.0) is None
    assert (s.retried, s.failed) == (2, 1)


def test_zero_retries_make_the_first_failure_terminal() -> None:
    s = Scheduler()
    t = make_task("r")
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    err = Boom("x")
    assert fail(s, t, err, 1.0) == DONE
    assert t.state is TaskState.FAILED
    assert t.error is err
    assert t.finished_at == 1.0
    assert s.retried == 0


def test_success_after_a_retry_is_terminal_with_value() -> None:
    s = Scheduler()
    t = make_task("r", retries=3)
    s.submit(t, 0.0)
    fail(s, pop_one(s, 0.0), Boom(), 0.0)
    assert succeed(s, pop_one(s, 0.0), "v", 2.0) == DONE
    assert t.state is TaskState.SUCCEEDED
    assert (t.value, t.error, t.finished_at) == ("v", None, 2.0)
    assert (s.succeeded, s.retried, s.failed) == (1, 1, 0)


def test_retry_delay_is_none_once_the_budget_is_spent() -> None:
    t = make_task("r", retries=2, backoff=FixedBackoff(1.0))
    rng = random.Random(0)
    t.attempts = 2
    assert retry_delay(t, Boom(), rng) == 1.0
    t.attempts = 3
    assert retry_delay(t, Boom(), rng) is None


def test_retry_if_false_makes_the_failure_terminal() -> None:
    s = Scheduler()
    t = make_task("r", retries=5, retry_if=lambda e: isinstance(e, KeyError))
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert fail(s, t, Boom(), 0.0) == DONE
    assert t.state is TaskState.FAILED
    assert t.attempts == 1


def test_retry_if_true_retries_and_receives_the_error() -> None:
    seen: list[BaseException] = []

    def pred(e: BaseException) -> bool:
        seen.append(e)
        return True

    s = Scheduler()
    t = make_task("r", retries=1, retry_if=pred)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    err = Boom()
    assert fail(s, t, err, 0.0) == REQUEUED
    assert seen == [err]


def test_retry_if_not_consulted_once_budget_is_spent() -> None:
    calls: list[BaseException] = []

    def pred(e: BaseException) -> bool:
        calls.append(e)
        return True

    t = make_task("r", retries=0, retry_if=pred)
    t.attempts = 1
    assert retry_delay(t, Boom(), random.Random(0)) is None
    assert calls == []


def test_raising_retry_if_means_no_retry_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def pred(e: BaseException) -> bool:
        raise RuntimeError("predicate exploded")

    s = Scheduler()
    t = make_task("pred-task", retries=3, retry_if=pred)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    with caplog.at_level(logging.ERROR, logger="cluster"):
        assert fail(s, t, Boom(), 0.0) == DONE
    assert t.state is TaskState.FAILED
    assert isinstance(t.error, Boom)
    records = [r for r in caplog.records if r.name == "cluster"]
    assert len(records) == 1
    assert records[0].levelno >= logging.ERROR
    assert "pred-task" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


def _raising_backoff(attempt: int) -> float:
    raise RuntimeError("backoff exploded")


@pytest.mark.parametrize(
    "backoff",
    [_raising_backoff, lambda a: math.nan, lambda a: -1.0, lambda a: -math.inf],
    ids=["raises", "nan", "negative", "minus-inf"],
)
def test_bad_backoff_is_logged_and_retries_without_delay(
    backoff: object, caplog: pytest.LogCaptureFixture
) -> None:
    s = Scheduler()
    t = make_task("bad-backoff", retries=1, backoff=backoff)  # type: ignore[arg-type]
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    with caplog.at_level(logging.ERROR, logger="cluster"):
        assert fail(s, t, Boom(), 5.0) == REQUEUED
    assert t.start == 5.0
    assert pop_one(s, 5.0) is t
    records = [r for r in caplog.records if r.name == "cluster"]
    assert len(records) == 1
    assert records[0].levelno >= logging.ERROR
    assert "bad-backoff" in records[0].getMessage()


def test_good_backoff_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    t = make_task("ok", retries=1, backoff=FixedBackoff(1.0))
    t.attempts = 1
    with caplog.at_level(logging.DEBUG, logger="cluster"):
        assert retry_delay(t, Boom(), random.Random(0)) == 1.0
    assert [r for r in caplog.records if r.name == "cluster"] == []


@pytest.mark.parametrize(
    "error",
    [KeyboardInterrupt(), SystemExit(3), GeneratorExit()],
    ids=["KeyboardInterrupt", "SystemExit", "GeneratorExit"],
)
def test_base_exception_is_never_retried(error: BaseException) -> None:
    s = Scheduler()
    t = make_task("b", retries=5, retry_if=lambda e: True)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert retry_delay(t, error, s.rng) is None
    assert fail(s, t, error, 1.0) == DONE
    assert t.state is TaskState.FAILED
    assert t.error is error
    assert s.retried == 0


def test_task_cancelled_error_is_never_retried() -> None:
    s = Scheduler()
    t = make_task("c", retries=5, retry_if=lambda e: True)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    err = TaskCancelledError("raised by the task")
    assert retry_delay(t, err, s.rng) is None
    assert fail(s, t, err, 1.0) == DONE
    assert t.state is TaskState.FAILED
    assert t.error is err


def test_task_timeout_error_raised_by_the_task_is_retried() -> None:
    s = Scheduler()
    t = make_task("c", retries=1)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert fail(s, t, TaskTimeoutError("from check()"), 1.0) == REQUEUED


def test_task_timeout_error_without_retry_ends_timed_out() -> None:
    s = Scheduler()
    t = make_task("c")
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert fail(s, t, TaskTimeoutError("from check()"), 1.0) == DONE
    assert t.state is TaskState.TIMED_OUT
    assert (s.timed_out, s.failed) == (1, 0)


def test_retries_allowed_false_makes_a_failure_terminal() -> None:
    s = Scheduler()
    t = make_task("r", retries=3, backoff=FixedBackoff(1.0))
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    s.retries_allowed = False
    assert fail(s, t, Boom(), 1.0) == DONE
    assert t.state is TaskState.FAILED
    assert (s.retried, s.failed) == (0, 1)
    assert gauges(s) == (0, 0, 0)


def test_retries_allowed_false_makes_a_timeout_terminal() -> None:
    s = Scheduler()
    t = make_task("r", retries=3, timeout=1.0)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    [ctx] = s.expire(1.0)
    s.retries_allowed = False
    err = TaskTimeoutError("t")
    assert s.fail_detached(ctx, err, retry_delay(t, err, s.rng), 1.0) == DONE
    assert t.state is TaskState.TIMED_OUT


# -- RetryMode.IMMEDIATE ---------------------------------------------------------------------


def test_immediate_mode_failure_returns_sleep_and_waits_outside_the_queue() -> None:
    s = Scheduler()
    t = make_task("i", priority=3, retries=1, backoff=FixedBackoff(2.0), mode=IMMEDIATE)
    s.submit(t, 0.0)
    first = ctx_of(pop_one(s, 0.0))
    assert fail(s, t, Boom(), 1.0) == SLEEP
    assert t.state is TaskState.RETRYING
    assert t.start == 3.0
    sleeping = ctx_of(t)
    assert sleeping is not first
    assert sleeping.attempt == 1
    assert sleeping.reason is None
    assert gauges(s) == (0, 1, 0)
    assert s.retried == 1
    # The worker owns the retry: it is not handed to any other pop.
    assert s.pop(10.0) is None


def test_resume_starts_the_next_attempt() -> None:
    s = Scheduler()
    t = make_task("i", retries=1, backoff=FixedBackoff(2.0), mode=IMMEDIATE)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    fail(s, t, Boom(), 1.0)
    sleeping = ctx_of(t)
    assert s.resume(t, sleeping, 3.0) is True
    assert t.state is TaskState.RUNNING
    ctx = ctx_of(t)  # the attempt's context (the sleeping one or a fresh one)
    assert (ctx.attempt, ctx.reason, ctx.task_id) == (1, None, "i")
    assert (t.attempts, t.started_at) == (2, 3.0)
    assert gauges(s) == (0, 0, 1)
    assert succeed(s, t, 42, 4.0) == DONE
    assert (t.state, t.value) == (TaskState.SUCCEEDED, 42)


def test_resume_applies_the_timeout_to_the_next_attempt() -> None:
    s = Scheduler()
    t = make_task("i", retries=1, backoff=FixedBackoff(2.0), mode=IMMEDIATE, timeout=5.0)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    fail(s, t, Boom(), 1.0)
    assert s.resume(t, ctx_of(t), 3.0)
    ctx = ctx_of(t)
    assert ctx.deadline == 8.0
    assert s.next_deadline() == 8.0
    assert s.expire(7.999) == []
    assert s.expire(8.0) == [ctx]


def test_cancel_during_immediate_sleep_wakes_it_and_resume_returns_false() -> None:
    s = Scheduler()
    t = make_task("i", retries=1, backoff=FixedBackoff(60.0), mode=IMMEDIATE)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    fail(s, t, Boom(), 1.0)
    sleeping = ctx_of(t)
    assert s.cancel(t, "cancelled", 2.0) is True
    assert sleeping.cancelled.is_set()
    assert sleeping.reason == "cancelled"
    assert t.state is TaskState.CANCELLED
    assert s.resume(t, sleeping, 61.0) is False
    assert t.state is TaskState.CANCELLED
    assert gauges(s) == (0, 0, 0)
    assert s.cancelled == 1
    assert_balanced(s)


def test_immediate_retry_budget_still_applies() -> None:
    s = Scheduler()
    t = make_task("i", retries=1, mode=IMMEDIATE)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    assert fail(s, t, Boom(), 0.0) == SLEEP
    assert s.resume(t, ctx_of(t), 0.0)
    assert fail(s, t, Boom(), 0.0) == DONE
    assert (t.state, t.attempts) == (TaskState.FAILED, 2)


# -- cancellation ----------------------------------------------------------------------------


def _assert_cancelled(s: Scheduler, t: Task, now: float) -> None:
    assert t.state is TaskState.CANCELLED
    assert isinstance(t.error, TaskCancelledError)
    assert t.finished_at == now
    assert t.value is None
    assert gauges(s) == (0, 0, 0)
    assert s.cancelled == 1
    assert_balanced(s)


def test_cancel_pending_task() -> None:
    s = Scheduler()
    t = make_task("p")
    s.submit(t, 0.0)
    assert s.cancel(t, "cancelled", 1.0) is True
    _assert_cancelled(s, t, 1.0)
    assert s.pop(1.0) is None


def test_cancel_delayed_task() -> None:
    s = Scheduler()
    t = make_task("d", start=5.0)
    s.submit(t, 0.0)
    assert s.cancel(t, "cancelled", 1.0) is True
    _assert_cancelled(s, t, 1.0)
    assert s.pop(10.0) is None
    assert s.next_due() is None


def test_cancel_requeued_retrying_task() -> None:
    s = Scheduler()
    t = make_task("r", retries=2, backoff=FixedBackoff(5.0))
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    fail(s, t, Boom(), 1.0)
    assert t.state is TaskState.RETRYING
    assert s.cancel(t, "cancelled", 2.0) is True
    _assert_cancelled(s, t, 2.0)
    assert s.pop(10.0) is None
    assert s.next_due() is None


def test_cancel_running_task_signals_its_context() -> None:
    s = Scheduler()
    t = make_task("run", timeout=10.0)
    s.submit(t, 0.0)
    ctx = ctx_of(pop_one(s, 0.0))
    assert s.cancel(t, "cancelled", 1.0) is True
    _assert_cancelled(s, t, 1.0)
    assert ctx.cancelled.is_set()
    assert ctx.reason == "cancelled"
    with pytest.raises(TaskCancelledError):
        ctx.check()
    assert s.next_deadline() is None
    assert s.expire(100.0) == []


def test_cancel_running_task_reports_the_worker_inside_it() -> None:
    s = Scheduler()
    t = make_task("run")
    s.submit(t, 0.0)
    worker = object()
    ctx_of(pop_one(s, 0.0))._worker = worker  # what the cluster records for its worker
    assert s.cancel(t, "cancelled", 1.0) is True
    assert s.abandoned == [worker]


def test_cancel_with_shutdown_reason() -> None:
    s = Scheduler()
    t = make_task("run")
    s.submit(t, 0.0)
    ctx = ctx_of(pop_one(s, 0.0))
    assert s.cancel(t, "shutdown", 1.0) is True
    assert ctx.reason == "shutdown"
    assert isinstance(t.error, TaskCancelledError)


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancelled"])
def test_cancel_of_terminal_task_returns_false(outcome: str) -> None:
    s = Scheduler()
    t = make_task("t", ttl=100.0)
    s.submit(t, 0.0)
    if outcome == "cancelled":
        s.cancel(t, "cancelled", 0.0)
    else:
        pop_one(s, 0.0)
        if outcome == "succeeded":
            succeed(s, t, 1, 0.0)
        else:
            fail(s, t, Boom(), 0.0)
    before = (t.state, t.error, t.value, counters(s))
    assert s.cancel(t, "cancelled", 1.0) is False
    assert (t.state, t.error, t.value, counters(s)) == before


def test_finish_after_cancel_is_stale_and_drops_the_value() -> None:
    s = Scheduler()
    t = make_task("run", retries=3, ttl=100.0)
    s.submit(t, 0.0)
    ctx = ctx_of(pop_one(s, 0.0))
    s.cancel(t, "cancelled", 1.0)
    before = counters(s)
    assert s.finish(t, ctx, "late value", None, None, 2.0) == STALE
    assert s.finish(t, ctx, None, Boom(), 0.0, 2.0) == STALE
    assert t.state is TaskState.CANCELLED
    assert t.value is None
    assert isinstance(t.error, TaskCancelledError)
    assert counters(s) == before
    assert gauges(s) == (0, 0, 0)


def test_finish_after_expire_is_stale() -> None:
    s = Scheduler()
    t = make_task("run", timeout=1.0)
    s.submit(t, 0.0)
    ctx = ctx_of(pop_one(s, 0.0))
    assert s.expire(1.0) == [ctx]
    assert s.finish(t, ctx, "late", None, None, 2.0) == STALE
    assert t.state is TaskState.RUNNING  # still waiting for fail_detached
    assert t.value is None
    assert s.succeeded == 0


def test_cancel_all_without_running_leaves_running_tasks() -> None:
    s = Scheduler()
    run = make_task("run")
    s.submit(run, 0.0)
    pop_one(s, 0.0)
    retrying = make_task("retry", retries=1, backoff=FixedBackoff(5.0))
    s.submit(retrying, 0.0)
    pop_one(s, 0.0)
    fail(s, retrying, Boom(), 0.0)
    s.submit(make_task("pending"), 0.0)
    s.submit(make_task("delayed", start=9.0), 0.0)
    done = s.cancel_all("shutdown", 1.0, False)
    assert sorted(t.id or "" for t in done) == ["delayed", "pending", "retry"]
    assert s.abandoned == []
    assert all(t.state is TaskState.CANCELLED for t in done)
    assert run.state is TaskState.RUNNING
    assert gauges(s) == (0, 0, 1)
    assert succeed(s, run, "v", 2.0) == DONE
    assert run.value == "v"
    assert (s.cancelled, s.succeeded) == (3, 1)
    assert_balanced(s)


def test_cancel_all_with_running_cancels_everything_and_reports_workers() -> None:
    s = Scheduler()
    worker = object()
    for i in range(2):
        s.submit(make_task(f"run{i}"), 0.0)
    ctx_of(pop_one(s, 0.0))._worker = worker
    ctx2 = ctx_of(pop_one(s, 0.0))
    s.submit(make_task("pending"), 0.0)
    done = s.cancel_all("shutdown", 1.0, True)
    assert sorted(t.id or "" for t in done) == ["pending", "run0", "run1"]
    assert s.abandoned == [worker]
    assert ctx2.reason == "shutdown"
    assert gauges(s) == (0, 0, 0)
    assert s.live == 0
    assert_balanced(s)


# -- timeouts ----------------------------------------------------------------------------


def test_pop_sets_the_attempt_deadline() -> None:
    s = Scheduler()
    s.submit(make_task("a", timeout=5.0), 0.0)
    s.submit(make_task("b"), 0.0)
    assert ctx_of(pop_one(s, 2.0)).deadline == 7.0
    assert ctx_of(pop_one(s, 2.0)).deadline is None


def test_expire_signals_the_context_with_reason_timeout() -> None:
    s = Scheduler()
    t = make_task("a", timeout=5.0)
    s.submit(t, 0.0)
    ctx = ctx_of(pop_one(s, 1.0))
    assert s.expire(5.999) == []
    assert not ctx.cancelled.is_set()
    assert s.expire(6.0) == [ctx]
    assert ctx.reason == "timeout"
    assert ctx.cancelled.is_set()
    with pytest.raises(TaskTimeoutError):
        ctx.check()
    assert t.state is TaskState.RUNNING
    assert gauges(s) == (0, 0, 1)  # until fail_detached settles it
    assert s.expire(100.0) == []  # reported once


def test_fail_detached_schedules_a_retry_when_budget_remains() -> None:
    s = Scheduler()
    t = make_task("a", timeout=5.0, retries=1, backoff=FixedBackoff(2.0), priority=4)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    [ctx] = s.expire(5.0)
    err = TaskTimeoutError("attempt 0 timed out")
    assert s.fail_detached(ctx, err, retry_delay(t, err, s.rng), 5.5) == REQUEUED
    assert t.state is TaskState.RETRYING
    assert t.start == 7.5
    assert gauges(s) == (0, 1, 0)
    assert s.retried == 1
    assert pop_one(s, 7.5) is t
    assert ctx_of(t).deadline == 12.5
    assert ctx_of(t).attempt == 1


def test_fail_detached_without_budget_ends_timed_out() -> None:
    s = Scheduler()
    t = make_task("a", timeout=5.0)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    [ctx] = s.expire(5.0)
    err = TaskTimeoutError("attempt 0 timed out")
    assert s.fail_detached(ctx, err, retry_delay(t, err, s.rng), 5.0) == DONE
    assert t.state is TaskState.TIMED_OUT
    assert t.error is err
    assert t.finished_at == 5.0
    assert (s.timed_out, s.failed) == (1, 0)
    assert gauges(s) == (0, 0, 0)
    assert_balanced(s)


def test_fail_detached_after_cancel_is_stale() -> None:
    s = Scheduler()
    t = make_task("a", timeout=5.0, retries=2)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    [ctx] = s.expire(5.0)
    assert s.cancel(t, "cancelled", 5.1) is True
    err = TaskTimeoutError("late")
    assert s.fail_detached(ctx, err, 0.0, 5.2) == STALE
    assert t.state is TaskState.CANCELLED
    assert (s.cancelled, s.timed_out, s.retried) == (1, 0, 0)
    assert gauges(s) == (0, 0, 0)


def test_fail_detached_twice_is_stale() -> None:
    s = Scheduler()
    t = make_task("a", timeout=1.0, retries=2)
    s.submit(t, 0.0)
    pop_one(s, 0.0)
    [ctx] = s.expire(1.0)
    err = TaskTimeoutError("t")
    assert s.fail_detached(ctx, err, 0.0, 1.0) == REQUEUED
    assert s.fail_detached(ctx, err, 0.0, 1.0) == STALE
    assert s.retried == 1
    assert gauges(s) == (0, 1, 0)


def test_next_deadline_is_the_earliest_running_deadline() -> None:
    s = Scheduler()
    assert s.next_deadline() is None
    a = make_task("a", timeout=3.0)
    b = make_task("b", timeout=10.0)
    s.submit(a, 0.0)
    s.submit(b, 0.0)
    s.submit(make_task("no-timeout"), 0.0)
    pop_one(s, 0.0)
    ctx_b = ctx_of(pop_one(s, 1.0))
    assert s.next_deadline() == 3.0
    succeed(s, a, None, 2.0)
    assert s.next_deadline() == 11.0
    pop_one(s, 2.0)
    assert s.next_deadline() == 11.0
    assert s.expire(11.0) == [ctx_b]
    assert s.next_deadline() is None


def test_deadline_heap_stays_bounded_while_tasks_finish() -> None:
    s = Scheduler()
    s.submit(make_task("long", timeout=1e9), 0.0)
    pop_one(s, 0.0)  # keeps one attempt running all along
    for i in range(5000):
        t = make_task(f"t{i}", timeout=100.0)
        s.submit(t, float(i))
        pop_one(s, float(i))
        succeed(s, t, None, float(i))
    assert s.sizes()["deadlines"] < 500
    assert s.next_deadline() == 1e9


# -- TTL and ids ---------------------------------------------------------------------------


def test_ttl_keeps_the_task_until_finished_plus_ttl() -> None:
    s = Scheduler()
    t = make_task("cached", ttl=10.0)
    s.submit(t, 0.0)
    pop_one(s, 1.0)
    succeed(s, t, "v", 3.0)
    assert s.lookup("cached", 12.999) is t
    assert "cached" in s.tasks
    with pytest.raises(DuplicateTaskError):
        s.submit(make_task("cached"), 12.999)
    with pytest.raises(TaskNotFoundError):
        s.lookup("cached", 13.0)
    assert "cached" not in s.tasks
    again = make_task("cached")
    s.submit(again, 13.0)
    assert s.lookup("cached", 13.0) is again


def test_expired_cache_is_purged_by_submit_of_the_same_id() -> None:
    s = Scheduler()
    t = make_task("cached", ttl=1.0)
    s.submit(t, 0.0)
    s.cancel(t, "cancelled", 0.0)
    again = make_task("cached")
    s.submit(again, 1.0)
    assert s.tasks["cached"] is again


def test_purge_forgets_only_expired_results() -> None:
    s = Scheduler()
    for tid, ttl in (("a", 1.0), ("b", 5.0)):
        t = make_task(tid, ttl=ttl)
        s.submit(t, 0.0)
        pop_one(s, 0.0)
        succeed(s, t, None, 0.0)
    s.purge(2.0)
    assert sorted(s.tasks) == ["b"]
    assert s.sizes()["expiry"] == 1
    s.purge(5.0)
    assert s.tasks == {}
    assert s.sizes()["expiry"] == 0


def test_purge_of_an_old_cache_entry_leaves_a_reused_id_alone() -> None:
    s = Scheduler()
    old = make_task("x", ttl=1.0)
    s.submit(old, 0.0)
    s.cancel(old, "cancelled", 0.0)  # cached until 1.0
    s.purge(1.0)
    new = make_task("x", ttl=100.0)
    s.submit(new, 1.0)
    s.cancel(new, "cancelled", 1.0)
    s.purge(50.0)
    assert s.lookup("x", 50.0) is new


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancelled", "timed_out"])
def test_without_ttl_a_terminal_task_is_removed_at_once(outcome: str) -> None:
    s = Scheduler()
    t = make_task("gone", timeout=1.0)
    s.submit(t, 0.0)
    if outcome == "cancelled":
        s.cancel(t, "cancelled", 0.0)
    else:
        pop_one(s, 0.0)
        if outcome == "succeeded":
            succeed(s, t, 1, 0.0)
        elif outcome == "failed":
            fail(s, t, Boom(), 0.0)
        else:
            [ctx] = s.expire(1.0)
            s.fail_detached(ctx, TaskTimeoutError("t"), None, 1.0)
    assert t.state.terminal
    assert "gone" not in s.tasks
    with pytest.raises(TaskNotFoundError):
        s.lookup("gone", 0.0)
    s.submit(make_task("gone"), 2.0)  # the id is free again
    assert s.sizes()["tasks"] == 1


def test_lookup_of_unknown_id_raises_task_not_found() -> None:
    s = Scheduler()
    with pytest.raises(TaskNotFoundError):
        s.lookup("nope", 0.0)
    with pytest.raises(KeyError):  # TaskNotFoundError is a KeyError
        s.lookup("nope", 0.0)


def test_lookup_rejects_a_non_str_id() -> None:
    s = Scheduler()
    with pytest.raises(TypeError):
        s.lookup(1, 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("state", ["pending", "delayed", "running", "retrying"])
def test_duplicate_id_in_use_raises_and_changes_nothing(state: str) -> None:
    s = Scheduler()
    t = make_task("dup", start=5.0 if state == "delayed" else None, retries=1)
    s.submit(t, 0.0)
    if state in ("running", "retrying"):
        pop_one(s, 0.0)
    if state == "retrying":
        fail(s, t, Boom(), 0.0)
    before = (counters(s), gauges(s), s.sizes())
    with pytest.raises(DuplicateTaskError):
        s.submit(make_task("dup"), 1.0)
    assert (counters(s), gauges(s), s.sizes()) == before
    assert s.tasks["dup"] is t


def test_generated_ids_are_unique() -> None:
    s = Scheduler()
    tasks = [make_task() for _ in range(1000)]
    submit_all(s, tasks, 0.0)
    ids = [t.id for t in tasks]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 1000
    assert sorted(s.tasks) == sorted(i for i in ids if i is not None)


def test_generated_ids_skip_ids_taken_by_users() -> None:
    probe = Scheduler()
    would_be = []
    for _ in range(4):
        t = make_task()
        probe.submit(t, 0.0)
        would_be.append(t.id)
    s = Scheduler()
    taken = [would_be[0], would_be[2]]
    for tid in taken:
        s.submit(make_task(tid), 0.0)
    generated = [make_task() for _ in range(4)]
    submit_all(s, generated, 0.0)
    gen_ids = [t.id for t in generated]
    assert len(set(gen_ids)) == 4
    assert not set(gen_ids) & set(taken)
    assert len(s.tasks) == 6


# -- gauges, counters, live ------------------------------------------------------------------


def test_gauges_and_counters_follow_every_transition() -> None:
    s = Scheduler()

    def check(g: tuple[int, int, int], **c: int) -> None:
        assert gauges(s) == g
        expected = dict.fromkeys(counters(s), 0)
        expected.update(c)
        assert counters(s) == expected
        assert s.live == sum(g)
        assert_balanced(s)

    check((0, 0, 0))
    a = make_task("a", retries=1, backoff=FixedBackoff(1.0))
    s.submit(a, 0.0)
    check((1, 0, 0), submitted=1)
    b = make_task("b", start=2.0, timeout=1.0)
    s.submit(b, 0.0)
    check((1, 1, 0), submitted=2)
    pop_one(s, 0.0)  # a
    check((0, 1, 1), submitted=2)
    fail(s, a, Boom(), 0.5)  # a retries at 1.5
    check((0, 2, 0), submitted=2, retried=1)
    assert pop_one(s, 1.5) is a
    check((0, 1, 1), submitted=2, retried=1)
    succeed(s, a, "ok", 1.6)
    check((0, 1, 0), submitted=2, retried=1, succeeded=1)
    assert pop_one(s, 2.0) is b
    check((0, 0, 1), submitted=2, retried=1, succeeded=1)
    [ctx] = s.expire(3.0)
    check((0, 0, 1), submitted=2, retried=1, succeeded=1)
    s.fail_detached(ctx, TaskTimeoutError("t"), None, 3.0)
    check((0, 0, 0), submitted=2, retried=1, succeeded=1, timed_out=1)
    c = make_task("c")
    s.submit(c, 4.0)
    pop_one(s, 4.0)
    fail(s, c, Boom(), 4.0)
    check((0, 0, 0), submitted=3, retried=1, succeeded=1, timed_out=1, failed=1)
    d = make_task("d")
    s.submit(d, 5.0)
    check((1, 0, 0), submitted=4, retried=1, succeeded=1, timed_out=1, failed=1)
    s.cancel(d, "cancelled", 5.0)
    check((0, 0, 0), submitted=4, retried=1, succeeded=1, timed_out=1, failed=1, cancelled=1)


def test_live_counts_queued_delayed_and_running() -> None:
    s = Scheduler()
    assert s.live == 0
    s.submit(make_task("q1"), 0.0)
    s.submit(make_task("q2"), 0.0)
    s.submit(make_task("d", start=9.0), 0.0)
    assert s.live == 3
    t = pop_one(s, 0.0)
    assert s.live == 3
    succeed(s, t, None, 0.0)
    assert s.live == 2


def test_submit_reports_whether_the_task_is_due() -> None:
    s = Scheduler()
    assert s.submit(make_task("now"), 1.0) is True
    assert s.submit(make_task("past", start=0.5), 1.0) is True
    assert s.submit(make_task("exact", start=1.0), 1.0) is True
    assert s.submit(make_task("future", start=1.5), 1.0) is False
    assert s.tasks["future"].state is TaskState.DELAYED
    assert s.tasks["now"].state is TaskState.PENDING
    assert s.tasks["now"].submitted_at == 1.0


# -- memory bounds and complexity ------------------------------------------------------------


def test_ready_heap_compacts_after_mass_cancel_and_survivors_pop_in_order() -> None:
    s = Scheduler()
    rng = random.Random(5)
    doomed: list[Task] = []
    survivors: list[tuple[int, int, str]] = []
    for i in range(10_010):
        prio = rng.randint(0, 9)
        t = make_task(f"t{i}", priority=prio)
        s.submit(t, 0.0)
        if i % 1001 == 500:
            survivors.append((-prio, i, f"t{i}"))
        else:
            doomed.append(t)
    assert len(survivors) == 10
    for t in doomed:
        assert s.cancel(t, "cancelled", 1.0) is True
    assert s.sizes()["ready"] < 500
    assert s.sizes()["tasks"] == 10
    assert gauges(s) == (10, 0, 0)
    assert drain(s, 2.0) == [tid for _, _, tid in sorted(survivors)]
    assert s.sizes()["ready"] == 0


def test_timer_heap_compacts_after_mass_cancel_of_delayed_tasks() -> None:
    s = Scheduler()
    doomed: list[Task] = []
    keep: list[str] = []
    for i in range(10_010):
        t = make_task(f"t{i}", start=100.0 + i)
        s.submit(t, 0.0)
        if i % 1001 == 7:
            keep.append(f"t{i}")
        else:
            doomed.append(t)
    for t in doomed:
        s.cancel(t, "cancelled", 1.0)
    assert s.sizes()["timers"] < 500
    assert gauges(s) == (0, 10, 0)
    assert s.next_due() == 107.0
    assert drain(s, 1e6) == keep


def test_cancelling_every_pending_task_empties_the_heap() -> None:
    s = Scheduler()
    tasks = [make_task(f"t{i}") for i in range(1000)]
    submit_all(s, tasks, 0.0)
    for t in reversed(tasks):
        s.cancel(t, "cancelled", 0.0)
    assert s.sizes()["ready"] < 100
    assert s.pop(0.0) is None
    assert s.sizes() == {"tasks": 0, "ready": 0, "timers": 0, "deadlines": 0, "expiry": 0}


def _queue_of(tasks: list[Task]) -> ReadyQueue:
    ready = ReadyQueue()
    for seq, t in enumerate(tasks):
        t.seq, t.start = seq, 0.0
        ready.push(t)
    return ready


def _pop_all(ready: ReadyQueue) -> list[str]:
    order = []
    while (t := ready.pop()) is not None:
        order.append(t.id or "")
    return order


def test_compact_trims_dead_entries_at_the_ends_without_a_rebuild() -> None:
    # Cancelling in submission order (or the latest submissions) leaves the dead
    # entries at the ends of a FIFO: they go one by one and the live ones stay put.
    tasks = [make_task(f"t{i}") for i in range(10)]
    ready = _queue_of(tasks)
    fifo = ready._buckets[0].fifo
    for t in tasks[:4] + tasks[8:]:
        t.state = TaskState.CANCELLED
    ready.compact(4)
    assert ready._buckets[0].fifo is fifo  # not rebuilt
    assert len(ready) == 4
    assert _pop_all(ready) == ["t4", "t5", "t6", "t7"]


def test_compact_rebuilds_when_dead_entries_remain_inside() -> None:
    tasks = [make_task(f"t{i}", priority=i % 3) for i in range(12)]
    ready = _queue_of(tasks)
    fifo = ready._buckets[1].fifo  # t1 t4 t7 t10
    for i in (0, 2, 4, 9, 10, 11):  # t4 is inside its FIFO, the others at an end
        tasks[i].state = TaskState.CANCELLED
    ready.compact(6)
    assert ready._buckets[1].fifo is not fifo
    assert len(ready) == 6
    assert _pop_all(ready) == ["t5", "t8", "t1", "t7", "t3", "t6"]


def test_compact_with_no_live_entries_empties_the_queue() -> None:
    tasks = [make_task(f"t{i}", priority=i % 2) for i in range(6)]
    ready = _queue_of(tasks)
    for t in tasks:
        t.state = TaskState.CANCELLED
    ready.compact(0)
    assert len(ready) == 0
    assert ready.pop() is None


def test_cancelling_in_submission_order_keeps_the_queue_small() -> None:
    s = Scheduler()
    tasks = [make_task(f"t{i}") for i in range(1000)]
    submit_all(s, tasks, 0.0)
    for t in tasks[:900]:
        s.cancel(t, "cancelled", 0.0)
        assert s.sizes()["ready"] <= 2 * s.queued + 1
    assert drain(s, 1.0) == [f"t{i}" for i in range(900, 1000)]


def test_cancelled_entries_never_outnumber_live_ones_by_much() -> None:
    # Cancel is O(1): entries are left behind and rebuilt away once dead ones
    # outnumber live ones, so queue sizes stay within ~2x the live tasks.
    s = Scheduler()
    tasks = [
        make_task(f"t{i}", priority=i % 7, start=None if i % 2 else 50.0) for i in range(20_000)
    ]
    submit_all(s, tasks, 0.0)
    order = tasks[::2] + tasks[1::2]  # all delayed ones first, then the pending ones
    for n, t in enumerate(order, 1):
        s.cancel(t, "cancelled", 1.0)
        sizes = s.sizes()
        live_ready, live_timers = s.queued, s.delayed
        assert sizes["ready"] <= 2 * live_ready + 2 * 64 + 2, (n, sizes)
        assert sizes["timers"] <= 2 * live_timers + 2 * 64 + 2, (n, sizes)
    assert s.live == 0
    assert s.sizes()["ready"] == s.sizes()["timers"] == 0


def test_the_ready_queue_pops_what_a_sorted_list_would() -> None:
    """Random pushes (priorities, out-of-order starts), pops, cancels, removals and
    compactions, against the plain model: the live tasks sorted by
    (-priority, start, seq). Pop looks at the highest priority's bucket first and
    drops emptied buckets as it meets them; this is what pins that down."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    op = st.one_of(
        st.tuples(st.just("push"), st.integers(-2, 2), st.integers(0, 3)),
        st.tuples(st.just("pop"), st.just(0), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("remove"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("compact"), st.just(0), st.just(0)),
    )

    @settings(max_examples=300, deadline=None)
    @given(st.lists(op, max_size=60))
    def check(ops: list[tuple[str, int, int]]) -> None:
        ready = ReadyQueue()
        live: list[Task] = []  # the model: PENDING tasks in the queue
        entries = 0  # entries held, dead ones included (len() counts them)
        for seq, (name, a, b) in enumerate(ops):
            if name == "push":
                t = make_task(f"t{seq}", priority=a)
                t.seq, t.start = seq, float(b)
                ready.push(t)
                live.append(t)
                entries += 1
            elif name == "pop":
                got = ready.pop()
                while got is not None and got.state is not TaskState.PENDING:
                    entries -= 1
                    got = ready.pop()
                want = min(live, key=lambda t: (-t.priority, t.start, t.seq), default=None)
                assert got is want
                if got is not None:
                    live.remove(got)
                    entries -= 1
            elif live and name == "cancel":
                live.pop(a % len(live)).state = TaskState.CANCELLED
            elif live and name == "remove":
                ready.remove(live.pop(a % len(live)))
                entries -= 1
            elif name == "compact":
                ready.compact(len(live))
                entries = len(ready)
                assert entries == len(live)
            assert len(ready) == entries
        for want in sorted(live, key=lambda t: (-t.priority, t.start, t.seq)):
            got = ready.pop()
            while got is not None and got.state is not TaskState.PENDING:
                got = ready.pop()
            assert got is want
        while (got := ready.pop()) is not None:
            assert got.state is not TaskState.PENDING

    check()


def test_names_past_the_limit_are_counted_under_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_NAMES names get counters of their own, in the order their first
    end came; the ends of the rest count under "other", a cancel (counted on its own
    path) as well as a success."""
    from cluster import Cluster, _core

    monkeypatch.setattr(_core, "MAX_NAMES", 2)

    def first() -> None:
        pass

    def second() -> None:
        pass

    def third() -> None:
        pass

    c = Cluster(workers=1)
    c.run()
    assert c.add_task(third).with_delay(3600).submit().cancel()  # name 1: "third"
    assert c.add_task(first).submit().wait(10) is not None  # name 2: "first"
    assert c.add_task(second).submit().wait(10) is not None  # past the limit
    assert c.add_task(second).with_delay(3600).submit().cancel()
    c.stop(timeout=10)

    names = {name.rsplit(".", 1)[-1]: s for name, s in c.stats_by_name().items()}
    assert set(names) == {"third", "first", "other"}
    assert (names["third"].succeeded, names["third"].cancelled) == (0, 1)
    assert (names["first"].succeeded, names["first"].cancelled) == (1, 0)
    assert (names["other"].succeeded, names["other"].cancelled) == (1, 1)
    stats = c.stats()
    assert (stats.succeeded, stats.cancelled) == (2, 2)
