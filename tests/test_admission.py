"""SPEC §12 admission and places with real worker threads: ``max_pending`` (block or
reject; what counts as pending; blocked submits woken by ``stop()``/``cancel()``;
many submitting threads), ``reprioritize`` and ``reschedule`` (queued, delayed and
key-waiting tasks; ``False`` once started; unknown ids), and ``wait_idle`` (what it
waits for and what it does not).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from _keys_helpers import WAIT, Clusters, Tracker, pending, take, takes
from _semantics_tasks import eventually, in_thread
from conftest import EventFactory

from cluster import (
    ClusterError,
    ClusterStoppedError,
    FixedBackoff,
    QueueFullError,
    RetryMode,
    TaskHandle,
    TaskNotFoundError,
    TaskState,
    current,
)


@pytest.fixture
def clusters(new_event: EventFactory) -> Iterator[Clusters]:
    made = Clusters()
    yield made
    new_event.release_all()
    made.close()


def still_blocked(thread: threading.Thread) -> bool:
    """True if ``thread`` has not finished after a short real-time look (a bounded
    wait for something that must *not* happen; it cannot fail a correct cluster)."""
    thread.join(0.1)
    return thread.is_alive()


def fails_once() -> str:
    if current().attempt == 0:
        raise ConnectionError("attempt 0")
    return "retried"


# ---------------------------------------------------------------- max_pending


def test_a_submit_beyond_max_pending_blocks_until_a_task_starts(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(1, max_pending=2)
    t = Tracker()
    gates = [new_event() for _ in range(3)]
    running = c.add_task(t.body("a", gate=gates[0])).submit()
    assert take(t.started) == "a"  # started: it no longer counts
    queued = [c.add_task(t.body(x, gate=g)).submit() for x, g in zip("bc", gates[1:], strict=True)]
    submitter, out = in_thread(lambda: c.add_task(t.body("d")).submit())
    assert still_blocked(submitter)
    assert c.stats().submitted == 3
    gates[0].set()  # a ends, b starts: room for one
    assert take(t.started) == "b"
    submitter.join(WAIT)
    (late,) = out
    assert isinstance(late, TaskHandle)
    for gate in gates:
        gate.set()
    assert [h.result(WAIT) for h in [running, *queued, late]] == ["a", "b", "c", "d"]


def test_on_full_reject_raises_queue_full_error(clusters: Clusters) -> None:
    c = clusters.make(1, run=False, max_pending=3, on_full="reject")
    for _ in range(3):
        c.add_task(int).submit()
    with pytest.raises(QueueFullError) as caught:
        c.add_task(int).submit()
    assert isinstance(caught.value, ClusterError)
    assert c.stats().submitted == 3
    c.run()
    assert c.wait_idle(WAIT)
    assert c.add_task(int, 5).submit().result(WAIT) == 5  # room again once they ran


def test_a_rejected_submit_leaves_no_trace(clusters: Clusters) -> None:
    c = clusters.make(1, run=False, max_pending=1, on_full="reject")
    c.add_task(int).with_id("first").submit()
    with pytest.raises(QueueFullError):
        c.add_task(int).with_id("second").submit()
    with pytest.raises(TaskNotFoundError):
        c.info("second")
    assert [i.id for i in c.tasks()] == ["first"]


@pytest.mark.timeout(120)
def test_many_submitting_threads_lose_and_duplicate_nothing_and_respect_the_bound(
    clusters: Clusters,
) -> None:
    limit = 20
    c = clusters.make(4, max_pending=limit)
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def work(tid: str) -> str:
        with lock:
            calls[tid] += 1
        return tid

    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append(pending(c))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    handles: list[Any] = []
    handles_lock = threading.Lock()
    barrier = threading.Barrier(8, timeout=WAIT)

    def submitter(n: int) -> None:
        barrier.wait()
        for i in range(250):
            tid = f"s{n}-{i}"
            h = c.add_task(work, tid).with_id(tid).submit()
            with handles_lock:
                handles.append(h)

    threads = [threading.Thread(target=submitter, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert sorted(h.result(WAIT) for h in handles) == sorted(
        f"s{n}-{i}" for n in range(8) for i in range(250)
    )
    stop_sampling.set()
    sampler.join(WAIT)
    assert len(calls) == 2000 and set(calls.values()) == {1}
    assert samples and max(samples) <= limit
    stats = c.stats()
    assert stats.submitted == 2000 and stats.succeeded == 2000


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_a_blocked_submit_wakes_with_cluster_stopped_error_at_stop_or_cancel(
    clusters: Clusters, new_event: EventFactory, how: str
) -> None:
    c = clusters.make(1, max_pending=1)
    t = Tracker()
    gate = new_event()
    c.add_task(t.body("a", gate=gate)).submit()
    assert take(t.started) == "a"
    c.add_task(t.body("b")).submit()  # pending: the cluster is full
    submitter, out = in_thread(lambda: c.add_task(t.body("c")).submit())
    assert still_blocked(submitter)
    ender, _ = in_thread(c.stop if how == "stop" else c.cancel)
    submitter.join(WAIT)  # woken at once, while the running task still holds its worker
    assert not submitter.is_alive()
    assert isinstance(out[0], ClusterStoppedError)
    assert not gate.is_set()
    gate.set()
    ender.join(WAIT)


def test_several_blocked_submits_all_wake_at_stop(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(1, max_pending=1)
    gate = new_event()
    c.add_task(gate.wait, WAIT).submit()
    c.add_task(int).submit()
    blocked = [in_thread(lambda: c.add_task(int).submit()) for _ in range(5)]
    assert all(still_blocked(thread) for thread, _ in blocked)
    ender, _ = in_thread(c.stop)
    for thread, out in blocked:
        thread.join(WAIT)
        assert isinstance(out[0], ClusterStoppedError)
    gate.set()
    ender.join(WAIT)


def test_delayed_tasks_count_as_pending(clusters: Clusters) -> None:
    c = clusters.make(1, max_pending=2, on_full="reject")
    c.add_task(int).with_delay(3600).submit()
    c.add_task(int).with_delay(3600).submit()
    with pytest.raises(QueueFullError):
        c.add_task(int).submit()


def test_a_task_waiting_to_retry_counts_as_pending(clusters: Clusters) -> None:
    c, _ = clusters.fake(1, max_pending=1, on_full="reject")
    h = c.add_task(fails_once).with_retry(1).with_backoff(FixedBackoff(60)).submit()
    eventually(lambda: c.info(h.id).state is TaskState.RETRYING, "the retry's wait")
    with pytest.raises(QueueFullError):
        c.add_task(int).submit()


def test_an_immediate_retry_sleeping_its_backoff_counts_as_pending(clusters: Clusters) -> None:
    c, _ = clusters.fake(1, max_pending=1, on_full="reject")
    h = (
        c.add_task(fails_once)
        .with_retry(1)
        .with_backoff(FixedBackoff(60))
        .with_retry_mode(RetryMode.IMMEDIATE)
        .submit()
    )
    eventually(lambda: c.info(h.id).state is TaskState.RETRYING, "the retry's wait")
    with pytest.raises(QueueFullError):
        c.add_task(int).submit()


def test_a_task_waiting_for_its_key_counts_as_pending(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2, max_pending=1, on_full="reject")
    t = Tracker()
    gate = new_event()
    c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    c.add_task(t.body("waiter")).with_key("k").submit()
    eventually(lambda: c.stats().waiting == 1, "the waiter parked on its key")
    with pytest.raises(QueueFullError):
        c.add_task(int).submit()


def test_a_cancelled_pending_task_makes_room(clusters: Clusters) -> None:
    c = clusters.make(1, run=False, max_pending=1)
    h = c.add_task(int).submit()
    submitter, out = in_thread(lambda: c.add_task(int, 2).submit())
    assert still_blocked(submitter)
    assert h.cancel()
    submitter.join(WAIT)
    assert not submitter.is_alive() and c.stats().submitted == 2
    c.run()
    (late,) = out
    assert isinstance(late, TaskHandle) and late.result(WAIT) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"max_pending": 0}, ValueError, "max_pending"),
        ({"max_pending": -5}, ValueError, "max_pending"),
        ({"max_pending": 2.5}, TypeError, "max_pending"),
        ({"max_pending": "10"}, TypeError, "max_pending"),
        ({"max_pending": True}, TypeError, "max_pending"),
        ({"max_pending": 3, "on_full": "drop"}, ValueError, "on_full"),
        ({"max_pending": 3, "on_full": None}, ValueError, "on_full"),
        ({"on_full": "REJECT"}, ValueError, "on_full"),
    ],
)
def test_bad_max_pending_and_on_full_are_refused(
    kwargs: dict[str, Any], error: type, word: str
) -> None:
    from cluster import Cluster

    with pytest.raises(error, match=word):
        Cluster(workers=1, **kwargs)


# ---------------------------------------------------------------- reprioritize / reschedule


def blocked_cluster(clusters: Clusters, new_event: EventFactory, t: Tracker) -> Any:
    """A one-worker cluster whose worker is held by a task until the returned gate opens."""
    c = clusters.make(1)
    gate = new_event()
    c.add_task(t.body("holder", "holder", gate=gate)).submit()
    assert take(t.started) == "holder"
    return c, gate


def test_reprioritize_changes_the_place_of_a_queued_task(
    clusters: Clusters, new_event: EventFactory
) -> None:
    t = Tracker()
    c, gate = blocked_cluster(clusters, new_event, t)
    a, b, d, e = (c.add_task(t.body(x)).submit() for x in "abde")
    assert c.reprioritize(d.id, 10) is True
    assert c.reprioritize(a.id, -1) is True
    assert c.info(d.id).priority == 10
    gate.set()
    for h in (a, b, d, e):
        h.result(WAIT)
    assert t.order == ["holder", "d", "b", "e", "a"]


def test_reprioritize_of_a_delayed_task_counts_once_it_is_due(clusters: Clusters) -> None:
    c, clock = clusters.fake(1, run=False)
    t = Tracker(clock)
    low = c.add_task(t.body("low")).with_delay(10).submit()
    high = c.add_task(t.body("high")).with_delay(10).submit()
    assert c.reprioritize(low.id, 5) is True
    assert c.info(low.id).state is TaskState.DELAYED
    c.run()
    clock.advance(10)
    low.result(WAIT)
    high.result(WAIT)
    assert t.order == ["low", "high"]


@pytest.mark.parametrize("form", ["seconds", "timedelta", "datetime"])
def test_reschedule_moves_a_delayed_task_earlier(clusters: Clusters, form: str) -> None:
    c, clock = clusters.fake(1)
    t = Tracker(clock)
    h = c.add_task(t.body("x")).with_delay(100).submit()
    when: Any = {
        "seconds": 10,
        "timedelta": timedelta(seconds=10),
        "datetime": clock.now() + timedelta(seconds=10),
    }[form]
    assert c.reschedule(h.id, when) is True
    assert c.info(h.id).start_at == clock.now() + timedelta(seconds=10)
    clock.advance(9)
    assert c.info(h.id).state is TaskState.DELAYED
    clock.advance(1)
    assert h.result(WAIT) == "x"
    assert t.times == [10]


def test_reschedule_earlier_wakes_a_real_clock_cluster_sleeping_until_the_old_time(
    clusters: Clusters,
) -> None:
    c = clusters.make(2)
    h = c.add_task(int, 1).with_delay(3600).submit()
    assert c.wait_idle(WAIT)  # the workers sleep until the hour is up
    assert c.reschedule(h.id, 0.01) is True
    assert h.result(WAIT) == 1


def test_reschedule_moves_a_delayed_task_later(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)
    t = Tracker(clock)
    h = c.add_task(t.body("x")).with_delay(10).submit()
    assert c.reschedule(h.id, 100) is True
    clock.advance(10)
    probe = c.add_task(t.body("probe", "p")).submit()  # a moment for a wrong start
    probe.result(WAIT)
    assert c.info(h.id).state is TaskState.DELAYED and t.order == ["probe"]
    clock.advance(90)
    assert h.result(WAIT) == "x"
    assert t.times == [10, 100]


def test_reschedule_to_a_past_datetime_makes_a_delayed_task_due_now(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)
    h = c.add_task(int, 3).with_delay(100).submit()
    assert c.reschedule(h.id, clock.now() - timedelta(hours=1)) is True
    assert h.result(WAIT) == 3


def test_reschedule_moves_a_queued_task_into_the_future(
    clusters: Clusters, new_event: EventFactory
) -> None:
    t = Tracker()
    c, gate = blocked_cluster(clusters, new_event, t)
    a, b = (c.add_task(t.body(x)).submit() for x in "ab")
    assert c.reschedule(a.id, 3600) is True
    assert c.info(a.id).state is TaskState.DELAYED
    gate.set()
    assert b.result(WAIT) == "b"
    assert not a.done()
    assert c.reschedule(a.id, 0) is True  # and back: due now
    assert a.result(WAIT) == "a"
    assert t.order == ["holder", "b", "a"]


def test_reprioritize_changes_the_place_of_a_task_waiting_for_its_key(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    a, b, d = (c.add_task(t.body(x)).with_key("k").submit() for x in "abd")
    eventually(lambda: c.stats().waiting == 3, "the tasks waiting for their key")
    assert c.reprioritize(d.id, 9) is True
    gate.set()
    for h in (holder, a, b, d):
        h.result(WAIT)
    assert t.order == ["holder", "d", "a", "b"]


def test_reschedule_of_a_task_waiting_for_its_key_lets_the_others_go_first(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c, clock = clusters.fake(2)
    t = Tracker(clock)
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    a, b = (c.add_task(t.body(x)).with_key("k").submit() for x in "ab")
    eventually(lambda: c.stats().waiting == 2, "the tasks waiting for their key")
    assert c.reschedule(a.id, 30) is True
    assert c.info(a.id).state is TaskState.DELAYED and c.stats().waiting == 1
    gate.set()
    assert b.result(WAIT) == "b"
    assert not a.done()
    clock.advance(30)
    assert a.result(WAIT) == "a"
    assert holder.done() and t.order == ["holder", "b", "a"] and t.times == [0, 0, 30]


def test_reprioritize_and_reschedule_are_false_for_a_running_task(
    clusters: Clusters, new_event: EventFactory
) -> None:
    t = Tracker()
    c = clusters.make(1)
    gate = new_event()
    h = c.add_task(t.body("r", gate=gate)).submit()
    assert take(t.started) == "r"
    assert c.reprioritize(h.id, 5) is False
    assert c.reschedule(h.id, 60) is False
    assert c.info(h.id).priority == 0 and c.info(h.id).state is TaskState.RUNNING


def test_reprioritize_and_reschedule_are_false_for_a_task_waiting_to_retry(
    clusters: Clusters,
) -> None:
    c, _ = clusters.fake(1)
    h = c.add_task(fails_once).with_retry(1).with_backoff(FixedBackoff(60)).submit()
    eventually(lambda: c.info(h.id).state is TaskState.RETRYING, "the retry's wait")
    assert c.reprioritize(h.id, 5) is False
    assert c.reschedule(h.id, 1) is False


def test_reprioritize_and_reschedule_are_false_for_a_finished_task(clusters: Clusters) -> None:
    c = clusters.make(1)
    h = c.add_task(int).with_cache(60).submit()
    h.result(WAIT)
    assert c.reprioritize(h.id, 5) is False
    assert c.reschedule(h.id, 60) is False


def test_reprioritize_and_reschedule_of_an_unknown_id_raise_task_not_found(
    clusters: Clusters,
) -> None:
    c = clusters.make(1)
    with pytest.raises(TaskNotFoundError):
        c.reprioritize("nope", 1)
    with pytest.raises(TaskNotFoundError):
        c.reschedule("nope", 1)
    h = c.add_task(int).submit()
    h.result(WAIT)  # not cached: forgotten once delivered
    with pytest.raises(TaskNotFoundError):
        c.reprioritize(h.id, 1)


@pytest.mark.parametrize(
    ("call", "error", "word"),
    [
        (lambda c, i: c.reprioritize(i, 1.5), TypeError, "priority"),
        (lambda c, i: c.reprioritize(i, True), TypeError, "priority"),
        (lambda c, i: c.reprioritize(i, "1"), TypeError, "priority"),
        (lambda c, i: c.reschedule(i, -1), ValueError, "when"),
        (lambda c, i: c.reschedule(i, float("nan")), ValueError, "when"),
        (lambda c, i: c.reschedule(i, "soon"), TypeError, "when"),
        (lambda c, i: c.reschedule(i, None), TypeError, "when"),
    ],
)
def test_reprioritize_and_reschedule_reject_bad_values(
    clusters: Clusters, call: Any, error: type, word: str
) -> None:
    c = clusters.make(1, run=False)
    h = c.add_task(int).submit()
    with pytest.raises(error, match=word):
        call(c, h.id)
    assert c.info(h.id).priority == 0 and c.info(h.id).state is TaskState.PENDING


# ---------------------------------------------------------------- wait_idle


def test_wait_idle_returns_while_a_task_waits_for_its_start_time(clusters: Clusters) -> None:
    c = clusters.make(1)
    h = c.add_task(int).with_delay(3600).submit()
    assert c.wait_idle(WAIT) is True
    assert c.info(h.id).state is TaskState.DELAYED


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_wait_idle_returns_while_a_task_waits_for_its_retry_backoff(
    clusters: Clusters, mode: RetryMode
) -> None:
    c = clusters.make(1)
    h = (
        c.add_task(fails_once)
        .with_retry(1)
        .with_backoff(FixedBackoff(3600))
        .with_retry_mode(mode)
        .submit()
    )
    eventually(lambda: c.info(h.id).state is TaskState.RETRYING, "the retry's wait")
    assert c.wait_idle(WAIT) is True
    assert c.info(h.id).state is TaskState.RETRYING


def test_wait_idle_blocks_while_a_task_runs_and_returns_false_after_its_timeout(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(1)
    gate = new_event()
    h = c.add_task(gate.wait, WAIT).submit()
    began = time.monotonic()
    assert c.wait_idle(0.1) is False
    assert time.monotonic() - began >= 0.1
    gate.set()
    assert c.wait_idle(WAIT) is True and h.done()


def test_wait_idle_blocks_while_a_task_waits_for_its_key(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiter = c.add_task(t.body("waiter")).with_key("k").submit()
    eventually(lambda: c.stats().waiting == 1, "the waiter parked on its key")
    assert c.wait_idle(0.1) is False
    gate.set()
    assert c.wait_idle(WAIT) is True
    assert waiter.result(0) == "waiter"


def test_wait_idle_blocks_while_a_task_waits_for_a_rate_token(clusters: Clusters) -> None:
    c, clock = clusters.fake(2)
    c.limit("k", concurrency=5, rate=1, burst=1)
    t = Tracker(clock)
    first = c.add_task(t.body("a")).with_key("k").submit()
    assert first.result(WAIT) == "a"
    second = c.add_task(t.body("b")).with_key("k").submit()
    eventually(lambda: c.stats().waiting == 1, "the task waiting for a token")
    assert c.wait_idle(0.2) is False
    clock.advance(1)
    assert second.result(WAIT) == "b"
    assert c.wait_idle(WAIT) is True


def test_wait_idle_on_a_new_cluster_with_nothing_to_do_returns_at_once(
    clusters: Clusters,
) -> None:
    c = clusters.make(2)
    assert c.wait_idle(0) is True


def test_wait_idle_rejects_a_bad_timeout(clusters: Clusters) -> None:
    c = clusters.make(1)
    with pytest.raises(ValueError, match="timeout"):
        c.wait_idle(-1)
    with pytest.raises(TypeError, match="timeout"):
        c.wait_idle("1")  # type: ignore[arg-type]


def test_wait_idle_waits_for_every_due_task_of_a_burst(clusters: Clusters) -> None:
    c = clusters.make(3)
    t = Tracker()
    handles = [c.add_task(t.body(f"t{i}", "none")).submit() for i in range(200)]
    assert c.wait_idle(WAIT) is True
    assert all(h.done() for h in handles)
    assert len(takes(t.started, 200)) == 200


def test_wait_idle_returns_at_the_next_start_time_on_a_fake_clock(clusters: Clusters) -> None:
    c, clock = clusters.fake(2)
    t = Tracker(clock)
    h = c.add_task(t.body("later")).with_start_time(clock.now() + timedelta(seconds=5)).submit()
    assert c.wait_idle(WAIT) is True and not h.done()
    clock.advance(5)
    assert c.wait_idle(WAIT) is True
    assert h.done() and t.times == [5]
