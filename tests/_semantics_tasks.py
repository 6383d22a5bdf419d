"""Shared pieces of the SPEC §10/§11/§18 integration tests.

The module-level task functions run in child processes of a ``ProcessExecutor``
too (children import this module by name), so they keep no state of their own:
what they do depends on ``current().attempt`` only. ``Script`` and the clock
helpers are for thread and event-loop tasks, which run in this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cluster import Cluster, RetryAfter, StopRetrying, TaskHandle, TaskState, current
from cluster.testing import FakeClock

WAIT = 20.0  #: generous real-time bound for anything that must happen "at once"

#: A fixed, whole-second fake start: every fake timestamp is then exact.
START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class RateLimited(Exception):
    """A second transient error class, unrelated to ``ConnectionError``."""


class SlowDown(RateLimited):
    """A subclass of ``RateLimited`` (for rule-order tests)."""


# ---------------------------------------------------------------- child-safe tasks


def retry_after_once(delay: float) -> int:
    """Attempt 0: ``raise RetryAfter(delay) from ConnectionError("host down")``;
    later attempts return their attempt number."""
    attempt = current().attempt
    if attempt == 0:
        raise RetryAfter(delay) from ConnectionError("host down")
    return attempt


def always_retry_after(delay: float) -> None:
    """Every attempt: ``raise RetryAfter(delay) from ConnectionError(...)`` naming it."""
    attempt = current().attempt
    raise RetryAfter(delay) from ConnectionError(f"host down at attempt {attempt}")


def stop_retrying_from_value_error() -> None:
    """``raise StopRetrying() from ValueError("bad input")``."""
    raise StopRetrying() from ValueError("bad input")


def fail_before(n: int, kind: str = "connection") -> int:
    """Attempts ``< n`` raise (``ConnectionError`` or ``RateLimited``); then the
    attempt number is returned."""
    attempt = current().attempt
    if attempt < n:
        if kind == "connection":
            raise ConnectionError(f"attempt {attempt}")
        raise RateLimited(f"attempt {attempt}")
    return attempt


def reset_at(attempt_to_reset: int, n: int) -> int:
    """Attempts ``< n`` raise ``ConnectionError``; attempt ``attempt_to_reset`` first
    calls ``current().reset_backoff()`` (it made progress)."""
    ctx = current()
    if ctx.attempt == attempt_to_reset:
        ctx.reset_backoff()
    if ctx.attempt < n:
        raise ConnectionError(f"attempt {ctx.attempt}")
    return ctx.attempt


# ---------------------------------------------------------------- in-process helpers


class Script:
    """A task function that plays ``outcomes`` in order, one per call: an exception
    instance is raised, a zero-argument callable is called (its result is raised if
    it is an exception, else returned), anything else is returned; once the script
    is used up it returns ``"done"``. Records each call's fake time and attempt."""

    def __init__(self, clock: FakeClock, *outcomes: object) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.times: list[float] = []  # clock.monotonic() at each call
        self.attempts: list[int] = []  # current().attempt at each call
        self._lock = threading.Lock()

    def __call__(self) -> object:
        with self._lock:
            self.times.append(self.clock.monotonic())
            self.attempts.append(current().attempt)
            out = self.outcomes.pop(0) if self.outcomes else "done"
        if callable(out) and not isinstance(out, BaseException):
            out = out()
        if isinstance(out, BaseException):
            raise out
        return out

    @property
    def calls(self) -> int:
        return len(self.times)


def chained(error: BaseException, cause: BaseException | None) -> BaseException:
    """``error`` with ``cause`` as its ``__cause__``, as ``raise error from cause`` makes it."""
    try:
        raise error from cause
    except BaseException as exc:
        return exc


def settle(c: Cluster) -> None:
    """Wait (real time) until the cluster has nothing to do now."""
    assert c.wait_idle(WAIT), "the cluster did not become idle"


def step(c: Cluster, clock: FakeClock, seconds: float | timedelta) -> None:
    """Advance the fake clock and wait until what became due has run."""
    clock.advance(seconds)
    settle(c)


def waiting(c: Cluster, clock: FakeClock, h: TaskHandle[Any]) -> float:
    """The task waits to retry: seconds (fake) until its next attempt is due."""
    info = c.info(h.id)
    assert info.state is TaskState.RETRYING, info
    assert info.next_attempt_at is not None
    return (info.next_attempt_at - clock.now()).total_seconds()


def retry_schedule(
    c: Cluster, clock: FakeClock, h: TaskHandle[Any], limit: int = 100
) -> list[float]:
    """Run ``h``'s retries to the end on the fake clock; the delay before each retry."""
    delays: list[float] = []
    settle(c)
    for _ in range(limit):
        if h.done() or c.info(h.id).state is not TaskState.RETRYING:
            return delays
        delay = waiting(c, clock, h)
        delays.append(delay)
        step(c, clock, delay + 1e-6)  # (datetimes are rounded to microseconds)
    raise AssertionError(f"still retrying after {limit} retries")


def stop_began(c: Cluster) -> bool:
    """True once ``c`` refuses submissions (a stop or cancel has begun)."""
    from cluster import ClusterStoppedError

    try:
        c.add_task(int).submit()
    except ClusterStoppedError:
        return True
    return False


def eventually(cond: Callable[[], bool], what: str = "the condition") -> None:
    """Poll a condition that cluster threads make true (a task that started, a stop
    that began) for up to WAIT real seconds; only for states no event announces."""
    end = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < end, f"{what} never happened"
        time.sleep(0.002)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` on a new thread; the list receives its result or exception."""
    out: list[object] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out
