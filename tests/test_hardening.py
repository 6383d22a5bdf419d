"""Regressions of the hardening issue: defects and weaknesses found by trying to break the
core as a hostile user would. Each test failed on the code before the fix.

Scenarios that used to wedge the process for good (a deadlock, a join without limit)
run in a subprocess with a deadline, so that a regression fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from typing import Any

import pytest
from _helpers import WAIT, MakeCluster, NewEvent, wait_until

from cluster import (
    Cluster,
    FixedBackoff,
    Result,
    TaskCancelledError,
    TaskTimeoutError,
    current,
)
from cluster.testing import FakeClock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(code: str, deadline: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; fail (not hang) if it outlives ``deadline``."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=deadline,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung for {deadline}s; stderr so far:\n{exc.stderr!r}")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


# -- 1. no user exception, however odd, kills a cluster thread ----------------------------


@dataclasses.dataclass(frozen=True)
class Frozen(Exception):
    code: int


def test_a_frozen_dataclass_exception_fails_only_its_task(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)

    def bad() -> None:
        raise Frozen(3)

    result = c.add_task(bad).submit().wait(WAIT)
    assert result is not None and isinstance(result.error, Frozen)
    assert result.error.__traceback__ is not None  # the traceback is kept
    assert c.add_task(lambda: "next").submit().result(WAIT) == "next"
    assert c.stats().workers == 1


def test_an_exception_with_a_raising_setattr_fails_only_its_task(make_cluster: MakeCluster) -> None:
    class Sealed(Exception):
        def __setattr__(self, name: str, value: Any) -> None:
            raise AttributeError(f"sealed: {name}")

    def bad() -> None:
        raise Sealed("no attributes")

    c = make_cluster(1)
    result = c.add_task(bad).with_retry(1).submit().wait(WAIT)
    assert result is not None and isinstance(result.error, Sealed)
    assert c.stats().workers == 1


# -- 2. no user code runs under a cluster lock, finalizers included -----------------------


def test_finalizers_that_call_the_cluster_never_deadlock_it() -> None:
    run_script(
        """
        import threading, time, weakref
        from cluster import Cluster, TaskTimeoutError

        c = Cluster(workers=2)
        c.run()
        calls = []

        class Resource:
            def __del__(self):
                calls.append(c.stats().submitted)  # takes the cluster lock

        def value():
            return Resource()

        gate = threading.Event()

        def slow_value():
            gate.wait(10)
            return Resource()

        # an argument, dropped when its task ends
        c.add_task(lambda r: None, Resource()).submit()
        # a value nobody keeps (no handle): dropped with the task
        c.add_task(value).submit()
        # the late value of an abandoned (timed-out) attempt
        h = c.add_task(slow_value).with_timeout(0.05).submit()
        assert isinstance(h.wait(5).error, TaskTimeoutError)
        del h
        gate.set()
        # a cached value, purged at its TTL
        c.add_task(value).with_cache(ttl=0.05).submit()
        # an argument of a cancelled pending task
        p = c.add_task(lambda r: None, Resource()).with_delay(60).submit()
        assert p.cancel()
        del p
        # weakref.finalize of a value
        class Box:
            pass
        def boxed():
            b = Box()
            weakref.finalize(b, lambda: calls.append(c.info("probe").state))
            return b
        c.add_task(lambda: None).with_id("probe").with_cache(60).submit()
        c.add_task(boxed).submit()
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
            c.add_task(int).submit()  # the cluster keeps answering
        assert len(calls) >= 6, calls
        c.stop(timeout=10)
        print("ok")
        """
    )


# -- 3, 4. stop(timeout=T) is bounded by T, and cluster threads never join each other ----


def test_stop_with_a_timeout_is_bounded_by_a_stuck_callback() -> None:
    done = run_script(
        """
        import threading, time
        from cluster import Cluster, StopTimeoutError

        c = Cluster(workers=1)
        c.run()
        gate = threading.Event()
        entered = threading.Event()
        def stuck(*args):
            entered.set()
            gate.wait()
        c.add_task(int).on_complete(stuck).submit()
        assert entered.wait(5)
        t0 = time.monotonic()
        try:
            c.stop(timeout=0.2)
        except StopTimeoutError as exc:
            print("raised:", exc)
        print("elapsed", time.monotonic() - t0)
        """,
        deadline=20,
    )
    elapsed = float(done.stdout.split("elapsed")[1])
    assert elapsed < 1.5, done.stdout
    assert "raised:" in done.stdout  # a thread stuck in a callback is reported


def test_stop_with_a_timeout_is_bounded_by_a_stuck_cancel_callback() -> None:
    done = run_script(
        """
        import threading, time
        from cluster import Cluster, StopTimeoutError

        c = Cluster(workers=1)
        c.run()
        entered = threading.Event()
        def stuck(*args):
            entered.set()
            threading.Event().wait()
        h = c.add_task(int).with_delay(60).on_failure(stuck).submit()
        h.cancel()
        assert entered.wait(5)
        t0 = time.monotonic()
        try:
            c.stop(timeout=0.2)
        except StopTimeoutError:
            pass
        print("elapsed", time.monotonic() - t0)
        """,
        deadline=20,
    )
    assert float(done.stdout.split("elapsed")[1]) < 1.5, done.stdout


def test_two_callbacks_stopping_at_once_do_not_deadlock() -> None:
    run_script(
        """
        import threading
        from cluster import Cluster, StopTimeoutError

        c = Cluster(workers=2)
        c.run()
        on_two_workers = threading.Barrier(2)
        together = threading.Barrier(2)
        returned = []
        def stop_from_callback(*args):
            together.wait(5)
            try:
                c.stop(timeout=2)
            except StopTimeoutError:
                pass
            returned.append(1)
        for _ in range(2):
            c.add_task(on_two_workers.wait, 5).on_complete(stop_from_callback).submit()
        c.stop()  # joins both workers: neither may hang on the other
        assert len(returned) == 2, returned
        c.stop()  # and every later stop() returns
        print("ok")
        """,
        deadline=20,
    )


# -- 5, 6. user code on the timeout path never stalls other timeouts or callbacks ---------


def test_a_slow_retry_predicate_of_a_timeout_does_not_delay_other_timeouts(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(3)
    gate = new_event()
    in_predicate = threading.Event()

    def slow_predicate(error: BaseException) -> bool:
        in_predicate.set()
        gate.wait(WAIT * 2)
        return False

    def blocked() -> None:
        gate.wait(WAIT * 2)

    a = c.add_task(blocked).with_timeout(0.05).with_retry(1).retry_if(slow_predicate).submit()
    assert in_predicate.wait(WAIT)
    t0 = time.monotonic()
    b = c.add_task(blocked).with_timeout(0.05).submit()
    result = b.wait(3)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    assert time.monotonic() - t0 < 2.0
    gate.set()
    assert isinstance(a.wait(WAIT).error, TaskTimeoutError)  # type: ignore[union-attr]


def test_a_stuck_cancel_callback_does_not_hold_up_later_ones(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    entered = threading.Event()
    later: queue.SimpleQueue[str] = queue.SimpleQueue()

    def stuck(task_id: str, error: BaseException) -> None:
        entered.set()
        gate.wait(WAIT * 3)

    first = c.add_task(int).with_delay(60).on_failure(stuck).submit()
    assert first.cancel()
    assert entered.wait(WAIT)
    for _ in range(3):
        h = c.add_task(int).with_delay(60).on_failure(lambda tid, e: later.put(tid)).submit()
        assert h.cancel()
    got = {later.get(timeout=3) for _ in range(3)}
    assert len(got) == 3


# -- 7. an unreferenced cluster is collected; its threads exit ----------------------------


def _cluster_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("cluster-")}


def test_a_dropped_cluster_is_collected_and_its_threads_exit() -> None:
    before = _cluster_threads()
    results: list[queue.SimpleQueue[Result[Any]]] = []
    for _ in range(5):
        c = Cluster(workers=2)
        c.run()
        results.append(c.add_task(lambda: "done").submit().subscribe())
        alive = weakref.ref(c)
        del c
        gc.collect()
        assert alive() is None, "the cluster is still referenced"
    for q in results:  # graceful: what was accepted still ran
        assert q.get(timeout=WAIT).value == "done"
    assert wait_until(lambda: not (_cluster_threads() - before), WAIT), _cluster_threads()


def test_a_dropped_cluster_still_delivers_to_kept_handles() -> None:
    c = Cluster(workers=1)
    c.run()
    gate = threading.Event()
    h = c.add_task(lambda: gate.wait(WAIT) and "late").submit()
    del c
    gc.collect()
    gate.set()
    assert h.result(WAIT) == "late"


# -- 9. tasks inherited by a forked child read as cancelled there -----------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_from_a_task_sees_inherited_tasks_as_cancelled(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(1)
    delayed = c.add_task(lambda: "never").with_delay(60).submit()
    pids: queue.SimpleQueue[int] = queue.SimpleQueue()

    def forker() -> None:
        pid = os.fork()
        if pid == 0:  # the child: one thread, this one
            code = 1
            try:
                r = delayed.wait(2)
                me = current()  # still our context in the child
                if r is not None and isinstance(r.error, TaskCancelledError) and me.task_id:
                    code = 0
            finally:
                os._exit(code)
        pids.put(pid)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
        c.add_task(forker).submit().result(WAIT)
    pid = pids.get(timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung on an inherited handle")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    assert delayed.cancel()  # the parent's task is untouched


# -- 10. a lock never released cannot hang cancel() or the exit -------------------------


def test_exit_and_cancel_give_up_on_a_lock_left_held() -> None:
    done = run_script(
        """
        import time
        import cluster._runtime as runtime
        from cluster import Cluster, ClusterError

        runtime.LOCK_GIVE_UP = 0.2
        c = Cluster(workers=1)
        c.run()
        c.add_task(int).with_delay(60).submit()
        c._rt.lock.acquire()  # what a Ctrl-C between acquire() and try: leaves behind
        t0 = time.monotonic()
        try:
            c.cancel()
        except ClusterError as exc:
            print("cancel raised:", exc)
        print("cancel took", time.monotonic() - t0)
        """,
        deadline=20,
    )
    assert "cancel raised" in done.stdout
    assert float(done.stdout.split("cancel took")[1]) < 2.0


# -- 11. expired cached results are released on an idle cluster ---------------------------


def test_an_expired_cached_result_is_released_without_any_call() -> None:
    clock = FakeClock()  # the TTL passes when the test says so, not under a busy machine
    c = Cluster(workers=1, clock=clock)
    c.run()
    ended = threading.Event()

    class Witness:
        pass

    refs: list[weakref.ref[Witness]] = []

    def succeeds() -> Witness:
        value = Witness()  # kept by the cached Result until the TTL passes
        refs.append(weakref.ref(value))
        return value

    try:
        h = c.add_task(succeeds).with_cache(ttl=60).on_complete(lambda *a: ended.set()).submit()
        assert ended.wait(WAIT)
        del h
        clock.advance(59)
        c.wait_idle(WAIT)
        gc.collect()
        assert refs and refs[0]() is not None  # still cached
        clock.advance(2)  # nothing else is called on the cluster: its service purges
        assert wait_until(lambda: gc.collect() >= 0 and refs[0]() is None, WAIT)
    finally:
        c.stop(timeout=WAIT)


def test_a_failed_tasks_frame_locals_are_released_once_delivered(make_cluster: MakeCluster) -> None:
    """A dead letter keeps the error and its traceback text, not its frames' locals."""
    c = make_cluster(1)
    ended = threading.Event()

    class Witness:
        pass

    refs: list[weakref.ref[Witness]] = []

    def fails() -> None:
        local = Witness()  # referenced from the error's traceback frame
        refs.append(weakref.ref(local))
        raise RuntimeError("kept as a dead letter")

    h = c.add_task(fails).with_cache(ttl=60).on_complete(lambda *a: ended.set()).submit()
    assert ended.wait(WAIT)
    assert wait_until(lambda: gc.collect() >= 0 and refs[0]() is None, 3.0)
    assert h.wait(0).error.__traceback__ is not None  # type: ignore[union-attr]  # text kept


def test_backoff_of_a_graceful_stop_is_honoured_for_requeue_too(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    starts: list[float] = []

    def flaky() -> str:
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise RuntimeError("once")
        return "ok"

    h = c.add_task(flaky).with_retry(1).with_backoff(FixedBackoff(0.3)).submit()
    assert wait_until(lambda: len(starts) == 1)
    c.stop(timeout=WAIT)
    assert h.result(0) == "ok"
    assert starts[1] - starts[0] >= 0.29


# -- a task cancelled by a callback between being taken and being run -----------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_cancelled_by_a_callback_before_it_starts_never_runs(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    """The worker that delivers ``a``'s failure has already taken ``b`` (the next in
    line) under the lock; ``a``'s callback then cancels ``b``. ``b`` must end cancelled
    without running, and the worker must neither crash nor stay counted as stuck."""
    c = make_cluster(workers)
    gate, ran = threading.Event(), threading.Event()
    handles: dict[str, Any] = {}
    blockers = [c.add_task(gate.wait, WAIT).submit() for _ in range(workers - 1)]

    def boom() -> None:
        gate.wait(WAIT)
        raise ValueError("x")

    a = c.add_task(boom).on_failure(lambda *_: handles["b"].cancel()).submit()
    handles["b"] = c.add_task(ran.set).submit()
    gate.set()
    assert isinstance(a.wait(WAIT).error, ValueError)  # type: ignore[union-attr]
    assert isinstance(handles["b"].wait(WAIT).error, TaskCancelledError)
    for h in blockers:
        h.result(WAIT)
    assert c.add_task(lambda: "after").submit().result(WAIT) == "after"
    assert wait_until(lambda: c.stats().abandoned == 0)
    assert not ran.is_set()
    assert "crashed" not in caplog.text
