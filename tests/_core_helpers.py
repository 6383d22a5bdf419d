"""Builders and worker-cycle helpers for driving the thread-free ``Scheduler`` by hand.

Only the stable surface of the core is used: ``Task``/``Options`` fields, the
Scheduler methods, counters and gauges, and ``retry_delay``.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster import FixedBackoff, RetryMode
from cluster._core import Scheduler, retry_delay
from cluster._task import DEFAULT_OPTIONS, Task, TaskContext


def noop() -> None:
    """The work of every hand-built task (never actually called by the core)."""


def make_task(
    tid: str | None = None,
    *,
    priority: int = 0,
    start: float | None = None,
    retries: int = 0,
    backoff: Callable[[int], float] | None = None,
    jitter: float = 0.0,
    mode: RetryMode = RetryMode.REQUEUE,
    ttl: float | None = None,
    timeout: float | None = None,
    retry_if: Callable[[BaseException], object] | None = None,
) -> Task:
    """A task as the builder would hand it to ``Scheduler.submit``."""
    t = Task(noop, (), {})
    t.id = tid
    t.priority = priority
    t.start = start
    o = DEFAULT_OPTIONS.copy()
    o.retries = retries
    o.backoff = backoff if backoff is not None else FixedBackoff(0)
    o.jitter = jitter
    o.retry_mode = mode
    o.ttl = ttl
    o.timeout = timeout
    o.retry_if = retry_if
    t.opts = o
    return t


def ctx_of(t: Task) -> TaskContext:
    """The task's current attempt context (asserting there is one)."""
    ctx = t.ctx
    assert ctx is not None, f"{t!r} has no current attempt"
    return ctx


def pop_one(s: Scheduler, now: float) -> Task:
    """Pop a task, asserting that one was due."""
    t = s.pop(now)
    assert t is not None, f"nothing due at {now}"
    return t


def succeed(s: Scheduler, t: Task, value: object, now: float) -> int:
    """End the current attempt of ``t`` with ``value``."""
    return s.finish(t, ctx_of(t), value, None, None, now)


def fail(s: Scheduler, t: Task, error: BaseException, now: float) -> int:
    """End the current attempt of ``t`` with ``error``, deciding the retry like a worker."""
    ctx = ctx_of(t)
    delay = retry_delay(t, error, s.rng)
    return s.finish(t, ctx, None, error, delay, now)


def gauges(s: Scheduler) -> tuple[int, int, int]:
    """(queued, delayed, running)."""
    return (s.queued, s.delayed, s.running)


def counters(s: Scheduler) -> dict[str, int]:
    """Every counter of the scheduler."""
    return {
        "submitted": s.submitted,
        "succeeded": s.succeeded,
        "failed": s.failed,
        "cancelled": s.cancelled,
        "timed_out": s.timed_out,
        "retried": s.retried,
    }


def assert_balanced(s: Scheduler) -> None:
    """submitted == succeeded + failed + cancelled + timed_out + live, and live == gauges."""
    assert s.live == s.queued + s.delayed + s.running
    assert min(s.queued, s.delayed, s.running) >= 0, gauges(s)
    terminal = s.succeeded + s.failed + s.cancelled + s.timed_out
    assert s.submitted == terminal + s.live, (counters(s), gauges(s))
