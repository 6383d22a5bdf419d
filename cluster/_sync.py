"""Thread primitives shared by the cluster's threads: the contended-lock protocol of the
hot paths and waits that accept any finite timeout."""

from __future__ import annotations

import threading
import time

__all__ = ["MAX_WAIT", "SPINS", "acquire_bounded", "acquire_contended", "wait_event"]

#: The longest single wait. Longer waits loop, so that a start time in year 9999,
#: ``with_delay(1e9)`` or ``stop(timeout=1e12)`` never overflows a lock timeout.
MAX_WAIT = 3600.0

#: How many times a contended hot-path acquire yields the GIL before it blocks.
SPINS = 64


def acquire_contended(lock: threading.Lock) -> None:
    """Take ``lock``, found held, without starting a lock convoy.

    A blocking ``acquire`` releases the GIL and, once woken, owns the lock while it
    waits to get the GIL back; the thread that holds the GIL soon needs the lock
    again and blocks in turn, and from then on every hand-off between the
    submitter and the workers costs context switches (measured: 8 µs per task
    instead of 3). Whoever holds the lock now is waiting for the GIL, so yield it
    (``sleep(0)``) and retry: the lock is then only ever taken with the GIL held.
    A holder that is not waiting for the GIL (it is starting a thread) ends the
    spinning with a normal blocking acquire.

    The hot paths call it as ``if not lock.acquire(False): acquire_contended(lock)``.
    (Testing ``lock.locked()`` and then calling a blocking ``acquire()`` is a
    cheaper call, but the GIL can change hands in between: measured, four workers
    draining a queue then fell into the convoy in most runs.)
    """
    sleep = time.sleep
    for _ in range(SPINS):
        sleep(0)
        if lock.acquire(False):
            return
    lock.acquire()


def acquire_bounded(lock: threading.Lock, timeout: float) -> bool:
    """``lock.acquire(timeout=...)`` for the paths that must never block forever.

    A ``KeyboardInterrupt`` that lands between a hot path's ``acquire`` and its
    ``try`` leaves the lock held for good (``ThreadPoolExecutor`` has the same
    hazard); the exit hook and ``cancel()`` then give up after ``timeout`` instead of
    hanging the process.
    """
    return lock.acquire(timeout=min(timeout, MAX_WAIT))


def wait_event(event: threading.Event, timeout: float | None) -> bool:
    """``event.wait(timeout)`` that accepts any finite timeout without overflowing."""
    if timeout is None:
        while not event.wait(MAX_WAIT):
            pass
        return True
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return event.is_set()
        if event.wait(min(remaining, MAX_WAIT)):
            return True
