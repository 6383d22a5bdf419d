"""The baselines ``cluster`` is compared with.

``PlainPool`` is the "plain" baseline: about the least code that gives a thread pool
with priorities and start times — a heap of ``(-priority, seq, fn, args)`` entries
(plus a second heap for entries whose start time has not come), one lock shared by
two conditions, and N worker threads. It has no timeouts, retries, results, callbacks
or ids, so the gap between it and ``cluster`` is the price of those features.

``BlockedExecutor`` holds every worker of a ``ThreadPoolExecutor`` busy on an event,
so that submissions only queue; it is how the "tpe" baseline measures submit-only
and queued-item costs.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_Entry = tuple[int, int, Callable[..., object], tuple[Any, ...]]
_Delayed = tuple[float, int, int, Callable[..., object], tuple[Any, ...]]


class PlainPool:
    """A minimal priority thread pool: highest priority first, FIFO among equals.

    ``submit()`` before ``start()`` only queues. ``submit()`` returns the task's
    sequence number ``n`` (1, 2, ...); ``wait(n)`` returns once ``n`` tasks have
    finished (run or been discarded as cancelled), which waits for all tasks when
    ``n`` is the last sequence number. ``shutdown()`` is graceful: workers exit once
    both heaps are empty.
    """

    def __init__(self, workers: int) -> None:
        """Create a pool of ``workers`` threads, not yet started."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here
        self._done = threading.Condition(self._lock)  # wait() waits here
        self._ready: list[_Entry] = []
        self._delayed: list[_Delayed] = []
        self._cancelled: set[int] = set()
        self._seq = 0
        self._finished = 0
        self._errors = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(workers)]

    def start(self) -> None:
        """Start the worker threads."""
        for thread in self._threads:
            thread.start()

    def submit(
        self, fn: Callable[..., object], /, *args: Any, priority: int = 0, delay: float = 0.0
    ) -> int:
        """Queue ``fn(*args)``, due after ``delay`` seconds; return its sequence number."""
        with self._lock:
            self._seq = seq = self._seq + 1
            if delay > 0:
                heapq.heappush(self._delayed, (time.monotonic() + delay, -priority, seq, fn, args))
            else:
                heapq.heappush(self._ready, (-priority, seq, fn, args))
            self._work.notify()
        return seq

    def cancel(self, seq: int) -> bool:
        """Mark a task cancelled; workers discard it when they pop it (lazy deletion).

        Returns ``True`` if it was not already marked; the pool does not track whether
        the task already ran.
        """
        with self._lock:
            if seq in self._cancelled:
                return False
            self._cancelled.add(seq)
            return True

    def wait(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least ``n`` tasks have finished; ``False`` on timeout."""
        with self._lock:
            return self._done.wait_for(lambda: self._finished >= n, timeout)

    def shutdown(self, wait: bool = True) -> None:
        """Let the workers exit once every queued task has run; join them if ``wait``."""
        with self._lock:
            self._stopping = True
            self._work.notify_all()
        if wait:
            for thread in self._threads:
                if thread.is_alive():
                    thread.join()

    @property
    def errors(self) -> int:
        """How many tasks raised."""
        return self._errors

    def _next(self) -> _Entry | None:
        """Pop the next due entry, sleeping until one is due; ``None`` means exit."""
        with self._lock:
            while True:
                now = time.monotonic()
                delayed = self._delayed
                while delayed and delayed[0][0] <= now:
                    _, negprio, seq, fn, args = heapq.heappop(delayed)
                    heapq.heappush(self._ready, (negprio, seq, fn, args))
                while self._ready:
                    entry = heapq.heappop(self._ready)
                    if entry[1] not in self._cancelled:
                        return entry
                    self._cancelled.discard(entry[1])
                    self._finish()
                if self._stopping and not delayed:
                    return None
                self._work.wait(delayed[0][0] - now if delayed else None)

    def _finish(self) -> None:
        """Count one finished task (lock held)."""
        self._finished += 1
        self._done.notify_all()

    def _worker(self) -> None:
        while (entry := self._next()) is not None:
            failed = False
            try:
                entry[2](*entry[3])
            except BaseException:  # a baseline: count, never die
                failed = True
            with self._lock:
                self._errors += failed
                self._finish()


class BlockedExecutor:
    """A ``ThreadPoolExecutor`` whose workers are all held on an event until released."""

    def __init__(self, workers: int) -> None:
        """Create the executor and wait until all ``workers`` threads are blocked."""
        self.executor = ThreadPoolExecutor(max_workers=workers)
        self._release = threading.Event()
        started = threading.Semaphore(0)
        for _ in range(workers):
            self.executor.submit(_hold, started, self._release)
        for _ in range(workers):
            started.acquire()

    def release(self) -> None:
        """Let the held workers go."""
        self._release.set()


def _hold(started: threading.Semaphore, release: threading.Event) -> None:
    started.release()
    release.wait()
