"""SPEC §19: Intermittent (attach/detach reference counting), poll() and Lifecycle.

Gates are conftest events (released at teardown); a test that must see a thread
*blocked* inside a wait looks at the condition's waiter list (``_waiters``), the one
white-box probe here, so that no step depends on a sleep being long enough.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from _helpers import WAIT, MakeCluster, NewEvent, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cluster
from cluster import Cluster, ClusterStoppedError, TaskCancelledError
from cluster._background import (
    Attachment,
    Intermittent,
    Lifecycle,
    LifecycleContext,
    poll,
)

needs_repeat = pytest.mark.skipif(
    not hasattr(cluster.TaskBuilder, "repeat"), reason="repeat() not merged yet"
)


# ---------------------------------------------------------------------- helpers


def waiters(cond: threading.Condition) -> int:
    """How many threads are blocked in ``cond.wait()`` now (CPython's waiter list)."""
    return len(getattr(cond, "_waiters"))  # noqa: B009  # private, deliberately


class Call:
    """Runs ``fn()`` on a new thread; ``outcome()`` returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str = "caller") -> None:
        self._fn = fn
        self._box: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._box.put((True, self._fn()))
        except BaseException as exc:
            self._box.put((False, exc))

    def done(self) -> bool:
        return not self.thread.is_alive()

    def outcome(self, timeout: float = WAIT) -> Any:
        ok, value = self._box.get(timeout=timeout)
        if not ok:
            raise value
        return value


class Recorder:
    """An instrumented operation: a timeline of starts and stops, and overlap checks.

    ``phase`` goes idle -> starting -> live -> stopping -> idle (a failed start goes
    back to idle); a start that begins anywhere but idle, or a stop anywhere but
    live, sets ``overlapped``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timeline: list[str] = []  # "start" / "stop" / "start-failed", in order
        self.phase = "idle"
        self.overlapped = False
        self.threads: list[threading.Thread] = []  # the thread of each call, in order
        self.stopped = threading.Event()  # set by every stop that returns
        self.fail_next = 0  # how many coming starts raise
        self.stop_gate: threading.Event | None = None  # a stop waits on it, if set
        self.stop_entered = threading.Event()
        self.stop_error: BaseException | None = None

    @property
    def live(self) -> bool:
        return self.phase == "live"

    def start(self) -> Callable[[], None]:
        with self.lock:
            self.overlapped |= self.phase != "idle"
            self.phase = "starting"
            self.timeline.append("start")
            self.threads.append(threading.current_thread())
        time.sleep(0)  # let other threads in, if anything would let them
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                self.timeline[-1] = "start-failed"
                self.phase = "idle"
                raise StartFailed("planned")
            self.phase = "live"
        return self.stop

    def stop(self) -> None:
        with self.lock:
            self.overlapped |= self.phase != "live"
            self.phase = "stopping"
            self.timeline.append("stop")
            self.threads.append(threading.current_thread())
        self.stop_entered.set()
        try:
            time.sleep(0)
            if self.stop_gate is not None:
                assert self.stop_gate.wait(WAIT * 2)
            if self.stop_error is not None:
                raise self.stop_error
        finally:
            with self.lock:
                self.phase = "idle"
            self.stopped.set()

    def count(self, what: str) -> int:
        with self.lock:
            return self.timeline.count(what)


class StartFailed(Exception):
    pass


def settled(op: Intermittent) -> bool:
    return not op.running and op.attachments == 0


# ====================================================================== Intermittent


def test_intermittent_rejects_a_non_callable_start(make_cluster: MakeCluster) -> None:
    with pytest.raises(TypeError, match="start"):
        Intermittent(make_cluster(), 42)  # type: ignore[arg-type]


def test_intermittent_and_poll_reject_a_cluster_that_is_not_one() -> None:
    with pytest.raises(TypeError, match="cluster"):
        Intermittent(object(), lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cluster"):
        poll(None, lambda: None, 1)  # type: ignore[arg-type]


def test_first_attach_calls_start_on_the_callers_thread(make_cluster: MakeCluster) -> None:
    rec = Recorder()
    op = Intermittent(make_cluster(), rec.start)
    assert not op.running
    with op.attach():
        assert rec.timeline == ["start"]
        assert rec.threads == [threading.current_thread()]
        assert op.running


def test_later_attachments_only_count(make_cluster: MakeCluster) -> None:
    rec = Recorder()
    op = Intermittent(make_cluster(), rec.start)
    holds = [op.attach() for _ in range(3)]
    assert rec.timeline == ["start"]
    assert op.attachments == 3
    for hold in holds[:2]:
        hold.detach()
    assert op.running and op.attachments == 1
    assert rec.timeline == ["start"]  # no stop while one is still held
    holds[2].detach()
    assert rec.stopped.wait(WAIT)
    assert rec.timeline == ["start", "stop"]


def test_attachment_is_a_context_manager_that_detaches_on_exit(
    make_cluster: MakeCluster,
) -> None:
    rec = Recorder()
    op = Intermittent(make_cluster(), rec.start)
    with op.attach() as hold:
        assert isinstance(hold, Attachment) and hold.attached
    assert not hold.attached
    assert rec.stopped.wait(WAIT)


def test_detach_is_idempotent_and_never_releases_another_hold(
    make_cluster: MakeCluster,
) -> None:
    rec = Recorder()
    op = Intermittent(make_cluster(), rec.start)
    first, second = op.attach(), op.attach()
    first.detach()
    first.detach()
    first.detach()
    assert op.attachments == 1 and op.running
    assert rec.count("stop") == 0
    second.detach()
    second.detach()
    assert rec.stopped.wait(WAIT)
    assert wait_until(lambda: settled(op))
    assert rec.count("stop") == 1


def test_last_detach_runs_stop_on_a_cluster_thread(make_cluster: MakeCluster) -> None:
    rec = Recorder()
    op = Intermittent(make_cluster(), rec.start)
    op.attach().detach()
    assert rec.stopped.wait(WAIT)
    stopper = rec.threads[1]
    assert stopper is not threading.current_thread()
    assert stopper.name.startswith("cluster-")


def test_detach_returns_without_waiting_for_the_stop(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    rec = Recorder()
    rec.stop_gate = new_event()
    op = Intermittent(make_cluster(), rec.start)
    hold = op.attach()
    hold.detach()  # returns although the stop will block until the gate opens
    assert rec.stop_entered.wait(WAIT)
    assert not rec.stopped.is_set()
    rec.stop_gate.set()
    assert rec.stopped.wait(WAIT)


def test_running_stays_true_until_the_stop_has_run(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    rec = Recorder()
    rec.stop_gate = new_event()
    op = Intermittent(make_cluster(), rec.start)
    op.attach().detach()
    assert rec.stop_entered.wait(WAIT)
    assert op.running and op.attachments == 0
    rec.stop_gate.set()
    assert wait_until(lambda: not op.running)


def test_failed_start_propagates_and_leaves_nothing_held(make_cluster: MakeCluster) -> None:
    rec = Recorder()
    rec.fail_next = 1
    op = Intermittent(make_cluster(), rec.start)
    with pytest.raises(StartFailed):
        op.attach()
    assert settled(op)
    with op.attach():  # a later attach starts it afresh
        assert op.running and op.attachments == 1
    assert rec.stopped.wait(WAIT)
    assert rec.timeline == ["start-failed", "start", "stop"]  # no stop for the failed start


def test_start_returning_a_non_callable_is_a_type_error_and_nothing_is_held(
    make_cluster: MakeCluster,
) -> None:
    op = Intermittent(make_cluster(), lambda: 42)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="callable or None"):
        op.attach()
    assert settled(op)


def test_start_returning_none_stops_at_once_and_restarts(make_cluster: MakeCluster) -> None:
    starts: list[int] = []

    def start() -> None:
        starts.append(1)

    op = Intermittent(make_cluster(), start)
    with op.attach():
        assert op.running
    assert not op.running  # no stop callable: nothing to wait for
    with op.attach():
        pass
    assert len(starts) == 2


def test_attach_during_a_start_that_fails_calls_start_itself(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    gate, entered = new_event(), new_event()
    calls: list[str] = []

    def start() -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            entered.set()
            assert gate.wait(WAIT)
            raise StartFailed("first")

    op = Intermittent(make_cluster(), start)
    first = Call(op.attach, name="first")
    assert entered.wait(WAIT)
    second = Call(op.attach, name="second")
    assert wait_until(lambda: waiters(op._changed) == 1)  # second waits for first's start
    gate.set()
    with pytest.raises(StartFailed):
        first.outcome()
    hold = second.outcome()  # not the first's error: it started the operation itself
    assert isinstance(hold, Attachment) and hold.attached
    assert calls == ["first", "second"]
    assert op.running and op.attachments == 1
    hold.detach()


def test_attach_during_a_start_that_succeeds_counts_without_starting(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    gate, entered = new_event(), new_event()
    calls: list[int] = []

    def start() -> None:
        calls.append(1)
        entered.set()
        assert gate.wait(WAIT)

    op = Intermittent(make_cluster(), start)
    first = Call(op.attach)
    assert entered.wait(WAIT)
    second = Call(op.attach)
    assert wait_until(lambda: waiters(op._changed) == 1)
    assert not op.running  # not until start() has returned
    gate.set()
    holds = [first.outcome(), second.outcome()]
    assert calls == [1]
    assert op.attachments == 2
    for hold in holds:
        hold.detach()


def test_a_stop_that_raises_is_logged_and_the_next_attach_starts_again(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    rec.stop_error = RuntimeError("stop broke")
    op = Intermittent(make_cluster(), rec.start)
    with caplog.at_level(logging.ERROR, logger="cluster"):
        op.attach().detach()
        assert rec.stopped.wait(WAIT)
        assert wait_until(lambda: not op.running)
    errors = [r for r in caplog.records if r.name == "cluster" and r.exc_info]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[1] is rec.stop_error
    rec.stop_error = None
    with op.attach():
        assert op.running
    assert rec.timeline[:3] == ["start", "stop", "start"]


def test_a_blocking_stop_does_not_delay_attach_or_detach_of_another_intermittent(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(2)
    slow = Recorder()
    slow.stop_gate = new_event()
    other = Recorder()
    op_slow, op_other = Intermittent(c, slow.start), Intermittent(c, other.start)
    op_slow.attach().detach()
    assert slow.stop_entered.wait(WAIT)  # blocked on a worker now
    for _ in range(3):
        with op_other.attach():
            pass
        assert other.stopped.wait(WAIT)
        other.stopped.clear()
    assert other.timeline == ["start", "stop"] * 3
    assert not slow.stopped.is_set()  # all that happened while the slow stop blocked


def test_a_reattach_waits_for_the_pending_stop_of_the_same_intermittent(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    rec = Recorder()
    rec.stop_gate = new_event()
    op = Intermittent(make_cluster(2), rec.start)
    op.attach().detach()
    assert rec.stop_entered.wait(WAIT)
    again = Call(op.attach)
    assert wait_until(lambda: waiters(op._changed) == 1)
    assert rec.timeline == ["start", "stop"]  # no start while the stop runs
    rec.stop_gate.set()
    hold = again.outcome()
    assert rec.timeline == ["start", "stop", "start"]
    assert not rec.overlapped
    hold.detach()


def test_a_reattach_runs_a_stop_the_cluster_has_not_begun(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate, busy = new_event(), new_event()

    def blocker() -> None:
        busy.set()
        assert gate.wait(WAIT * 2)

    c.add_task(blocker).submit()
    assert busy.wait(WAIT)  # the only worker is taken: the stop task has to queue
    rec = Recorder()
    op = Intermittent(c, rec.start)
    op.attach().detach()
    with op.attach():  # does not wait for the worker: runs the queued stop itself
        assert rec.timeline == ["start", "stop", "start"]
        assert rec.threads[1] is threading.current_thread()
    gate.set()
    assert c.add_task(lambda: None).submit().wait(WAIT) is not None  # the queue has drained
    assert wait_until(lambda: rec.count("stop") == 2)
    assert rec.timeline == ["start", "stop", "start", "stop"]  # the first stop ran once


def test_attach_detach_attach_inside_a_task_of_a_one_worker_cluster_does_not_deadlock(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(1)
    rec = Recorder()
    op = Intermittent(c, rec.start)

    def task() -> list[str]:
        for _ in range(3):
            with op.attach():
                pass
        return list(rec.timeline)

    timeline = c.add_task(task).submit().result(timeout=WAIT)
    assert timeline == ["start", "stop", "start", "stop", "start"]


def test_on_a_stopped_cluster_the_stop_runs_on_a_fresh_thread(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster()
    rec = Recorder()
    op = Intermittent(c, rec.start)
    hold = op.attach()
    c.stop()
    hold.detach()  # the cluster refuses the task: the stop still runs, once
    assert rec.stopped.wait(WAIT)
    stopper = rec.threads[1]
    assert stopper is not threading.current_thread()
    assert stopper.name.startswith("cluster-intermittent-stop")
    with op.attach():  # attach still works: start() needs no cluster
        pass
    assert wait_until(lambda: rec.count("stop") == 2)


def test_a_stop_task_cancelled_before_it_ran_still_runs_once(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate, busy = new_event(), new_event()

    def blocker() -> None:
        busy.set()
        gate.wait(WAIT * 2)

    c.add_task(blocker).submit()
    assert busy.wait(WAIT)
    rec = Recorder()
    op = Intermittent(c, rec.start)
    op.attach().detach()  # queued behind the blocker
    c.cancel()  # cancels the queued stop task before any worker took it
    assert rec.stopped.wait(WAIT)
    assert wait_until(lambda: not op.running)
    gate.set()
    assert rec.timeline == ["start", "stop"]


def test_attach_from_inside_start_raises_runtime_error(make_cluster: MakeCluster) -> None:
    op: Intermittent

    def start() -> None:
        op.attach()

    op = Intermittent(make_cluster(), start)
    with pytest.raises(RuntimeError, match="inside start"):
        op.attach()
    assert settled(op)


def test_attach_from_inside_the_stop_raises_runtime_error(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    seen: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    op: Intermittent

    def stop() -> None:
        try:
            op.attach()
        except BaseException as exc:
            seen.put(exc)
        else:
            seen.put(None)

    op = Intermittent(make_cluster(), lambda: stop)
    op.attach().detach()
    error = seen.get(timeout=WAIT)
    assert isinstance(error, RuntimeError) and "stop callable" in str(error)
    assert wait_until(lambda: settled(op))


def _stress(c: Cluster, plans: list[list[int]], failing: set[int]) -> None:
    """Threads attach and detach by ``plans``; check the timeline.

    Each step of a plan is a nesting depth: take that many holds, then release them;
    0 pauses for a millisecond instead, which lets a worker take a pending stop
    (otherwise the next attach nearly always runs it itself).
    """
    rec = Recorder()
    starts = iter(range(10**9))
    start_lock = threading.Lock()

    def start() -> Callable[[], None]:
        with start_lock:
            number = next(starts)
        if number in failing:
            with rec.lock:
                rec.fail_next += 1
        return rec.start()

    op = Intermittent(c, start)
    problems: list[str] = []
    barrier = threading.Barrier(len(plans))

    def worker(plan: list[int]) -> None:
        barrier.wait(WAIT)
        for depth in plan:
            if not depth:
                time.sleep(0.001)  # a perturbation, not a synchronisation
                continue
            holds: list[Attachment] = []
            for _ in range(depth):
                try:
                    holds.append(op.attach())
                except StartFailed:
                    continue
                if not rec.live:
                    problems.append("held while not started")
            for hold in holds:
                if not rec.live:
                    problems.append("stopped while held")
                hold.detach()

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 4)
    assert not any(thread.is_alive() for thread in threads)
    assert wait_until(lambda: settled(op)), op
    assert problems == []
    assert not rec.overlapped
    with rec.lock:
        timeline = [step for step in rec.timeline if step != "start-failed"]
        assert not rec.live
    # start and stop alternate, and every start has exactly one stop by the end
    assert timeline == ["start", "stop"] * (len(timeline) // 2)


@pytest.mark.timeout(120)
def test_stress_eight_threads_attach_and_detach(make_cluster: MakeCluster) -> None:
    rng = random.Random(19)
    plans = [[rng.randint(0, 3) for _ in range(200)] for _ in range(8)]
    failing = set(rng.sample(range(300), 40))
    _stress(make_cluster(2), plans, failing)


@pytest.mark.timeout(180)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plans=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=8, max_size=8),
    failing=st.sets(st.integers(0, 40), max_size=10),
    workers=st.integers(1, 3),
)
def test_attach_detach_timeline_invariants_hold_for_any_schedule(
    make_cluster: MakeCluster, plans: list[list[int]], failing: set[int], workers: int
) -> None:
    _stress(make_cluster(workers), plans, failing)


# ====================================================================== poll


def test_poll_validates_its_arguments_at_the_call(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    with pytest.raises(TypeError, match="action"):
        poll(c, "nope", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        poll(c, lambda: None, 0)
    with pytest.raises(ValueError, match="every"):
        poll(c, lambda: None, -1.0)
    with pytest.raises(TypeError, match="every"):
        poll(c, lambda: None, "1")  # type: ignore[arg-type]


@needs_repeat
def test_poll_runs_nothing_until_attached_then_runs_at_once(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(2)
    calls: queue.SimpleQueue[float] = queue.SimpleQueue()
    op = poll(c, lambda: calls.put(0.0), 3600)
    assert calls.empty() and not op.running
    with op.attach():
        calls.get(timeout=WAIT)  # the first run does not wait `every` seconds


@needs_repeat
def test_poll_repeats_while_attached_and_stops_when_released(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(2)
    calls: queue.SimpleQueue[int] = queue.SimpleQueue()
    op = poll(c, lambda: calls.put(1), 0.02)
    with op.attach():
        for _ in range(3):
            calls.get(timeout=WAIT)
    assert wait_until(lambda: not op.running)
    while not calls.empty():  # a run may have begun before the release
        calls.get()
    with pytest.raises(queue.Empty):
        calls.get(timeout=0.2)  # ten periods: the series has ended


@needs_repeat
def test_poll_reattach_starts_a_new_series(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    calls: queue.SimpleQueue[int] = queue.SimpleQueue()
    op = poll(c, lambda: calls.put(1), 3600)
    with op.attach():
        calls.get(timeout=WAIT)
    with op.attach():
        calls.get(timeout=WAIT)  # at once again: a new series, not the old grid


@needs_repeat
def test_poll_stop_waits_for_the_action_in_progress(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(2)
    gate, entered = new_event(), new_event()
    inside = threading.Semaphore(1)
    overlaps: list[int] = []

    def action() -> None:
        if not inside.acquire(blocking=False):
            overlaps.append(1)
            return
        try:
            entered.set()
            gate.wait(WAIT)
        finally:
            inside.release()

    op = poll(c, action, 3600)
    op.attach().detach()
    assert entered.wait(WAIT)
    # The re-attach waits (for the stop on a worker, or running the stop itself),
    # since the stop waits for the call of action in progress.
    again = Call(op.attach)
    again.thread.join(0.1)
    assert not again.done()
    assert op.running
    gate.set()
    again.outcome().detach()
    assert overlaps == []


@needs_repeat
def test_poll_attach_on_a_stopped_cluster_raises_and_holds_nothing(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster(2)
    c.stop()
    op = poll(c, lambda: None, 1)
    with pytest.raises(ClusterStoppedError):
        op.attach()
    assert settled(op)


# ====================================================================== Lifecycle


def _noop(ctx: LifecycleContext, config: Any) -> None:
    pass


def test_lifecycle_rejects_non_callables_naming_them() -> None:
    with pytest.raises(TypeError, match="apply_config"):
        Lifecycle(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read_config"):
        Lifecycle(_noop, read_config="json")  # type: ignore[arg-type]


def test_configure_rejects_data_that_is_not_bytes_or_str() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    lc.start()
    with pytest.raises(TypeError, match="data"):
        lc.configure({"a": 1})  # type: ignore[arg-type]
    assert lc.state == "active"


def test_lifecycle_states_across_start_and_stop() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    assert lc.state == "inactive"
    lc.start()
    assert lc.state == "active"
    lc.start()  # a no-op
    assert lc.state == "active"
    lc.stop()
    assert lc.state == "inactive"
    lc.stop()  # a no-op
    assert lc.state == "inactive"
    lc.start()
    assert lc.state == "active"


def test_configure_before_start_raises_runtime_error() -> None:
    applied: list[Any] = []
    lc: Lifecycle[Any] = Lifecycle(lambda ctx, cfg: applied.append(cfg))
    with pytest.raises(RuntimeError, match="not started"):
        lc.configure("{}")
    assert applied == [] and lc.state == "inactive"


def test_configure_after_stop_raises_runtime_error_until_the_next_start() -> None:
    applied: list[Any] = []
    lc: Lifecycle[Any] = Lifecycle(lambda ctx, cfg: applied.append(cfg))
    lc.start()
    lc.stop()
    with pytest.raises(RuntimeError):
        lc.configure("1")
    lc.start()
    lc.configure("2")
    assert applied == [2]


def test_configure_decodes_json_and_applies_on_the_callers_thread_while_loading() -> None:
    seen: list[tuple[Any, str, threading.Thread]] = []
    lc: Lifecycle[Any]

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        seen.append((cfg, lc.state, threading.current_thread()))

    lc = Lifecycle(apply)
    lc.start()
    lc.configure(b'{"port": 80}')
    lc.configure('["str", "too"]')
    assert seen == [
        ({"port": 80}, "loading", threading.current_thread()),
        (["str", "too"], "loading", threading.current_thread()),
    ]
    assert lc.state == "active"


def test_configure_uses_the_given_read_config() -> None:
    applied: list[Any] = []
    lc: Lifecycle[str] = Lifecycle(
        lambda ctx, cfg: applied.append(cfg), read_config=lambda d: f"decoded {d!r}"
    )
    lc.start()
    lc.configure(b"raw")
    assert applied == ["decoded b'raw'"]


def test_a_decoding_error_is_raised_from_configure_and_sets_error() -> None:
    applied: list[Any] = []
    lc: Lifecycle[Any] = Lifecycle(lambda ctx, cfg: applied.append(cfg))
    lc.start()
    with pytest.raises(ValueError):  # json.JSONDecodeError
        lc.configure("{not json")
    assert lc.state == "error"
    assert applied == []


def test_an_apply_error_is_raised_from_configure_and_sets_error_until_a_good_one() -> None:
    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        if cfg == "bad":
            raise KeyError("bad config")

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    with pytest.raises(KeyError):
        lc.configure('"bad"')
    assert lc.state == "error"
    lc.configure('"good"')  # an error is not final: configure again
    assert lc.state == "active"


def test_ctx_stays_valid_after_apply_until_the_next_configure() -> None:
    contexts: list[LifecycleContext] = []
    lc: Lifecycle[Any] = Lifecycle(lambda ctx, cfg: contexts.append(ctx))
    lc.start()
    lc.configure("1")
    first = contexts[0]
    assert not first.cancelled.is_set()
    first.check()  # does not raise
    lc.configure("2")
    assert first.cancelled.is_set() and first.reason == "superseded"
    with pytest.raises(TaskCancelledError):
        first.check()
    assert not contexts[1].cancelled.is_set()


def test_stop_cancels_the_current_ctx() -> None:
    contexts: list[LifecycleContext] = []
    lc: Lifecycle[Any] = Lifecycle(lambda ctx, cfg: contexts.append(ctx))
    lc.start()
    lc.configure("1")
    lc.stop()
    assert contexts[0].cancelled.is_set() and contexts[0].reason == "stopped"
    with pytest.raises(TaskCancelledError):
        contexts[0].check()


def test_a_later_configure_cancels_the_running_apply_and_waits_for_it(
    new_event: NewEvent,
) -> None:
    gate = new_event()
    entered: queue.SimpleQueue[tuple[Any, LifecycleContext]] = queue.SimpleQueue()
    returned: list[Any] = []

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        entered.put((cfg, ctx))
        if cfg == 1:
            assert gate.wait(WAIT)
        returned.append(cfg)

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    first = Call(lambda: lc.configure("1"))
    cfg, ctx = entered.get(timeout=WAIT)
    assert cfg == 1
    second = Call(lambda: lc.configure("2"))
    assert ctx.cancelled.wait(WAIT)  # at once, while the first apply still runs
    assert wait_until(lambda: waiters(lc._changed) == 1)  # the second waits for it
    assert entered.empty() and lc.state == "loading"
    gate.set()
    first.outcome()  # the first ignored its ctx: it was applied and returns normally
    second.outcome()
    assert returned == [1, 2]
    assert lc.state == "active"


def test_a_superseded_apply_that_checks_raises_cancelled_without_an_error_state(
    new_event: NewEvent,
) -> None:
    entered = new_event()

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        if cfg == 1:
            entered.set()
            assert ctx.cancelled.wait(WAIT)
            ctx.check()

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    first = Call(lambda: lc.configure("1"))
    assert entered.wait(WAIT)
    lc.configure("2")
    with pytest.raises(TaskCancelledError, match="later configure"):
        first.outcome()
    assert lc.state == "active"
    # every transition so far: being superseded was not an "error"
    assert list(lc._recent) == ["active", "loading", "active"]


def test_configure_calls_are_applied_one_at_a_time_in_call_order(
    new_event: NewEvent,
) -> None:
    gate = new_event()
    order: list[int] = []
    lock = threading.Lock()
    inside: list[int] = []  # applies in progress
    overlaps: list[int] = []

    def apply(ctx: LifecycleContext, cfg: int) -> None:
        with lock:
            if inside:
                overlaps.append(cfg)
            inside.append(cfg)
            order.append(cfg)
        if cfg == 0:
            assert gate.wait(WAIT)
        time.sleep(0)
        with lock:
            inside.remove(cfg)

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    calls = [Call(lambda: lc.configure("0"))]
    assert wait_until(lambda: order == [0])
    for n in range(1, 9):
        calls.append(Call(functools.partial(lc.configure, str(n))))
        assert wait_until(functools.partial(lambda k: len(lc._turns) == k, n + 1))
    gate.set()
    for call in calls:
        call.outcome()
    assert order == list(range(9))
    assert overlaps == []


def test_stop_during_an_apply_goes_inactive_at_once_and_the_late_return_changes_nothing(
    new_event: NewEvent,
) -> None:
    gate, entered = new_event(), new_event()
    contexts: list[LifecycleContext] = []

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        contexts.append(ctx)
        entered.set()
        assert gate.wait(WAIT)

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    call = Call(lambda: lc.configure("1"))
    assert entered.wait(WAIT)
    lc.stop()  # does not wait for the apply
    assert lc.state == "inactive"
    assert contexts[0].reason == "stopped"
    gate.set()
    call.outcome()  # the apply returned normally: so does its configure
    assert lc.state == "inactive"


def test_stop_during_an_apply_that_raises_leaves_inactive(new_event: NewEvent) -> None:
    entered = new_event()

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        entered.set()
        ctx.cancelled.wait(WAIT)
        ctx.check()

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    call = Call(lambda: lc.configure("1"))
    assert entered.wait(WAIT)
    lc.stop()
    with pytest.raises(TaskCancelledError):
        call.outcome()
    assert lc.state == "inactive"  # not "error"


def test_stop_cancels_configure_calls_still_waiting_for_their_turn(
    new_event: NewEvent,
) -> None:
    gate, entered = new_event(), new_event()
    applied: list[Any] = []

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        applied.append(cfg)
        if cfg == 1:
            entered.set()
            assert gate.wait(WAIT)

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    running = Call(lambda: lc.configure("1"))
    assert entered.wait(WAIT)
    waiting = [Call(lambda: lc.configure("2")), Call(lambda: lc.configure("3"))]
    assert wait_until(lambda: len(lc._turns) == 3)
    lc.stop()
    for call in waiting:  # at once, while the first apply still blocks
        with pytest.raises(TaskCancelledError, match="stopped"):
            call.outcome()
    gate.set()
    running.outcome()
    assert applied == [1]


def test_after_a_restart_configure_waits_for_the_apply_stop_abandoned(
    new_event: NewEvent,
) -> None:
    gate, entered = new_event(), new_event()
    order: list[Any] = []

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        order.append(("begin", cfg))
        if cfg == 1:
            entered.set()
            assert gate.wait(WAIT)
        order.append(("end", cfg))

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    old = Call(lambda: lc.configure("1"))
    assert entered.wait(WAIT)
    lc.stop()
    lc.start()
    assert lc.state == "active"
    new = Call(lambda: lc.configure("2"))
    assert wait_until(lambda: waiters(lc._changed) == 1)
    gate.set()
    old.outcome()
    new.outcome()
    assert order == [("begin", 1), ("end", 1), ("begin", 2), ("end", 2)]
    assert lc.state == "active"


def test_configure_from_inside_apply_config_raises_runtime_error() -> None:
    errors: list[BaseException] = []
    lc: Lifecycle[Any]

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        try:
            lc.configure("2")
        except RuntimeError as exc:
            errors.append(exc)

    lc = Lifecycle(apply)
    lc.start()
    lc.configure("1")
    assert len(errors) == 1 and "inside apply_config" in str(errors[0])
    assert lc.state == "active"


def test_wait_for_state_change_returns_at_once_if_the_state_differs() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    assert lc.wait_for_state_change("active", timeout=0) == "inactive"


def test_wait_for_state_change_times_out() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    with pytest.raises(TimeoutError):
        lc.wait_for_state_change("inactive", timeout=0.05)


def test_wait_for_state_change_validates_its_arguments() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    with pytest.raises(ValueError, match="source"):
        lc.wait_for_state_change("running", timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        lc.wait_for_state_change("active", timeout=-1)


def test_wait_for_state_change_wakes_on_start_and_stop() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    waiter = Call(lambda: lc.wait_for_state_change("inactive", timeout=WAIT))
    assert wait_until(lambda: waiters(lc._changed) == 1)
    lc.start()
    assert waiter.outcome() == "active"
    waiter = Call(lambda: lc.wait_for_state_change("active", timeout=WAIT))
    assert wait_until(lambda: waiters(lc._changed) == 1)
    lc.stop()
    assert waiter.outcome() == "inactive"


def test_wait_for_state_change_reports_the_outcome_of_a_configure(
    new_event: NewEvent,
) -> None:
    gate, entered = new_event(), new_event()

    def apply(ctx: LifecycleContext, cfg: Any) -> None:
        entered.set()
        assert gate.wait(WAIT)
        if cfg == "bad":
            raise ValueError(cfg)

    lc: Lifecycle[Any] = Lifecycle(apply)
    lc.start()
    call = Call(lambda: lc.configure('"bad"'))
    assert entered.wait(WAIT)
    assert lc.state == "loading"
    waiter = Call(lambda: lc.wait_for_state_change("loading", timeout=WAIT))
    assert wait_until(lambda: waiters(lc._changed) == 1)
    gate.set()
    assert waiter.outcome() == "error"
    with pytest.raises(ValueError):
        call.outcome()


def test_wait_for_state_change_does_not_miss_a_change_away_and_back() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    lc.start()
    waiter = Call(lambda: lc.wait_for_state_change("active", timeout=WAIT))
    assert wait_until(lambda: waiters(lc._changed) == 1)
    # active -> loading -> active in one critical section: the waiter cannot wake
    # in between, and still sees that the state changed (and what it changed to).
    with lc._lock:
        lc._set_state_locked("loading")
        lc._set_state_locked("active")
    assert waiter.outcome() == "loading"
    assert lc.state == "active"


def test_wait_for_state_change_sees_a_quick_configure_through_the_public_api() -> None:
    lc: Lifecycle[Any] = Lifecycle(_noop)
    lc.start()
    waiter = Call(lambda: lc.wait_for_state_change("active", timeout=WAIT))
    assert wait_until(lambda: waiters(lc._changed) == 1)
    lc.configure("{}")  # active -> loading -> active, probably before the waiter runs
    assert waiter.outcome() == "loading"
