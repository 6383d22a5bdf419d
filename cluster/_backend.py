"""The seam between the scheduling core and *where an attempt runs*.

A cluster has one ``Lane`` (core: due queue, timers, gauges) per executor and one
``Backend`` serving it: the thread pool, a process pool, the event loop, Dask. The
runtime (``_runtime.Runtime``) owns the lock, the scheduler and the life cycle; a
backend only starts attempts of its lane and reports how they end:

* pull backends (threads, processes: ``_slots.SlotPool``) run slot threads that
  record an attempt and take the next one in one critical section;
* push backends (asyncio, Dask) start attempts from their own event source.

The methods named ``*_locked`` are called with the cluster lock held and must not
block or run user code; the others are called without it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, ClassVar

from ._sync import MAX_WAIT

if TYPE_CHECKING:
    from ._core import Lane
    from ._runtime import Runtime
    from ._task import Task

__all__ = ["Backend", "join_threads"]


class Backend:
    """Where the attempts of one lane run. Subclasses override what they need."""

    #: True when ``abandon_locked`` really ends the attempt (a killed process, a
    #: cancelled coroutine): the slot is reused, not replaced by a new one.
    kills: ClassVar[bool] = False
    #: True if ``prepare`` must see every task of this lane at submit.
    prepares: ClassVar[bool] = False
    #: True if it can run ``async def`` functions (the event loop).
    runs_coroutines: ClassVar[bool] = False

    #: The runtime this backend serves and its lane (set once by ``bind``).
    rt: Runtime
    lane: Lane

    def __init__(self) -> None:
        self.name = ""

    def bind(self, rt: Runtime, lane: Lane) -> None:
        """Attach to one cluster's lane; an executor serves one cluster, once."""
        if getattr(self, "rt", None) is not None:
            raise ValueError(f"{self!r} already serves another cluster")
        self.rt = rt
        self.lane = lane
        self.name = lane.name
        lane.backend = self

    @property
    def capacity(self) -> int:
        """How many attempts may run at once (``ExecutorStats.capacity``)."""
        raise NotImplementedError

    def prepare(self, task: Task) -> None:
        """Check or convert a task at ``submit()``, on the submitting thread, before it
        is accepted (only called when ``prepares`` is true). Raises for bad input."""

    def start_locked(self) -> None:
        """The cluster runs (``run()``, or a graceful ``stop()`` of a cluster never run)."""

    def queued_locked(self, task: Task, ready: bool) -> None:
        """``task`` of this lane was queued: due now (``ready``), or at ``task.start``
        (a delayed task or a requeued retry). Only called while the cluster runs."""

    def wake_locked(self) -> None:
        """Due tasks of this lane may be waiting (they came back from a key's gate)."""

    def abandon_locked(self, slot: object, fresh: list[threading.Thread] | None) -> None:
        """The attempt running in ``slot`` was detached (timeout, cancel, shutdown).

        Threads this creates are appended to ``fresh`` for the caller to start once
        it has released the lock, or started at once when ``fresh`` is None.
        """

    def stopping_locked(self) -> None:
        """The cluster is stopping (or every task settled while it stops): wake idle
        slots so that they exit once nothing is left for them."""

    def clock_jumped_locked(self) -> None:
        """A fake clock moved: whatever waits for one of its moments looks again."""

    def watch_locked(self, now: float) -> float | None:
        """The service thread's periodic look (after ``Runtime.watch_locked(self)``);
        return when to look again, or None."""
        return None

    def owed_locked(self) -> bool:
        """True while one of its threads delivers a settled task's Result outside the
        lock (``stop()`` waits for that, so that every subscriber has its Result)."""
        return False

    def busy_locked(self, now: float) -> bool:
        """True while one of its threads delivers or runs a settled task's callbacks,
        or an attempt is due that no queue shows (an IMMEDIATE backoff that is over)."""
        return False

    def waiting_locked(self, now: float) -> int:
        """Attempts due that wait on a slot's own sleep (an IMMEDIATE retry whose backoff
        is over, waiting for its key's rate to give a token)."""
        return 0

    def join(self, deadline: float | None) -> int:
        """Wait until its threads exit, at most until ``deadline`` (monotonic);
        return how many are still alive."""
        return 0

    def reset_in_child(self) -> None:
        """After ``fork()``: the child has none of this backend's threads or processes."""


def join_threads(threads: list[threading.Thread], deadline: float | None) -> int:
    """Join ``threads`` (never the current one) until ``deadline``; how many are left.

    A thread that has not started yet is waited for too: it is about to be started
    by the thread that made it (the service thread starts replacements right after
    it releases the lock).
    """
    import time

    me = threading.current_thread()
    left = 0
    for thread in threads:
        if thread is me:
            continue
        while thread.ident is None:  # created, not yet started: rare and brief
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        if thread.ident is None:
            left += 1
            continue
        while thread.is_alive():  # in steps: a huge timeout would overflow join()
            remaining = MAX_WAIT if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            thread.join(min(remaining, MAX_WAIT))
        if thread.is_alive():
            left += 1
    return left
