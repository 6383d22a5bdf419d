"""Keys and limits (SPEC §12): at most ``limit`` tasks of a key at a time, and an
optional start rate from a token bucket. Pure data, driven by the scheduler under
the cluster lock.

A task *holds* its key from the start of its first attempt until it is terminal
(or, for a repeating task, until its run ends): through its retries' backoffs, so
the next task of that key waits too. A task that cannot start (the key is full, or
no token is left) is *parked* on its gate: it leaves its executor's due queue,
holds no worker and delays no other task; when the gate frees (a holder ends, a
token comes back, the limit grows), the best parked task, in §4 order, goes back
to its due queue at its original place (priority, start time, submission order).
Waiting is not failing: a parked task spends no retry.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._task import Task

__all__ = ["Gate"]

#: Slack on token counts: float rounding must not turn a whole token into 0.99999...
_EPSILON = 1e-9


class Gate:
    """The limit of one key, its holders and its parked tasks."""

    __slots__ = ("burst", "dead", "holders", "key", "limit", "rate", "stamp", "timer", "tokens",
                 "waiting")  # fmt: skip

    def __init__(self, key: str) -> None:
        self.key = key
        self.limit = 1
        self.holders = 0  #: tasks holding the key now
        #: parked tasks, a heap by (-priority, start, seq); dead entries skipped lazily
        self.waiting: list[tuple[int, float, int, Task]] = []
        self.dead = 0  #: cancelled entries still in ``waiting``
        self.rate: float | None = None  #: attempt starts per second, or None
        self.burst = 1
        self.tokens = 1.0
        self.stamp = 0.0  #: when ``tokens`` was last brought up to date
        self.timer: float | None = None  #: when a token comes back for a parked task

    def configure(self, limit: int, rate: float | None, burst: int, now: float) -> None:
        """Set the limit and rate; the bucket starts full."""
        self.limit = limit
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now
        self.timer = None

    def tokens_now(self, now: float) -> float:
        """The tokens in the bucket at ``now`` (none taken)."""
        rate = self.rate
        if rate is None:
            return float("inf")
        return min(float(self.burst), self.tokens + (now - self.stamp) * rate) + _EPSILON

    def next_token(self, now: float) -> float:
        """When the bucket next holds a whole token."""
        tokens = self.tokens_now(now) - _EPSILON
        return now + max(0.0, 1.0 - (tokens % 1.0 if tokens >= 1 else tokens)) / self.rate  # type: ignore[operator]

    def take_token(self, now: float) -> float | None:
        """Take a start token; None if taken, else when the next one comes back."""
        rate = self.rate
        if rate is None:
            return None
        tokens = min(float(self.burst), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if tokens + _EPSILON >= 1.0:  # (a refill of exactly 1/rate may round to 0.999...)
            self.tokens = max(0.0, tokens - 1.0)
            return None
        self.tokens = tokens
        return now + (1.0 - tokens) / rate

    def park(self, task: Task) -> None:
        """``task`` waits here (its state stays PENDING)."""
        start: float = task.start  # type: ignore[assignment]
        heappush(self.waiting, (-task.priority, start, task.seq, task))

    def unpark(self) -> Task | None:
        """The best parked task that is still waiting, taken out; None if none."""
        waiting = self.waiting
        while waiting:
            task = heappop(waiting)[3]
            opts = task.opts
            if opts.parked:
                opts.parked = False
                return task
            self.dead -= 1
        return None

    def forget(self, task: Task) -> None:
        """A parked ``task`` was cancelled (or moved): its entry is now dead."""
        task.opts.parked = False
        self.dead += 1
        if self.dead > 16 and 2 * self.dead > len(self.waiting):
            self.waiting = [e for e in self.waiting if e[3].opts.parked]
            heapify(self.waiting)
            self.dead = 0

    @property
    def parked(self) -> int:
        """Parked tasks (live entries)."""
        return len(self.waiting) - self.dead

    def __repr__(self) -> str:
        return f"<Gate {self.key!r} {self.holders}/{self.limit} parked={self.parked}>"
