"""SPEC §3-§5 and §8 at run time: timeouts, retries, backoff, retry modes, cancellation,
the task context, callbacks and BaseException handling."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from _helpers import WAIT, MakeCluster, NewEvent

from cluster import (
    Cluster,
    ClusterError,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    RetryMode,
    StopTimeoutError,
    TaskCancelledError,
    TaskTimeoutError,
    current,
)

T = TypeVar("T")

SLACK = 0.02


def get(q: queue.SimpleQueue[T], timeout: float = WAIT) -> T:
    return q.get(timeout=timeout)


def assert_no_more(q: queue.SimpleQueue[Any], wait: float = 0.2) -> None:
    with pytest.raises(queue.Empty):
        q.get(timeout=wait)


def hold_worker(c: Cluster, gate: threading.Event, priority: int = 10**6) -> Any:
    started = threading.Event()

    def blocker() -> None:
        started.set()
        gate.wait(10)

    handle = c.add_task(blocker).with_priority(priority).submit()
    assert started.wait(WAIT), "blocker task never started"
    return handle


def cluster_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "cluster" or r.name.startswith("cluster.")]


def mentions(record: logging.LogRecord, exc: BaseException) -> bool:
    if record.exc_info and record.exc_info[1] is exc:
        return True
    return str(exc) in record.getMessage()


def logged(caplog: pytest.LogCaptureFixture, exc: BaseException) -> int:
    return sum(mentions(rec, exc) for rec in cluster_records(caplog))


# =========================================================================== timeouts


def test_timeout_delivers_task_timeout_error_while_function_still_stuck(
    cluster: Cluster, new_event: NewEvent
) -> None:
    release, returned = new_event(), threading.Event()

    def stuck() -> str:
        release.wait(10)  # ignores its context on purpose
        returned.set()
        return "too late"

    h = cluster.add_task(stuck).with_timeout(0.1).submit()
    q = h.subscribe()
    r = get(q)
    assert isinstance(r.error, TaskTimeoutError)
    assert isinstance(r.error, TimeoutError)
    assert isinstance(r.error, ClusterError)
    assert not r.ok
    assert not returned.is_set()


def test_timeout_late_return_value_is_discarded(cluster: Cluster, new_event: NewEvent) -> None:
    release, returned = new_event(), threading.Event()

    def stuck() -> str:
        release.wait(10)
        returned.set()
        return "too late"

    h = cluster.add_task(stuck).with_timeout(0.1).submit()
    q = h.subscribe()
    assert isinstance(get(q).error, TaskTimeoutError)
    release.set()
    assert returned.wait(WAIT)
    assert_no_more(q)
    with pytest.raises(TaskTimeoutError):
        h.result(timeout=WAIT)


def test_timeout_keeps_pool_at_full_strength(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(2)
    release = new_event()
    stuck = [c.add_task(release.wait, 10).with_timeout(0.1).submit() for _ in range(2)]
    for h in stuck:
        with pytest.raises(TaskTimeoutError):
            h.result(timeout=WAIT)
    # both original workers are still stuck; two fresh ones must run side by side
    barrier = threading.Barrier(2, timeout=WAIT)
    pair = [c.add_task(barrier.wait).submit() for _ in range(2)]
    assert sorted(h.result(timeout=WAIT) for h in pair) == [0, 1]
    assert not release.is_set()


def test_timeout_signals_context_with_timeout_reason(cluster: Cluster) -> None:
    seen: queue.SimpleQueue[tuple[bool, str | None, type[BaseException] | None]] = (
        queue.SimpleQueue()
    )

    def polite() -> None:
        ctx = current()
        fired = ctx.cancelled.wait(10)
        raised: type[BaseException] | None = None
        try:
            ctx.check()
        except BaseException as exc:
            raised = type(exc)
        seen.put((fired, ctx.reason, raised))

    h = cluster.add_task(polite).with_timeout(0.1).submit()
    with pytest.raises(TaskTimeoutError):
        h.result(timeout=WAIT)
    assert get(seen) == (True, "timeout", TaskTimeoutError)


def test_task_honouring_check_stops_promptly_on_timeout(cluster: Cluster) -> None:
    exited = threading.Event()

    def cooperative() -> None:
        ctx = current()
        try:
            while True:
                ctx.check()
                ctx.cancelled.wait(0.01)
        finally:
            exited.set()

    h = cluster.add_task(cooperative).with_timeout(0.1).submit()
    with pytest.raises(TaskTimeoutError):
        h.result(timeout=WAIT)
    assert exited.wait(1.0)


def test_abandoned_worker_exits_when_its_call_returns(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)

    def time_out_once() -> None:
        release = new_event()
        returned = threading.Event()

        def stuck() -> None:
            release.wait(10)
            returned.set()

        with pytest.raises(TaskTimeoutError):
            c.add_task(stuck).with_timeout(0.05).submit().result(timeout=WAIT)
        release.set()
        assert returned.wait(WAIT)

    time_out_once()  # warm-up: lets any lazily started helper thread exist
    assert c.add_task(lambda: 1).submit().result(timeout=WAIT) == 1
    baseline = threading.active_count()
    time_out_once()
    assert c.add_task(lambda: 2).submit().result(timeout=WAIT) == 2
    end = time.monotonic() + WAIT
    while time.monotonic() < end and threading.active_count() > baseline:
        time.sleep(0.01)
    assert threading.active_count() == baseline, "the abandoned worker thread never exited"


def test_task_finishing_within_timeout_succeeds(cluster: Cluster) -> None:
    assert cluster.add_task(lambda: "quick").with_timeout(5).submit().result(WAIT) == "quick"


def test_timeout_applies_per_attempt_and_is_retried(cluster: Cluster) -> None:
    def slow_then_fast() -> str:
        ctx = current()
        if ctx.attempt == 0:
            ctx.cancelled.wait(10)
            ctx.check()
        return f"attempt {ctx.attempt}"

    h = cluster.add_task(slow_then_fast).with_timeout(0.1).with_retry(1).submit()
    assert h.result(timeout=WAIT) == "attempt 1"


def test_deadline_is_monotonic_start_plus_timeout(cluster: Cluster) -> None:
    def fn() -> tuple[float, float | None]:
        return time.monotonic(), current().deadline

    now, deadline = cluster.add_task(fn).with_timeout(3).submit().result(timeout=WAIT)
    assert deadline is not None
    assert now < deadline <= now + 3


def test_deadline_is_none_without_timeout(cluster: Cluster) -> None:
    assert cluster.add_task(lambda: current().deadline).submit().result(timeout=WAIT) is None


# =========================================================================== retries


class Flaky:
    """Fails the first ``failures`` attempts (recording times), then returns ``"ok"``."""

    def __init__(self, failures: int, exc: Callable[[int], BaseException] = RuntimeError) -> None:
        self.failures = failures
        self.exc = exc
        self.attempts: list[int] = []
        self.starts: list[float] = []
        self.fails: list[float] = []
        self.raised: list[BaseException] = []
        self.threads: list[int] = []

    def __call__(self) -> str:
        self.starts.append(time.monotonic())
        self.attempts.append(current().attempt)
        self.threads.append(threading.get_ident())
        n = len(self.attempts) - 1
        if n < self.failures:
            exc = self.exc(n)
            self.raised.append(exc)
            self.fails.append(time.monotonic())
            raise exc
        return "ok"

    def gaps(self) -> list[float]:
        return [self.starts[i + 1] - self.fails[i] for i in range(len(self.fails))]


def test_n_retries_means_n_plus_one_attempts(cluster: Cluster) -> None:
    fn = Flaky(failures=100)
    r = cluster.add_task(fn).with_retry(2).submit().wait(timeout=WAIT)
    assert r is not None
    assert fn.attempts == [0, 1, 2]
    assert r.error is fn.raised[-1]


def test_zero_retries_means_single_attempt(cluster: Cluster) -> None:
    fn = Flaky(failures=100)
    r = cluster.add_task(fn).with_retry(0).submit().wait(timeout=WAIT)
    assert r is not None and isinstance(r.error, RuntimeError)
    assert fn.attempts == [0]


def test_no_retry_by_default(cluster: Cluster) -> None:
    fn = Flaky(failures=100)
    assert cluster.add_task(fn).submit().wait(timeout=WAIT) is not None
    assert fn.attempts == [0]


def test_retry_stops_at_first_success(cluster: Cluster) -> None:
    fn = Flaky(failures=2)
    assert cluster.add_task(fn).with_retry(5).submit().result(timeout=WAIT) == "ok"
    assert fn.attempts == [0, 1, 2]


def test_fixed_backoff_delays_every_retry(cluster: Cluster) -> None:
    fn = Flaky(failures=2)
    h = cluster.add_task(fn).with_retry(2).with_backoff(FixedBackoff(0.1)).submit()
    assert h.result(timeout=WAIT) == "ok"
    assert all(g >= 0.1 - SLACK for g in fn.gaps()), fn.gaps()


def test_linear_backoff_delays_grow_per_retry(cluster: Cluster) -> None:
    fn = Flaky(failures=2)
    h = cluster.add_task(fn).with_retry(2).with_backoff(LinearBackoff(0.05, 0.1)).submit()
    assert h.result(timeout=WAIT) == "ok"
    g = fn.gaps()
    assert g[0] >= 0.05 - SLACK and g[1] >= 0.15 - SLACK, g


def test_lambda_backoff_delay_is_honoured(cluster: Cluster) -> None:
    fn = Flaky(failures=1)
    h = cluster.add_task(fn).with_retry(1).with_backoff(lambda attempt: 0.1).submit()
    assert h.result(timeout=WAIT) == "ok"
    assert fn.gaps()[0] >= 0.1 - SLACK


def test_exponential_backoff_delays_double_per_retry(cluster: Cluster) -> None:
    fn = Flaky(failures=2)
    h = cluster.add_task(fn).with_retry(2).with_backoff(ExponentialBackoff(0.05, 2.0)).submit()
    assert h.result(timeout=WAIT) == "ok"
    g = fn.gaps()
    assert g[0] >= 0.05 - SLACK and g[1] >= 0.1 - SLACK, g


def test_any_callable_backoff_receives_zero_based_retry_index(cluster: Cluster) -> None:
    seen: list[int] = []

    def backoff(attempt: int) -> float:
        seen.append(attempt)
        return 0.0

    fn = Flaky(failures=3)
    assert cluster.add_task(fn).with_retry(3).with_backoff(backoff).submit().result(WAIT) == "ok"
    assert seen == [0, 1, 2]


def test_jitter_keeps_each_delay_within_ratio(cluster: Cluster) -> None:
    fn = Flaky(failures=3)
    h = cluster.add_task(fn).with_retry(3).with_backoff(FixedBackoff(0.1)).with_jitter(0.5)
    assert h.submit().result(timeout=WAIT) == "ok"
    for g in fn.gaps():
        assert 0.05 - SLACK <= g <= 0.15 + 0.25, fn.gaps()


def test_retry_if_false_stops_retrying(cluster: Cluster) -> None:
    kinds: list[type[Exception]] = [ValueError, ValueError, TypeError]
    fn = Flaky(failures=100, exc=lambda n: kinds[min(n, 2)](f"attempt {n}"))
    h = cluster.add_task(fn).with_retry(5).retry_if(lambda e: isinstance(e, ValueError)).submit()
    r = h.wait(timeout=WAIT)
    assert r is not None
    assert fn.attempts == [0, 1, 2]
    assert isinstance(r.error, TypeError)


def test_retry_if_receives_the_raised_exception(cluster: Cluster) -> None:
    got: list[BaseException] = []

    def predicate(exc: BaseException) -> bool:
        got.append(exc)
        return True

    fn = Flaky(failures=2)
    assert cluster.add_task(fn).with_retry(3).retry_if(predicate).submit().result(WAIT) == "ok"
    assert got == fn.raised
    assert all(a is b for a, b in zip(got, fn.raised, strict=True))


def test_raising_predicate_counts_as_false_and_is_logged(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cluster")
    boom = LookupError("predicate-boom")

    def predicate(exc: BaseException) -> bool:
        raise boom

    fn = Flaky(failures=100)
    r = cluster.add_task(fn).with_retry(3).retry_if(predicate).submit().wait(timeout=WAIT)
    assert r is not None
    assert fn.attempts == [0]
    assert r.error is fn.raised[0]  # the task's error, not the predicate's
    assert any(mentions(rec, boom) for rec in cluster_records(caplog))


def test_base_exception_is_not_retried_by_default(cluster: Cluster) -> None:
    fn = Flaky(failures=100, exc=lambda n: KeyboardInterrupt(f"attempt {n}"))
    r = cluster.add_task(fn).with_retry(3).submit().wait(timeout=WAIT)
    assert r is not None
    assert isinstance(r.error, KeyboardInterrupt)
    assert fn.attempts == [0]


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_attempt_counter_counts_from_zero(cluster: Cluster, mode: RetryMode) -> None:
    fn = Flaky(failures=2)
    h = cluster.add_task(fn).with_retry(2).with_retry_mode(mode).submit()
    assert h.result(timeout=WAIT) == "ok"
    assert fn.attempts == [0, 1, 2]


def order_of_retry_and_other(
    c: Cluster, gate: threading.Event, mode: RetryMode, backoff: float
) -> tuple[list[str], Flaky]:
    """R (priority 5, one retry) and L (priority 0) queued behind the held worker."""
    order: queue.SimpleQueue[str] = queue.SimpleQueue()
    flaky = Flaky(failures=1)

    def r() -> str:
        order.put(f"R{current().attempt}")
        return flaky()

    c.add_task(r).with_priority(5).with_retry(1).with_retry_mode(mode).with_backoff(
        FixedBackoff(backoff)
    ).submit()
    c.add_task(order.put, "L").submit()
    gate.set()
    return [get(order) for _ in range(3)], flaky


def fails_first_attempt(order: queue.SimpleQueue[str]) -> Callable[[], None]:
    """A task that records "R<attempt>" in ``order`` and fails its first attempt."""

    def r() -> None:
        order.put(f"R{current().attempt}")
        if current().attempt == 0:
            raise RuntimeError("retry me")

    return r


def test_requeue_mode_frees_the_worker_during_backoff(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    order, flaky = order_of_retry_and_other(c, gate, RetryMode.REQUEUE, 0.2)
    assert order == ["R0", "L", "R1"]
    assert flaky.gaps()[0] >= 0.2 - SLACK


def test_requeue_is_the_default_retry_mode(make_cluster: MakeCluster, new_event: NewEvent) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    order: queue.SimpleQueue[str] = queue.SimpleQueue()
    r = fails_first_attempt(order)
    c.add_task(r).with_priority(5).with_retry(1).with_backoff(FixedBackoff(0.2)).submit()
    c.add_task(order.put, "L").submit()
    gate.set()
    assert [get(order) for _ in range(3)] == ["R0", "L", "R1"]


def test_immediate_mode_retries_on_same_worker_first(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    order, flaky = order_of_retry_and_other(c, gate, RetryMode.IMMEDIATE, 0.2)
    assert order == ["R0", "R1", "L"]
    assert flaky.threads[0] == flaky.threads[1]
    assert flaky.gaps()[0] >= 0.2 - SLACK


def test_requeued_retry_keeps_its_priority(make_cluster: MakeCluster, new_event: NewEvent) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    order: queue.SimpleQueue[str] = queue.SimpleQueue()
    r = fails_first_attempt(order)
    c.add_task(r).with_priority(5).with_retry(1).with_retry_mode(RetryMode.REQUEUE).submit()
    c.add_task(order.put, "L1").submit()
    c.add_task(order.put, "L2").submit()
    gate.set()
    assert [get(order) for _ in range(4)] == ["R0", "R1", "L1", "L2"]


def test_cancel_during_immediate_backoff_wakes_the_worker(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    failed = threading.Event()
    calls: list[int] = []

    def fn() -> None:
        calls.append(current().attempt)
        failed.set()
        raise RuntimeError("fail, then sleep a long backoff")

    h = (
        c.add_task(fn)
        .with_retry(3)
        .with_retry_mode(RetryMode.IMMEDIATE)
        .with_backoff(FixedBackoff(30))
        .submit()
    )
    q = h.subscribe()
    assert failed.wait(WAIT)
    assert c.cancel_task(h.id) is True
    assert isinstance(get(q).error, TaskCancelledError)
    assert c.add_task(lambda: "next").submit().result(timeout=WAIT) == "next"
    assert calls == [0]


def test_cancel_during_requeue_backoff_prevents_retry(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    failed = threading.Event()
    calls: list[int] = []

    def fn() -> None:
        calls.append(current().attempt)
        failed.set()
        raise RuntimeError("fail")

    h = c.add_task(fn).with_retry(3).with_backoff(FixedBackoff(1.0)).submit()
    q = h.subscribe()
    assert failed.wait(WAIT)
    assert c.cancel_task(h.id) is True
    assert isinstance(get(q).error, TaskCancelledError)
    c.stop(timeout=10)
    assert calls == [0]
    assert_no_more(q, 0.05)


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_stop_honours_the_backoff_of_either_mode(
    make_cluster: MakeCluster, mode: RetryMode
) -> None:
    """A graceful stop() waits out a retry's backoff in both modes (a server's
    Retry-After is respected even while stopping), then the retry runs."""
    c = make_cluster(1)
    failed = threading.Event()

    def fn() -> str:
        if current().attempt == 0:
            failed.set()
            raise RuntimeError("fail, then wait the backoff")
        return "retried"

    h = c.add_task(fn).with_retry(1).with_retry_mode(mode).with_backoff(FixedBackoff(0.3)).submit()
    assert failed.wait(WAIT)
    t0 = time.monotonic()
    c.stop(timeout=WAIT)
    assert time.monotonic() - t0 >= 0.25  # the backoff was not cut short
    assert h.result(0) == "retried"


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_stop_timeout_shorter_than_a_backoff_cancels_the_retry(
    make_cluster: MakeCluster, mode: RetryMode
) -> None:
    c = make_cluster(1)
    failed = threading.Event()

    def fn() -> str:
        if current().attempt == 0:
            failed.set()
            raise RuntimeError("fail, then sleep a long backoff")
        return "retried"

    h = c.add_task(fn).with_retry(1).with_retry_mode(mode).with_backoff(FixedBackoff(30)).submit()
    assert failed.wait(WAIT)
    t0 = time.monotonic()
    with pytest.raises(StopTimeoutError):
        c.stop(timeout=0.2)
    assert time.monotonic() - t0 < 3
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]


def test_cluster_cancel_wakes_immediate_backoff(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    failed = threading.Event()

    def fn() -> None:
        failed.set()
        raise RuntimeError("fail")

    h = (
        c.add_task(fn)
        .with_retry(3)
        .with_retry_mode(RetryMode.IMMEDIATE)
        .with_backoff(FixedBackoff(30))
        .submit()
    )
    q = h.subscribe()
    assert failed.wait(WAIT)
    t0 = time.monotonic()
    c.cancel()
    assert isinstance(get(q).error, TaskCancelledError)
    assert time.monotonic() - t0 < 3


# =========================================================================== context


def test_current_outside_a_task_raises_lookup_error() -> None:
    with pytest.raises(LookupError):
        current()


def test_current_in_the_calling_thread_after_tasks_still_raises(cluster: Cluster) -> None:
    cluster.add_task(lambda: current().task_id).submit().result(timeout=WAIT)
    with pytest.raises(LookupError):
        current()


def test_context_defaults_inside_a_plain_task(cluster: Cluster) -> None:
    def fn() -> tuple[Any, ...]:
        ctx = current()
        ctx.check()  # not signalled: must not raise
        return (
            ctx.task_id,
            ctx.attempt,
            ctx.deadline,
            isinstance(ctx.cancelled, threading.Event),
            ctx.cancelled.is_set(),
            ctx.reason,
        )

    h = cluster.add_task(fn).with_id("ctx-task").submit()
    assert h.result(timeout=WAIT) == ("ctx-task", 0, None, True, False, None)


def test_context_is_per_task_in_concurrent_tasks(cluster: Cluster) -> None:
    barrier = threading.Barrier(2, timeout=WAIT)

    def fn() -> str:
        before = current().task_id
        barrier.wait()  # both tasks are inside at the same time
        after = current().task_id
        assert before == after
        return after

    a = cluster.add_task(fn).with_id("a").submit()
    b = cluster.add_task(fn).with_id("b").submit()
    assert (a.result(timeout=WAIT), b.result(timeout=WAIT)) == ("a", "b")


def test_progress_is_visible_through_info(cluster: Cluster, new_event: NewEvent) -> None:
    reported, release = threading.Event(), new_event()

    def fn() -> None:
        current().progress(0.5)
        reported.set()
        release.wait(10)

    h = cluster.add_task(fn).submit()
    assert reported.wait(WAIT)
    assert cluster.info(h.id).progress == 0.5
    release.set()
    h.result(timeout=WAIT)


def test_progress_latest_value_wins(cluster: Cluster, new_event: NewEvent) -> None:
    reported, release = threading.Event(), new_event()

    def fn() -> None:
        ctx = current()
        for step in ({"step": 1}, {"step": 2}, {"step": 3}):
            ctx.progress(step)
        reported.set()
        release.wait(10)

    h = cluster.add_task(fn).submit()
    assert reported.wait(WAIT)
    assert cluster.info(h.id).progress == {"step": 3}


def test_cancel_of_running_task_sets_cancelled_with_reason_cancelled(
    cluster: Cluster,
) -> None:
    started = threading.Event()
    seen: queue.SimpleQueue[tuple[bool, str | None, type[BaseException] | None]] = (
        queue.SimpleQueue()
    )

    def fn() -> None:
        ctx = current()
        started.set()
        fired = ctx.cancelled.wait(10)
        raised: type[BaseException] | None = None
        try:
            ctx.check()
        except BaseException as exc:
            raised = type(exc)
        seen.put((fired, ctx.reason, raised))

    h = cluster.add_task(fn).submit()
    assert started.wait(WAIT)
    assert cluster.cancel_task(h.id) is True
    assert get(seen) == (True, "cancelled", TaskCancelledError)


def test_handle_cancel_of_running_task_signals_context(cluster: Cluster) -> None:
    started = threading.Event()
    seen: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def fn() -> None:
        ctx = current()
        started.set()
        ctx.cancelled.wait(10)
        seen.put(ctx.reason)

    h = cluster.add_task(fn).submit()
    assert started.wait(WAIT)
    assert h.cancel() is True
    assert get(seen) == "cancelled"
    with pytest.raises(TaskCancelledError):
        h.result(timeout=WAIT)


# =========================================================================== callbacks


Call = tuple[str, tuple[Any, ...], int]  # (callback name, args, thread ident)


def recorder() -> tuple[queue.SimpleQueue[Call], Callable[..., None], Callable[..., None]]:
    events: queue.SimpleQueue[Call] = queue.SimpleQueue()

    def on_complete(*args: Any) -> None:
        events.put(("complete", args, threading.get_ident()))

    def on_failure(*args: Any) -> None:
        events.put(("failure", args, threading.get_ident()))

    return events, on_complete, on_failure


def collect(events: queue.SimpleQueue[Call], n: int) -> dict[str, Call]:
    """Exactly ``n`` callback calls, each callback at most once, then nothing more."""
    got = [get(events) for _ in range(n)]
    assert_no_more(events)
    names = [e[0] for e in got]
    assert len(set(names)) == len(names), names
    return {e[0]: e for e in got}


def test_on_complete_called_once_with_value_on_success(cluster: Cluster) -> None:
    events, on_complete, on_failure = recorder()
    h = cluster.add_task(lambda: 42).on_complete(on_complete).on_failure(on_failure).submit()
    got = collect(events, 1)
    assert got["complete"][1] == (h.id, 42, None)


def test_on_complete_and_on_failure_called_once_on_failure(cluster: Cluster) -> None:
    events, on_complete, on_failure = recorder()
    boom = ValueError("boom")

    def fn() -> None:
        raise boom

    h = cluster.add_task(fn).on_complete(on_complete).on_failure(on_failure).submit()
    got = collect(events, 2)
    assert got["complete"][1] == (h.id, None, boom)
    assert got["complete"][1][2] is boom
    assert got["failure"][1] == (h.id, boom)
    assert got["failure"][1][1] is boom


def test_callbacks_called_once_after_all_retries(cluster: Cluster) -> None:
    events, on_complete, on_failure = recorder()
    fn = Flaky(failures=100)
    h = cluster.add_task(fn).with_retry(2).on_complete(on_complete).on_failure(on_failure)
    handle = h.submit()
    got = collect(events, 2)
    assert fn.attempts == [0, 1, 2]
    assert got["failure"][1] == (handle.id, fn.raised[-1])


def test_callbacks_called_on_timeout_while_function_still_stuck(
    cluster: Cluster, new_event: NewEvent
) -> None:
    events, on_complete, on_failure = recorder()
    release = new_event()
    h = (
        cluster.add_task(release.wait, 10)
        .with_timeout(0.1)
        .on_complete(on_complete)
        .on_failure(on_failure)
        .submit()
    )
    got = collect(events, 2)
    task_id, value, error = got["complete"][1]
    assert (task_id, value) == (h.id, None)
    assert isinstance(error, TaskTimeoutError)
    assert got["failure"][1][0] == h.id
    assert isinstance(got["failure"][1][1], TaskTimeoutError)
    assert not release.is_set()
    release.set()
    assert_no_more(events)  # the late return triggers nothing


def test_callbacks_called_on_cancel_of_pending_task_on_another_thread(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    events, on_complete, on_failure = recorder()
    h = c.add_task(lambda: 1).on_complete(on_complete).on_failure(on_failure).submit()
    assert c.cancel_task(h.id) is True
    got = collect(events, 2)
    me = threading.get_ident()
    assert got["complete"][1][:2] == (h.id, None)
    assert isinstance(got["complete"][1][2], TaskCancelledError)
    assert isinstance(got["failure"][1][1], TaskCancelledError)
    assert got["complete"][2] != me and got["failure"][2] != me


def test_callbacks_called_on_cancel_of_running_task_on_another_thread(
    cluster: Cluster, new_event: NewEvent
) -> None:
    started, release = threading.Event(), new_event()
    events, on_complete, on_failure = recorder()

    def fn() -> str:
        started.set()
        release.wait(10)
        return "late"

    h = cluster.add_task(fn).on_complete(on_complete).on_failure(on_failure).submit()
    assert started.wait(WAIT)
    assert cluster.cancel_task(h.id) is True
    got = collect(events, 2)
    me = threading.get_ident()
    assert isinstance(got["complete"][1][2], TaskCancelledError)
    assert isinstance(got["failure"][1][1], TaskCancelledError)
    assert got["complete"][2] != me and got["failure"][2] != me
    release.set()
    assert_no_more(events)


def test_callbacks_called_for_tasks_cancelled_by_cluster_cancel(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    events, on_complete, on_failure = recorder()
    c.add_task(lambda: 1).with_delay(60).on_complete(on_complete).on_failure(on_failure).submit()
    c.cancel()
    got = collect(events, 2)
    assert isinstance(got["failure"][1][1], TaskCancelledError)
    assert isinstance(got["complete"][1][2], TaskCancelledError)


def test_idle_callback_thread_serves_the_next_burst_and_stop_ends_it(
    make_cluster: MakeCluster, new_event: NewEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The callback thread lingers between bursts (so a timeout's callback does not
    # wait for a thread to start); stop() must wake it rather than wait it out.
    monkeypatch.setattr("cluster._delivery.LINGER", 600.0)
    c = make_cluster(1)
    hold_worker(c, new_event())
    threads: queue.SimpleQueue[threading.Thread] = queue.SimpleQueue()

    def on_complete(task_id: str, value: Any, error: BaseException | None) -> None:
        threads.put(threading.current_thread())

    for _ in range(2):
        h = c.add_task(lambda: 1).on_complete(on_complete).submit()
        assert c.cancel_task(h.id) is True
    first = threads.get(timeout=WAIT)
    assert threads.get(timeout=WAIT) is first
    h = c.add_task(lambda: 1).on_complete(on_complete).submit()
    assert c.cancel_task(h.id) is True
    assert threads.get(timeout=WAIT) is first  # the same thread, idle in between
    assert first.is_alive()
    c.cancel()
    c.stop()
    assert not first.is_alive()


def test_callbacks_run_on_a_cluster_thread(cluster: Cluster) -> None:
    events, on_complete, _ = recorder()
    cluster.add_task(lambda: 1).on_complete(on_complete).submit()
    got = collect(events, 1)
    assert got["complete"][2] != threading.get_ident()


def test_raising_on_complete_is_logged_and_changes_nothing(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cluster")
    boom = RuntimeError("callback-boom")
    failures: queue.SimpleQueue[tuple[str, BaseException]] = queue.SimpleQueue()
    task_error = ValueError("task error")

    def bad_complete(task_id: str, value: Any, error: BaseException | None) -> None:
        raise boom

    def failing() -> None:
        raise task_error

    ok = cluster.add_task(lambda: "fine").on_complete(bad_complete).with_cache(60).submit()
    bad = (
        cluster.add_task(failing)
        .on_complete(bad_complete)
        .on_failure(lambda tid, err: failures.put((tid, err)))
        .submit()
    )
    assert ok.result(timeout=WAIT) == "fine"
    assert get(failures) == (bad.id, task_error)  # on_failure still runs
    assert_no_more(failures)
    assert cluster.subscribe(ok.id).get_nowait().value == "fine"
    assert cluster.add_task(lambda: "still works").submit().result(WAIT) == "still works"
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and logged(caplog, boom) < 2:
        time.sleep(0.01)
    assert logged(caplog, boom) >= 2  # once for each raising callback


def test_raising_on_failure_is_logged_and_changes_nothing(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cluster")
    boom = RuntimeError("on-failure-boom")
    completes: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    task_error = ValueError("task error")

    def bad_failure(task_id: str, error: BaseException) -> None:
        raise boom

    def failing() -> None:
        raise task_error

    h = (
        cluster.add_task(failing)
        .on_failure(bad_failure)
        .on_complete(lambda *args: completes.put(args))
        .submit()
    )
    assert get(completes) == (h.id, None, task_error)
    r = h.wait(timeout=WAIT)
    assert r is not None and r.error is task_error
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and logged(caplog, boom) < 1:
        time.sleep(0.01)
    assert logged(caplog, boom) >= 1
    assert cluster.add_task(lambda: 3).submit().result(timeout=WAIT) == 3


def test_subscribers_receive_result_no_later_than_callbacks_run(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    seen_in_callback: queue.SimpleQueue[Any] = queue.SimpleQueue()
    subs: list[queue.SimpleQueue[Any]] = []

    def on_complete(task_id: str, value: Any, error: BaseException | None) -> None:
        try:
            seen_in_callback.put(subs[0].get_nowait().value)
        except queue.Empty:
            seen_in_callback.put("subscriber had nothing yet")

    h = c.add_task(lambda: "v").on_complete(on_complete).submit()
    subs.append(c.subscribe(h.id))
    gate.set()
    assert get(seen_in_callback) == "v"


def test_cluster_methods_callable_from_a_callback(cluster: Cluster) -> None:
    other = cluster.add_task(lambda: None).with_delay(60).submit()
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def on_complete(task_id: str, value: Any, error: BaseException | None) -> None:
        out.put(cluster.stats().submitted)
        out.put(cluster.info(task_id).id)
        q = cluster.subscribe(other.id)
        out.put(cluster.cancel_task(other.id))
        out.put(type(q.get(timeout=WAIT).error))
        out.put(cluster.add_task(lambda: "from callback").submit().result(timeout=WAIT))

    h = cluster.add_task(lambda: 1).with_cache(60).on_complete(on_complete).submit()
    assert [get(out) for _ in range(5)] == [
        2,
        h.id,
        True,
        TaskCancelledError,
        "from callback",
    ]


def test_callback_runs_without_a_cluster_lock_held(cluster: Cluster) -> None:
    out: queue.SimpleQueue[bool] = queue.SimpleQueue()

    def on_complete(task_id: str, value: Any, error: BaseException | None) -> None:
        # another thread must be able to use the cluster while this callback runs
        t = threading.Thread(target=lambda: out.put(cluster.stats().workers == 2))
        t.start()
        t.join(WAIT)
        out.put(not t.is_alive())

    cluster.add_task(lambda: 1).on_complete(on_complete).submit()
    assert [get(out), get(out)] == [True, True]


# =========================================================================== BaseException


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_base_exception_fails_only_that_task(
    make_cluster: MakeCluster, exc_type: type[BaseException]
) -> None:
    c = make_cluster(1)
    err = exc_type("from task")

    def fn() -> None:
        raise err

    h = c.add_task(fn).submit()
    r = h.wait(timeout=WAIT)
    assert r is not None
    assert r.error is err
    assert not r.ok
    with pytest.raises(exc_type):
        r.unwrap()
    # the only worker survived (or was replaced): the cluster keeps working
    assert [c.add_task(int, i).submit().result(WAIT) for i in range(3)] == [0, 1, 2]
    assert c.stats().workers == 1


def test_base_exception_triggers_failure_callbacks(cluster: Cluster) -> None:
    events, on_complete, on_failure = recorder()
    err = KeyboardInterrupt("stop!")

    def fn() -> None:
        raise err

    h = cluster.add_task(fn).on_complete(on_complete).on_failure(on_failure).submit()
    got = collect(events, 2)
    assert got["failure"][1] == (h.id, err)
    assert got["complete"][1] == (h.id, None, err)
