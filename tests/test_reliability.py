"""Reliability suite: races, stress, ordering, memory, hostile callbacks and inputs.

Every accepted task must end in exactly one terminal Result, delivered to every
subscriber, with its callbacks run exactly once, whatever races with it. Each test
ends by checking the invariants of ``_reliability_helpers`` (one Result per subscriber,
counters add up when idle, attempts <= retries + 1, no late value ever delivered,
threads back to baseline after stop()).

Sizes scale with CLUSTER_STRESS_SCALE; random choices derive from CLUSTER_SEED (printed
in every assertion message as ``[test CLUSTER_SEED=... CLUSTER_STRESS_SCALE=...]``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import inspect
import itertools
import logging
import math
import queue
import threading
import time
import tracemalloc
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from _reliability_helpers import (
    LATE,
    WAIT,
    Harness,
    PlannedError,
    Tracker,
    WeakError,
    base_seed,
    body,
    hold_worker,
    scaled,
    value_of,
    wait_until,
)

from cluster import (
    Cluster,
    ClusterStoppedError,
    DuplicateTaskError,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    Result,
    RetryMode,
    StopTimeoutError,
    TaskBuilder,
    TaskCancelledError,
    TaskHandle,
    TaskInfo,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
    current,
)

pytestmark = pytest.mark.reliability

FINAL = (PlannedError, TaskCancelledError, TaskTimeoutError)
GRACE_EXTRA = 0.05  # how long a drained queue must stay empty


@pytest.fixture(scope="session")
def seed() -> int:
    return base_seed()


@pytest.fixture
def h(seed: int, request: pytest.FixtureRequest) -> Iterator[Harness]:
    print(f"CLUSTER_SEED={seed} (test {request.node.name})")
    harness = Harness(seed, request.node.name)
    yield harness
    harness.close()


def finish(h: Harness, c: Cluster, tr: Tracker | None = None, **check: Any) -> None:
    """stop() gracefully, re-check the callbacks (exactly once even after shutdown), and
    check that the threads are back to the baseline."""
    c.stop(timeout=WAIT)
    if tr is not None:
        tr.check(**check)
    h.assert_threads_back()


# ============================================================================ stress


@pytest.mark.timeout(120)
def test_stress_every_task_gets_exactly_one_result(h: Harness) -> None:
    """20k tasks (x scale) on 4 workers from 2 submitters: random priorities, retries in
    both modes, timeouts that expire, delays, caching, futures, while a thread cancels
    random ids racing their completion. Every id gets exactly one terminal Result."""
    n = scaled(20_000)
    c = h.cluster(4)
    tr = Tracker(c, h)
    ids: list[str] = []
    cached_ids: list[str] = []
    futures: dict[str, concurrent.futures.Future[Any]] = {}
    stop_cancelling = threading.Event()

    def submitter(k: int, count: int) -> None:
        rng = h.rng(f"submit-{k}")
        for i in range(count):
            tid = f"s{k}-{i}"
            hold = 0.0
            fail_first = retries = 0
            roll = rng.random()
            if roll < 0.10:
                hold = rng.uniform(0.0002, 0.002)  # long enough to be cancelled running
            elif roll < 0.18:
                retries = rng.randint(1, 3)
                fail_first = rng.randint(0, retries + 1)  # sometimes exhausts the budget
            elif roll < 0.1815:
                hold = 0.05  # times out (and returns LATE afterwards)
            b = c.add_task(body, tr, hold, fail_first).with_priority(rng.randint(-3, 3))
            if roll < 0.1815 and hold == 0.05:
                b.with_timeout(0.02)
                retries = rng.randint(0, 1)
            elif rng.random() < 0.05:
                b.with_timeout(5.0)  # never expires
            if retries:
                b.with_retry_mode(rng.choice(list(RetryMode)))
                b.with_backoff(FixedBackoff(rng.choice([0, 0.001, 0.003])))
                if rng.random() < 0.3:
                    b.with_jitter(0.5)
            if rng.random() < 0.05:
                b.with_delay(rng.uniform(0, 0.02))
            cached = rng.random() < 0.05
            if cached:
                b.with_cache(ttl=60)
            handle = tr.submit(b, tid, retries=retries)
            ids.append(tid)
            if cached or rng.random() < 0.02:
                tr.subscribe_more(tid)
            if cached:
                cached_ids.append(tid)
            if rng.random() < 0.03:
                futures[tid] = handle.future()

    def canceller() -> None:
        rng = h.rng("cancel")
        while not stop_cancelling.is_set():
            if ids:
                tr.cancel(ids[rng.randrange(len(ids))])
            stop_cancelling.wait(0.0002)

    cancel_thread = h.thread(canceller, "canceller")
    submitters = [
        h.thread(functools.partial(submitter, k, n // 2), f"submitter-{k}") for k in range(2)
    ]
    for t in submitters:
        t.join(90)
        assert not t.is_alive(), f"submitter stuck {h.tag()}"
    tr.collect(timeout=60)
    stop_cancelling.set()
    cancel_thread.join(WAIT)
    tr.check_stats_idle()
    kinds = tr.check(cancels_exact=True, allowed_errors=FINAL)
    print(f"outcomes: {dict(kinds)}")
    assert kinds["ok"] > n // 2, f"too few successes: {kinds} {h.tag()}"
    for tid in cached_ids:  # invariant 3 through info(): the same attempt count
        info = c.info(tid)
        assert info.attempts == tr.attempts[tid], f"{tid}: {info} vs {tr.attempts[tid]}"
        assert info.attempts <= info.retries + 1 and info.state.terminal, f"{info} {h.tag()}"
    for tid, fut in futures.items():  # futures settle like every other subscriber
        r = tr.results[tid]
        assert fut.done(), f"{tid}: future not done, Result {r!r} {h.tag()}"
        if r.error is None:
            assert fut.result(timeout=0) == r.value, f"{tid} {h.tag()}"
        else:
            assert fut.exception(timeout=0) is r.error, f"{tid} {h.tag()}"
    assert c.stats().workers == 4, f"pool not at full strength: {c.stats()} {h.tag()}"
    finish(h, c, tr, cancels_exact=True, allowed_errors=FINAL)


# ============================================================================ ordering


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-starts", "tied-starts"])
def test_exact_ordering_of_due_tasks(h: Harness, ties: bool) -> None:
    """One worker held by a gate; 2,000 due tasks with random priorities and past start
    times run in exactly (-priority, start time, submission order). With ``ties`` many
    tasks share the very same start datetime, so FIFO decides among them."""
    n = scaled(2_000, 200)
    rng = h.rng()
    c = h.cluster(1)
    tr = Tracker(c, h)
    gate = h.event()
    hold_worker(c, gate)
    order: list[int] = []

    def record(i: int) -> object:
        ctx = tr.attempt()
        order.append(i)
        return value_of(ctx.task_id)

    base = datetime.now(UTC)
    offsets = [rng.randrange(1, 30) for _ in range(n)] if ties else rng.sample(range(1, 60_000), n)
    keys: dict[int, tuple[int, float, int]] = {}
    for i in range(n):
        priority = rng.randrange(4)
        b = c.add_task(record, i).with_priority(priority)
        if rng.random() < 0.1:  # default start: "now", later than every past start
            keys[i] = (-priority, 0.0, i)
        else:
            ms = offsets[i]
            b.with_start_time(base - timedelta(seconds=1, milliseconds=ms))
            keys[i] = (-priority, -1.0 - ms / 1000, i)
        tr.submit(b, f"o{i}")
    gate.set()
    tr.check_all(timeout=30, allowed_errors=())
    assert len(order) == n
    bad = [(a, b) for a, b in itertools.pairwise(order) if keys[a] > keys[b]]
    assert not bad, (
        f"{len(bad)} ordering inversions among {n} tasks; first (earlier, later) as "
        f"(-priority, start, submission): {[(keys[a], keys[b]) for a, b in bad[:5]]} {h.tag()}"
    )
    finish(h, c, tr, allowed_errors=())


def test_high_priority_delayed_task_runs_exactly_when_due(h: Harness) -> None:
    """A high-priority task due later never starts early, and starts next once due even
    while a stream of low-priority due tasks (~5 ms each) keeps the only worker busy."""
    c = h.cluster(1)
    tr = Tracker(c, h)
    starts: dict[str, float] = {}
    seq: list[str] = []

    def step(tid: str) -> object:
        tr.attempt()
        starts[tid] = time.monotonic()
        seq.append(tid)
        if tid.startswith("low"):
            threading.Event().wait(0.005)
        return value_of(tid)

    gate = h.event()
    hold_worker(c, gate)
    for i in range(250):  # ~1.3 s of low-priority work
        tr.submit(c.add_task(step, f"low{i}").with_priority(-1), f"low{i}")
    due: dict[str, tuple[float, float]] = {}
    t0 = time.monotonic()
    b = c.add_task(step, "high-delay").with_priority(100).with_delay(0.3)
    due["high-delay"] = (t0 + 0.3, time.monotonic() + 0.3)
    tr.submit(b, "high-delay")
    t0 = time.monotonic()
    when = datetime.now(UTC) + timedelta(seconds=0.6)
    b = c.add_task(step, "high-start").with_priority(50).with_start_time(when)
    due["high-start"] = (t0 + 0.6 - 0.002, time.monotonic() + 0.6 + 0.002)
    tr.submit(b, "high-start")
    gate.set()
    tr.check_all(timeout=30, allowed_errors=())
    for tid, (earliest, latest) in due.items():
        started = starts[tid]
        assert started >= earliest, (
            f"{tid} started {earliest - started:.4f}s before its start time {h.tag()}"
        )
        # Low tasks that started after the high task was due and before it: at most the
        # one a worker may have popped just before the due time.
        pos = seq.index(tid)
        overtaken = [t for t in seq[:pos] if t.startswith("low") and starts[t] > latest]
        assert len(overtaken) <= 1, (
            f"{tid} was due but {len(overtaken)} low-priority tasks started first: "
            f"{overtaken[:5]} {h.tag()}"
        )
        assert started - latest < 0.1, f"{tid} started {started - latest:.3f}s late {h.tag()}"
    finish(h, c, tr, allowed_errors=())


@pytest.mark.parametrize("mode", list(RetryMode), ids=lambda m: m.name)
def test_retry_keeps_priority_and_waits_its_backoff(h: Harness, mode: RetryMode) -> None:
    """A failed high-priority task retries no sooner than failure time + backoff and,
    with REQUEUE, runs next once due although low-priority due tasks queue behind it."""
    c = h.cluster(1)
    seq: list[tuple[str, int, float]] = []  # (id, attempt, started)
    failed_at: list[float] = []
    backoff = 0.1

    def step(tid: str) -> object:
        ctx = current()
        seq.append((tid, ctx.attempt, time.monotonic()))
        if tid == "high" and ctx.attempt == 0:
            failed_at.append(time.monotonic())
            raise PlannedError("first attempt")
        if tid.startswith("low"):
            threading.Event().wait(0.005)
        return value_of(tid)

    gate = h.event()
    hold_worker(c, gate)
    lows = [
        c.add_task(step, f"low{i}").with_id(f"low{i}").with_priority(-1).submit() for i in range(80)
    ]
    b = c.add_task(step, "high").with_id("high").with_priority(10).with_retry(1)
    high = b.with_backoff(FixedBackoff(backoff)).with_retry_mode(mode).submit()
    gate.set()
    assert high.result(timeout=WAIT) == value_of("high")
    for handle in lows:
        assert handle.result(timeout=WAIT) == value_of(handle.id)
    runs = [(i, t) for i, (tid, _, t) in enumerate(seq) if tid == "high"]
    assert len(runs) == 2 and runs[0][0] == 0, f"high did not run first: {seq[:3]} {h.tag()}"
    (_, _), (pos, started) = runs
    due = failed_at[0] + backoff
    assert started >= due, f"retry ran {due - started:.4f}s before its backoff {h.tag()}"
    assert started - due < 0.1, f"retry ran {started - due:.3f}s late {h.tag()}"
    if mode is RetryMode.IMMEDIATE:
        assert pos == 1, f"IMMEDIATE: the same worker slept and retried, yet {pos - 1} ran"
    else:
        overtaken = [tid for tid, _, t in seq[1:pos] if t > due + 0.002]
        assert len(overtaken) <= 1, f"due retry overtaken by {overtaken[:5]} {h.tag()}"
        assert pos > 5, f"REQUEUE freed no worker for the low tasks: pos={pos} {h.tag()}"
    finish(h, c)


@pytest.mark.timeout(60)
def test_delayed_tasks_and_retries_start_on_time(h: Harness) -> None:
    """Tasks with random delays / start times and REQUEUE retries with random backoffs
    (and jitter) never start early, and start promptly while workers are free. (IMMEDIATE
    retries would keep workers asleep by design, so they are left to other tests.)"""
    c = h.cluster(2)
    tr = Tracker(c, h)
    rng = h.rng()
    earliest: dict[tuple[str, int], float] = {}  # (id, attempt) -> may not start before
    latest: dict[tuple[str, int], float] = {}  # (id, attempt) -> due at the latest
    starts: dict[tuple[str, int], float] = {}
    lock = threading.Lock()
    jitters: dict[str, tuple[float, float]] = {}

    def timed(fail_first: int) -> object:
        ctx = tr.attempt()
        now = time.monotonic()
        with lock:
            starts[(ctx.task_id, ctx.attempt)] = now
        if ctx.attempt < fail_first:
            backoff, ratio = jitters[ctx.task_id]
            key = (ctx.task_id, ctx.attempt + 1)
            with lock:
                earliest[key] = time.monotonic() + backoff * (1 - ratio)
            raise_at = time.monotonic()
            with lock:
                latest[key] = raise_at + backoff * (1 + ratio) + 0.002
            raise PlannedError("again")
        return value_of(ctx.task_id)

    for i in range(scaled(300)):
        tid = f"d{i}"
        fail_first = rng.choice([0, 0, 1, 2])
        backoff, ratio = rng.uniform(0, 0.2), rng.choice([0.0, 0.5])
        jitters[tid] = (backoff, ratio)
        b = c.add_task(timed, fail_first).with_priority(rng.randint(0, 3))
        if fail_first:
            b.with_backoff(FixedBackoff(backoff))
            if ratio:
                b.with_jitter(ratio)
        delay = rng.uniform(0, 0.4)
        t0 = time.monotonic()
        if rng.random() < 0.5:
            b.with_delay(delay)
        else:
            b.with_start_time(datetime.now(UTC) + timedelta(seconds=delay))
        earliest[(tid, 0)] = t0 + delay - 0.002  # wall/monotonic conversion slack
        latest[(tid, 0)] = time.monotonic() + delay + 0.002
        tr.submit(b, tid, retries=fail_first)
    tr.check_all(timeout=30, allowed_errors=())
    early = [(k, earliest[k] - t) for k, t in starts.items() if t < earliest[k]]
    assert not early, f"{len(early)} attempts started early: {early[:5]} {h.tag()}"
    lateness = sorted(t - latest[k] for k, t in starts.items())
    print(f"lateness p50={lateness[len(lateness) // 2]:.4f}s max={lateness[-1]:.4f}s")
    assert lateness[-1] < 0.1, f"an attempt started {lateness[-1]:.3f}s late {h.tag()}"
    finish(h, c, tr, allowed_errors=())


# ============================================================================ cancel storm


@pytest.mark.timeout(90)
def test_cancel_storm(h: Harness) -> None:
    """4 threads cancel random ids while 2 submit and 2 more subscribe: cancel_task()
    returns True exactly for the ids whose Result is a TaskCancelledError, at most once."""
    n = scaled(6_000)
    c = h.cluster(4)
    tr = Tracker(c, h)
    ids: list[str] = []
    done = threading.Event()
    not_found: Counter[str] = Counter()

    def submitter(k: int) -> None:
        rng = h.rng(f"submit-{k}")
        for i in range(n // 2):
            hold = rng.choice([0.0, 0.0, 0.0, 0.0005, 0.002])
            retries = fail_first = 0
            if rng.random() < 0.15:  # cancels also land on tasks waiting for a retry
                retries = fail_first = rng.randint(1, 2)
            b = c.add_task(body, tr, hold, fail_first).with_priority(rng.randint(0, 3))
            b.with_cache(ttl=60)
            if retries:
                b.with_retry_mode(rng.choice(list(RetryMode)))
                b.with_backoff(FixedBackoff(rng.choice([0.0005, 0.002])))
            if rng.random() < 0.1:
                b.with_delay(rng.uniform(0, 0.01))
            tid = f"c{k}-{i}"
            tr.submit(b, tid, retries=retries)
            ids.append(tid)

    def canceller(k: int) -> None:
        rng = h.rng(f"cancel-{k}")
        while not done.is_set():
            if ids:
                tid = ids[rng.randrange(len(ids))]
                if tr.cancel(tid) is None:
                    not_found[tid] += 1
            done.wait(0.0001)

    def subscriber(k: int) -> None:
        rng = h.rng(f"subscribe-{k}")
        while not done.is_set():
            if ids:
                assert tr.subscribe_more(ids[rng.randrange(len(ids))]), "cached id not found"
            done.wait(0.0005)

    helpers = [h.thread(functools.partial(canceller, k), f"cancel-{k}") for k in range(4)]
    helpers += [h.thread(functools.partial(subscriber, k), f"sub-{k}") for k in range(2)]
    submitters = [h.thread(functools.partial(submitter, k), f"submit-{k}") for k in range(2)]
    for t in submitters:
        t.join(60)
    done.set()
    for t in helpers:
        t.join(WAIT)
    assert not not_found, f"cached ids reported unknown: {list(not_found)[:5]} {h.tag()}"
    kinds = tr.check_all(timeout=30, cancels_exact=True, allowed_errors=(TaskCancelledError,))
    print(f"outcomes: {dict(kinds)}")
    assert kinds["TaskCancelledError"] > 0, f"the storm cancelled nothing {h.tag()}"
    # Cancelling a finished task is a no-op returning False.
    for tid in ids[:50]:
        assert c.cancel_task(tid) is False, f"{tid}: cancel after the end returned True"
    finish(h, c, tr, cancels_exact=True, allowed_errors=(TaskCancelledError,))


@pytest.mark.timeout(60)
def test_subscribers_hold_the_result_before_callbacks_run(h: Harness) -> None:
    """Subscribers registered before a task ends hold its Result by the time its
    callbacks run, however it ends (value, error, timeout, cancel)."""
    n = scaled(2_000)
    c = h.cluster(4, run=False)
    tr = Tracker(c, h)
    rng = h.rng()
    gate = h.event()
    early: list[tuple[str, list[int]]] = []

    def on_complete(tid: str, value: Any, error: BaseException | None) -> None:
        tr.on_complete(tid, value, error)
        early.append((tid, [q.qsize() for q in tr.queues[tid]]))

    blocked = []
    for i in range(n):
        tid = f"b{i}"
        roll = rng.random()
        if roll < 0.05:
            b = c.add_task(body, tr, 0.0, 0, gate).with_timeout(0.01)
        elif roll < 0.10:
            b = c.add_task(body, tr, 0.0, 0, gate)
            blocked.append(tid)
        else:
            b = c.add_task(body, tr, 0.0, 1 if roll < 0.3 else 0)
        tr.submit(b.on_complete(on_complete).on_failure(tr.on_failure), tid, callbacks=False)
        tr.callbacks.add(tid)
        tr.subscribe_more(tid)
    c.run()
    for tid in blocked:
        assert wait_until(functools.partial(_has_started, tr, tid)), f"{tid} {h.tag()}"
        assert tr.cancel(tid) is True
    tr.wait_callbacks()
    late = [(tid, sizes) for tid, sizes in early if min(sizes) < 1]
    assert not late, f"callbacks ran before subscribers had the Result: {late[:5]} {h.tag()}"
    tr.collect()
    tr.check_stats_idle()
    tr.check(allowed_errors=FINAL)
    finish(h, c, tr, allowed_errors=FINAL)


@pytest.mark.timeout(60)
def test_id_reuse_churn(h: Harness) -> None:
    """One id is submitted again and again (from the previous incarnation's on_complete,
    once it is purged) while other threads cancel and subscribe to it by id: every
    incarnation ends exactly once, every subscriber queue gets exactly one Result, and
    cancel_task returned True exactly as often as an incarnation was cancelled."""
    incarnations = scaled(1_500)
    c = h.cluster(3)
    lock = threading.Lock()
    results: list[Result[Any]] = []
    trues = 0
    subscriptions: list[queue.SimpleQueue[Result[Any]]] = []
    finished = threading.Event()
    errors: list[BaseException] = []
    count = iter(range(incarnations))

    def work(i: int) -> object:
        ctx = current()
        if i % 3 == 0:
            time.sleep(0.0003)
        return LATE if ctx.reason is not None else ("v", i)

    def launch() -> None:
        i = next(count, None)
        if i is None:
            finished.set()
            return
        b = c.add_task(work, i).with_id("hot").on_complete(on_complete)
        if i % 4 == 0:
            b.with_cache(ttl=0.0005)
        try:
            handle = b.submit()
        except BaseException as exc:  # recorded, asserted on below
            errors.append(exc)
            finished.set()
            return
        q = handle.subscribe()
        with lock:
            subscriptions.append(q)

    def on_complete(tid: str, value: Any, error: BaseException | None) -> None:
        with lock:
            results.append(Result(value, error))
        if error is None or isinstance(error, TaskCancelledError):
            # A cached incarnation keeps the id until its TTL passes: wait for that.
            if not wait_until(lambda: _id_free(c, "hot"), WAIT):
                errors.append(AssertionError("id never purged"))
                finished.set()
                return
            launch()

    def canceller() -> None:
        nonlocal trues
        rng = h.rng("cancel")
        while not finished.is_set():
            try:
                if c.cancel_task("hot"):
                    with lock:
                        trues += 1
            except TaskNotFoundError:
                pass
            finished.wait(rng.uniform(0, 0.001))

    def subscriber() -> None:
        while not finished.is_set():
            try:
                q = c.subscribe("hot")
            except TaskNotFoundError:
                pass
            else:
                with lock:
                    subscriptions.append(q)
            finished.wait(0.0003)

    helpers = [h.thread(canceller, "canceller"), h.thread(subscriber, "subscriber")]
    launch()
    assert finished.wait(50), f"churn stalled after {len(results)} incarnations {h.tag()}"
    for t in helpers:
        t.join(WAIT)
    assert not errors, f"{errors[:3]} {h.tag()}"
    assert len(results) == incarnations, f"{len(results)} Results {h.tag()}"
    assert all(r.value is not LATE for r in results), f"a late value was delivered {h.tag()}"
    cancelled = sum(isinstance(r.error, TaskCancelledError) for r in results)
    assert trues == cancelled, f"cancel_task True x{trues}, {cancelled} cancelled {h.tag()}"
    end = time.monotonic() + WAIT
    got = [q.get(timeout=max(0.001, end - time.monotonic())) for q in subscriptions]
    assert all(isinstance(r, Result) and r.value is not LATE for r in got)
    time.sleep(GRACE_EXTRA)
    assert all(q.empty() for q in subscriptions), f"a queue got two Results {h.tag()}"
    print(f"{incarnations} incarnations, {cancelled} cancelled, {len(subscriptions)} queues")
    s = c.stats()
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.timed_out == incarnations
    finish(h, c)


def _id_free(c: Cluster, tid: str) -> bool:
    try:
        c.info(tid)
    except TaskNotFoundError:
        return True
    return False


# ============================================================================ memory


class Payload:
    """A weakly referenceable object passed to, or returned by, a task."""


def _noop() -> None:
    return None


def _fail_first_attempt() -> None:
    if current().attempt == 0:
        raise PlannedError("first attempt fails")


def _noop_callback(*args: object) -> None:
    return None


def _run_memory_batch(c: Cluster, rng: Any, n: int, chunk: int = 500) -> None:
    """``n`` tasks of every common shape; returns once all are terminal, keeping nothing."""
    for lo in range(0, n, chunk):
        handles: list[TaskHandle[Any]] = []
        cancels: list[TaskHandle[Any]] = []
        queues: list[queue.SimpleQueue[Result[Any]]] = []
        for _ in range(min(chunk, n - lo)):
            roll = rng.random()
            if roll < 0.05:
                b: TaskBuilder[Any] = c.add_task(_fail_first_attempt).with_retry(1)
                b.with_retry_mode(rng.choice(list(RetryMode)))
            else:
                b = c.add_task(_noop)
            if 0.05 <= roll < 0.10:
                b.with_timeout(5.0)
            elif roll < 0.15:
                b.with_delay(0.0005)
            elif roll < 0.20:
                b.with_delay(30)
            elif roll < 0.25:
                b.on_complete(_noop_callback).on_failure(_noop_callback)
            elif roll < 0.27:
                b.with_cache(ttl=0.001)
            elif roll < 0.30:
                b.with_priority(rng.randint(-5, 5))
            handle = b.submit()
            if 0.15 <= roll < 0.20:
                cancels.append(handle)
            elif 0.30 <= roll < 0.35:
                queues.append(handle.subscribe())
            handles.append(handle)
        for handle in cancels:
            assert handle.cancel(), "cancelling a task delayed by 30 s failed"
        for handle in handles:
            assert handle.wait(WAIT) is not None, f"task {handle.id} never ended"
        for q in queues:
            q.get(timeout=WAIT)
        del handles, cancels, queues


@pytest.mark.timeout(120)
def test_memory_plateau(h: Harness) -> None:
    """After 10k warm-up tasks, 30k more (100k at scale 5) grow traced memory < 1 MB,
    and with nothing cached the scheduler holds no task when idle."""
    c = h.cluster(2)
    rng = h.rng()
    warm, main = scaled(10_000), max(30_000, scaled(20_000))
    tracemalloc.start()
    try:
        _run_memory_batch(c, rng, warm)
        time.sleep(0.002)  # let the 1 ms cache TTLs pass: the next submit purges them
        _run_memory_batch(c, rng, 1)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _run_memory_batch(c, rng, main)
        time.sleep(0.002)
        _run_memory_batch(c, rng, 1)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    growth = after - before
    print(f"traced memory growth over {main} tasks: {growth} bytes")
    sizes = c._rt.sched.sizes()
    assert sizes["tasks"] == 0, f"idle scheduler still holds tasks: {sizes} {h.tag()}"
    assert growth < 1_000_000, f"memory grew {growth} bytes over {main} tasks {h.tag()}"
    assert max(sizes.values()) <= 64, f"internal structures stay large: {sizes} {h.tag()}"
    s = c.stats()
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.timed_out, f"{s} {h.tag()}"
    finish(h, c)


def _make_payload(arg: Payload, *, kw: Payload) -> Payload:
    return Payload()


def _raise_weak_error(arg: Payload, *, kw: Payload) -> None:
    raise WeakError("boom")


@pytest.mark.parametrize("ttl", [None, 0.05], ids=["uncached", "cached"])
def test_finished_task_releases_args_value_and_exception(h: Harness, ttl: float | None) -> None:
    """Once its handles and Results are dropped (and a cached one is purged, and the
    failed one's dead letter cleared: SPEC §13 keeps what a resurrect needs), a task's
    args, kwargs, value and exception die by reference counting alone (gc disabled)."""
    c = h.cluster(2)
    refs: dict[str, weakref.ref[Any]] = {}
    ids: list[str] = []
    gc.disable()
    try:
        for fn, name in ((_make_payload, "value"), (_raise_weak_error, "error")):
            arg, kw = Payload(), Payload()
            refs[f"{name}-task arg"] = weakref.ref(arg)
            refs[f"{name}-task kwarg"] = weakref.ref(kw)
            b = c.add_task(fn, arg, kw=kw)
            if ttl is not None:
                b.with_cache(ttl=ttl)
            handle = b.submit()
            ids.append(handle.id)
            del arg, kw, b
            result = handle.wait(WAIT)
            assert result is not None, f"task never ended {h.tag()}"
            if name == "value":
                assert isinstance(result.value, Payload), f"{result!r} {h.tag()}"
                refs["value"] = weakref.ref(result.value)
            else:
                assert isinstance(result.error, WeakError), f"{result!r} {h.tag()}"
                refs["exception"] = weakref.ref(result.error)
            del result, handle
        if ttl is not None:
            time.sleep(ttl)
            for tid in ids:  # a lookup purges expired results (and then misses)
                with pytest.raises(TaskNotFoundError):
                    c.info(tid)
        assert c.clear_dead_letters() == 1  # the failed task's

        def alive() -> list[str]:
            return [name for name, ref in refs.items() if ref() is not None]

        wait_until(lambda: not alive(), 2.0)
        assert not alive(), f"still referenced after the task ended: {alive()} {h.tag()}"
    finally:
        gc.enable()
    finish(h, c)


# ============================================================================ BaseException


class CustomBase(BaseException):
    pass


@pytest.mark.parametrize(
    "exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit, BaseException, CustomBase]
)
def test_base_exception_fails_only_that_task(h: Harness, exc_type: type[BaseException]) -> None:
    c = h.cluster(2)
    tr = Tracker(c, h)
    rng = h.rng()
    raised: dict[str, BaseException] = {}

    def raiser(fail_first: int) -> object:
        ctx = tr.attempt()
        if ctx.attempt < fail_first:
            raise PlannedError("retried first")
        exc = exc_type(f"from {ctx.task_id}")
        raised[ctx.task_id] = exc
        raise exc

    for i in range(4):  # directly; and after a retry, in both retry modes
        fail_first = i % 2
        b = c.add_task(raiser, fail_first).with_retry_mode(rng.choice(list(RetryMode)))
        tr.submit(b, f"base{i}", retries=3)
    for i in range(scaled(1_000)):
        tr.submit(c.add_task(body, tr), f"after{i}")
    tr.collect()
    tr.check_stats_idle()
    tr.check(allowed_errors=(exc_type,))
    for i in range(4):
        tid = f"base{i}"
        r = tr.results[tid]
        assert r.error is raised[tid], f"{tid}: {r!r} is not the raised error {h.tag()}"
        assert tr.attempts[tid] == 1 + i % 2, f"{tid}: BaseException retried {h.tag()}"
    assert all(tr.results[f"after{i}"].ok for i in range(scaled(1_000)))
    s = c.stats()
    assert s.workers == 2 and s.failed == 4, f"{s} {h.tag()}"
    finish(h, c, tr, allowed_errors=(exc_type,))


# ============================================================================ hostile callbacks


def _constant(value: Any, attempt: int) -> Any:
    return value


def _has_started(tr: Tracker, tid: str) -> bool:
    return tr.attempts[tid] > 0


def _cluster_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "cluster" or r.name.startswith("cluster.")]


@pytest.mark.timeout(60)
def test_raising_callbacks_predicates_and_backoffs(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Callbacks, retry predicates and backoffs that raise (Exception or BaseException)
    or return NaN/negative/garbage delays are logged on the ``cluster`` logger; every task
    still reaches exactly one terminal Result and the pool keeps its strength."""
    caplog.set_level(logging.ERROR, logger="cluster")
    c = h.cluster(2)
    tr = Tracker(c, h)
    raised: dict[str, list[BaseException]] = {}
    expect: dict[str, tuple[str, int]] = {}  # id -> (outcome, attempts)
    gate = h.event()
    makers: dict[str, Callable[[], BaseException]] = {
        "exc": lambda: RuntimeError("callback bug"),
        "kbi": KeyboardInterrupt,
        "sysexit": lambda: SystemExit(3),
        "base": lambda: BaseException("bare"),
    }

    def boom(tid: str, kind: str) -> BaseException:
        exc = makers[kind]()
        raised.setdefault(tid, []).append(exc)
        return exc

    def raising(tid: str, kind: str) -> Callable[..., Any]:
        def hook(*args: object) -> Any:
            raise boom(tid, kind)

        return hook

    def bad_complete(kind: str) -> Callable[[str, Any, BaseException | None], None]:
        def cb(tid: str, value: Any, error: BaseException | None) -> None:
            tr.on_complete(tid, value, error)
            raise boom(tid, kind)

        return cb

    def bad_failure(kind: str) -> Callable[[str, BaseException], None]:
        def cb(tid: str, error: BaseException) -> None:
            tr.on_failure(tid, error)
            raise boom(tid, kind)

        return cb

    def track(b: TaskBuilder[Any], tid: str, outcome: str, attempts: int, **kw: Any) -> None:
        tr.submit(b, tid, callbacks=False, **kw)
        tr.callbacks.add(tid)
        expect[tid] = (outcome, attempts)

    cancel_ids: list[str] = []
    for kind in makers:
        for mode in RetryMode:
            m = mode.name.lower()
            # on_complete / on_failure raising, on success and on failure.
            b = c.add_task(body, tr).on_complete(bad_complete(kind)).on_failure(tr.on_failure)
            track(b.with_retry_mode(mode), f"complete-{kind}-{m}", "ok", 1)
            b = c.add_task(body, tr, 0.0, 1).on_complete(bad_complete(kind))
            track(b.on_failure(bad_failure(kind)), f"both-{kind}-{m}", "PlannedError", 1)
            # retry_if raising counts as False: no retry.
            b = c.add_task(body, tr, 0.0, 1).with_retry_mode(mode)
            b.retry_if(raising(f"pred-{kind}-{m}", kind))
            b.on_complete(tr.on_complete).on_failure(tr.on_failure)
            track(b, f"pred-{kind}-{m}", "PlannedError", 1, retries=2)
            # backoff raising: logged, retried without delay.
            b = c.add_task(body, tr, 0.0, 1).with_retry_mode(mode)
            b.with_backoff(raising(f"back-{kind}-{m}", kind))
            b.on_complete(tr.on_complete).on_failure(tr.on_failure)
            track(b, f"back-{kind}-{m}", "ok", 2, retries=2)
            # callbacks raising on a cancelled running task (run off the worker).
            b = c.add_task(body, tr, 0.0, 0, gate).with_retry_mode(mode)
            b.on_complete(bad_complete(kind)).on_failure(bad_failure(kind))
            track(b, f"cancel-{kind}-{m}", "TaskCancelledError", 1, retries=1)
            cancel_ids.append(f"cancel-{kind}-{m}")
        # callbacks raising on a timed-out task (settled by the watchdog).
        b = c.add_task(body, tr, 0.0, 0, gate).with_timeout(0.05)
        b.on_complete(bad_complete(kind)).on_failure(bad_failure(kind))
        track(b, f"timeout-{kind}", "TaskTimeoutError", 1)
    for label, delay in (("nan", math.nan), ("neg", -5.0), ("str", "soon"), ("none", None)):
        for mode in RetryMode:
            b = c.add_task(body, tr, 0.0, 1).with_retry_mode(mode)
            b.with_backoff(functools.partial(_constant, delay)).on_complete(tr.on_complete)
            b.on_failure(tr.on_failure)
            track(b, f"delay-{label}-{mode.name.lower()}", "ok", 2, retries=1)
    for tid in cancel_ids:
        assert wait_until(functools.partial(_has_started, tr, tid)), f"{tid} never ran {h.tag()}"
        assert tr.cancel(tid) is True, f"{tid}: cancel_task did not cancel it {h.tag()}"
    tr.collect()
    tr.check_stats_idle()
    tr.check(allowed_errors=FINAL)
    for tid, (outcome, attempts) in expect.items():
        r = tr.results[tid]
        got = "ok" if r.error is None else type(r.error).__name__
        assert got == outcome, f"{tid}: {r!r}, expected {outcome} {h.tag()}"
        assert tr.attempts[tid] == attempts, f"{tid}: {tr.attempts[tid]} attempts {h.tag()}"
    gate.set()
    finish(h, c, tr, allowed_errors=FINAL)  # every callback has run once stop() returns
    records = _cluster_records(caplog)
    logged = {id(r.exc_info[1]) for r in records if r.exc_info and r.exc_info[1] is not None}
    unlogged = [(tid, exc) for tid, excs in raised.items() for exc in excs if id(exc) not in logged]
    assert not unlogged, f"exceptions not logged on 'cluster': {unlogged[:5]} {h.tag()}"
    text = "\n".join(r.getMessage() for r in records)
    quiet = [tid for tid in expect if tid.startswith("delay-") and repr(tid) not in text]
    assert not quiet, f"bad backoff delays not logged: {quiet} {h.tag()}"
    assert set(raised) >= {t for t in expect if not t.startswith("delay-")}, (
        f"some hooks never ran: {set(expect) - set(raised)} {h.tag()}"
    )


# ============================================================================ stuck tasks


def test_stuck_tasks_time_out_while_the_pool_keeps_working(h: Harness) -> None:
    """Tasks stuck past their timeout get TaskTimeoutError within timeout + slack while
    100 quick tasks still finish; once released, the abandoned threads exit and their
    late return values are dropped."""
    c = h.cluster(2)
    tr = Tracker(c, h)
    gate = h.event()
    timeout, slack = 0.2, 2.0
    timing: list[tuple[str, float, queue.SimpleQueue[Result[Any]]]] = []
    for i in range(4):
        retries = i % 2  # the retry gets stuck too: two timeouts back to back
        b = c.add_task(body, tr, 0.0, 0, gate).with_timeout(timeout).with_priority(5)
        handle = tr.submit(b, f"stuck{i}", retries=retries)
        timing.append((handle.id, time.monotonic() + timeout * (retries + 1), handle.subscribe()))
    quick = [f"quick{i}" for i in range(100)]
    for tid in quick:
        tr.submit(c.add_task(body, tr, 0.001), tid)
    for tid, due, q in timing:
        r = q.get(timeout=WAIT)
        late = time.monotonic() - due
        assert isinstance(r.error, TaskTimeoutError), f"{tid}: {r!r} {h.tag()}"
        assert late < slack, f"{tid}: Result {late:.2f}s after its timeout {h.tag()}"
    tr.collect(ids=quick)
    assert not gate.is_set()
    s = c.stats()
    assert s.workers == 2, f"pool not at full strength while 6 calls are stuck: {s} {h.tag()}"
    assert s.abandoned == 6, f"expected 6 abandoned stuck calls: {s} {h.tag()}"
    gate.set()  # the stuck calls return LATE now; nobody may see it
    assert wait_until(lambda: c.stats().abandoned == 0), f"{c.stats()} {h.tag()}"
    tr.check_all(allowed_errors=(TaskTimeoutError,))
    finish(h, c, tr, allowed_errors=(TaskTimeoutError,))


# ============================================================================ races at ±1 ms


def _race_body(tr: Tracker, hold: float, announce: queue.SimpleQueue[Any] | None) -> object:
    ctx = tr.attempt()
    if announce is not None:
        announce.put((ctx.task_id, time.monotonic()))
    time.sleep(hold)
    return LATE if ctx.reason is not None else value_of(ctx.task_id)


@pytest.mark.parametrize("mode", ["timeout", "cancel", "both"])
@pytest.mark.timeout(120)
def test_timeout_or_cancel_racing_completion(h: Harness, mode: str) -> None:
    """A task finishing within ±1 ms of its timeout and/or of a cancel_task(): exactly one
    Result, either the value or the timeout/cancel error, never the late value; cancel_task
    returned True exactly when the Result says cancelled."""
    trials = scaled(2_000)
    c = h.cluster(4)
    tr = Tracker(c, h)
    rng = h.rng()
    base = 0.002
    timeouts = mode in ("timeout", "both")
    cancels = mode in ("cancel", "both")
    announce: queue.SimpleQueue[Any] = queue.SimpleQueue()
    cancel_at: dict[str, float] = {}
    errors: tuple[type[BaseException], ...] = ()
    if timeouts:
        errors += (TaskTimeoutError,)
    if cancels:
        errors += (TaskCancelledError,)

    def canceller() -> None:
        while True:
            item = announce.get(timeout=60)
            if item is None:
                return
            tid, started = item
            pause = started + cancel_at[tid] - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            tr.cancel(tid)

    if cancels:
        for k in range(4):
            h.thread(canceller, f"canceller-{k}")
    for i in range(trials):
        tid = f"r{i}"
        hold = base + rng.uniform(-0.001, 0.001) if timeouts else base
        cancel_at[tid] = base + rng.uniform(-0.001, 0.001)
        b = c.add_task(_race_body, tr, hold, announce if cancels else None)
        retries = 0
        if timeouts:
            b.with_timeout(base)
            retries = rng.choice([0, 0, 1]) if mode == "timeout" else 0
        if cancels:
            b.with_cache(ttl=60)  # so that a late cancel_task() answers False, not NotFound
        tr.submit(b, tid, retries=retries)
    tr.collect(timeout=90)
    for _ in range(4 if cancels else 0):
        announce.put(None)
    h.join_helpers()
    tr.check_stats_idle()
    kinds = tr.check(cancels_exact=cancels, allowed_errors=errors)
    print(f"{mode}: {dict(kinds)}")
    finish(h, c, tr, cancels_exact=cancels, allowed_errors=errors)


# ============================================================================ re-entrancy


def _reentrant_calls(c: Cluster, me: str, other: str, child: str) -> dict[str, Any]:
    """Call every public method on ``c`` from the current (cluster) thread."""
    out: dict[str, Any] = {}

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except BaseException as exc:  # recorded, asserted on by the test
            out[name] = exc

    call("info", lambda: c.info(me).state)
    call("stats", lambda: c.stats().submitted)
    call("subscribe-self", lambda: c.subscribe(me))
    call("subscribe-other", lambda: c.subscribe(other))
    call("submit", lambda: c.add_task(value_of, child).with_id(child).with_cache(60).submit())
    handle = out["submit"]
    if isinstance(handle, TaskHandle):
        call("child-result", lambda: handle.result(timeout=WAIT))
    call("cancel-other", lambda: c.cancel_task(other))
    call("cancel-self", lambda: c.cancel_task(me))
    call("info-after", lambda: c.info(me).state)
    return out


@pytest.mark.parametrize(
    "where", ["task", "inline-callback", "cancel-callback", "timeout-callback"]
)
@pytest.mark.timeout(30)
def test_reentrant_calls_do_not_deadlock(h: Harness, where: str) -> None:
    c = h.cluster(2)
    tr = Tracker(c, h)
    gate = h.event()
    other = "other"
    tr.submit(c.add_task(body, tr).with_delay(60).with_cache(60), other)
    done = threading.Event()
    out: dict[str, Any] = {}

    def in_task() -> object:
        ctx = tr.attempt()
        out.update(_reentrant_calls(c, ctx.task_id, other, "child"))
        out["signalled"] = ctx.cancelled.is_set()
        done.set()
        return LATE if ctx.reason is not None else value_of(ctx.task_id)

    def in_callback(tid: str, value: Any, error: BaseException | None) -> None:
        tr.on_complete(tid, value, error)
        out.update(_reentrant_calls(c, tid, other, "child"))
        out["thread"] = threading.current_thread().name
        done.set()

    if where == "task":
        b = c.add_task(in_task).with_cache(60).on_complete(tr.on_complete)
    else:
        if where == "inline-callback":
            b = c.add_task(body, tr)
        elif where == "cancel-callback":
            b = c.add_task(body, tr, 0.0, 0, gate)
        else:
            b = c.add_task(body, tr, 0.0, 0, gate).with_timeout(0.05)
        b.with_cache(60).on_complete(in_callback)
    tr.submit(b.on_failure(tr.on_failure), "me", callbacks=False)
    tr.callbacks.add("me")
    if where == "cancel-callback":
        assert wait_until(lambda: tr.attempts["me"] > 0), f"never started {h.tag()}"
        assert tr.cancel("me") is True
    assert done.wait(WAIT), f"re-entrant calls never completed (deadlock?) {h.tag()}"
    tr.add_queue("me", out["subscribe-self"])
    tr.add_queue(other, out["subscribe-other"])
    tr.check_all(allowed_errors=(TaskCancelledError, TaskTimeoutError))
    expect_state = {
        "task": TaskState.RUNNING,
        "inline-callback": TaskState.SUCCEEDED,
        "cancel-callback": TaskState.CANCELLED,
        "timeout-callback": TaskState.TIMED_OUT,
    }[where]
    assert out["info"] is expect_state, f"{out} {h.tag()}"
    assert isinstance(out["stats"], int)
    assert out["child-result"] == ("v", "child"), f"{out} {h.tag()}"
    assert out["cancel-other"] is True, f"{out} {h.tag()}"
    assert out["cancel-self"] is (where == "task"), f"{out} {h.tag()}"
    after = TaskState.CANCELLED if where == "task" else expect_state
    assert out["info-after"] is after, f"{out} {h.tag()}"
    if where == "task":
        assert out["signalled"] is True
        assert isinstance(tr.results["me"].error, TaskCancelledError)
    finish(h, c, tr, allowed_errors=(TaskCancelledError, TaskTimeoutError))


@pytest.mark.parametrize("where", ["task", "callback"])
@pytest.mark.timeout(30)
def test_stop_timeout_zero_from_inside(h: Harness, where: str) -> None:
    """stop(timeout=0) from a task or a callback raises StopTimeoutError (caught there),
    does not deadlock, and every task still gets exactly one Result."""
    c = h.cluster(2)
    tr = Tracker(c, h)
    gate = h.event()
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def stop_now() -> None:
        try:
            c.stop(timeout=0)
            outcome.append(None)
        except BaseException as exc:  # recorded, asserted on below
            outcome.append(exc)
        done.set()

    def stopping_task() -> object:
        ctx = tr.attempt()
        stop_now()
        return LATE if ctx.reason is not None else value_of(ctx.task_id)

    def stopping_callback(tid: str, value: Any, error: BaseException | None) -> None:
        tr.on_complete(tid, value, error)
        stop_now()

    tr.submit(c.add_task(body, tr, 0.0, 0, gate).with_priority(9), "blocked")
    assert wait_until(lambda: tr.attempts["blocked"] > 0)
    for i in range(20):
        tr.submit(c.add_task(body, tr), f"queued{i}")
    tr.submit(c.add_task(body, tr).with_delay(60), "delayed")
    if where == "task":
        b = c.add_task(stopping_task).on_complete(tr.on_complete).on_failure(tr.on_failure)
    else:
        b = c.add_task(body, tr).on_complete(stopping_callback).on_failure(tr.on_failure)
    tr.submit(b.with_priority(5), "stopper", callbacks=False)
    tr.callbacks.add("stopper")
    assert done.wait(WAIT), f"stop(timeout=0) deadlocked {h.tag()}"
    assert len(outcome) == 1 and isinstance(outcome[0], StopTimeoutError | type(None)), (
        f"{outcome} {h.tag()}"
    )
    tr.collect()
    tr.check_stats_idle()
    tr.check(allowed_errors=(TaskCancelledError,))
    with pytest.raises(ClusterStoppedError):
        c.add_task(_noop).submit()
    finish(h, c, tr, allowed_errors=(TaskCancelledError,))


@pytest.mark.timeout(30)
def test_stop_with_timeout_from_callback_when_nothing_is_left(h: Harness) -> None:
    """From the on_complete of the last task, stop(timeout=2) has nothing left to wait
    for: it must neither sit out its whole timeout nor raise StopTimeoutError."""
    c = h.cluster(2)
    tr = Tracker(c, h)
    outcome: list[Any] = []
    done = threading.Event()

    def stopping_callback(tid: str, value: Any, error: BaseException | None) -> None:
        tr.on_complete(tid, value, error)
        t0 = time.monotonic()
        try:
            c.stop(timeout=2)
            outcome.append(None)
        except BaseException as exc:  # recorded, asserted on below
            outcome.append(exc)
        outcome.append(time.monotonic() - t0)
        done.set()

    b = c.add_task(body, tr).on_complete(stopping_callback).on_failure(tr.on_failure)
    tr.submit(b, "last", callbacks=False)
    tr.callbacks.add("last")
    assert done.wait(WAIT), f"stop() from a callback deadlocked {h.tag()}"
    tr.check_all(allowed_errors=())
    error, elapsed = outcome
    assert error is None and elapsed < 1.0, (
        f"stop(timeout=2) from the last task's callback raised {error!r} after "
        f"{elapsed:.2f}s although every task was terminal {h.tag()}"
    )
    finish(h, c, tr, allowed_errors=())


# ============================================================================ bad input fuzzing

SETTERS = [
    "with_id",
    "with_start_time",
    "with_delay",
    "with_timeout",
    "with_priority",
    "with_retry",
    "with_backoff",
    "with_jitter",
    "retry_if",
    "with_retry_mode",
    "with_cache",
    "on_complete",
    "on_failure",
]


def _param_name(method: Callable[..., Any]) -> str:
    """The name of the value parameter of an (unbound) builder method."""
    return next(p for p in inspect.signature(method).parameters if p != "self")


def _flaky() -> object:
    """Fails its first attempt, succeeds on the second."""
    ctx = current()
    if ctx.attempt == 0:
        raise PlannedError("first attempt")
    return value_of(ctx.task_id)


def _always_true(*args: object) -> bool:
    return True


def _always_false(*args: object) -> bool:
    return False


def _raises_runtime(*args: object) -> object:
    raise RuntimeError("hook bug")


def _raises_interrupt(*args: object) -> object:
    raise KeyboardInterrupt


def _returns_nan(*args: object) -> float:
    return math.nan


def _returns_negative(*args: object) -> float:
    return -1.0


class _IntEnumLike(int):
    pass


def _values() -> Any:
    from decimal import Decimal
    from fractions import Fraction

    from hypothesis import strategies as st

    odd = [
        object(),
        [],
        {},
        (),
        b"x",
        1j,
        Decimal("1.5"),
        Decimal("NaN"),
        Fraction(1, 3),
        _IntEnumLike(3),
        float("-0.0"),
        2**1100,
        -(2**1100),
        timedelta.max,
        timedelta.min,
        -timedelta(microseconds=1),
        datetime.max,
        datetime.min,
        datetime.max.replace(tzinfo=UTC),
        datetime.min.replace(tzinfo=UTC),
        datetime(9999, 12, 31, tzinfo=UTC),
        RetryMode.REQUEUE,
        RetryMode.IMMEDIATE,
        FixedBackoff(0),
        LinearBackoff(0, 0.001, max=0.002),
        ExponentialBackoff(0.0005, max=0.001),
        _always_true,
        _always_false,
        _raises_runtime,
        _raises_interrupt,
        _returns_nan,
        _returns_negative,
        int,
        str,
        len,
        repr,
    ]
    tzs = st.sampled_from([None, UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=13))])
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-1.0, max_value=0.05),
        st.text(max_size=8),
        st.timedeltas(),
        st.timedeltas(min_value=timedelta(seconds=-1), max_value=timedelta(milliseconds=50)),
        st.datetimes(timezones=tzs),
        st.sampled_from(odd),
        st.functions(like=lambda *a, **k: None, returns=st.sampled_from([0, -1, None, "x"])),
    )


def _near_valid(setter: str) -> Any:
    """Values of roughly the right kind for ``setter`` (often valid, often just not)."""
    from hypothesis import strategies as st

    callables = st.one_of(
        st.sampled_from(
            [
                FixedBackoff(0),
                LinearBackoff(0, 0.001, max=0.002),
                ExponentialBackoff(0.0005, max=0.001),
                _always_true,
                _always_false,
                _raises_runtime,
                _raises_interrupt,
                _returns_nan,
                _returns_negative,
                int,
                str,
                len,
                repr,
                functools.partial(_always_true, 1),
                Payload(),  # an object: not callable
            ]
        ),
        st.functions(like=lambda *a, **k: None, returns=st.sampled_from([0, -1, None, "x"])),
    )
    durations = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-1.0, max_value=0.05),
        st.integers(min_value=-3, max_value=3),
        st.timedeltas(min_value=timedelta(seconds=-1), max_value=timedelta(milliseconds=50)),
        st.timedeltas(),
    )
    tzs = st.sampled_from([None, UTC, timezone(timedelta(hours=-7))])
    return {
        "with_id": st.text(max_size=8),
        "with_start_time": st.datetimes(timezones=tzs),
        "with_delay": durations,
        "with_timeout": durations,
        "with_priority": st.integers() | st.integers(min_value=-5, max_value=5),
        "with_retry": st.integers() | st.integers(min_value=-2, max_value=4),
        "with_backoff": callables,
        "with_jitter": st.floats(allow_nan=True, allow_infinity=True)
        | st.floats(min_value=-0.5, max_value=1.5)
        | st.integers(min_value=-1, max_value=2),
        "retry_if": callables,
        "with_retry_mode": st.sampled_from([*RetryMode, "requeue", "REQUEUE", 0, None]),
        "with_cache": durations,
        "on_complete": callables,
        "on_failure": callables,
    }[setter]


def _submittable(setter: str, value: Any) -> bool:
    """Would the accepted ``value`` let the task run within ~50 ms?"""
    if setter == "with_delay":
        s = value.total_seconds() if isinstance(value, timedelta) else float(value)
        return s <= 0.05
    if setter == "with_start_time":
        try:
            ahead = value.timestamp() - time.time()
        except (OverflowError, OSError, ValueError):
            ahead = math.inf if value.year >= 1970 else -math.inf
        return bool(ahead <= 0.05)
    return True


@pytest.mark.timeout(120)
def test_fuzz_every_builder_setter(h: Harness) -> None:
    """Any value for any setter is either accepted, or rejected at that call with a
    TypeError/ValueError naming the argument; accepted ones never fail later in a worker."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    c = h.cluster(2)
    counter = iter(range(10**9))
    seen: Counter[str] = Counter()
    anything = _values()

    @hypothesis_seed(h.seed)
    @settings(
        max_examples=scaled(600, 50),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data(), setter=st.sampled_from(SETTERS))
    def run(data: Any, setter: str) -> None:
        pool = _near_valid(setter) if data.draw(st.booleans()) else anything
        value = data.draw(pool, label="value")
        n = next(counter)
        b = c.add_task(_flaky).with_retry(1).with_id(f"fz{n}")
        method = getattr(b, setter)
        name = _param_name(getattr(TaskBuilder, setter))
        try:
            returned = method(value)
        except (TypeError, ValueError) as exc:
            seen[f"{setter}: rejected"] += 1
            assert name in str(exc), f"{setter}({value!r}) -> {exc!r} does not name {name!r}"
            accepted = False
        else:
            seen[f"{setter}: accepted"] += 1
            assert returned is b, f"{setter} did not return the builder"
            accepted = True
        if accepted and not _submittable(setter, value):
            return
        try:
            handle = b.submit()
        except DuplicateTaskError:
            assert setter == "with_id", f"{setter}({value!r}): duplicate id at submit"
            return
        result = handle.wait(WAIT)
        assert result is not None, f"{setter}({value!r}): task never ended {h.tag()}"
        if result.ok:
            assert result.value == value_of(handle.id)
            return
        err = result.error
        acceptable = (isinstance(err, PlannedError) and setter in ("with_retry", "retry_if")) or (
            isinstance(err, TaskTimeoutError) and setter == "with_timeout"
        )
        assert accepted and acceptable, (
            f"{setter}({value!r}) {'accepted' if accepted else 'rejected'}, then the task "
            f"failed in a worker with {err!r} {h.tag()}"
        )

    run()
    print(dict(seen))
    s = c.stats()
    assert s.workers == 2 and s.running == 0 and s.queued == 0, f"{s} {h.tag()}"
    finish(h, c)


def test_fuzz_cluster_and_handle_arguments(h: Harness) -> None:
    """Cluster(workers=...), handle.wait/result(timeout=...) and stop(timeout=...) take
    any value, or reject it at the call with TypeError/ValueError naming the argument."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    c = h.cluster(1)
    handle = c.add_task(value_of, "x").submit()
    assert handle.wait(WAIT) is not None

    @hypothesis_seed(h.seed)
    @settings(
        max_examples=scaled(200, 50),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(value=_values())
    def run(value: Any) -> None:
        for label, call, name in (
            ("Cluster", lambda: Cluster(workers=value), "workers"),
            ("wait", lambda: handle.wait(value), "timeout"),
            ("result", lambda: handle.result(value), "timeout"),
        ):
            try:
                call()
            except (TypeError, ValueError) as exc:
                assert name in str(exc), f"{label}({value!r}) -> {exc!r} misses {name!r}"
        spare = Cluster(workers=1)
        try:
            spare.stop(timeout=value)
        except (TypeError, ValueError) as exc:
            assert "timeout" in str(exc), f"stop({value!r}) -> {exc!r}"
            spare.stop(timeout=WAIT)

    run()
    finish(h, c)


@pytest.mark.timeout(60)
def test_extreme_durations_never_overflow(h: Harness) -> None:
    """Far-future delays and start times, huge timeouts/TTLs/priorities/retry counts and
    far-past start times neither overflow nor disturb normal tasks submitted afterwards."""
    c = h.cluster(2)
    tr = Tracker(c, h)
    far: dict[str, Callable[[TaskBuilder[Any]], Any]] = {
        "delay-1e9": lambda b: b.with_delay(1e9),
        "delay-max-float": lambda b: b.with_delay(1.7976931348623157e308),
        "delay-td-max": lambda b: b.with_delay(timedelta.max),
        "start-9999": lambda b: b.with_start_time(datetime(9999, 12, 31, tzinfo=UTC)),
        "start-max-naive": lambda b: b.with_start_time(datetime.max),
        "backoff-1e12-requeue": lambda b: b.with_backoff(FixedBackoff(1e12)).with_retry(1),
        "backoff-1e12-immediate": lambda b: (
            b.with_backoff(FixedBackoff(1e12)).with_retry(1).with_retry_mode(RetryMode.IMMEDIATE)
        ),
        "backoff-exp-huge": lambda b: b.with_backoff(ExponentialBackoff(1, 1e300)).with_retry(1),
    }
    soon: dict[str, Callable[[TaskBuilder[Any]], Any]] = {
        "timeout-1e12": lambda b: b.with_timeout(1e12),
        "timeout-max-float": lambda b: b.with_timeout(1.7976931348623157e308),
        "timeout-td-max": lambda b: b.with_timeout(timedelta.max),
        "cache-1e12": lambda b: b.with_cache(1e12),
        "cache-td-max": lambda b: b.with_cache(timedelta.max),
        "start-min-naive": lambda b: b.with_start_time(datetime.min),
        "start-min-aware": lambda b: b.with_start_time(datetime.min.replace(tzinfo=UTC)),
        "start-epoch": lambda b: b.with_start_time(datetime(1970, 1, 1, tzinfo=UTC)),
        "priority-huge": lambda b: b.with_priority(10**100),
        "priority-tiny": lambda b: b.with_priority(-(10**100)),
        "retries-huge": lambda b: b.with_retry(10**18),
        "jitter-1": lambda b: b.with_retry(1).with_jitter(1.0),
    }
    handles: dict[str, TaskHandle[Any]] = {}
    for tid, configure in far.items():
        fail_first = 1 if tid.startswith("backoff") else 0
        b = c.add_task(body, tr, 0.0, fail_first)
        configure(b)
        handles[tid] = tr.submit(b, tid, retries=1 if fail_first else 0)
    for tid, configure in soon.items():
        fail_first = 1 if tid.startswith(("retries", "jitter")) else 0
        b = c.add_task(body, tr, 0.0, fail_first)
        configure(b)
        handles[tid] = tr.submit(b, tid, retries=1 if fail_first else 0)
    backoffs = [t for t in far if t.startswith("backoff")]
    assert wait_until(lambda: all(tr.attempts[t] == 1 for t in backoffs)), f"{h.tag()}"
    t0 = time.monotonic()
    normal = [f"n{i}" for i in range(200)]
    for tid in normal:
        tr.submit(c.add_task(body, tr), tid)
    tr.collect(ids=normal + list(soon))
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"normal tasks took {elapsed:.2f}s next to far-off ones {h.tag()}"
    for tid in far:
        info = c.info(tid)  # dates far out of range must still render
        assert isinstance(info, TaskInfo) and not info.state.terminal, f"{tid}: {info}"
        assert info.started_at is None or tid.startswith("backoff"), f"{tid} ran early"
    assert handles["timeout-1e12"].result(timeout=1e12) == value_of("timeout-1e12")
    assert handles["cache-1e12"].wait(timeout=timedelta.max) is not None
    s = c.stats()
    assert s.delayed == len(far) and s.running == 0, f"{s} {h.tag()}"
    for tid in far:
        assert tr.cancel(tid) is True, f"{tid}: could not cancel {h.tag()}"
    tr.check_all(allowed_errors=(TaskCancelledError,))
    for tid in far:
        assert isinstance(tr.results[tid].error, TaskCancelledError)
    c.stop(timeout=1e12)
    tr.check(allowed_errors=(TaskCancelledError,))
    h.assert_threads_back()


# ============================================================================ duplicate ids


class _Contest:
    """One round of concurrent submits of the id ``tid``."""

    def __init__(self, tid: str, cached: bool, threads: int) -> None:
        self.tid = tid
        self.cached = cached
        self.barrier = threading.Barrier(threads, timeout=WAIT)
        self.lock = threading.Lock()
        self.wins: list[TaskHandle[Any]] = []
        self.losers: list[TaskBuilder[Any]] = []
        self.others: list[BaseException] = []

    def contend(self, b: TaskBuilder[Any]) -> None:
        b.with_id(self.tid)
        if self.cached:
            b.with_cache(60)
        self.barrier.wait()
        try:
            handle = b.submit()
        except DuplicateTaskError:
            with self.lock:
                self.losers.append(b)
        except BaseException as exc:  # recorded, asserted on by the test
            with self.lock:
                self.others.append(exc)
        else:
            with self.lock:
                self.wins.append(handle)


@pytest.mark.timeout(60)
def test_concurrent_submits_of_one_id(h: Harness) -> None:
    """16 threads submit the same id at once (Barrier): exactly one wins, the other 15
    get DuplicateTaskError at submit() and can fix the id and submit again."""
    c = h.cluster(2)
    tr = Tracker(c, h)
    gate = h.event()  # keeps every winner live (running or queued) until the end
    rounds = scaled(30, 5)
    for r in range(rounds):
        contest = _Contest(f"dup{r}", cached=r % 2 == 1, threads=16)
        threads = [
            h.thread(
                functools.partial(contest.contend, c.add_task(body, tr, 0.0, 0, gate)), f"dup{k}"
            )
            for k in range(16)
        ]
        for t in threads:
            t.join(WAIT)
        wins, losers = contest.wins, contest.losers
        assert not contest.others, f"round {r}: {contest.others} {h.tag()}"
        assert len(wins) == 1 and len(losers) == 15, (
            f"round {r}: {len(wins)} submits won, {len(losers)} got DuplicateTaskError {h.tag()}"
        )
        tr.queues[contest.tid] = [wins[0].subscribe()]
        tr.retries[contest.tid] = 0
        for k, b in enumerate(losers):  # a refused builder can be fixed and submitted
            handle = b.with_id(f"{contest.tid}-retry{k}").submit()
            tr.queues[handle.id] = [handle.subscribe()]
            tr.retries[handle.id] = 0
    gate.set()
    tr.check_all()
    assert all(r.ok for r in tr.results.values()), f"{h.tag()}"
    assert c.stats().submitted == rounds * 16
    finish(h, c, tr)
