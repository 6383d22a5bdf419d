"""Shared machinery of the reliability suite (tests/test_reliability*.py).

* ``SCALE`` (env ``CLUSTER_STRESS_SCALE``, default 1) sizes the heavy scenarios.
* ``base_seed()`` (env ``CLUSTER_SEED``, default ``DEFAULT_SEED``; ``CLUSTER_SEED=random``
  draws one) seeds every random choice; every assertion message carries it.
* ``Harness`` owns the clusters, gate events and helper threads of one test, and checks
  that the live threads are back to the baseline (invariant 5).
* ``Tracker`` wires subscribers and callbacks into tasks, counts attempts from inside
  them and checks invariants 1-4 (``collect``, ``check``, ``check_stats_idle``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from queue import SimpleQueue
from typing import Any

from cluster import (
    Cluster,
    ClusterError,
    Result,
    TaskBuilder,
    TaskCancelledError,
    TaskContext,
    TaskHandle,
    TaskNotFoundError,
    current,
)

SCALE = max(0.05, float(os.environ.get("CLUSTER_STRESS_SCALE", "1") or "1"))
DEFAULT_SEED = 20240617
WAIT = 10.0  #: generous bound on any single blocking wait
GRACE = 0.05  #: how long an "empty" subscriber queue must stay empty


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` times CLUSTER_STRESS_SCALE, at least ``minimum``."""
    return max(minimum, int(n * SCALE))


@functools.cache
def base_seed() -> int:
    """The run's seed (one per process, even when drawn at random)."""
    raw = os.environ.get("CLUSTER_SEED", "").strip()
    if not raw:
        return DEFAULT_SEED
    if raw == "random":
        return random.SystemRandom().randrange(2**32)
    return int(raw)


class _Late:
    """The value a task returns after it was signalled: it must never be delivered."""

    def __repr__(self) -> str:
        return "<LATE>"


LATE = _Late()


def value_of(task_id: str) -> tuple[str, str]:
    """The value a tracked task returns when it succeeds."""
    return ("v", task_id)


def wait_until(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds pass (bounded, for state that has
    no event of its own, e.g. ``info().state`` or a weakref dying)."""
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return pred()
        time.sleep(0.001)


def cluster_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cluster-")]


class PlannedError(Exception):
    """The error tracked tasks raise on purpose (retried by default)."""


class WeakError(Exception):
    """A user exception class (instances can be weakly referenced)."""


class Harness:
    """The clusters, gates and helper threads of one test; ``close()`` releases them all."""

    def __init__(self, seed: int, name: str = "") -> None:
        self.seed = seed
        self.name = name
        self.baseline = set(threading.enumerate())
        self.clusters: list[Cluster] = []
        self.events: list[threading.Event] = []
        self.threads: list[threading.Thread] = []

    def tag(self) -> str:
        return f"[{self.name} CLUSTER_SEED={self.seed} CLUSTER_STRESS_SCALE={SCALE}]"

    def rng(self, salt: object = 0) -> random.Random:
        return random.Random(f"{self.seed}:{self.name}:{salt}")

    def cluster(self, workers: int, *, run: bool = True) -> Cluster:
        c = Cluster(workers=workers)
        self.clusters.append(c)
        if run:
            c.run()
        return c

    def event(self) -> threading.Event:
        event = threading.Event()
        self.events.append(event)
        return event

    def thread(self, target: Callable[[], object], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"test-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join_helpers(self, timeout: float = WAIT) -> None:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"helper threads still running: {alive} {self.tag()}"

    def release(self) -> None:
        for event in self.events:
            event.set()

    def assert_threads_back(self, timeout: float = WAIT) -> None:
        """Invariant 5: after stop() and releasing every gate, only baseline threads live."""
        self.release()
        end = time.monotonic() + timeout
        for thread in self.threads + cluster_threads():
            if thread not in self.baseline:
                thread.join(max(0.0, end - time.monotonic()))
        left = [t.name for t in threading.enumerate() if t not in self.baseline and t.is_alive()]
        assert not left, f"threads left behind after stop(): {left} {self.tag()}"

    def close(self) -> None:
        self.release()
        for c in self.clusters:
            with contextlib.suppress(ClusterError):
                c.cancel()
            with contextlib.suppress(ClusterError):
                c.stop(timeout=WAIT)
        end = time.monotonic() + WAIT
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))


def hold_worker(c: Cluster, gate: threading.Event, priority: int = 10**9) -> TaskHandle[Any]:
    """Occupy one worker with a task blocked on ``gate``; returns once it runs."""
    started = threading.Event()

    def blocker() -> None:
        started.set()
        gate.wait(WAIT * 3)

    handle = c.add_task(blocker).with_priority(priority).submit()
    assert started.wait(WAIT), "the blocker task never started"
    return handle


class Tracker:
    """Subscribers, callbacks and attempt counts of tracked tasks, and invariants 1-4."""

    def __init__(self, c: Cluster, harness: Harness) -> None:
        self.c = c
        self.h = harness
        self._lock = threading.Lock()
        self.queues: dict[str, list[SimpleQueue[Result[Any]]]] = {}
        self.retries: dict[str, int] = {}
        self.attempts: Counter[str] = Counter()
        self.completes: defaultdict[str, list[tuple[Any, BaseException | None]]] = defaultdict(list)
        self.failures: defaultdict[str, list[BaseException]] = defaultdict(list)
        self.callbacks: set[str] = set()  # ids whose callbacks the tracker installed
        self.cancel_true: Counter[str] = Counter()
        self.results: dict[str, Result[Any]] = {}

    # -- inside tasks and callbacks -------------------------------------------------

    def attempt(self) -> TaskContext:
        """Call first thing in a tracked task: counts the attempt, returns the context."""
        ctx = current()
        with self._lock:
            self.attempts[ctx.task_id] += 1
        return ctx

    def on_complete(self, task_id: str, value: Any, error: BaseException | None) -> None:
        with self._lock:
            self.completes[task_id].append((value, error))

    def on_failure(self, task_id: str, error: BaseException) -> None:
        with self._lock:
            self.failures[task_id].append(error)

    # -- submission ---------------------------------------------------------------------

    def submit(
        self,
        builder: TaskBuilder[Any],
        task_id: str,
        *,
        retries: int = 0,
        callbacks: bool = True,
        subscribers: int = 1,
    ) -> TaskHandle[Any]:
        builder.with_id(task_id)
        if retries:
            builder.with_retry(retries)
        if callbacks:
            builder.on_complete(self.on_complete).on_failure(self.on_failure)
        with self._lock:
            assert task_id not in self.queues, f"test bug: id {task_id!r} tracked twice"
            self.queues[task_id] = []
            self.retries[task_id] = retries
            if callbacks:
                self.callbacks.add(task_id)
        try:
            handle = builder.submit()
        except BaseException:
            self.forget(task_id)
            raise
        qs = [handle.subscribe() for _ in range(subscribers)]
        with self._lock:
            self.queues[task_id].extend(qs)
        return handle

    def forget(self, task_id: str) -> None:
        """Stop tracking an id whose submit() was refused."""
        with self._lock:
            self.queues.pop(task_id, None)
            self.retries.pop(task_id, None)
            self.callbacks.discard(task_id)

    def add_queue(self, task_id: str, q: SimpleQueue[Result[Any]]) -> None:
        with self._lock:
            self.queues[task_id].append(q)

    def subscribe_more(self, task_id: str) -> bool:
        """One more subscriber through ``Cluster.subscribe`` (False if already purged)."""
        try:
            q = self.c.subscribe(task_id)
        except TaskNotFoundError:
            return False
        self.add_queue(task_id, q)
        return True

    def record_cancel(self, task_id: str, returned: bool) -> None:
        if returned:
            with self._lock:
                self.cancel_true[task_id] += 1

    def cancel(self, task_id: str) -> bool | None:
        """``cancel_task`` and record it; None if the id was already purged."""
        try:
            returned = self.c.cancel_task(task_id)
        except TaskNotFoundError:
            return None
        self.record_cancel(task_id, returned)
        return returned

    # -- checks -------------------------------------------------------------------------

    def collect(self, timeout: float = WAIT, ids: Iterable[str] | None = None) -> None:
        """Invariant 1, queue side: exactly one Result per subscriber queue, the same on all
        (ids collected by an earlier call are skipped)."""
        tag = self.h.tag()
        with self._lock:
            wanted = list(self.queues) if ids is None else list(ids)
            todo = [(t, list(self.queues[t])) for t in wanted if t not in self.results]
        end = time.monotonic() + timeout
        missing: list[str] = []
        for tid, qs in todo:
            got: list[Result[Any]] = []
            for q in qs:
                try:
                    got.append(q.get(timeout=max(0.001, end - time.monotonic())))
                except queue.Empty:
                    missing.append(tid)
                    break
            if len(got) != len(qs):
                continue
            first = got[0]
            assert isinstance(first, Result), f"{tid}: not a Result: {first!r} {tag}"
            for other in got[1:]:
                assert other.error is first.error and other.value == first.value, (
                    f"{tid}: subscribers got different Results {first!r} / {other!r} {tag}"
                )
            self.results[tid] = first
        if missing:
            states = {}
            for tid in missing[:10]:
                try:
                    states[tid] = self.c.info(tid).state.value
                except TaskNotFoundError:
                    states[tid] = "purged"
            raise AssertionError(
                f"{len(missing)} tasks delivered no Result within {timeout}s; "
                f"first: {states}; stats={self.c.stats()} {tag}"
            )
        # Nothing more may arrive: every queue stays empty for GRACE seconds.
        end = time.monotonic() + GRACE
        extra: list[tuple[str, Any]] = []
        for tid, qs in todo:
            for q in qs:
                with contextlib.suppress(queue.Empty):
                    extra.append((tid, q.get(timeout=max(0.0, end - time.monotonic()))))
        assert not extra, f"{len(extra)} extra Results delivered, first: {extra[:5]} {tag}"

    def check_stats_idle(self) -> None:
        """Invariant 2: counters add up and every gauge is zero."""
        s = self.c.stats()
        total = s.succeeded + s.failed + s.cancelled + s.timed_out
        assert s.submitted == total, f"submitted != sum of terminal counters: {s} {self.h.tag()}"
        assert (s.queued, s.delayed, s.running) == (0, 0, 0), f"not idle: {s} {self.h.tag()}"

    def wait_callbacks(self, timeout: float = WAIT) -> None:
        def done() -> bool:
            with self._lock:
                return all(self.completes.get(tid) for tid in self.callbacks)

        assert wait_until(done, timeout), (
            f"on_complete never ran for "
            f"{[t for t in self.callbacks if not self.completes.get(t)][:10]} {self.h.tag()}"
        )

    def check(
        self,
        *,
        cancels_exact: bool = False,
        allowed_errors: tuple[type[BaseException], ...] = (BaseException,),
    ) -> Counter[str]:
        """Invariants 1 (callbacks), 3 and 4 over every collected Result; returns the
        count of outcomes by kind. ``cancels_exact``: cancel_task returned True exactly
        for the ids whose Result is a TaskCancelledError (no other canceller ran)."""
        tag = self.h.tag()
        self.wait_callbacks()
        kinds: Counter[str] = Counter()
        with self._lock:
            assert set(self.results) == set(self.queues), f"collect() first {tag}"
            for tid, r in self.results.items():
                err = r.error
                kinds["ok" if err is None else type(err).__name__] += 1
                assert r.value is not LATE, f"{tid}: a late return value was delivered {tag}"
                if err is None:
                    assert r.value == value_of(tid), f"{tid}: wrong value {r.value!r} {tag}"
                else:
                    assert r.value is None, f"{tid}: error and value {r!r} {tag}"
                    assert isinstance(err, allowed_errors), f"{tid}: unexpected {err!r} {tag}"
                if tid in self.callbacks:
                    calls = self.completes.get(tid, [])
                    assert len(calls) == 1, f"{tid}: on_complete ran {len(calls)} times {tag}"
                    value, cerr = calls[0]
                    assert cerr is err and value is r.value, (
                        f"{tid}: on_complete({value!r}, {cerr!r}) disagrees with {r!r} {tag}"
                    )
                    fails = self.failures.get(tid, [])
                    want = 0 if err is None else 1
                    assert len(fails) == want, (
                        f"{tid}: on_failure ran {len(fails)} times for {r!r} {tag}"
                    )
                    assert all(f is err for f in fails), f"{tid}: on_failure error {tag}"
                attempts = self.attempts.get(tid, 0)
                assert attempts <= self.retries[tid] + 1, (
                    f"{tid}: {attempts} attempts with {self.retries[tid]} retries {tag}"
                )
                trues = self.cancel_true.get(tid, 0)
                assert trues <= 1, f"{tid}: cancel_task returned True {trues} times {tag}"
                if cancels_exact:
                    cancelled = isinstance(err, TaskCancelledError)
                    assert cancelled == (trues == 1), (
                        f"{tid}: cancel_task True x{trues} but Result {r!r} {tag}"
                    )
        return kinds

    def check_all(self, timeout: float = WAIT, **kwargs: Any) -> Counter[str]:
        """collect + stats + check (while the cluster still runs)."""
        self.collect(timeout)
        self.check_stats_idle()
        return self.check(**kwargs)


def body(
    tr: Tracker, hold: float = 0.0, fail_first: int = 0, gate: threading.Event | None = None
) -> object:
    """A tracked task: counts its attempt, blocks on ``gate`` and/or sleeps ``hold``, fails
    its first ``fail_first`` attempts with PlannedError, then returns ``value_of(id)`` - or
    LATE if it was signalled (timed out, cancelled, shut down) meanwhile."""
    ctx = tr.attempt()
    if gate is not None:
        gate.wait(WAIT * 3)
    if hold:
        time.sleep(hold)
    if ctx.attempt < fail_first:
        raise PlannedError(f"{ctx.task_id} attempt {ctx.attempt}")
    return LATE if ctx.reason is not None else value_of(ctx.task_id)
