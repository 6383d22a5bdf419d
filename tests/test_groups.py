"""SPEC §12 ``Cluster.group()`` with real worker threads.

``g.add_task(...).submit()`` joins the group; ``handles`` and ``wait()`` in
submission order; ``wait(timeout)`` and ``as_completed(timeout)``; ``cancel()``;
``fail_fast``; and the group as a context manager, as ``asyncio.TaskGroup``
behaves: it waits for every task, raises an ``ExceptionGroup`` of the failures
(cancellations are not failures), an exception of the block cancels the
unfinished tasks and joins the group, a ``KeyboardInterrupt`` is re-raised as
itself, and a group whose block ended takes no more tasks.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _keys_helpers import WAIT, Clusters, Tracker, take, takes
from conftest import EventFactory

from cluster import TaskCancelledError, TaskGroup, TaskHandle, current


@pytest.fixture
def clusters(new_event: EventFactory) -> Iterator[Clusters]:
    made = Clusters()
    yield made
    new_event.release_all()
    made.close()


class Planned(Exception):
    """A task's planned failure."""


def gated(gate: threading.Event, value: Any = None, error: BaseException | None = None) -> Any:
    """Wait for ``gate`` (or the task's cancellation), then return ``value`` or raise."""
    ctx = current()
    if not gate.wait(WAIT):
        raise TimeoutError("gate never opened")
    ctx.check()
    if error is not None:
        raise error
    return value


def cooperative(started: threading.Event) -> str:
    """Run until cancelled (signals ``started`` first)."""
    started.set()
    if not current().cancelled.wait(WAIT):
        raise TimeoutError("never cancelled")
    current().check()
    return "not cancelled"


def fail(message: str) -> None:
    raise Planned(message)


# ---------------------------------------------------------------- handles, wait, as_completed


def test_tasks_submitted_through_the_group_join_it_in_submission_order(
    clusters: Clusters,
) -> None:
    c = clusters.make(2, run=False)
    g = c.group()
    handles = [g.add_task(int, i).with_priority(-i).submit() for i in range(5)]
    assert g.handles == handles
    assert all(isinstance(h, TaskHandle) for h in g.handles)
    g.handles.clear()  # a copy: the group is unchanged
    assert len(g.handles) == 5


def test_a_plain_cluster_submit_does_not_join_a_group(clusters: Clusters) -> None:
    c = clusters.make(2)
    g = c.group()
    inside = g.add_task(int, 1).submit()
    c.add_task(int, 2).submit().result(WAIT)
    assert g.handles == [inside]


def test_wait_gives_the_results_in_submission_order_whatever_order_they_end_in(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(4)
    g = c.group()
    gates = [new_event() for _ in range(4)]
    for i, gate in enumerate(gates):
        g.add_task(gated, gate, i).submit()
    for gate in reversed(gates):
        gate.set()
    results = g.wait(WAIT)
    assert [r.value for r in results] == [0, 1, 2, 3]
    assert all(r.ok for r in results)


def test_wait_gives_failures_as_results_without_raising(clusters: Clusters) -> None:
    c = clusters.make(2)
    g = c.group()
    g.add_task(int, 5).submit()
    g.add_task(fail, "x").submit()
    ok, bad = g.wait(WAIT)
    assert ok.value == 5 and isinstance(bad.error, Planned)


def test_wait_raises_timeout_error_if_a_task_is_not_done_in_time(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    g = c.group()
    gate = new_event()
    g.add_task(int).submit()
    stuck = g.add_task(gated, gate, "late").submit()
    with pytest.raises(TimeoutError):
        g.wait(0.05)
    assert not stuck.done()  # a timeout of the wait is not a cancel
    gate.set()
    assert [r.value for r in g.wait(WAIT)] == [0, "late"]


def test_wait_on_an_empty_group_returns_an_empty_list(clusters: Clusters) -> None:
    assert clusters.make(1).group().wait(0) == []


def test_as_completed_yields_the_handles_as_their_tasks_end(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(4)
    g = c.group()
    gates = [new_event() for _ in range(3)]
    handles = [g.add_task(gated, gate, i).submit() for i, gate in enumerate(gates)]
    done = g.add_task(int, 9).submit()
    done.result(WAIT)  # ended before the iteration: yielded first
    it = g.as_completed(WAIT)
    assert next(it) is done
    for n in (2, 0, 1):
        gates[n].set()
        assert next(it) is handles[n]
    with pytest.raises(StopIteration):
        next(it)


def test_as_completed_raises_timeout_error_if_a_task_is_not_done_in_time(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    g = c.group()
    quick = g.add_task(int).submit()
    g.add_task(gated, new_event()).submit()
    quick.result(WAIT)
    it = g.as_completed(timeout=0.05)
    assert next(it) is quick
    with pytest.raises(TimeoutError):
        next(it)


# ---------------------------------------------------------------- cancel


def test_cancel_cancels_every_unfinished_task_and_says_how_many(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(1)
    g = c.group()
    finished = g.add_task(int, 1).submit()
    finished.result(WAIT)
    started = new_event()
    running = g.add_task(cooperative, started).submit()
    assert started.wait(WAIT)
    queued = g.add_task(int, 2).submit()
    assert g.cancel() == 2
    assert g.cancel() == 0
    results = g.wait(WAIT)
    assert results[0].value == 1
    assert isinstance(results[1].error, TaskCancelledError)
    assert isinstance(results[2].error, TaskCancelledError)
    assert running.done() and queued.done()


# ---------------------------------------------------------------- fail_fast


def test_fail_fast_the_first_error_cancels_the_rest(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    g = c.group(fail_fast=True)
    started = new_event()
    running = g.add_task(cooperative, started).submit()
    assert started.wait(WAIT)
    trigger = new_event()
    failing = g.add_task(gated, trigger, None, Planned("first")).submit()
    queued = [g.add_task(int, i).with_delay(3600).submit() for i in range(3)]
    trigger.set()
    results = g.wait(WAIT)
    assert isinstance(failing.wait(0).error, Planned)  # type: ignore[union-attr]
    assert isinstance(results[0].error, TaskCancelledError)
    assert results[0].error.reason == "cancelled"  # the ordinary cancel
    assert all(isinstance(r.error, TaskCancelledError) for r in results[2:])
    assert running.done() and all(h.done() for h in queued)


def test_fail_fast_does_not_touch_tasks_that_already_succeeded(clusters: Clusters) -> None:
    c = clusters.make(2)
    g = c.group(fail_fast=True)
    ok = g.add_task(int, 3).submit()
    assert ok.result(WAIT) == 3
    g.add_task(fail, "late").submit()
    results = g.wait(WAIT)
    assert results[0].value == 3 and isinstance(results[1].error, Planned)


def test_fail_fast_cancels_a_task_added_after_it_fired(clusters: Clusters) -> None:
    c = clusters.make(2)
    g = c.group(fail_fast=True)
    g.add_task(fail, "first").submit().wait(WAIT)
    late = g.add_task(int, 1).with_delay(3600).submit()
    result = late.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskCancelledError)


def test_a_cancellation_does_not_trip_fail_fast(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    g = c.group(fail_fast=True)
    victim = g.add_task(int).with_delay(3600).submit()
    gate = new_event()
    other = g.add_task(gated, gate, "ok").submit()
    assert victim.cancel()
    gate.set()
    assert other.result(WAIT) == "ok"


def test_without_fail_fast_an_error_cancels_nothing(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    g = c.group()
    gate = new_event()
    slow = g.add_task(gated, gate, "slow").submit()
    g.add_task(fail, "x").submit().wait(WAIT)
    assert not slow.done()
    gate.set()
    assert slow.result(WAIT) == "slow"


def test_fail_fast_must_be_a_bool(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    with pytest.raises(TypeError, match="fail_fast"):
        c.group(fail_fast=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- as a context manager


def test_leaving_the_block_waits_for_every_task(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(3)
    t = Tracker()
    gate = new_event()

    def release_once_started() -> None:
        take(t.started)
        gate.set()

    releaser = threading.Thread(target=release_once_started, daemon=True)
    with c.group() as g:
        handles: list[TaskHandle[Any]] = [
            g.add_task(t.body("slow", gate=gate)).submit(),
            g.add_task(int, 1).submit(),
        ]
        releaser.start()
    assert all(h.done() for h in handles)
    assert [h.result(0) for h in handles] == ["slow", 1]
    releaser.join(WAIT)


def test_the_block_raises_an_exception_group_of_the_failures(clusters: Clusters) -> None:
    c = clusters.make(3)
    with pytest.raises(ExceptionGroup) as caught, c.group() as g:
        first = g.add_task(fail, "one").submit()
        g.add_task(int, 1).submit()
        second = g.add_task(fail, "two").submit()
    errors = caught.value.exceptions
    assert len(errors) == 2
    assert {id(e) for e in errors} == {id(first.wait(0).error), id(second.wait(0).error)}  # type: ignore[union-attr]
    assert sorted(str(e) for e in errors) == ["one", "two"]


def test_a_block_whose_tasks_all_succeed_raises_nothing(clusters: Clusters) -> None:
    c = clusters.make(2)
    with c.group() as g:
        h = g.add_task(int, 4).submit()
    assert h.result(0) == 4


def test_cancellations_are_not_failures_of_the_group(clusters: Clusters) -> None:
    c = clusters.make(2)
    with c.group() as g:
        h = g.add_task(int).with_delay(3600).submit()
        g.add_task(int, 2).submit()
        assert c.cancel_task(h.id)
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]


def test_with_fail_fast_the_group_raises_only_the_real_failure(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    with pytest.raises(ExceptionGroup) as caught, c.group(fail_fast=True) as g:
        started = new_event()
        running = g.add_task(cooperative, started).submit()
        assert started.wait(WAIT)
        waiting = [g.add_task(int).with_delay(3600).submit() for _ in range(3)]
        g.add_task(fail, "the one").submit()
    assert [str(e) for e in caught.value.exceptions] == ["the one"]
    assert isinstance(running.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    assert all(isinstance(h.wait(0).error, TaskCancelledError) for h in waiting)  # type: ignore[union-attr]


def test_an_exception_of_the_block_cancels_unfinished_tasks_and_joins_the_group(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    started = new_event()
    problem = RuntimeError("the block failed")
    with pytest.raises(ExceptionGroup) as caught, c.group() as g:
        done = g.add_task(int, 1).submit()
        failed = g.add_task(fail, "task").submit()
        done.result(WAIT)
        failed.wait(WAIT)
        running = g.add_task(cooperative, started).submit()
        queued = g.add_task(int).with_delay(3600).submit()
        assert started.wait(WAIT)
        raise problem
    errors = caught.value.exceptions
    assert errors[-1] is problem  # the block's own exception, inside the group
    assert [type(e) for e in errors] == [Planned, RuntimeError]
    assert done.result(0) == 1
    assert isinstance(running.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    assert isinstance(queued.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]


def test_an_exception_of_the_block_alone_is_raised_inside_a_group(clusters: Clusters) -> None:
    c = clusters.make(2)
    with pytest.raises(ExceptionGroup) as caught, c.group() as g:
        h = g.add_task(int).with_delay(3600).submit()
        raise KeyError("k")
    assert [type(e) for e in caught.value.exceptions] == [KeyError]
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]


def test_a_keyboard_interrupt_of_the_block_is_re_raised_as_itself(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    started = new_event()
    with pytest.raises(KeyboardInterrupt) as caught, c.group() as g:
        running = g.add_task(cooperative, started).submit()
        queued = g.add_task(int).with_delay(3600).submit()
        failed = g.add_task(fail, "x").submit()
        failed.wait(WAIT)
        assert started.wait(WAIT)
        raise KeyboardInterrupt
    assert type(caught.value) is KeyboardInterrupt
    assert isinstance(running.wait(WAIT).error, TaskCancelledError)  # type: ignore[union-attr]
    assert isinstance(queued.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]


def test_a_group_whose_block_ended_takes_no_more_tasks(clusters: Clusters) -> None:
    c = clusters.make(2)
    with c.group() as g:
        g.add_task(int).submit()
    submitted = c.stats().submitted
    with pytest.raises(RuntimeError, match="TaskGroup"):
        g.add_task(int).submit()
    assert c.stats().submitted == submitted and len(g.handles) == 1


def test_a_task_of_the_group_may_add_to_the_group_while_the_block_runs(
    clusters: Clusters,
) -> None:
    c = clusters.make(2)
    added: list[TaskHandle[Any]] = []

    def spawn(group: TaskGroup) -> str:
        added.append(group.add_task(int, 7).submit())
        return "spawned"

    with c.group() as g:
        parent = g.add_task(spawn, g).submit()
        parent.result(WAIT)
    assert g.handles == [parent, *added]
    assert added[0].result(0) == 7


def test_groups_of_one_cluster_are_independent(clusters: Clusters) -> None:
    c = clusters.make(2)
    a = c.group(fail_fast=True)
    b = c.group()
    bh = b.add_task(int).with_delay(3600).submit()
    a.add_task(fail, "a").submit().wait(WAIT)
    assert not bh.done() and b.handles == [bh]
    assert b.cancel() == 1


def test_a_group_of_many_tasks_waits_for_all_of_them(clusters: Clusters) -> None:
    c = clusters.make(4)
    t = Tracker()
    with c.group() as g:
        for i in range(200):
            g.add_task(t.body(f"t{i}")).submit()
    assert sorted(takes(t.started, 200)) == sorted(f"t{i}" for i in range(200))
    assert [r.value for r in g.wait(0)] == [f"t{i}" for i in range(200)]


def test_handles_are_in_submission_order_when_threads_submit_at_once(
    clusters: Clusters,
) -> None:
    c = clusters.make(2, run=False)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the window is a few bytecodes
    try:
        for _ in range(10):
            g = c.group()
            barrier = threading.Barrier(8, timeout=WAIT)

            def submit_many(group: TaskGroup = g, b: threading.Barrier = barrier) -> None:
                b.wait()
                for _ in range(300):
                    group.add_task(int).with_delay(3600).submit()

            threads = [threading.Thread(target=submit_many) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            listed = [i.id for i in c.tasks(limit=10_000)][::-1]  # oldest first
            mine = {h.id for h in g.handles}
            assert [h.id for h in g.handles] == [i for i in listed if i in mine]
    finally:
        sys.setswitchinterval(old)


def test_a_task_that_raised_a_base_exception_is_reported_with_that_error(
    clusters: Clusters,
) -> None:
    c = clusters.make(2)

    def leave() -> None:
        raise SystemExit(3)

    with pytest.raises(BaseException) as caught, c.group() as g:
        h = g.add_task(leave).submit()
    error = h.wait(0).error  # type: ignore[union-attr]
    assert isinstance(error, SystemExit)
    raised = caught.value
    found = raised is error or (
        isinstance(raised, BaseExceptionGroup)
        and any(e is error or e.__cause__ is error for e in raised.exceptions)
    )
    assert found, f"{raised!r} does not carry the task's {error!r}"
