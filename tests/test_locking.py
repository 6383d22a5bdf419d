"""The hot-path lock protocol: a contended acquire yields the GIL, then blocks.

``_acquire_contended`` is how submit, subscribe, cancel and the workers take the
cluster lock when it is held. It must still be a lock: mutual exclusion, no lost
acquire, and a holder that sleeps without the GIL must not make it spin forever.
"""

from __future__ import annotations

import threading

import pytest

from cluster._cluster import _SPINS, _acquire_contended

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
