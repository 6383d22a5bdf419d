"""SPEC §12 keys and limits with real worker threads.

``with_key``: tasks of one key never overlap (limit 1) and run in §4 order among
them, while other keys and keyless tasks run meanwhile; a task waiting for its key
holds no worker and delays no other key; ``limit(key, concurrency)`` raised and
lowered; the key held through a retry's backoff (REQUEUE and IMMEDIATE); waiting
spends no retry; cancel and stop of waiting tasks; keys across the thread and async
executors; repeating tasks. ``limit(key, rate=, burst=)`` on a ``FakeClock``: start
spacing, bursts, retries taking tokens, validation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from _keys_helpers import WAIT, Clusters, Tracker, take, takes
from _semantics_tasks import eventually, in_thread, stop_began
from conftest import EventFactory

from cluster import (
    Cluster,
    FixedBackoff,
    RetryMode,
    TaskCancelledError,
    TaskHandle,
    TaskState,
    current,
)


@pytest.fixture
def clusters(new_event: EventFactory) -> Iterator[Clusters]:
    made = Clusters()
    yield made
    new_event.release_all()
    made.close()


def waiting_is(c: Cluster, n: int) -> None:
    """Wait until exactly ``n`` tasks are parked on their keys (workers park them as
    they look for work, so this settles within moments)."""
    eventually(lambda: c.stats().waiting == n, f"{n} tasks waiting for their keys")


def fail_first(tracker: Tracker, label: str, group: str = "k") -> Any:
    """A task function whose attempt 0 raises; later attempts return ``label``."""

    def run() -> str:
        with tracker.inside(f"{label}{current().attempt}", group):
            if current().attempt == 0:
                raise ConnectionError(f"{label}: attempt 0")
        return label

    return run


# ---------------------------------------------------------------- one key, limit 1


def test_tasks_of_one_key_never_overlap(clusters: Clusters) -> None:
    c = clusters.make(4)
    t = Tracker()
    handles = [c.add_task(t.body(f"t{i}")).with_key("k").submit() for i in range(30)]
    assert [h.result(WAIT) for h in handles] == [f"t{i}" for i in range(30)]
    assert t.max("k") == 1


def test_tasks_of_one_key_run_by_priority_then_start_then_submission(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(3)
    t = Tracker()
    gate = new_event()
    first = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    now = datetime.now().astimezone()
    # (label, priority, start time in the past: due at once, but ordered by it)
    plan = [
        ("a", 0, now - timedelta(seconds=1)),
        ("b", 5, now - timedelta(seconds=1)),
        ("c", 0, now - timedelta(seconds=9)),  # an earlier start than a's: before a
        ("d", 5, now - timedelta(seconds=1)),  # same as b: after b (submission order)
        ("e", 1, now - timedelta(seconds=1)),
        ("f", 0, now - timedelta(seconds=1)),  # same as a: after a
    ]
    handles = [
        c.add_task(t.body(label)).with_key("k").with_priority(p).with_start_time(s).submit()
        for label, p, s in plan
    ]
    waiting_is(c, len(plan))
    gate.set()
    assert first.result(WAIT) == "holder"
    assert [h.result(WAIT) for h in handles] == [label for label, _, _ in plan]
    assert t.order == ["holder", "b", "d", "e", "c", "a", "f"]
    assert t.max("k") == 1


def test_other_keys_and_keyless_tasks_run_while_a_key_is_busy(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("a0", gate=gate)).with_key("a").submit()
    assert take(t.started) == "a0"
    later_a = c.add_task(t.body("a1")).with_key("a").submit()
    other_key = [c.add_task(t.body(f"b{i}", "b")).with_key("b").submit() for i in range(5)]
    keyless = [c.add_task(t.body(f"n{i}", "none")).submit() for i in range(5)]
    assert [h.result(WAIT) for h in other_key] == [f"b{i}" for i in range(5)]
    assert [h.result(WAIT) for h in keyless] == [f"n{i}" for i in range(5)]
    assert not holder.done() and c.info(later_a.id).state is TaskState.PENDING
    gate.set()
    assert later_a.result(WAIT) == "a1"
    assert t.order.index("a1") > t.order.index("a0")


def test_a_task_waiting_for_its_key_holds_no_worker(clusters: Clusters) -> None:
    # One worker. The key's holder waits for its retry (it holds the key, not the
    # worker); 100 tasks of the key wait behind it; a keyless task still runs at once.
    c, clock = clusters.fake(1)
    t = Tracker()
    holder = (
        c.add_task(fail_first(t, "holder"))
        .with_key("k")
        .with_retry(1)
        .with_backoff(FixedBackoff(60))
        .submit()
    )
    eventually(lambda: c.info(holder.id).state is TaskState.RETRYING, "the holder's retry wait")
    waiters = [c.add_task(t.body(f"w{i}")).with_key("k").submit() for i in range(100)]
    keyless = c.add_task(t.body("free", "none")).submit()
    assert keyless.result(WAIT) == "free"
    waiting_is(c, 100)
    assert all(c.info(h.id).state is TaskState.PENDING for h in waiters)
    assert c.stats().running == 0  # nobody occupies the one worker while they wait
    clock.advance(60)
    assert holder.result(WAIT) == "holder"
    assert [h.result(WAIT) for h in waiters] == [f"w{i}" for i in range(100)]
    assert t.order[:2] == ["holder0", "free"]
    assert t.order[2:] == ["holder1"] + [f"w{i}" for i in range(100)]


def test_a_thread_holding_a_key_leaves_the_other_workers_to_other_tasks(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiters = [c.add_task(t.body(f"w{i}")).with_key("k").submit() for i in range(100)]
    keyless = [c.add_task(t.body(f"n{i}", "none")).submit() for i in range(20)]
    assert [h.result(WAIT) for h in keyless] == [f"n{i}" for i in range(20)]
    assert c.stats().waiting == 100
    gate.set()
    assert [h.result(WAIT) for h in [holder, *waiters]] == ["holder"] + [
        f"w{i}" for i in range(100)
    ]


def test_waiting_tasks_of_one_key_do_not_delay_another_key(
    clusters: Clusters, new_event: EventFactory
) -> None:
    # No head-of-line blocking: 50 high-priority tasks of a busy key are due before
    # the low-priority tasks of another key, which still run without waiting.
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("a", "a", gate=gate)).with_key("a").submit()
    assert take(t.started) == "a"
    busy = [
        c.add_task(t.body(f"a{i}", "a")).with_key("a").with_priority(100).submit()
        for i in range(50)
    ]
    other = [
        c.add_task(t.body(f"b{i}", "b")).with_key("b").with_priority(-100).submit()
        for i in range(10)
    ]
    assert [h.result(WAIT) for h in other] == [f"b{i}" for i in range(10)]
    assert not any(h.done() for h in busy)
    gate.set()
    assert [h.result(WAIT) for h in busy] == [f"a{i}" for i in range(50)]
    assert holder.done() and t.max("a") == 1 and t.max("b") == 1


# ---------------------------------------------------------------- limit(key, concurrency)


def test_a_concurrency_of_three_lets_three_run_at_once(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(6)
    c.limit("k", concurrency=3)
    t = Tracker()
    gate = new_event()
    handles = [c.add_task(t.body(f"t{i}", gate=gate)).with_key("k").submit() for i in range(9)]
    assert sorted(takes(t.started, 3)) == ["t0", "t1", "t2"]
    waiting_is(c, 6)
    assert c.stats().running == 3 and t.max("k") == 3
    gate.set()
    assert [h.result(WAIT) for h in handles] == [f"t{i}" for i in range(9)]
    assert t.max("k") == 3


def test_a_concurrency_of_three_is_reached_and_never_exceeded(clusters: Clusters) -> None:
    c = clusters.make(8)
    c.limit("k", 3)
    t = Tracker()
    handles = [c.add_task(t.body(f"t{i}")).with_key("k").submit() for i in range(60)]
    for h in handles:
        h.result(WAIT)
    assert t.max("k") <= 3


def test_raising_the_limit_releases_waiting_tasks_at_once(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(4)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiters = [c.add_task(t.body(f"w{i}")).with_key("k").submit() for i in range(3)]
    waiting_is(c, 3)
    c.limit("k", concurrency=4)
    assert [h.result(WAIT) for h in waiters] == ["w0", "w1", "w2"]
    assert not holder.done()  # they ran beside the holder, which still runs
    gate.set()
    assert holder.result(WAIT) == "holder"


def test_lowering_the_limit_takes_effect_as_holders_end(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(6)
    c.limit("k", concurrency=3)
    t = Tracker()
    gates = [new_event() for _ in range(3)]
    holders = [
        c.add_task(t.body(f"h{i}", gate=g)).with_key("k").submit() for i, g in enumerate(gates)
    ]
    assert sorted(takes(t.started, 3)) == ["h0", "h1", "h2"]
    waiters = [c.add_task(t.body(f"w{i}", "w")).with_key("k").submit() for i in range(3)]
    waiting_is(c, 3)
    c.limit("k", concurrency=1)
    assert c.stats().running == 3  # holders are never interrupted
    gates[0].set()
    holders[0].result(WAIT)
    assert c.stats().waiting == 3  # 2 holders left: still over the new limit of 1
    gates[1].set()
    holders[1].result(WAIT)
    assert c.stats().waiting == 3  # 1 holder left: the limit is reached
    gates[2].set()
    assert [h.result(WAIT) for h in waiters] == ["w0", "w1", "w2"]
    assert t.max("w") == 1  # from then on one at a time


# ---------------------------------------------------------------- the key through retries


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_a_task_keeps_its_key_while_it_waits_to_retry(clusters: Clusters, mode: RetryMode) -> None:
    c, clock = clusters.fake(2)
    t = Tracker(clock)
    first = (
        c.add_task(fail_first(t, "a"))
        .with_key("k")
        .with_retry(1)
        .with_backoff(FixedBackoff(10))
        .with_retry_mode(mode)
        .submit()
    )
    eventually(lambda: c.info(first.id).state is TaskState.RETRYING, "the retry's wait")
    second = c.add_task(t.body("b")).with_key("k").submit()
    waiting_is(c, 1)  # the next task of the key waits through the backoff
    clock.advance(9.5)
    assert c.info(second.id).state is TaskState.PENDING and t.order == ["a0"]
    clock.advance(0.5)
    assert first.result(WAIT) == "a"
    assert second.result(WAIT) == "b"
    assert t.order == ["a0", "a1", "b"]
    assert t.times == [0, 10, 10]


def test_a_task_waiting_for_its_key_spends_no_retry(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiter = c.add_task(t.body("waiter")).with_key("k").with_retry(0).with_cache(60).submit()
    waiting_is(c, 1)
    info = c.info(waiter.id)
    assert info.state is TaskState.PENDING
    assert info.attempts == 0 and info.started_at is None and info.last_error is None
    gate.set()
    assert holder.result(WAIT) == "holder"
    assert waiter.result(WAIT) == "waiter"
    assert c.info(waiter.id).attempts == 1  # its one attempt, made once it had the key
    assert c.stats().retried == 0 and c.stats().failed == 0


def test_time_spent_waiting_for_the_key_does_not_count_against_the_timeout(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c, clock = clusters.fake(2)
    t = Tracker(clock)
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiter = c.add_task(t.body("waiter")).with_key("k").with_timeout(1).submit()
    waiting_is(c, 1)
    clock.advance(5)  # five timeouts' worth of waiting
    assert c.info(waiter.id).state is TaskState.PENDING
    gate.set()
    assert holder.result(WAIT) == "holder"
    assert waiter.result(WAIT) == "waiter"


# ---------------------------------------------------------------- cancel and stop


def test_cancelling_a_task_waiting_for_its_key_ends_it_at_once(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    a, b, d = (c.add_task(t.body(x)).with_key("k").submit() for x in "abd")
    waiting_is(c, 3)
    assert c.cancel_task(b.id) is True
    result = b.wait(0)  # its Result is there when cancel returns
    assert result is not None and isinstance(result.error, TaskCancelledError)
    assert c.stats().waiting == 2
    assert b.cancel() is False  # (by id it is unknown now: not cached, so purged)
    gate.set()
    assert [h.result(WAIT) for h in (holder, a, d)] == ["holder", "a", "d"]
    assert t.order == ["holder", "a", "d"]


def test_cancelling_the_best_waiting_task_lets_the_next_one_have_the_key(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    best = c.add_task(t.body("best")).with_key("k").with_priority(9).submit()
    rest = [c.add_task(t.body(f"r{i}")).with_key("k").submit() for i in range(3)]
    waiting_is(c, 4)
    assert best.cancel()
    gate.set()
    assert holder.result(WAIT) == "holder"
    assert [h.result(WAIT) for h in rest] == ["r0", "r1", "r2"]
    assert "best" not in t.order


def test_cancelling_the_running_holder_gives_the_key_to_the_next_task(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    started = new_event()

    def cooperative() -> str:
        started.set()
        current().cancelled.wait(WAIT)
        return "late"

    holder = c.add_task(cooperative).with_key("k").submit()
    assert started.wait(WAIT)
    waiter = c.add_task(t.body("waiter")).with_key("k").submit()
    waiting_is(c, 1)
    assert holder.cancel()
    assert waiter.result(WAIT) == "waiter"


def test_a_graceful_stop_runs_every_task_waiting_for_its_key(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiters = [c.add_task(t.body(f"w{i}")).with_key("k").submit() for i in range(5)]
    waiting_is(c, 5)
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT))
    eventually(lambda: stop_began(c), "the stop")
    gate.set()
    stopper.join(WAIT + 1)
    assert out == [None]
    assert [h.result(0) for h in [holder, *waiters]] == ["holder"] + [f"w{i}" for i in range(5)]
    assert t.max("k") == 1


def test_stop_cancel_pending_gives_every_task_waiting_for_its_key_its_result(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiters = [c.add_task(t.body(f"w{i}")).with_key("k").submit() for i in range(5)]
    waiting_is(c, 5)
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT, cancel_pending=True))
    for h in waiters:
        result = h.wait(WAIT)
        assert result is not None and isinstance(result.error, TaskCancelledError)
    assert not holder.done()  # the running one is awaited
    gate.set()
    stopper.join(WAIT + 1)
    assert out == [None]
    assert holder.result(0) == "holder" and t.order == ["holder"]


def test_cancel_gives_every_task_waiting_for_its_key_its_result_at_once(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiters = [c.add_task(t.body(f"w{i}")).with_key("k").submit() for i in range(5)]
    waiting_is(c, 5)
    c.cancel()
    for h in [holder, *waiters]:
        result = h.wait(0)
        assert result is not None and isinstance(result.error, TaskCancelledError)


# ---------------------------------------------------------------- across executors, series


def test_a_thread_task_and_an_async_task_of_one_key_never_overlap(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    t = Tracker()
    gate = new_event()

    async def coro(label: str) -> str:
        with t.inside(label):
            await asyncio.sleep(0.002)
        return label

    holder = c.add_task(t.body("thread-holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "thread-holder"
    blocked = c.add_task(coro, "async-waiter").with_key("k").submit()
    waiting_is(c, 1)
    assert not blocked.done()
    gate.set()
    assert holder.result(WAIT) == "thread-holder"
    assert blocked.result(WAIT) == "async-waiter"
    mixed: list[TaskHandle[str]] = []
    for i in range(20):
        mixed.append(c.add_task(t.body(f"t{i}")).with_key("k").submit())
        mixed.append(c.add_task(coro, f"a{i}").with_key("k").submit())
    assert [h.result(WAIT) for h in mixed] == [x for i in range(20) for x in (f"t{i}", f"a{i}")]
    assert t.max("k") == 1


def test_an_async_task_waiting_for_its_key_starts_once_a_thread_task_frees_it(
    clusters: Clusters, new_event: EventFactory
) -> None:
    # The reverse direction: an async holder, a thread task waiting behind it.
    c = clusters.make(2)
    t = Tracker()
    release = new_event()

    async def holder_coro() -> str:
        with t.inside("async-holder"):
            while not release.is_set():
                await asyncio.sleep(0.002)
        return "async-holder"

    holder = c.add_task(holder_coro).with_key("k").submit()
    assert take(t.started) == "async-holder"
    waiter = c.add_task(t.body("thread-waiter")).with_key("k").submit()
    waiting_is(c, 1)
    release.set()
    assert holder.result(WAIT) == "async-holder"
    assert waiter.result(WAIT) == "thread-waiter"
    assert t.max("k") == 1


def test_a_repeating_task_holds_its_key_during_each_run_not_between_runs(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c, clock = clusters.fake(2)
    t = Tracker(clock)
    gates = [new_event(), new_event()]
    runs = iter(range(2))

    def run() -> str:
        n = next(runs)
        with t.inside(f"run{n}"):
            if not gates[n].wait(WAIT):
                raise TimeoutError
        return f"run{n}"

    series = c.add_task(run).with_key("k").repeat(every=10, count=2).submit()
    assert take(t.started) == "run0"
    during = c.add_task(t.body("during0")).with_key("k").submit()
    waiting_is(c, 1)  # the run holds the key
    gates[0].set()
    assert during.result(WAIT) == "during0"  # between runs: the key is free, no clock move
    between = c.add_task(t.body("between")).with_key("k").submit()
    assert between.result(WAIT) == "between"
    assert takes(t.started, 2) == ["during0", "between"]
    clock.advance(10)
    assert take(t.started) == "run1"
    during1 = c.add_task(t.body("during1")).with_key("k").submit()
    waiting_is(c, 1)
    gates[1].set()
    assert series.result(WAIT) == "run1"
    assert during1.result(WAIT) == "during1"
    assert t.order == ["run0", "during0", "between", "run1", "during1"]
    assert t.max("k") == 1


# ---------------------------------------------------------------- rate limits (FakeClock)


def test_a_rate_limit_spaces_starts_by_one_over_the_rate(clusters: Clusters) -> None:
    c, clock = clusters.fake(4)
    c.limit("k", concurrency=10, rate=8, burst=1)  # one start per 0.125 s (exact in binary)
    t = Tracker(clock)
    handles = [c.add_task(t.body(f"t{i}")).with_key("k").submit() for i in range(6)]
    assert take(t.started) == "t0"
    for i in range(1, 6):
        waiting_is(c, 6 - i)  # the rest wait for a token
        clock.advance(0.125)
        assert take(t.started) == f"t{i}"
    assert [h.result(WAIT) for h in handles] == [f"t{i}" for i in range(6)]
    assert t.times == [0.125 * i for i in range(6)]


def test_no_token_comes_back_before_one_over_the_rate(clusters: Clusters) -> None:
    c, clock = clusters.fake(2)
    c.limit("k", concurrency=10, rate=2, burst=1)  # a token per 0.5 s
    t = Tracker(clock)
    first = c.add_task(t.body("a")).with_key("k").submit()
    assert first.result(WAIT) == "a"
    second = c.add_task(t.body("b")).with_key("k").submit()
    waiting_is(c, 1)
    clock.advance(0.25)
    clock.advance(0.125)
    clock.advance(0.0625)  # 0.4375 s: still short of a token
    # (A moment for a wrong early start to show: a keyless task runs meanwhile.)
    probe = c.add_task(t.body("probe", "none")).submit()
    assert probe.result(WAIT) == "probe"
    assert c.info(second.id).state is TaskState.PENDING and c.stats().waiting == 1
    clock.advance(0.0625)
    assert second.result(WAIT) == "b"
    assert t.times[-1] == 0.5


def test_with_rate_10_starts_are_exactly_a_tenth_of_a_second_apart(clusters: Clusters) -> None:
    c, clock = clusters.fake(4)
    c.limit("k", concurrency=20, rate=10, burst=1)
    t = Tracker(clock)
    handles = [c.add_task(t.body(f"t{i}")).with_key("k").submit() for i in range(11)]
    assert take(t.started) == "t0"
    for i in range(1, 11):
        waiting_is(c, 11 - i)
        clock.advance(0.1)
        assert take(t.started, timeout=2) == f"t{i}", f"no start after {i} steps of 0.1 s"
    for h in handles:
        h.result(WAIT)


@pytest.mark.parametrize("fake", [False, True], ids=["real-clock", "fake-clock"])
def test_a_graceful_stop_runs_the_tasks_waiting_for_a_rate_token(
    clusters: Clusters, fake: bool
) -> None:
    """The tokens that come back while a graceful stop waits still start their tasks
    (they were left waiting, and the stop timed out)."""
    if fake:
        c, clock = clusters.fake(4)
        t = Tracker(clock)
    else:
        c, clock = clusters.make(4), None
        t = Tracker()
    c.limit("k", concurrency=10, rate=8, burst=1)  # a token per 0.125 s
    handles = [c.add_task(t.body(f"t{i}")).with_key("k").submit() for i in range(4)]
    assert take(t.started) == "t0"
    stopper, out = in_thread(lambda: c.stop(timeout=WAIT))
    eventually(lambda: stop_began(c), "the stop")
    for i in range(1, 4):
        if clock is not None:
            clock.advance(0.125)
        assert take(t.started) == f"t{i}"
    stopper.join(WAIT + 1)
    assert out == [None]
    assert [h.result(0) for h in handles] == [f"t{i}" for i in range(4)]


def test_a_burst_of_three_starts_three_at_once_then_one_per_interval(
    clusters: Clusters,
) -> None:
    c, clock = clusters.fake(8)
    c.limit("k", concurrency=10, rate=4, burst=3)  # a token per 0.25 s, bucket of 3
    t = Tracker(clock)
    handles = [c.add_task(t.body(f"t{i}")).with_key("k").submit() for i in range(7)]
    assert sorted(takes(t.started, 3)) == ["t0", "t1", "t2"]
    waiting_is(c, 4)
    for i in range(3, 7):
        clock.advance(0.25)
        assert take(t.started) == f"t{i}"
        waiting_is(c, 6 - i)
    assert [h.result(WAIT) for h in handles] == [f"t{i}" for i in range(7)]
    assert t.times == [0, 0, 0, 0.25, 0.5, 0.75, 1.0]


def test_an_idle_bucket_refills_up_to_its_burst_only(clusters: Clusters) -> None:
    c, clock = clusters.fake(8)
    c.limit("k", concurrency=10, rate=4, burst=2)
    t = Tracker(clock)
    for h in [c.add_task(t.body(f"a{i}")).with_key("k").submit() for i in range(2)]:
        h.result(WAIT)
    assert sorted(takes(t.started, 2)) == ["a0", "a1"]
    clock.advance(100)  # would be 400 tokens without the cap
    handles = [c.add_task(t.body(f"b{i}")).with_key("k").submit() for i in range(4)]
    assert sorted(takes(t.started, 2)) == ["b0", "b1"]
    waiting_is(c, 2)
    clock.advance(0.25)
    assert take(t.started) == "b2"
    clock.advance(0.25)
    assert take(t.started) == "b3"
    for h in handles:
        h.result(WAIT)
    assert t.times == [0, 0, 100, 100, 100.25, 100.5]


@pytest.mark.parametrize(
    "mode",
    [
        RetryMode.REQUEUE,
        RetryMode.IMMEDIATE,
    ],
)
def test_every_attempt_including_retries_takes_a_token(clusters: Clusters, mode: RetryMode) -> None:
    c, clock = clusters.fake(2)
    c.limit("k", concurrency=5, rate=4, burst=1)
    t = Tracker(clock)

    def flaky() -> int:
        with t.inside(f"attempt{current().attempt}"):
            if current().attempt < 2:
                raise ConnectionError("transient")
        return current().attempt

    h = (
        c.add_task(flaky)
        .with_key("k")
        .with_retry(2)
        .with_backoff(FixedBackoff(0))
        .with_retry_mode(mode)
        .submit()
    )
    assert take(t.started) == "attempt0"
    for i in (1, 2):

        def parked_or_started(i: int = i) -> bool:
            return c.stats().waiting == 1 or len(t.order) > i

        eventually(parked_or_started, "the retry's wait")
        assert t.order == [f"attempt{j}" for j in range(i)], "a retry started without a token"
        clock.advance(0.25)
        assert take(t.started) == f"attempt{i}"
    assert h.result(WAIT) == 2
    assert t.times == [0, 0.25, 0.5]


def test_the_key_and_the_rate_apply_together(clusters: Clusters, new_event: EventFactory) -> None:
    # Limit 1 with a generous rate: a token is there, but the key is not.
    c, clock = clusters.fake(2)
    c.limit("k", concurrency=1, rate=100, burst=5)
    t = Tracker(clock)
    gate = new_event()
    holder = c.add_task(t.body("holder", gate=gate)).with_key("k").submit()
    assert take(t.started) == "holder"
    waiter = c.add_task(t.body("waiter")).with_key("k").submit()
    waiting_is(c, 1)
    clock.advance(1)
    assert c.info(waiter.id).state is TaskState.PENDING
    gate.set()
    assert holder.result(WAIT) == "holder"
    assert waiter.result(WAIT) == "waiter"


def test_a_limit_applies_to_tasks_queued_before_it_was_set(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(4, run=False)
    t = Tracker()
    gate = new_event()
    handles = [c.add_task(t.body(f"t{i}", gate=gate)).with_key("k").submit() for i in range(4)]
    c.limit("k", concurrency=2)
    c.run()
    assert sorted(takes(t.started, 2)) == ["t0", "t1"]
    waiting_is(c, 2)
    gate.set()
    for h in handles:
        h.result(WAIT)
    assert t.max("k") == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "word"),
    [
        (("k", 0), {}, ValueError, "concurrency"),
        (("k", -1), {}, ValueError, "concurrency"),
        (("k", 1.5), {}, TypeError, "concurrency"),
        (("k", True), {}, TypeError, "concurrency"),
        (("k",), {"rate": 0}, ValueError, "rate"),
        (("k",), {"rate": -1}, ValueError, "rate"),
        (("k",), {"rate": float("inf")}, ValueError, "rate"),
        (("k",), {"rate": float("nan")}, ValueError, "rate"),
        (("k",), {"rate": "10"}, TypeError, "rate"),
        (("k",), {"rate": 10, "burst": 0}, ValueError, "burst"),
        (("k",), {"rate": 10, "burst": 1.5}, TypeError, "burst"),
        (("",), {}, ValueError, "key"),
        ((3,), {}, TypeError, "key"),
        ((None,), {}, TypeError, "key"),
    ],
)
def test_limit_rejects_bad_arguments_naming_them(
    clusters: Clusters, args: tuple[Any, ...], kwargs: dict[str, Any], error: type, word: str
) -> None:
    c = clusters.make(1)
    with pytest.raises(error, match=word):
        c.limit(*args, **kwargs)


@pytest.mark.parametrize(
    ("key", "error"), [("", ValueError), (7, TypeError), (None, TypeError), (b"k", TypeError)]
)
def test_with_key_rejects_a_key_that_is_not_a_non_empty_str(
    clusters: Clusters, key: Any, error: type
) -> None:
    c = clusters.make(1)
    with pytest.raises(error, match="key"):
        c.add_task(int).with_key(key)


def test_a_key_that_was_never_limited_has_a_limit_of_one(clusters: Clusters) -> None:
    c = clusters.make(4)
    t = Tracker()
    handles = [c.add_task(t.body(f"t{i}")).with_key("fresh").submit() for i in range(12)]
    for h in handles:
        h.result(WAIT)
    assert t.max("k") == 1


def test_keys_are_independent_of_each_other(clusters: Clusters) -> None:
    c = clusters.make(6)
    c.limit("two", 2)
    t = Tracker()
    barrier = threading.Barrier(3, timeout=WAIT)  # one of "one" and two of "two" at once

    def meet(label: str, group: str) -> str:
        with t.inside(label, group):
            barrier.wait()
        return label

    handles = [
        c.add_task(meet, "o", "one").with_key("one").submit(),
        c.add_task(meet, "t0", "two").with_key("two").submit(),
        c.add_task(meet, "t1", "two").with_key("two").submit(),
    ]
    assert [h.result(WAIT) for h in handles] == ["o", "t0", "t1"]


def test_rate_limited_tasks_keep_starting_while_earlier_ones_still_run(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c, clock = clusters.fake(6)
    c.limit("k", concurrency=10, rate=8, burst=1)
    t = Tracker(clock)
    gate = new_event()
    handles = [c.add_task(t.body(f"t{i}", gate=gate)).with_key("k").submit() for i in range(5)]
    assert take(t.started) == "t0"
    for i in range(1, 5):
        waiting_is(c, 5 - i)
        clock.advance(0.125)
        assert take(t.started, timeout=2) == f"t{i}", f"t{i} did not start with its token"
    gate.set()
    for h in handles:
        h.result(WAIT)


def test_a_refilled_burst_starts_that_many_waiting_tasks(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c, clock = clusters.fake(6)
    c.limit("k", concurrency=10, rate=4, burst=3)
    t = Tracker(clock)
    gate = new_event()
    handles = [c.add_task(t.body(f"t{i}", gate=gate)).with_key("k").submit() for i in range(6)]
    assert sorted(takes(t.started, 3)) == ["t0", "t1", "t2"]
    waiting_is(c, 3)
    clock.advance(10)  # the bucket is full again: 3 tokens
    assert sorted(takes(t.started, 3, timeout=2)) == ["t3", "t4", "t5"]
    gate.set()
    for h in handles:
        h.result(WAIT)
