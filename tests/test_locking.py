"""Locking: the hot-path lock protocol, and what is created lazily under a guard.

``_acquire_contended`` is how submit, subscribe, cancel and the workers take the
cluster lock when it is held. It must still be a lock: mutual exclusion, no lost
acquire, and a holder that sleeps without the GIL must not make it spin forever.
A cancelled task's TaskCancelledError is created by its first reader: every reader,
however they race, must see the same object.
"""

from __future__ import annotations

import threading
from queue import SimpleQueue

import pytest
from _core_helpers import make_task
from _helpers import WAIT, MakeCluster

from cluster import TaskCancelledError
from cluster._core import Scheduler
from cluster._sync import SPINS as _SPINS
from cluster._sync import acquire_contended as _acquire_contended
from cluster._task import Task

pytestmark = pytest.mark.timeout(60)


def _take(lock: threading.Lock) -> None:
    if not lock.acquire(False):
        _acquire_contended(lock)


def test_mutual_exclusion_under_contention() -> None:
    """Eight threads increment a counter non-atomically under the protocol: no update
    is lost, and no two threads are ever inside at once."""
    lock = threading.Lock()
    inside = [0]
    overlap = []
    total = [0]
    per_thread = 5_000

    def work() -> None:
        for _ in range(per_thread):
            _take(lock)
            try:
                inside[0] += 1
                if inside[0] != 1:
                    overlap.append(inside[0])
                value = total[0]
                total[0] = value + 1  # a read-modify-write that a second holder would break
                inside[0] -= 1
            finally:
                lock.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == []
    assert total[0] == 8 * per_thread


def test_a_holder_that_sleeps_without_the_gil_is_waited_for() -> None:
    """Past its spins the acquire blocks: it returns once the holder releases, and it
    holds the lock then (the holder cannot take it back)."""
    lock = threading.Lock()
    lock.acquire()
    got = threading.Event()

    def acquirer() -> None:
        _acquire_contended(lock)
        got.set()

    t = threading.Thread(target=acquirer)
    t.start()
    assert not got.wait(0.05)  # still held: it must not have "acquired" anything
    lock.release()
    assert got.wait(10)
    assert not lock.acquire(False)  # the acquirer owns it now
    t.join(10)
    lock.release()
    assert _SPINS >= 1


def _read_error(task: Task, start: threading.Barrier, seen: list[BaseException | None]) -> None:
    start.wait()
    seen.append(task.error)  # list.append is atomic


def test_a_cancellation_error_is_created_once_for_concurrent_readers() -> None:
    """Cancelling leaves the TaskCancelledError to its first reader; readers racing on
    many threads must all get one and the same exception object."""
    for round_ in range(50):
        s = Scheduler()
        t = make_task(f"c{round_}", ttl=60.0)
        s.submit(t, 0.0)
        assert s.cancel(t, "shutdown", 1.0)
        start = threading.Barrier(8)
        seen: list[BaseException | None] = []

        threads = [threading.Thread(target=_read_error, args=(t, start, seen)) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert len(seen) == 8
        first = seen[0]
        assert isinstance(first, TaskCancelledError)
        assert str(first) == f"task 'c{round_}' was cancelled by shutdown"
        assert all(e is first for e in seen)
        assert t.result().error is first


def test_every_observer_of_a_cancel_sees_the_same_error(make_cluster: MakeCluster) -> None:
    """Subscriber, handle, future, on_complete, on_failure and info() all see one
    TaskCancelledError object."""
    c = make_cluster(1, run=False)  # nothing runs: the task stays pending
    completed: SimpleQueue[BaseException | None] = SimpleQueue()
    failed: SimpleQueue[BaseException] = SimpleQueue()
    h = (
        c.add_task(lambda: None)
        .with_id("watched")
        .with_cache(60)
        .on_complete(lambda _id, _v, e: completed.put(e))
        .on_failure(lambda _id, e: failed.put(e))
        .submit()
    )
    q = c.subscribe("watched")
    future = h.future()
    assert c.cancel_task("watched")
    error = q.get(timeout=WAIT).error
    assert isinstance(error, TaskCancelledError)
    assert completed.get(timeout=WAIT) is error
    assert failed.get(timeout=WAIT) is error
    assert future.exception(timeout=WAIT) is error
    assert h.wait(WAIT) is not None and h.wait(WAIT).error is error  # type: ignore[union-attr]
    assert c.info("watched").error is error
    assert c.subscribe("watched").get(timeout=WAIT).error is error
