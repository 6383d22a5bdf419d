"""Deterministic time for users' tests (SPEC §18).

``Cluster(clock=FakeClock())``: start times, delays, backoff, ``RetryAfter``, TTL,
repeats, timeouts, rate limits and ``info()`` timestamps follow the fake clock,
while the workers are real threads. ``advance()`` moves it and wakes the cluster;
``Cluster.wait_idle()`` then waits (in real time) until what became due has run::

    clock = FakeClock()
    with Cluster(clock=clock) as c:
        h = c.add_task(sync).repeat(every=60).submit()
        c.wait_idle()                  # run 0, at fake time 0
        for _ in range(1440):          # a day of runs, in milliseconds
            clock.advance(60)
            c.wait_idle()

Timeouts that the caller passes (``handle.wait``, ``result``, ``stop``,
``wait_idle``, ``as_completed``) stay in real time.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta

from ._clock import Clock
from ._validate import seconds

__all__ = ["FakeClock"]


class FakeClock(Clock):
    """A clock that moves only when told; ``start`` is its wall time (default: now).

    Thread-safe. A cluster registers itself when created with it; ``advance``
    wakes every such cluster.
    """

    fake = True

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime.now().astimezone()
        elif not isinstance(start, datetime):
            raise TypeError(f"start must be a datetime, got {type(start).__name__}")
        super().__init__(start.timestamp(), 0.0)
        self._lock = threading.Lock()
        self._now = 0.0  # guarded by _lock (read without it: a float is read atomically)
        # Listeners held weakly: a clock must not keep the clusters that used it alive.
        self._listeners: list[weakref.WeakMethod[Callable[[], None]]] = []

    def monotonic(self) -> float:
        """The clock's monotonic seconds (0 at ``start``)."""
        return self._now

    def timeout(self, seconds: float) -> float | None:
        """A fake clock never elapses by itself: block until ``advance`` wakes you."""
        return None

    def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (a bound method, held weakly) after every ``advance``."""
        with self._lock:
            self._listeners.append(weakref.WeakMethod(wake))

    def unlisten(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake``."""
        with self._lock:
            self._listeners = [ref for ref in self._listeners if ref() not in (None, wake)]

    def advance(self, seconds_: float | timedelta) -> None:
        """Move the clock forward by ``seconds_`` (>= 0; a number or timedelta) in one
        jump and wake the clusters: whatever became due runs, in §4 order. Returns at
        once, without waiting for those tasks (see ``Cluster.wait_idle``)."""
        step = seconds(seconds_, "seconds")
        with self._lock:
            self._now += step
            self._listeners = [ref for ref in self._listeners if ref() is not None]
            listeners = [ref() for ref in self._listeners]
        for wake in listeners:
            if wake is not None:  # (collected in between)
                wake()

    def __repr__(self) -> str:
        return f"<FakeClock {self.now().isoformat()}>"
