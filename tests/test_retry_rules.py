"""SPEC §10 with real worker threads: retry rules, the directives a task raises
(``RetryAfter``, ``StopRetrying``), ``reset_backoff()``, ``UNLIMITED``, and
``info().last_error``/``next_attempt_at`` — on the thread pool, the event loop and
a process pool.

Time is a ``FakeClock`` wherever a delay matters: a test reads when the retry is
due from ``info().next_attempt_at``, advances the clock and waits for the
cluster to be idle, so nothing sleeps. The pure decision has its own unit tests
(``test_policy.py``); these pin what a user sees through the cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import _semantics_tasks as tasks
import pytest
from _helpers import MakeCluster
from _semantics_tasks import (
    START,
    WAIT,
    RateLimited,
    Script,
    SlowDown,
    chained,
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
    LinearBackoff,
    ProcessExecutor,
    RetryAfter,
    StopRetrying,
    TaskCancelledError,
    TaskHandle,
    TaskState,
    current,
)
from cluster.testing import FakeClock


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


def outcome(c: Cluster, h: TaskHandle[Any]) -> tuple[TaskState, BaseException | None, int]:
    """(state, error, attempts) of a finished, cached task."""
    info = c.info(h.id)
    return info.state, info.error, info.attempts


# ---------------------------------------------------------------- each rule's own budget


def test_interleaved_errors_within_each_rules_budget_end_in_success(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(
        clock,
        ConnectionError(),
        RateLimited(),
        ConnectionError(),
        RateLimited(),
        RateLimited(),
        "ok",
    )
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=2)
        .with_retry_rule(RateLimited, retries=3)
        .submit()
    )
    assert h.result(WAIT) == "ok"
    assert f.attempts == [0, 1, 2, 3, 4, 5]


def test_one_failure_past_a_rules_budget_fails_the_task_with_that_error(
    c: Cluster, clock: FakeClock
) -> None:
    last = RateLimited("the fourth")
    f = Script(
        clock,
        ConnectionError(),
        RateLimited(),
        ConnectionError(),
        RateLimited(),
        RateLimited(),
        last,
        "never",
    )
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=2)
        .with_retry_rule(RateLimited, retries=3)
        .with_cache()
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None and result.error is last
    assert outcome(c, h) == (TaskState.FAILED, last, 6)


def test_a_third_connection_error_fails_although_the_other_rule_has_budget_left(
    c: Cluster, clock: FakeClock
) -> None:
    third = ConnectionError("third")
    f = Script(clock, ConnectionError(), RateLimited(), ConnectionError(), third, "never")
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=2)
        .with_retry_rule(RateLimited, retries=3)
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None and result.error is third
    assert f.calls == 4


def test_failures_of_another_rule_do_not_restart_a_budget(c: Cluster, clock: FakeClock) -> None:
    second = ConnectionError("second")
    f = Script(clock, ConnectionError(), RateLimited(), RateLimited(), second, "never")
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=1)
        .with_retry_rule(RateLimited, retries=5)
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None and result.error is second  # one retry, used by the first
    assert f.calls == 4


def test_failures_of_another_rule_do_not_use_a_budget(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, RateLimited(), RateLimited(), RateLimited(), ConnectionError(), "ok")
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=1)
        .with_retry_rule(RateLimited, retries=3)
        .submit()
    )
    assert h.result(WAIT) == "ok"
    assert f.calls == 5


# ---------------------------------------------------------------- order of rules


def test_the_first_matching_rule_decides_even_for_a_subclass_listed_later(
    c: Cluster, clock: FakeClock
) -> None:
    error = ConnectionError("a subclass of OSError")
    f = Script(clock, error, "never")
    h = (
        c.add_task(f)
        .with_retry_rule(OSError, retries=0)
        .with_retry_rule(ConnectionError, retries=5)
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert f.calls == 1


def test_a_subclass_rule_listed_first_takes_its_errors_and_the_base_rule_the_rest(
    c: Cluster, clock: FakeClock
) -> None:
    # SlowDown (a RateLimited) gets 3 retries; other RateLimited errors only 1.
    f = Script(clock, SlowDown(), SlowDown(), RateLimited(), SlowDown(), "ok")
    h = (
        c.add_task(f)
        .with_retry_rule(SlowDown, retries=3)
        .with_retry_rule(RateLimited, retries=1)
        .submit()
    )
    assert h.result(WAIT) == "ok"
    assert f.calls == 5


def test_a_rule_may_list_several_error_classes_on_one_budget(c: Cluster, clock: FakeClock) -> None:
    third = RateLimited("third")
    f = Script(clock, ConnectionError(), RateLimited(), third, "never")
    h = c.add_task(f).with_retry_rule(ConnectionError, RateLimited, retries=2).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is third
    assert f.calls == 3


# ---------------------------------------------------------------- the default rule


def test_with_retry_is_the_budget_of_errors_no_rule_matched(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ValueError(), ConnectionError(), ValueError(), "ok")
    h = c.add_task(f).with_retry(2).with_retry_rule(ConnectionError, retries=1).submit()
    assert h.result(WAIT) == "ok"
    assert f.calls == 4


def test_the_default_budget_runs_out_on_its_own(c: Cluster, clock: FakeClock) -> None:
    third = ValueError("third")
    f = Script(clock, ValueError(), ValueError(), third, "never")
    h = c.add_task(f).with_retry(2).with_retry_rule(ConnectionError, retries=9).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is third
    assert f.calls == 3


def test_with_rules_and_no_with_retry_an_unmatched_error_is_final(
    c: Cluster, clock: FakeClock
) -> None:
    error = ValueError("no rule for this")
    f = Script(clock, error, "never")
    h = c.add_task(f).with_retry_rule(ConnectionError, retries=5).with_cache().submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert outcome(c, h) == (TaskState.FAILED, error, 1)


def test_retry_if_gates_the_retries_of_rules_too(c: Cluster, clock: FakeClock) -> None:
    seen: list[BaseException] = []

    def transient(exc: BaseException) -> bool:
        seen.append(exc)
        return "transient" in str(exc)

    first, fatal = ConnectionError("transient"), ConnectionError("fatal")
    f = Script(clock, first, fatal, "never")
    h = c.add_task(f).with_retry_rule(ConnectionError, retries=5).retry_if(transient).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is fatal
    assert seen == [first, fatal]
    assert f.calls == 2


def test_a_retry_if_predicate_that_raises_refuses_the_retry(c: Cluster, clock: FakeClock) -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    error = ConnectionError()
    f = Script(clock, error, "never")
    h = c.add_task(f).with_retry_rule(ConnectionError, retries=5).retry_if(broken).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert f.calls == 1


# ---------------------------------------------------------------- backoff per rule


def test_a_rules_backoff_counts_that_rules_retries_and_others_use_the_tasks(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(
        clock,
        ConnectionError(),
        RateLimited(),
        ConnectionError(),
        RateLimited(),
        ConnectionError(),
        "ok",
    )
    h = (
        c.add_task(f)
        .with_backoff(LinearBackoff(100, 10))  # RateLimited's: it has none of its own
        .with_retry_rule(ConnectionError, retries=5, backoff=LinearBackoff(10, 1))
        .with_retry_rule(RateLimited, retries=5)
        .submit()
    )
    assert retry_schedule(c, clock, h) == pytest.approx([10, 100, 11, 110, 12], abs=1e-5)
    assert h.result(WAIT) == "ok"
    # Each attempt started when its retry was due, by the fake clock.
    gaps = [b - a for a, b in zip(f.times, f.times[1:], strict=False)]
    assert gaps == pytest.approx([10, 100, 11, 110, 12], abs=1e-5)


def test_the_default_rule_counts_its_own_retries_for_the_backoff(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock, ValueError(), ConnectionError(), ValueError(), ValueError(), "ok")
    h = (
        c.add_task(f)
        .with_retry(5)
        .with_backoff(ExponentialBackoff(1, 2))
        .with_retry_rule(ConnectionError, retries=5, backoff=FixedBackoff(50))
        .submit()
    )
    assert retry_schedule(c, clock, h) == pytest.approx([1, 50, 2, 4], abs=1e-5)


def test_jitter_applies_to_a_rules_own_backoff(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, *[ConnectionError() for _ in range(12)], "ok")
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=12, backoff=FixedBackoff(100))
        .with_jitter(0.5)
        .submit()
    )
    delays = retry_schedule(c, clock, h)
    assert len(delays) == 12
    assert all(50 - 1e-5 <= d <= 150 + 1e-5 for d in delays), delays
    assert len({round(d, 3) for d in delays}) > 1, "no jitter at all"
    assert h.result(WAIT) == "ok"


# ---------------------------------------------------------------- never retried


@pytest.mark.parametrize("error", [KeyboardInterrupt("interrupt"), SystemExit(3)])
def test_a_base_exception_is_never_retried_even_by_a_rule_naming_it(
    c: Cluster, clock: FakeClock, error: BaseException
) -> None:
    f = Script(clock, error, "never")
    h = (
        c.add_task(f)
        .with_retry(UNLIMITED)
        .with_retry_rule(type(error), retries=5)
        .with_cache()
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert outcome(c, h) == (TaskState.FAILED, error, 1)
    assert c.add_task(lambda: "still serving").submit().result(WAIT) == "still serving"


def test_a_task_cancelled_error_raised_by_the_task_is_never_retried(
    c: Cluster, clock: FakeClock
) -> None:
    error = TaskCancelledError("given up from inside")
    f = Script(clock, error, "never")
    h = c.add_task(f).with_retry(UNLIMITED).with_retry_rule(Exception, retries=5).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert f.calls == 1


def test_a_task_cancelled_while_waiting_to_retry_is_never_retried(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(clock, ConnectionError(), "never")
    h = c.add_task(f).with_retry(5).with_backoff(FixedBackoff(10)).with_cache().submit()
    settle(c)
    assert c.info(h.id).state is TaskState.RETRYING
    assert h.cancel() is True
    step(c, clock, 60)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskCancelledError)
    assert c.info(h.id).state is TaskState.CANCELLED
    assert f.calls == 1


# ---------------------------------------------------------------- RetryAfter


@pytest.mark.parametrize("delay", [7, 2.5, timedelta(minutes=1, seconds=30)])
def test_retry_after_waits_exactly_its_delay_without_backoff_or_jitter(
    c: Cluster, clock: FakeClock, delay: float | timedelta
) -> None:
    f = Script(clock, lambda: RetryAfter(delay), "ok")
    h = c.add_task(f).with_retry(3).with_backoff(FixedBackoff(1000)).with_jitter(1.0).submit()
    expected = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    settle(c)
    assert waiting(c, clock, h) == pytest.approx(expected, abs=1e-6)
    step(c, clock, expected - 0.001)
    assert f.calls == 1  # not a moment early
    step(c, clock, 0.001)
    assert h.result(WAIT) == "ok"
    assert f.times[1] - f.times[0] == pytest.approx(expected, abs=1e-9)


def test_retry_after_ignores_a_rules_own_backoff_but_counts_as_its_retry(
    c: Cluster, clock: FakeClock
) -> None:
    f = Script(
        clock,
        lambda: chained(RetryAfter(3), ConnectionError()),
        ConnectionError(),  # the rule's second retry: backoff(1)
        "ok",
    )
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=2, backoff=LinearBackoff(500, 100))
        .submit()
    )
    assert retry_schedule(c, clock, h) == pytest.approx([3, 600], abs=1e-5)
    assert h.result(WAIT) == "ok"


def test_retry_if_sees_a_retry_after_without_a_cause_itself(c: Cluster, clock: FakeClock) -> None:
    seen: list[BaseException] = []
    error = RetryAfter(1)

    def record(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    f = Script(clock, error, "ok")
    h = c.add_task(f).with_retry(1).retry_if(record).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([1], abs=1e-6)
    assert h.result(WAIT) == "ok"
    assert seen == [error]


def test_retry_after_from_a_cause_uses_the_budget_of_the_rule_the_cause_matches(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ConnectionError("again")
    f = Script(
        clock,
        lambda: chained(RetryAfter(3), ConnectionError("first")),
        lambda: chained(RetryAfter(3), cause),
        "never",
    )
    # The default budget (5) would allow it; the ConnectionError rule (1) does not.
    h = c.add_task(f).with_retry(5).with_retry_rule(ConnectionError, retries=1).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([3.0], abs=1e-6)
    result = h.wait(WAIT)
    assert result is not None and result.error is cause  # the cause, not the RetryAfter
    assert f.calls == 2


def test_retry_after_without_a_cause_uses_the_default_rule(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, lambda: RetryAfter(2), lambda: RetryAfter(2), "never")
    h = c.add_task(f).with_retry(1).with_retry_rule(ConnectionError, retries=9).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([2.0], abs=1e-6)
    result = h.wait(WAIT)
    assert result is not None
    assert isinstance(result.error, RetryAfter) and result.error.delay == 2.0
    assert f.calls == 2


def test_retry_if_sees_the_cause_of_a_retry_after_and_refusing_fails_with_it(
    c: Cluster, clock: FakeClock
) -> None:
    seen: list[BaseException] = []
    cause = ConnectionError("do not retry me")
    f = Script(clock, lambda: chained(RetryAfter(1), cause), "never")

    def refuse(exc: BaseException) -> bool:
        seen.append(exc)
        return False

    h = c.add_task(f).with_retry(5).retry_if(refuse).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is cause
    assert seen == [cause]
    assert f.calls == 1


def test_retry_after_out_of_budget_fails_with_its_cause(c: Cluster, clock: FakeClock) -> None:
    cause = ConnectionError("down")
    f = Script(clock, lambda: chained(RetryAfter(1), cause), "never")
    h = c.add_task(f).with_retry_rule(ConnectionError, retries=0).with_cache().submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is cause
    assert outcome(c, h) == (TaskState.FAILED, cause, 1)


def test_retry_after_whose_cause_matches_no_rule_and_no_with_retry_is_final(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ValueError("no rule")
    f = Script(clock, lambda: chained(RetryAfter(1), cause), "never")
    h = c.add_task(f).with_retry_rule(ConnectionError, retries=5).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is cause
    assert f.calls == 1


def test_retry_after_without_a_cause_and_no_budget_fails_with_the_retry_after(
    c: Cluster, clock: FakeClock
) -> None:
    error = RetryAfter(1)
    f = Script(clock, error, "never")
    h = c.add_task(f).with_retry(0).with_cache().submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert c.info(h.id).state is TaskState.FAILED


def test_retry_after_from_a_cause_on_a_task_without_retries_fails_with_the_cause(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ConnectionError("down")
    f = Script(clock, lambda: chained(RetryAfter(1), cause))
    result = c.add_task(f).submit().wait(WAIT)
    assert result is not None and result.error is cause


def test_retry_after_from_a_cause_with_retry_zero_fails_with_the_cause(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ConnectionError("down")
    f = Script(clock, lambda: chained(RetryAfter(1), cause))
    result = c.add_task(f).with_retry(0).submit().wait(WAIT)
    assert result is not None and result.error is cause


def test_retry_after_from_a_base_exception_is_final(c: Cluster, clock: FakeClock) -> None:
    cause = KeyboardInterrupt()
    f = Script(clock, lambda: chained(RetryAfter(1), cause), "never")
    h = c.add_task(f).with_retry(UNLIMITED).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is cause
    assert f.calls == 1


# ---------------------------------------------------------------- StopRetrying


def test_stop_retrying_from_an_error_fails_with_it_at_once_whatever_the_budget(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ConnectionError("give up")
    f = Script(clock, lambda: chained(StopRetrying(), cause), "never")
    h = (
        c.add_task(f)
        .with_retry(UNLIMITED)
        .with_retry_rule(ConnectionError, retries=UNLIMITED)
        .with_cache()
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None and result.error is cause
    assert outcome(c, h) == (TaskState.FAILED, cause, 1)


def test_stop_retrying_without_a_cause_fails_with_the_stop_retrying(
    c: Cluster, clock: FakeClock
) -> None:
    error = StopRetrying()
    f = Script(clock, error, "never")
    h = c.add_task(f).with_retry(5).submit()
    result = h.wait(WAIT)
    assert result is not None and result.error is error
    assert f.calls == 1


def test_stop_retrying_is_not_shown_to_retry_if(c: Cluster, clock: FakeClock) -> None:
    seen: list[BaseException] = []
    f = Script(clock, lambda: chained(StopRetrying(), ValueError()), "never")

    def allow(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    h = c.add_task(f).with_retry(5).retry_if(allow).submit()
    h.wait(WAIT)
    assert seen == []
    assert f.calls == 1


def test_stop_retrying_from_an_error_on_a_task_without_retries_fails_with_it(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ValueError("bad input")
    f = Script(clock, lambda: chained(StopRetrying(), cause))
    result = c.add_task(f).submit().wait(WAIT)
    assert result is not None and result.error is cause


# ---------------------------------------------------------------- reset_backoff


def test_reset_backoff_starts_the_backoff_again_at_zero(c: Cluster, clock: FakeClock) -> None:
    def progress_then_fail() -> ConnectionError:
        current().reset_backoff()
        return ConnectionError("after progress")

    f = Script(
        clock,
        ConnectionError(),
        ConnectionError(),
        ConnectionError(),
        progress_then_fail,
        ConnectionError(),
        "ok",
    )
    h = c.add_task(f).with_retry(10).with_backoff(ExponentialBackoff(1, 2)).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([1, 2, 4, 1, 2], abs=1e-5)
    assert h.result(WAIT) == "ok"


def test_reset_backoff_restarts_every_rules_count(c: Cluster, clock: FakeClock) -> None:
    def progress_then_fail() -> ConnectionError:
        current().reset_backoff()
        return ConnectionError("after progress")

    last = ConnectionError("budget spent again")
    f = Script(
        clock,
        ConnectionError(),
        RateLimited(),
        ConnectionError(),  # ConnectionError's 2 retries are spent
        progress_then_fail,  # ... but this one is the first since the progress
        RateLimited(),
        ConnectionError(),
        last,
        "never",
    )
    h = (
        c.add_task(f)
        .with_retry_rule(ConnectionError, retries=2, backoff=ExponentialBackoff(1, 2))
        .with_retry_rule(RateLimited, retries=1, backoff=ExponentialBackoff(10, 2))
        .submit()
    )
    # RateLimited's count restarted too: its second failure is again its first retry (10).
    assert retry_schedule(c, clock, h) == pytest.approx([1, 10, 2, 1, 10, 2], abs=1e-5)
    result = h.wait(WAIT)
    assert result is not None and result.error is last
    assert f.calls == 7


def test_reset_backoff_without_a_failure_changes_nothing(c: Cluster, clock: FakeClock) -> None:
    def progress() -> str:
        current().reset_backoff()
        return "done"

    f = Script(clock, ConnectionError(), progress)
    h = c.add_task(f).with_retry(1).with_backoff(FixedBackoff(5)).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([5], abs=1e-5)
    assert h.result(WAIT) == "done"


# ---------------------------------------------------------------- UNLIMITED


@pytest.mark.timeout(60)
def test_unlimited_retries_go_past_a_thousand_failures(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, *[ConnectionError(str(i)) for i in range(1200)], "finally")
    h = c.add_task(f).with_retry(UNLIMITED).with_cache().submit()
    assert h.result(WAIT * 4) == "finally"
    assert c.info(h.id).attempts == 1201
    assert c.stats().retried >= 1200


def test_an_uncapped_exponential_backoff_past_a_thousand_retries_waits_forever(
    c: Cluster, clock: FakeClock
) -> None:
    # The first 1,100 retries at once; from then on an uncapped ExponentialBackoff,
    # whose value at n = 1,100 is past any float: inf (it must not overflow).
    exponential = ExponentialBackoff(1, 2)
    ns: list[int] = []

    def backoff(n: int) -> float:
        ns.append(n)
        return 0.0 if n < 1100 else exponential(n)

    f = Script(clock, *[ConnectionError(str(i)) for i in range(1101)], "never")
    h = c.add_task(f).with_retry(UNLIMITED).with_backoff(backoff).with_cache().submit()
    settle(c)
    info = c.info(h.id)
    assert info.state is TaskState.RETRYING
    assert f.calls == 1101
    assert ns[-1] == 1100 and exponential(1100) == math.inf
    assert info.next_attempt_at is not None
    assert info.next_attempt_at.year == datetime.max.year  # "never"
    step(c, clock, timedelta(days=365 * 1000))
    assert f.calls == 1101
    # The cluster still serves, and the task can be cancelled.
    assert c.add_task(lambda: 42).submit().result(WAIT) == 42
    assert h.cancel() is True
    assert c.info(h.id).state is TaskState.CANCELLED


def test_an_infinite_backoff_on_the_real_clock_is_not_a_hot_loop(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(2)
    calls: list[int] = []

    def fail() -> None:
        calls.append(1)
        raise ConnectionError

    h = c.add_task(fail).with_retry(UNLIMITED).with_backoff(lambda n: math.inf).submit()
    assert c.wait_idle(WAIT)
    assert c.info(h.id).state is TaskState.RETRYING
    cpu = time.process_time()
    wall = time.monotonic()
    assert h.wait(0.5) is None
    used = time.process_time() - cpu
    elapsed = time.monotonic() - wall
    assert used < 0.5 * elapsed, f"{used:.2f} s of CPU in {elapsed:.2f} s: a hot loop?"
    assert calls == [1]
    assert c.add_task(lambda: "responsive").submit().result(WAIT) == "responsive"
    assert h.cancel() is True


@pytest.mark.parametrize("bad", [-1, -2, -100])
def test_a_negative_retry_count_other_than_unlimited_is_a_value_error(c: Cluster, bad: int) -> None:
    with pytest.raises(ValueError, match="retries"):
        c.add_task(int).with_retry(bad)
    with pytest.raises(ValueError, match="retries"):
        c.add_task(int).with_retry_rule(ConnectionError, retries=bad)


def test_unlimited_is_accepted_by_with_retry_and_by_rules(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ConnectionError(), ValueError(), "ok")
    h = (
        c.add_task(f)
        .with_retry(UNLIMITED)
        .with_retry_rule(ConnectionError, retries=UNLIMITED)
        .with_cache()
        .submit()
    )
    assert h.result(WAIT) == "ok"
    assert c.info(h.id).retries == UNLIMITED


def test_a_graceful_stop_ends_an_unlimited_retry_wait_at_once_with_its_last_error(
    c: Cluster, clock: FakeClock
) -> None:
    last = ConnectionError("the last one")
    f = Script(clock, ConnectionError(), last, "never")
    h = c.add_task(f).with_retry(UNLIMITED).with_backoff(FixedBackoff(60)).submit()
    settle(c)
    step(c, clock, 60)
    assert c.info(h.id).state is TaskState.RETRYING
    c.stop(timeout=WAIT)  # does not wait for the fake clock to reach the retry
    result = h.wait(0)
    assert result is not None and result.error is last
    assert f.calls == 2


def test_a_graceful_stop_wakes_an_unlimited_immediate_retry_and_ends_it(
    c: Cluster, clock: FakeClock
) -> None:
    from cluster import RetryMode

    last = ConnectionError("while its worker slept the backoff")
    f = Script(clock, last, "never")
    h = (
        c.add_task(f)
        .with_retry(UNLIMITED)
        .with_backoff(FixedBackoff(60))
        .with_retry_mode(RetryMode.IMMEDIATE)
        .submit()
    )
    settle(c)
    assert c.info(h.id).state is TaskState.RETRYING
    c.stop(timeout=WAIT)
    result = h.wait(0)
    assert result is not None and result.error is last
    assert f.calls == 1


def test_a_graceful_stop_ends_a_running_unlimited_task_when_it_fails(
    c: Cluster, clock: FakeClock, new_event: EventFactory
) -> None:
    gate = new_event()
    error = ConnectionError("failed during the stop")

    def blocked() -> None:
        gate.wait(WAIT)
        raise error

    h = c.add_task(blocked).with_retry(UNLIMITED).submit()
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT))
    eventually(lambda: stop_began(c))
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive() and out == [None]
    result = h.wait(0)
    assert result is not None and result.error is error


def test_a_graceful_stop_still_uses_up_a_finite_budget(c: Cluster, clock: FakeClock) -> None:
    f = Script(clock, ConnectionError(), "retried during the stop")
    h = c.add_task(f).with_retry(3).with_backoff(FixedBackoff(60)).submit()
    settle(c)
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT))
    eventually(lambda: stop_began(c))
    assert h.wait(0.05) is None  # the stop waits for the retry
    clock.advance(60)
    stopper.join(WAIT)
    assert not stopper.is_alive() and out == [None]
    assert h.result(0) == "retried during the stop"
    assert f.calls == 2


# ---------------------------------------------------------------- last_error, next_attempt_at


def test_last_error_shows_while_a_retry_waits_and_is_kept_after_success(
    c: Cluster, clock: FakeClock
) -> None:
    error = ConnectionError("flaky")
    f = Script(clock, error, "ok")
    h = c.add_task(f).with_retry(1).with_backoff(FixedBackoff(30)).with_cache().submit()
    settle(c)
    info = c.info(h.id)
    assert info.state is TaskState.RETRYING
    assert info.last_error is error
    assert info.next_attempt_at == clock.now() + timedelta(seconds=30)
    step(c, clock, 30)
    info = c.info(h.id)
    assert info.state is TaskState.SUCCEEDED
    assert info.error is None
    assert info.last_error is error
    assert info.next_attempt_at is None


def test_a_task_that_never_failed_has_no_last_error_nor_next_attempt(
    c: Cluster, clock: FakeClock
) -> None:
    h = c.add_task(lambda: 1).with_retry(3).with_cache().submit()
    assert h.result(WAIT) == 1
    info = c.info(h.id)
    assert info.last_error is None and info.next_attempt_at is None


# ---------------------------------------------------------------- the "async" executor


def test_an_async_task_raising_retry_after_from_a_cause_waits_exactly_and_succeeds(
    c: Cluster, clock: FakeClock
) -> None:
    attempts: list[int] = []

    async def fetch() -> str:
        attempts.append(current().attempt)
        if len(attempts) == 1:
            raise RetryAfter(timedelta(seconds=45)) from ConnectionError("429")
        return "fetched"

    h = (
        c.add_task(fetch)
        .with_retry_rule(ConnectionError, retries=1)
        .with_backoff(FixedBackoff(1000))
        .with_jitter(1.0)
        .submit()
    )
    settle(c)
    assert waiting(c, clock, h) == pytest.approx(45, abs=1e-6)
    step(c, clock, 44)
    assert attempts == [0]
    step(c, clock, 1)
    assert h.result(WAIT) == "fetched"
    assert attempts == [0, 1]


def test_an_async_task_out_of_its_rules_budget_fails_with_the_cause(
    c: Cluster, clock: FakeClock
) -> None:
    async def fetch() -> None:
        raise RetryAfter(5) from ConnectionError(f"429 at {current().attempt}")

    h = c.add_task(fetch).with_retry(9).with_retry_rule(ConnectionError, retries=2).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([5, 5], abs=1e-6)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, ConnectionError)
    assert str(result.error) == "429 at 2"


def test_an_async_task_keeps_each_rules_budget_and_backoff(c: Cluster, clock: FakeClock) -> None:
    errors = [ConnectionError(), RateLimited(), ConnectionError(), RateLimited()]

    async def flaky() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    h = (
        c.add_task(flaky)
        .with_retry_rule(ConnectionError, retries=2, backoff=LinearBackoff(1, 1))
        .with_retry_rule(RateLimited, retries=2, backoff=LinearBackoff(10, 10))
        .submit()
    )
    assert retry_schedule(c, clock, h) == pytest.approx([1, 10, 2, 20], abs=1e-6)
    assert h.result(WAIT) == "ok"


def test_an_async_task_raising_stop_retrying_fails_with_its_cause_at_once(
    c: Cluster, clock: FakeClock
) -> None:
    cause = ValueError("bad request")
    calls: list[int] = []

    async def fetch() -> None:
        calls.append(1)
        raise StopRetrying() from cause

    result = c.add_task(fetch).with_retry(UNLIMITED).submit().wait(WAIT)
    assert result is not None and result.error is cause
    assert calls == [1]


def test_reset_backoff_works_inside_a_coroutine(c: Cluster, clock: FakeClock) -> None:
    async def flaky() -> str:
        ctx = current()
        if ctx.attempt == 2:
            ctx.reset_backoff()
        if ctx.attempt < 4:
            raise ConnectionError
        return "ok"

    h = c.add_task(flaky).with_retry(9).with_backoff(ExponentialBackoff(1, 3)).submit()
    assert retry_schedule(c, clock, h) == pytest.approx([1, 3, 1, 3], abs=1e-6)
    assert h.result(WAIT) == "ok"


# ---------------------------------------------------------------- a process pool


@pytest.fixture
def pc(clock: FakeClock) -> Iterator[Cluster]:
    """A fake-clock cluster with a one-child process executor named "cpu"."""
    cluster = Cluster(workers=1, clock=clock, executors={"cpu": ProcessExecutor(1)})
    cluster.run()
    yield cluster
    cluster.cancel()
    cluster.stop(timeout=WAIT)


@pytest.mark.timeout(120)
def test_retry_after_in_a_child_keeps_its_cause_across_the_pipe(
    pc: Cluster, clock: FakeClock
) -> None:
    h = (
        pc.add_task(tasks.always_retry_after, 9)
        .with_executor("cpu")
        .with_retry(5)
        .with_retry_rule(ConnectionError, retries=1)
        .with_jitter(1.0)
        .submit()
    )
    assert retry_schedule(pc, clock, h) == pytest.approx([9], abs=1e-6)
    result = h.wait(WAIT)
    assert result is not None
    # The rule matched the cause, so its budget (1) decided, and the task failed with it.
    assert type(result.error) is ConnectionError
    assert str(result.error) == "host down at attempt 1"


@pytest.mark.timeout(120)
def test_retry_after_in_a_child_waits_exactly_and_the_retry_succeeds(
    pc: Cluster, clock: FakeClock
) -> None:
    h = (
        pc.add_task(tasks.retry_after_once, 12.5)
        .with_executor("cpu")
        .with_retry_rule(ConnectionError, retries=1)
        .with_backoff(FixedBackoff(1000))
        .with_cache()
        .submit()
    )
    settle(pc)
    assert waiting(pc, clock, h) == pytest.approx(12.5, abs=1e-6)
    assert type(pc.info(h.id).last_error) is ConnectionError
    step(pc, clock, 12.5)
    assert h.result(WAIT) == 1


@pytest.mark.timeout(120)
def test_rules_budgets_and_stop_retrying_in_a_child(pc: Cluster, clock: FakeClock) -> None:
    ok = (
        pc.add_task(tasks.fail_before, 2, "rate")
        .with_executor("cpu")
        .with_retry_rule(ConnectionError, retries=0)
        .with_retry_rule(RateLimited, retries=2, backoff=LinearBackoff(3, 3))
        .submit()
    )
    assert retry_schedule(pc, clock, ok) == pytest.approx([3, 6], abs=1e-6)
    assert ok.result(WAIT) == 2
    final = (
        pc.add_task(tasks.fail_before, 2, "connection")
        .with_executor("cpu")
        .with_retry(5)
        .with_retry_rule(ConnectionError, retries=0)
        .submit()
    )
    failed = final.wait(WAIT)
    assert failed is not None and type(failed.error) is ConnectionError
    stop = (
        pc.add_task(tasks.stop_retrying_from_value_error)
        .with_executor("cpu")
        .with_retry(UNLIMITED)
        .submit()
    )
    stopped = stop.wait(WAIT)
    assert stopped is not None and type(stopped.error) is ValueError
    assert str(stopped.error) == "bad input"


@pytest.mark.timeout(120)
def test_reset_backoff_in_a_child_restarts_the_backoff(pc: Cluster, clock: FakeClock) -> None:
    h = (
        pc.add_task(tasks.reset_at, 2, 4)
        .with_executor("cpu")
        .with_retry(9)
        .with_backoff(ExponentialBackoff(1, 2))
        .submit()
    )
    assert retry_schedule(pc, clock, h) == pytest.approx([1, 2, 1, 2], abs=1e-6)
    assert h.result(WAIT) == 4


# ---------------------------------------------------------------- validation (§3, §7)


def test_with_retry_rule_needs_at_least_one_error_class(c: Cluster) -> None:
    with pytest.raises(TypeError, match="errors"):
        c.add_task(int).with_retry_rule()


@pytest.mark.parametrize("bad", [ValueError("an instance"), "ValueError", int, None])
def test_with_retry_rule_refuses_what_is_not_an_exception_class(c: Cluster, bad: object) -> None:
    with pytest.raises(TypeError, match="errors"):
        c.add_task(int).with_retry_rule(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["3", 2.0, True])
def test_with_retry_rule_refuses_a_retry_count_that_is_not_an_int(c: Cluster, bad: object) -> None:
    with pytest.raises(TypeError, match="retries"):
        c.add_task(int).with_retry_rule(ValueError, retries=bad)  # type: ignore[arg-type]


def test_with_retry_rule_refuses_a_backoff_that_is_not_callable(c: Cluster) -> None:
    with pytest.raises(TypeError, match="backoff"):
        c.add_task(int).with_retry_rule(ValueError, backoff=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (-1, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (timedelta(seconds=-1), ValueError),
        ("5", TypeError),
        (None, TypeError),
    ],
)
def test_retry_after_refuses_a_bad_delay(bad: object, kind: type[Exception]) -> None:
    with pytest.raises(kind, match="delay"):
        RetryAfter(bad)  # type: ignore[arg-type]


def test_retry_after_and_stop_retrying_are_cluster_errors_usable_outside_a_task() -> None:
    from cluster import ClusterError

    error = RetryAfter(timedelta(milliseconds=1500))
    assert isinstance(error, ClusterError) and error.delay == 1.5
    assert isinstance(StopRetrying(), ClusterError)
    with pytest.raises(RetryAfter):
        raise error


def test_a_failed_builder_call_leaves_the_builder_usable(c: Cluster) -> None:
    builder = c.add_task(lambda: "fine")
    with pytest.raises(ValueError):
        builder.with_retry_rule(ValueError, retries=-2)
    assert builder.with_retry_rule(ValueError, retries=2).submit().result(WAIT) == "fine"


def test_rules_wait_with_the_thread_pool_freed(c: Cluster, clock: FakeClock) -> None:
    # A REQUEUE retry waiting on a rule's backoff holds no worker: others run meanwhile.
    f = Script(clock, ConnectionError(), "ok")
    h = c.add_task(f).with_retry_rule(ConnectionError, retries=1, backoff=FixedBackoff(99)).submit()
    settle(c)
    done = [c.add_task(int, i).submit() for i in range(4)]
    assert [d.result(WAIT) for d in done] == [0, 1, 2, 3]
    assert c.info(h.id).state is TaskState.RETRYING
    step(c, clock, 99)
    assert h.result(WAIT) == "ok"
