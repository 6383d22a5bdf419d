"""SPEC §2 (Cluster methods) and §4 (ordering), through the public API only."""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from _helpers import WAIT, MakeCluster, NewEvent, is_purged, wait_until

from cluster import (
    Cluster,
    ClusterStoppedError,
    FixedBackoff,
    StopTimeoutError,
    TaskCancelledError,
    TaskNotFoundError,
    TaskTimeoutError,
    current,
)

T = TypeVar("T")


def get(q: queue.SimpleQueue[T], timeout: float = WAIT) -> T:
    return q.get(timeout=timeout)


def assert_no_more(q: queue.SimpleQueue[Any], wait: float = 0.2) -> None:
    with pytest.raises(queue.Empty):
        q.get(timeout=wait)


def state_name(info: Any) -> str:
    state = info.state
    return str(getattr(state, "value", state)).lower()


PENDING = {"pending", "queued"}
DELAYED = {"delayed", "scheduled", "waiting"}
RUNNING = {"running"}
SUCCEEDED = {"succeeded", "success", "done", "completed"}
FAILED = {"failed", "error"}


def hold_worker(c: Cluster, gate: threading.Event, priority: int = 10**6) -> Any:
    """Occupy one worker until ``gate`` is set; returns once the blocker is running."""
    started = threading.Event()

    def blocker() -> str:
        started.set()
        gate.wait(10)
        return "blocker"

    handle = c.add_task(blocker).with_priority(priority).submit()
    assert started.wait(WAIT), "blocker task never started"
    return handle


# --------------------------------------------------------------------------- construction


def test_workers_zero_or_negative_raises_value_error() -> None:
    with pytest.raises(ValueError, match="workers"):
        Cluster(workers=0)
    with pytest.raises(ValueError, match="workers"):
        Cluster(workers=-1)


@pytest.mark.parametrize("bad", [True, 2.0, "2"])
def test_workers_non_int_or_bool_raises_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="workers"):
        Cluster(workers=bad)


def test_default_workers_is_cpu_count() -> None:
    c = Cluster()
    c.run()
    try:
        assert c.stats().workers == (os.cpu_count() or 1)
    finally:
        c.stop(timeout=10)


def test_stats_workers_reports_pool_size(make_cluster: MakeCluster) -> None:
    assert make_cluster(3).stats().workers == 3


# --------------------------------------------------------------------------- run()


def test_submit_before_run_waits_in_queue(make_cluster: MakeCluster) -> None:
    c = make_cluster(1, run=False)
    started = threading.Event()

    def fn() -> str:
        started.set()
        return "ran"

    h = c.add_task(fn).submit()
    assert not started.wait(0.2)
    assert not h.done()
    assert c.stats().queued == 1
    c.run()
    assert h.result(timeout=WAIT) == "ran"


def test_run_twice_is_a_noop(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.run()
    assert c.stats().workers == 2
    assert c.add_task(lambda: 42).submit().result(timeout=WAIT) == 42


def test_run_after_stop_raises_cluster_stopped(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    c.stop(timeout=10)
    with pytest.raises(ClusterStoppedError):
        c.run()


def test_run_after_cancel_raises_cluster_stopped(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    c.cancel()
    with pytest.raises(ClusterStoppedError):
        c.run()


def test_submit_after_stop_raises_cluster_stopped(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    c.stop(timeout=10)
    with pytest.raises(ClusterStoppedError):
        c.add_task(lambda: 1).submit()
    assert c.stats().submitted == 0


def test_submit_after_cancel_raises_cluster_stopped(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    c.cancel()
    with pytest.raises(ClusterStoppedError):
        c.add_task(lambda: 1).submit()


def test_cluster_stopped_error_is_cluster_error() -> None:
    from cluster import ClusterError

    assert issubclass(ClusterStoppedError, ClusterError)


# --------------------------------------------------------------------------- add_task()


@pytest.mark.parametrize("bad", [42, None, "print"])
def test_add_task_non_callable_raises_type_error_at_once(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError):
        cluster.add_task(bad)


def test_add_task_passes_positional_and_keyword_args(cluster: Cluster) -> None:
    def fn(a: int, b: int, *, scale: int) -> tuple[int, int, int]:
        return a, b, scale

    assert cluster.add_task(fn, 1, 2, scale=3).submit().result(timeout=WAIT) == (1, 2, 3)


def test_add_task_accepts_lambda_bound_method_and_partial(cluster: Cluster) -> None:
    class Acc:
        def __init__(self) -> None:
            self.base = 10

        def add(self, x: int) -> int:
            return self.base + x

    def mul(a: int, b: int) -> int:
        return a * b

    h1 = cluster.add_task(lambda: "lam").submit()
    h2 = cluster.add_task(Acc().add, 5).submit()
    h3 = cluster.add_task(functools.partial(mul, 6), 7).submit()
    assert h1.result(timeout=WAIT) == "lam"
    assert h2.result(timeout=WAIT) == 15
    assert h3.result(timeout=WAIT) == 42


def test_task_exception_is_the_result_error(cluster: Cluster) -> None:
    boom = ValueError("boom")

    def fn() -> None:
        raise boom

    h = cluster.add_task(fn).submit()
    q = h.subscribe()
    r = get(q)
    assert r.error is boom
    assert r.value is None


# --------------------------------------------------------------------------- subscribe()


def test_subscribe_returns_simple_queue_receiving_result_exactly_once(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    h = c.add_task(lambda: gate.wait(10) and "v").submit()
    q = c.subscribe(h.id)
    assert isinstance(q, queue.SimpleQueue)
    gate.set()
    r = get(q)
    assert r.ok
    assert r.value == "v"
    assert_no_more(q)


def test_several_subscribers_each_get_one_copy(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    h = c.add_task(lambda: gate.wait(10) and 7).submit()
    qs = [c.subscribe(h.id) for _ in range(3)]
    assert len({id(q) for q in qs}) == 3
    gate.set()
    for q in qs:
        r = get(q)
        assert r.value == 7
        assert r.error is None
    for q in qs:
        assert_no_more(q, 0.05)


def test_subscribe_to_pending_task_before_run(make_cluster: MakeCluster) -> None:
    c = make_cluster(1, run=False)
    h = c.add_task(lambda: "later").submit()
    q = c.subscribe(h.id)
    c.run()
    assert get(q).value == "later"


def test_late_subscribe_to_cached_result_gets_it_at_once(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: "cached").with_cache(ttl=60).submit()
    assert h.result(timeout=WAIT) == "cached"
    q = cluster.subscribe(h.id)
    r = q.get_nowait()
    assert r.value == "cached"
    assert r.ok
    assert_no_more(q)


def test_late_subscribe_to_cached_failure_gets_error(cluster: Cluster) -> None:
    def fn() -> None:
        raise KeyError("k")

    h = cluster.add_task(fn).with_cache(ttl=60).submit()
    assert h.wait(timeout=WAIT) is not None
    r = cluster.subscribe(h.id).get_nowait()
    assert isinstance(r.error, KeyError)
    assert not r.ok


def test_subscribe_unknown_id_raises_task_not_found(cluster: Cluster) -> None:
    with pytest.raises(TaskNotFoundError):
        cluster.subscribe("no-such-task")
    with pytest.raises(KeyError):
        cluster.subscribe("no-such-task")


def test_subscribe_finished_uncached_task_raises_task_not_found(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).submit()
    assert h.result(timeout=WAIT) == 1
    assert wait_until(lambda: is_purged(cluster, h.id)), "uncached result was never purged"
    with pytest.raises(TaskNotFoundError):
        cluster.subscribe(h.id)


# --------------------------------------------------------------------------- cancel_task()


def test_cancel_of_pending_task_delivers_cancelled_result(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    ran = threading.Event()
    h = c.add_task(ran.set).submit()
    q = c.subscribe(h.id)
    assert c.cancel_task(h.id) is True
    r = get(q)  # delivered at once, while the only worker is still held
    assert isinstance(r.error, TaskCancelledError)
    assert not r.ok
    assert not gate.is_set()
    gate.set()
    c.stop(timeout=10)
    assert not ran.is_set()
    assert_no_more(q, 0.05)


def test_cancel_of_pending_task_removes_it_from_queue(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    h1 = c.add_task(lambda: 1).submit()
    c.add_task(lambda: 2).submit()
    assert c.stats().queued == 2
    assert c.cancel_task(h1.id) is True
    assert c.stats().queued == 1


def test_cancel_of_delayed_task_delivers_cancelled_result(cluster: Cluster) -> None:
    ran = threading.Event()
    h = cluster.add_task(ran.set).with_delay(60).submit()
    q = cluster.subscribe(h.id)
    assert cluster.stats().delayed == 1
    assert cluster.cancel_task(h.id) is True
    r = get(q)
    assert isinstance(r.error, TaskCancelledError)
    assert cluster.stats().delayed == 0
    assert not ran.is_set()


def test_cancel_of_running_task_delivers_result_while_function_still_blocked(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    started, release, returned = threading.Event(), new_event(), threading.Event()

    def stubborn() -> str:
        started.set()
        release.wait(10)  # ignores cancellation on purpose
        returned.set()
        return "late value"

    h = c.add_task(stubborn).submit()
    q = c.subscribe(h.id)
    assert started.wait(WAIT)
    assert c.cancel_task(h.id) is True
    r = get(q)
    assert isinstance(r.error, TaskCancelledError)
    assert not returned.is_set()
    release.set()
    assert returned.wait(WAIT)
    assert_no_more(q)  # the late return value is discarded
    with pytest.raises(TaskCancelledError):
        h.result(timeout=WAIT)


def test_cancel_of_running_task_keeps_pool_at_full_strength(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    started, release = threading.Event(), new_event()

    def stubborn() -> None:
        started.set()
        release.wait(10)

    h = c.add_task(stubborn).submit()
    assert started.wait(WAIT)
    assert c.cancel_task(h.id) is True
    other = c.add_task(lambda: "other").submit()
    assert other.result(timeout=WAIT) == "other"
    assert not release.is_set()


def test_cancel_task_of_finished_task_returns_false(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_cache(ttl=60).submit()
    assert h.result(timeout=WAIT) == 1
    assert cluster.cancel_task(h.id) is False
    r = cluster.subscribe(h.id).get_nowait()
    assert r.ok and r.value == 1


def test_cancel_task_twice_second_call_returns_false(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_delay(60).with_cache(ttl=60).submit()
    assert cluster.cancel_task(h.id) is True
    assert cluster.cancel_task(h.id) is False


def test_cancel_task_unknown_id_raises_task_not_found(cluster: Cluster) -> None:
    with pytest.raises(TaskNotFoundError):
        cluster.cancel_task("nope")
    with pytest.raises(KeyError):
        cluster.cancel_task("nope")


def test_cancelled_running_task_is_never_retried(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    started, release = threading.Event(), new_event()
    calls: list[int] = []

    def fn() -> None:
        calls.append(current().attempt)
        started.set()
        release.wait(10)
        raise RuntimeError("fails after cancel")

    h = c.add_task(fn).with_retry(3).submit()
    q = h.subscribe()
    assert started.wait(WAIT)
    assert c.cancel_task(h.id) is True
    assert isinstance(get(q).error, TaskCancelledError)
    release.set()
    c.stop(timeout=10)
    assert calls == [0]
    assert c.stats().retried == 0
    assert_no_more(q, 0.05)


def test_cancelled_task_that_raises_cancelled_error_is_not_retried(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(1)
    started = threading.Event()
    calls: list[int] = []

    def polite() -> None:
        ctx = current()
        calls.append(ctx.attempt)
        started.set()
        ctx.cancelled.wait(10)
        ctx.check()

    h = c.add_task(polite).with_retry(3).submit()
    assert started.wait(WAIT)
    assert c.cancel_task(h.id) is True
    with pytest.raises(TaskCancelledError):
        h.result(timeout=WAIT)
    c.stop(timeout=10)
    assert calls == [0]


# --------------------------------------------------------------------------- stop()


def test_stop_runs_queued_and_delayed_tasks_to_completion(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    queued = c.add_task(lambda: "queued").submit()
    delayed = c.add_task(lambda: "delayed").with_delay(0.1).submit()
    gate.set()
    c.stop(timeout=10)
    assert queued.done() and delayed.done()
    assert queued.result(timeout=0) == "queued"
    assert delayed.result(timeout=0) == "delayed"


def test_stop_carries_task_waiting_to_retry_to_terminal_state(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    failed_once = threading.Event()
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(current().attempt)
        if not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("first attempt fails")
        return "second attempt"

    h = c.add_task(flaky).with_retry(1).with_backoff(FixedBackoff(0.1)).submit()
    assert failed_once.wait(WAIT)
    c.stop(timeout=10)
    assert h.done()
    assert h.result(timeout=0) == "second attempt"
    assert attempts == [0, 1]


def test_stop_waits_for_running_task(make_cluster: MakeCluster, new_event: NewEvent) -> None:
    c = make_cluster(1)
    gate = new_event()
    blocker = hold_worker(c, gate)
    stopper = threading.Thread(target=c.stop, kwargs={"timeout": 10})
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # still waiting for the running task
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert blocker.result(timeout=0) == "blocker"


def test_submit_while_stopping_raises_cluster_stopped(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    stopper = threading.Thread(target=c.stop, kwargs={"timeout": 10})
    stopper.start()

    def rejected() -> bool:
        try:
            c.add_task(lambda: None).submit()
        except ClusterStoppedError:
            return True
        return False

    assert wait_until(rejected)
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()


def test_stop_cancel_pending_cancels_unstarted_and_awaits_running(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    blocker = hold_worker(c, gate)
    ran = threading.Event()
    pending = c.add_task(ran.set).submit()
    delayed = c.add_task(ran.set).with_delay(60).submit()
    qp, qd = pending.subscribe(), delayed.subscribe()
    stopper = threading.Thread(target=c.stop, kwargs={"timeout": 10, "cancel_pending": True})
    stopper.start()
    # unstarted tasks are cancelled at once, while the running one still holds the worker
    assert isinstance(get(qp).error, TaskCancelledError)
    assert isinstance(get(qd).error, TaskCancelledError)
    assert stopper.is_alive()
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert blocker.result(timeout=0) == "blocker"
    assert not ran.is_set()


def test_stop_timeout_raises_stop_timeout_error_with_results_delivered(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    blocker = hold_worker(c, gate)
    pending = c.add_task(lambda: "never").submit()
    delayed = c.add_task(lambda: "never").with_delay(60).submit()
    queues = [blocker.subscribe(), pending.subscribe(), delayed.subscribe()]
    t0 = time.monotonic()
    with pytest.raises(StopTimeoutError) as excinfo:
        c.stop(timeout=0.2)
    assert time.monotonic() - t0 < 3
    assert isinstance(excinfo.value, TimeoutError)
    for q in queues:  # every subscriber already holds its Result
        r = q.get_nowait()
        assert isinstance(r.error, TaskCancelledError)
    assert not gate.is_set()


def test_stop_timeout_signals_running_task_with_shutdown_reason(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(1)
    started = threading.Event()
    seen: queue.SimpleQueue[tuple[bool, str | None]] = queue.SimpleQueue()

    def fn() -> None:
        ctx = current()
        started.set()
        while not ctx.cancelled.wait(0.01):
            pass
        seen.put((ctx.cancelled.is_set(), ctx.reason))

    c.add_task(fn).submit()
    assert started.wait(WAIT)
    with pytest.raises(StopTimeoutError):
        c.stop(timeout=0.1)
    assert get(seen) == (True, "shutdown")


# --------------------------------------------------------------------------- cancel()


def test_cancel_returns_without_waiting_and_delivers_cancelled_results(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    blocker = hold_worker(c, gate)
    ran = threading.Event()
    pending = c.add_task(ran.set).submit()
    delayed = c.add_task(ran.set).with_delay(60).submit()
    queues = [blocker.subscribe(), pending.subscribe(), delayed.subscribe()]
    t0 = time.monotonic()
    c.cancel()
    assert time.monotonic() - t0 < 3
    assert not gate.is_set()  # the running function has not returned
    for q in queues:
        assert isinstance(get(q).error, TaskCancelledError)
    gate.set()
    assert not ran.wait(0.1)


def test_cancel_signals_running_tasks_with_shutdown_reason(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    started = threading.Event()
    seen: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def fn() -> None:
        ctx = current()
        started.set()
        ctx.cancelled.wait(10)
        seen.put(ctx.reason)

    c.add_task(fn).submit()
    assert started.wait(WAIT)
    c.cancel()
    assert get(seen) == "shutdown"


# --------------------------------------------------------------------------- context manager


def test_context_manager_runs_cluster_and_stops_gracefully() -> None:
    with Cluster(workers=2) as c:
        assert isinstance(c, Cluster)
        h = c.add_task(lambda: "inside").with_delay(0.05).submit()
    assert h.done()  # __exit__ waited for the queued task
    assert h.result(timeout=0) == "inside"
    with pytest.raises(ClusterStoppedError):
        c.add_task(lambda: None).submit()


def test_context_manager_stops_when_body_raises() -> None:
    with pytest.raises(RuntimeError, match="body"), Cluster(workers=1) as c:
        h = c.add_task(lambda: 5).submit()
        raise RuntimeError("body")
    assert h.result(timeout=WAIT) == 5
    with pytest.raises(ClusterStoppedError):
        c.add_task(lambda: None).submit()


# --------------------------------------------------------------------------- info()


def test_info_of_pending_task_has_all_fields(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    h = c.add_task(lambda: None).with_id("pending-one").with_priority(7).submit()
    info = c.info(h.id)
    assert info.id == "pending-one"
    assert state_name(info) in PENDING
    assert info.priority == 7
    assert info.attempts == 0
    assert info.submitted_at is not None
    assert info.started_at is None
    assert info.finished_at is None
    assert info.error is None
    assert info.progress is None


def test_info_of_delayed_task_reports_delayed_state(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: None).with_delay(60).submit()
    assert state_name(cluster.info(h.id)) in DELAYED


def test_info_of_running_task_reports_running_and_started_at(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    h = hold_worker(c, gate)
    info = c.info(h.id)
    assert state_name(info) in RUNNING
    assert info.started_at is not None
    assert info.finished_at is None


def test_info_of_finished_cached_task(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: "v").with_cache(ttl=60).submit()
    assert h.result(timeout=WAIT) == "v"
    info = cluster.info(h.id)
    assert state_name(info) in SUCCEEDED
    assert info.attempts == 1
    assert info.error is None
    assert info.started_at is not None and info.finished_at is not None
    assert info.submitted_at <= info.started_at <= info.finished_at


def test_info_of_failed_cached_task_has_error_and_attempts(cluster: Cluster) -> None:
    boom = ValueError("always")

    def fn() -> None:
        raise boom

    h = cluster.add_task(fn).with_retry(2).with_cache(ttl=60).submit()
    assert h.wait(timeout=WAIT) is not None
    info = cluster.info(h.id)
    assert state_name(info) in FAILED
    assert info.error is boom
    assert info.attempts == 3


def test_info_unknown_id_raises_task_not_found(cluster: Cluster) -> None:
    with pytest.raises(TaskNotFoundError):
        cluster.info("missing")


# --------------------------------------------------------------------------- stats()


def counters(c: Cluster) -> tuple[int, int, int, int, int, int]:
    s = c.stats()
    return (s.submitted, s.succeeded, s.failed, s.cancelled, s.timed_out, s.retried)


def settled(c: Cluster, expected: tuple[int, ...]) -> tuple[int, ...]:
    """Counters once they reach ``expected`` (or after a deadline, for the assert message)."""
    wait_until(lambda: counters(c) == expected)
    return counters(c)


def test_stats_counts_successes(cluster: Cluster) -> None:
    for h in [cluster.add_task(lambda: 1).submit() for _ in range(3)]:
        h.result(timeout=WAIT)
    # (submitted, succeeded, failed, cancelled, timed_out, retried)
    assert settled(cluster, (3, 3, 0, 0, 0, 0)) == (3, 3, 0, 0, 0, 0)


def test_stats_counts_failures(cluster: Cluster) -> None:
    def fn() -> None:
        raise RuntimeError("x")

    assert cluster.add_task(fn).submit().wait(timeout=WAIT) is not None
    assert cluster.add_task(lambda: 1).submit().result(timeout=WAIT) == 1
    assert settled(cluster, (2, 1, 1, 0, 0, 0)) == (2, 1, 1, 0, 0, 0)


def test_stats_counts_cancellations(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_delay(60).submit()
    assert cluster.cancel_task(h.id)
    wait_until(lambda: cluster.stats().cancelled == 1)
    s = cluster.stats()
    assert (s.submitted, s.succeeded, s.cancelled, s.timed_out, s.retried) == (1, 0, 1, 0, 0)


def test_stats_counts_timeouts(cluster: Cluster, new_event: NewEvent) -> None:
    release = new_event()
    h = cluster.add_task(release.wait, 10).with_timeout(0.05).submit()
    with pytest.raises(TaskTimeoutError):
        h.result(timeout=WAIT)
    wait_until(lambda: cluster.stats().timed_out == 1)
    s = cluster.stats()
    assert (s.submitted, s.succeeded, s.cancelled, s.timed_out, s.retried) == (1, 0, 0, 1, 0)


def test_stats_counts_retries(cluster: Cluster) -> None:
    def fn() -> None:
        raise RuntimeError("x")

    assert cluster.add_task(fn).with_retry(2).submit().wait(timeout=WAIT) is not None
    assert settled(cluster, (1, 0, 1, 0, 0, 2)) == (1, 0, 1, 0, 0, 2)


def test_stats_gauges_queued_delayed_running_workers(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    c.add_task(lambda: 1).submit()
    c.add_task(lambda: 2).submit()
    c.add_task(lambda: 3).with_delay(60).submit()
    s = c.stats()
    assert (s.queued, s.delayed, s.running, s.workers) == (2, 1, 1, 1)
    assert s.submitted == 4


# --------------------------------------------------------------------------- thread safety


def test_cluster_methods_callable_from_inside_a_task(cluster: Cluster) -> None:
    other = cluster.add_task(lambda: None).with_delay(60).submit()

    def inner() -> tuple[int, str, bool, Any, Any]:
        me = current().task_id
        stats = cluster.stats()
        info = cluster.info(me)
        q = cluster.subscribe(other.id)
        cancelled = cluster.cancel_task(other.id)
        child = cluster.add_task(lambda: "child").submit()
        return stats.running, state_name(info), cancelled, get(q).error, child.result(WAIT)

    h = cluster.add_task(inner).submit()
    running, state, cancelled, other_error, child_value = h.result(timeout=WAIT)
    assert child_value == "child"
    assert running >= 1
    assert state in RUNNING
    assert cancelled is True
    assert isinstance(other_error, TaskCancelledError)


def test_task_can_wait_for_a_child_task(cluster: Cluster) -> None:
    def parent() -> int:
        child = cluster.add_task(lambda: 20).submit()
        return int(child.result(timeout=WAIT)) + 1

    assert cluster.add_task(parent).submit().result(timeout=WAIT) == 21


def test_cluster_methods_do_not_hold_lock_while_task_runs(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    done: queue.SimpleQueue[int] = queue.SimpleQueue()

    def fn() -> None:
        t = threading.Thread(target=lambda: done.put(c.stats().running))
        t.start()
        t.join(WAIT)

    c.add_task(fn).submit().result(timeout=WAIT)
    assert get(done) == 1


def test_concurrent_submits_from_many_threads_all_run(cluster: Cluster) -> None:
    barrier = threading.Barrier(8, timeout=WAIT)
    handles: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def submitter(n: int) -> None:
        barrier.wait()
        for i in range(25):
            handles.put(cluster.add_task(int, n * 100 + i).submit())

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    got = [handles.get_nowait() for _ in range(200)]
    assert len({h.id for h in got}) == 200
    values = sorted(h.result(timeout=WAIT) for h in got)
    assert values == sorted(n * 100 + i for n in range(8) for i in range(25))
    assert cluster.stats().submitted == 200


# --------------------------------------------------------------------------- §4 ordering


def run_ordered(
    c: Cluster, gate: threading.Event, builders: list[tuple[str, Callable[[Any], Any]]]
) -> list[str]:
    """Submit tasks while the only worker is held, release it, return execution order."""
    order: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name, configure in builders:
        configure(c.add_task(order.put, name)).submit()
    gate.set()
    return [get(order) for _ in builders]


def test_higher_priority_due_task_runs_first(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    order = run_ordered(
        c,
        gate,
        [
            ("p1", lambda b: b.with_priority(1)),
            ("p5", lambda b: b.with_priority(5)),
            ("p-3", lambda b: b.with_priority(-3)),
            ("p3", lambda b: b.with_priority(3)),
            ("p0", lambda b: b),
        ],
    )
    assert order == ["p5", "p3", "p1", "p0", "p-3"]


def test_equal_priority_runs_in_start_time_order(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    now = datetime.now()
    order = run_ordered(
        c,
        gate,
        [
            ("now", lambda b: b),
            ("-1s", lambda b: b.with_start_time(now - timedelta(seconds=1))),
            ("-3s", lambda b: b.with_start_time(now - timedelta(seconds=3))),
            ("-2s", lambda b: b.with_start_time(now - timedelta(seconds=2))),
        ],
    )
    assert order == ["-3s", "-2s", "-1s", "now"]


def test_equal_priority_and_start_time_runs_fifo(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    when = datetime.now() - timedelta(seconds=5)
    names = [f"t{i}" for i in range(8)]
    order = run_ordered(
        c, gate, [(n, lambda b: b.with_start_time(when).with_priority(2)) for n in names]
    )
    assert order == names


def test_default_start_time_tasks_run_fifo(make_cluster: MakeCluster, new_event: NewEvent) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    names = [f"t{i}" for i in range(8)]
    assert run_ordered(c, gate, [(n, lambda b: b) for n in names]) == names


def test_priority_beats_earlier_start_time_among_due_tasks(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    now = datetime.now()
    order = run_ordered(
        c,
        gate,
        [
            ("old-low", lambda b: b.with_start_time(now - timedelta(seconds=10))),
            ("new-high", lambda b: b.with_priority(1).with_start_time(now - timedelta(seconds=1))),
        ],
    )
    assert order == ["new-high", "old-low"]


def test_not_yet_due_high_priority_task_does_not_run_early(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    hold_worker(c, gate)
    order: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
    t0 = time.monotonic()
    c.add_task(lambda: order.put(("high", time.monotonic()))).with_priority(100).with_delay(
        0.3
    ).submit()
    c.add_task(lambda: order.put(("low", time.monotonic()))).submit()
    gate.set()
    first, second = get(order), get(order)
    assert [first[0], second[0]] == ["low", "high"]
    assert second[1] >= t0 + 0.3 - 0.01
