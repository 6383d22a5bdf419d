"""The service thread: the one thread that keeps time for the whole cluster.

It sleeps until the earliest of: an attempt's deadline, a cached result's expiry,
and a check on the runner threads. It never runs user code, so that no callback,
retry predicate or backoff can delay a timeout:

* Timeouts: it detaches and signals the attempt (the task stays RUNNING with no
  attempt, so a late return is dropped), asks the attempt's backend to abandon or
  kill it, and hands the retry decision and the delivery to a runner thread.
* Expiry: it purges cached results whose TTL passed, at least once a second while
  any are cached, so an idle cluster releases them too (SPEC §6: no frames kept).
* Runners: when every runner has been stuck in one job for a while and others
  wait, it adds a runner (``_delivery.Runners.check_locked``).
* Backends that want watching (the event loop: is it blocked?) get a look too.

Started on first need; it exits when the cluster terminates. Replacement threads
it creates are started right after it releases the lock (starting a thread takes
about 0.3 ms, too long to hold the lock for); ``Runtime.join`` joins this thread
before it looks at the pools, so it never sees a thread that will never start.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

from ._sync import MAX_WAIT

if TYPE_CHECKING:
    from ._runtime import Leftovers, Runtime

__all__ = ["PURGE_EVERY", "Service"]

#: While cached results exist, the service thread looks at least this often.
PURGE_EVERY = 1.0


class Service:
    """The service thread of one cluster (every field guarded by the cluster lock)."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self.thread: threading.Thread | None = None
        self._target = math.inf  # when the thread wakes by itself
        self._wake = threading.Condition(rt.lock)

    def arm_locked(self, when: float) -> None:
        """Make sure the thread runs and wakes no later than ``when``."""
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._loop, name=self._rt.thread_name("service"), daemon=True
            )
            self.thread.start()
        elif when < self._target:
            self._target = when
            self._wake.notify()

    def wake_locked(self) -> None:
        """Look again now (the cluster terminates, or the clock jumped)."""
        self._wake.notify()

    def reset_in_child(self, lock: threading.Lock) -> None:
        """After fork: the child has no service thread."""
        self.thread = None
        self._target = math.inf
        self._wake = threading.Condition(lock)

    def _loop(self) -> None:
        rt = self._rt
        rt.enter_thread()
        sched = rt.sched
        clock = rt.monotonic
        timeout_of = rt.clock.timeout
        runners = rt.runners
        while True:
            fresh: list[threading.Thread] = []
            left: Leftovers | None = None
            with rt.lock:
                while True:
                    if rt.terminated_locked():
                        return
                    now = clock()
                    for ctx in sched.expire(now):
                        runners.submit_locked(rt.settle_timeout, ctx, fresh)
                    if sched.abandoned:
                        rt.abandon_locked(fresh)
                    expiry = sched.next_expiry()
                    if expiry is not None and expiry <= now:
                        sched.purge(now)
                        expiry = sched.next_expiry()
                    gate = sched.next_gate_timer()
                    if gate is not None and gate <= now:  # tokens came back (rate limits)
                        sched.fire_gate_timers(now)
                        gate = sched.next_gate_timer()
                        if sched.woken:
                            rt.wake_lanes_locked()
                    target = math.inf
                    for when in (
                        sched.next_deadline(),
                        gate,
                        None if expiry is None else min(expiry, now + PURGE_EVERY),
                        runners.check_locked(now, fresh),
                        rt.watch_backends_locked(now),
                    ):
                        if when is not None and when < target:
                            target = when
                    left = rt.leftovers_locked()
                    if fresh or left is not None:
                        self._target = now  # back at once, after starting/freeing
                        break
                    self._target = target
                    wait = None if target == math.inf else timeout_of(max(0.0, target - now))
                    self._wake.wait(MAX_WAIT if wait is None else min(wait, MAX_WAIT))
            try:
                for thread in fresh:
                    thread.start()
            finally:  # (a thread that cannot start: the commit is still waited for)
                if left is not None:
                    rt.after_lock(left)
            del left, fresh
