"""The scheduling core: queues, state transitions, retry decisions and TTL purge.

Plain Python with no threads, no locks and no clock of its own. The cluster holds
its lock around every ``Scheduler`` method and passes ``now`` (monotonic seconds),
so ordering, backoff, jitter and TTL can be driven deterministically in tests.

Two-stage scheduling: tasks not yet due wait in ``_timers``, a heap of the tasks
themselves ordered by (start, seq) (``Task.__lt__``: no tuple per entry, so a
million delayed tasks cost little memory); due tasks wait in ``_ready``, a
``ReadyQueue`` ordered by (-priority, start, seq), where seq is the submission
order. Timers are promoted to ``_ready`` when a worker looks for work, so a due
task always competes on priority.

Cancel is O(1): the task's state becomes terminal and its queue entry is left
behind as a dead entry, skipped when popped. When dead entries outnumber live
ones they are dropped (amortised O(1) per cancel), which keeps a structure at
most about twice its live size: the ready queue trims them off the ends of its
FIFOs, where cancelling in submission order leaves them, and rebuilds only if
some remain inside.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from heapq import heapify, heappop, heappush

from ._backoff import RetryMode
from ._errors import DuplicateTaskError, TaskCancelledError, TaskNotFoundError, TaskTimeoutError
from ._task import _NO_KWARGS, TERMINAL, Task, TaskContext, TaskState

log = logging.getLogger("cluster")

PENDING = TaskState.PENDING
DELAYED = TaskState.DELAYED
RUNNING = TaskState.RUNNING
RETRYING = TaskState.RETRYING
SUCCEEDED = TaskState.SUCCEEDED
FAILED = TaskState.FAILED
CANCELLED = TaskState.CANCELLED
TIMED_OUT = TaskState.TIMED_OUT

# What ``finish`` tells the worker to do next.
STALE = 0  #: the attempt had been abandoned (timeout/cancel): drop its outcome
DONE = 1  #: the task is terminal: deliver its result
REQUEUED = 2  #: a retry waits in the queue
SLEEP = 3  #: RetryMode.IMMEDIATE: sleep the backoff on task.ctx, then ``resume``

_COMPACT_MIN = 64  # dead heap entries tolerated before a rebuild is considered


def retry_delay(task: Task, error: BaseException, rng: random.Random) -> float | None:
    """Seconds to wait before retrying ``task`` after ``error``; None: no retry.

    Runs the user's predicate and backoff, so the cluster calls it *outside* its
    lock. A predicate that raises counts as False; a backoff that raises or gives
    NaN or a negative delay is logged and treated as 0 (the retry is not lost).
    """
    opts = task.opts
    if task.attempts > opts.retries:  # attempts started so far vs. retries + 1 allowed
        return None
    if not isinstance(error, Exception) or isinstance(error, TaskCancelledError):
        return None  # BaseExceptions and cancellations are final
    predicate = opts.retry_if
    if predicate is not None:
        try:
            if not predicate(error):
                return None
        except BaseException:
            log.exception("retry_if predicate of task %r raised; not retrying", task.id)
            return None
    try:
        delay = float(opts.backoff(task.attempts - 1))
    except BaseException:
        log.exception("backoff of task %r raised; retrying without delay", task.id)
        return 0.0
    if not delay >= 0:  # also catches NaN
        log.error("backoff of task %r returned %r; retrying without delay", task.id, delay)
        return 0.0
    if opts.jitter:
        delay *= rng.uniform(1.0 - opts.jitter, 1.0 + opts.jitter)
    return delay


class _Bucket:
    """The due tasks of one priority, in (start, seq) order.

    Tasks almost always arrive in order (a task due now has the latest start), so
    they go to ``fifo`` in O(1); the rare out-of-order task (a past start time, a
    promoted timer) goes to the small ``heap`` (ordered by ``Task.__lt__``). The
    next task is the lesser of the two heads. Both hold the tasks themselves: no
    tuple per queued task.
    """

    __slots__ = ("fifo", "heap")

    def __init__(self) -> None:
        self.fifo: deque[Task] = deque()
        self.heap: list[Task] = []


class ReadyQueue:
    """Due tasks by (-priority, start, seq): O(1) push and pop in the FIFO case.

    Holds dead entries (tasks no longer PENDING) until they are popped or
    ``compact`` drops them; ``len()`` counts entries, dead ones included.
    """

    __slots__ = ("_buckets", "_count", "_priorities")

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._priorities: list[int] = []  # heap of -priority, one per bucket
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, task: Task) -> None:
        """Add ``task`` (its priority, start and seq are set) to its priority's bucket."""
        priority = task.priority
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = _Bucket()
            heappush(self._priorities, -priority)
        fifo = bucket.fifo
        if fifo:
            last = fifo[-1]
            start = task.start
            # Inlined ``last < task``: this runs once per submitted task.
            if last.start < start or (last.start == start and last.seq < task.seq):  # type: ignore[operator]
                fifo.append(task)
            else:
                heappush(bucket.heap, task)
        else:
            fifo.append(task)
        self._count += 1

    def pop(self) -> Task | None:
        """Remove and return the first task (dead or alive), or None if empty."""
        priorities = self._priorities
        while priorities:
            bucket = self._buckets[-priorities[0]]
            fifo = bucket.fifo
            heap = bucket.heap
            if fifo:
                task = heappop(heap) if heap and heap[0] < fifo[0] else fifo.popleft()
            elif heap:
                task = heappop(heap)
            else:  # an emptied bucket: drop it
                del self._buckets[-heappop(priorities)]
                continue
            self._count -= 1
            return task
        return None

    def compact(self, live: int) -> None:
        """Drop every dead entry, given the number of ``live`` (PENDING) ones.

        Dead entries at either end of a FIFO go one by one, without touching the
        live ones: cancelling in submission order, or the latest submissions, leaves
        them there. Only if some remain is the queue rebuilt.
        """
        if not live:
            self.clear()
            return
        count = self._count
        for bucket in self._buckets.values():
            fifo = bucket.fifo
            while fifo and fifo[0].state is not PENDING:
                fifo.popleft()
                count -= 1
            while fifo and fifo[-1].state is not PENDING:
                fifo.pop()
                count -= 1
        self._count = count
        if count == live:
            return
        for priority, bucket in list(self._buckets.items()):
            bucket.fifo = deque([t for t in bucket.fifo if t.state is PENDING])
            bucket.heap = [t for t in bucket.heap if t.state is PENDING]
            heapify(bucket.heap)
            if not bucket.fifo and not bucket.heap:
                del self._buckets[priority]
        self._priorities = [-p for p in self._buckets]
        heapify(self._priorities)
        self._count = sum(len(b.fifo) + len(b.heap) for b in self._buckets.values())

    def clear(self) -> None:
        """Drop every entry."""
        self._buckets.clear()
        self._priorities.clear()
        self._count = 0


def _waiting(task: Task) -> bool:
    """Is this timer-heap entry live? (A task has at most one entry there.)"""
    state = task.state
    return (state is DELAYED or state is RETRYING) and task.ctx is None


class Scheduler:
    """Queues and state machine of one cluster; every method expects the caller's lock."""

    def __init__(self, rng: random.Random | None = None) -> None:
        #: Every task whose id is reserved: not yet terminal, or terminal and cached.
        self.tasks: dict[str, Task] = {}
        self._ready = ReadyQueue()
        self._timers: list[Task] = []  # heap by (start, seq); see Task.__lt__
        self._deadlines: list[tuple[float, int, TaskContext]] = []
        self._expiry: list[tuple[float, int, Task]] = []  # cached results: (purge at, seq, task)
        self._ready_dead = 0  # dead entries in _ready (live ones: ``queued``)
        self._timer_dead = 0
        #: Workers stuck in a cancelled or timed-out attempt, for the caller to replace.
        self.abandoned: list[object] = []
        self._seq = itertools.count(1).__next__
        self._ids = itertools.count(1).__next__
        self.rng = rng if rng is not None else random.Random()
        #: False once a shutdown has cancelled whatever has not started.
        self.retries_allowed = True
        # Counters.
        self.submitted = self.succeeded = self.failed = 0
        self.cancelled = self.timed_out = self.retried = 0
        # Gauges: tasks PENDING, DELAYED or RETRYING, RUNNING.
        self.queued = self.delayed = self.running = 0

    # -- submission and lookup ------------------------------------------------

    def submit(self, task: Task, now: float) -> bool:
        """Accept ``task``; return True if it is due now (a worker should take it)."""
        if self._expiry and self._expiry[0][0] <= now:
            self.purge(now)
        tasks = self.tasks
        tid = task.id
        if tid is None:
            tid = f"t{self._ids()}"
            while tid in tasks:  # a user took this id with with_id()
                tid = f"t{self._ids()}"
            task.id = tid
        elif tid in tasks:
            raise DuplicateTaskError(f"task id {tid!r} is already queued, running or cached")
        tasks[tid] = task
        task.seq = self._seq()
        task.submitted_at = now
        self.submitted += 1
        start = task.start
        if start is None or start <= now:
            if start is None:
                start = task.start = now
            self.queued += 1
            self._ready.push(task)
            return True
        task.state = DELAYED
        self.delayed += 1
        heappush(self._timers, task)
        return False

    def lookup(self, task_id: str, now: float) -> Task:
        """The task with this id; TaskNotFoundError if unknown or purged."""
        if self._expiry and self._expiry[0][0] <= now:
            self.purge(now)
        try:
            task = self.tasks.get(task_id)
        except TypeError:  # unhashable
            task = None
        if task is None:
            if not isinstance(task_id, str):
                raise TypeError(f"task_id must be a str, got {type(task_id).__name__}")
            raise TaskNotFoundError(
                f"no task with id {task_id!r} (unknown, or finished and purged)"
            )
        return task

    def purge(self, now: float) -> None:
        """Forget cached results whose TTL has passed."""
        expiry = self._expiry
        tasks = self.tasks
        while expiry and expiry[0][0] <= now:
            task = heappop(expiry)[2]
            if tasks.get(task.id) is task:  # type: ignore[arg-type]
                del tasks[task.id]  # type: ignore[arg-type]

    # -- dispatch -------------------------------------------------------------

    def pop(self, now: float) -> Task | None:
        """Start the next attempt: the best due task, now RUNNING with a fresh ctx."""
        timers = self._timers
        if timers and timers[0].start <= now:  # type: ignore[operator]
            self._promote(now)
        pop = self._ready.pop
        while True:
            task = pop()
            if task is None:
                return None
            if task.state is PENDING:
                break
            self._ready_dead -= 1
        self.queued -= 1
        self.running += 1
        task.state = RUNNING
        if task.opts.timeout is not None or task.attempts:
            self._begin(task, TaskContext(task, task.attempts, None), now)
        else:  # the common case, inlined: a first attempt without timeout
            task.attempts = 1
            task.started_at = now
            task.ctx = TaskContext(task, 0, None)
        return task

    def _begin(self, task: Task, ctx: TaskContext, now: float) -> None:
        task.attempts += 1
        task.started_at = now
        task.ctx = ctx
        timeout = task.opts.timeout
        if timeout is not None:
            ctx.deadline = now + timeout
            deadlines = self._deadlines
            if len(deadlines) > 2 * self.running + _COMPACT_MIN:
                deadlines[:] = [e for e in deadlines if e[2]._task is not None]
                heapify(deadlines)
            heappush(deadlines, (ctx.deadline, self._seq(), ctx))

    def _promote(self, now: float) -> None:
        timers = self._timers
        ready = self._ready
        while timers and timers[0].start <= now:  # type: ignore[operator]
            task = heappop(timers)
            if _waiting(task):
                task.state = PENDING
                self.delayed -= 1
                self.queued += 1
                ready.push(task)
            else:
                self._timer_dead -= 1

    def next_due(self) -> float | None:
        """When the earliest waiting task becomes due, or None if none waits."""
        timers = self._timers
        while timers:
            task = timers[0]
            if _waiting(task):
                return task.start
            heappop(timers)
            self._timer_dead -= 1
        return None

    # -- the end of an attempt -------------------------------------------------

    def finish(
        self,
        task: Task,
        ctx: TaskContext,
        value: object,
        error: BaseException | None,
        delay: float | None,
        now: float,
    ) -> int:
        """Record how the attempt ``ctx`` ended; ``delay`` is ``retry_delay``'s answer.

        The compare-and-set at the heart of exactly-once: only the attempt that is
        still ``task.ctx`` may move the task on; a timed-out or cancelled attempt
        was detached and gets STALE.
        """
        if task.ctx is not ctx:
            return STALE
        ctx._task = None
        ctx._worker = None
        self.running -= 1
        task.ctx = None
        if error is None:
            self._finalize(task, SUCCEEDED, value, None, now)
            return DONE
        return self._failed(task, error, delay, now, True)

    def fail_detached(
        self, ctx: TaskContext, error: BaseException, delay: float | None, now: float
    ) -> int:
        """Settle an attempt that ``expire`` detached: schedule its retry or end the task."""
        task = ctx._task
        ctx._task = None
        ctx._worker = None
        if task is None or task.state is not RUNNING or task.ctx is not None:
            return STALE  # cancelled or shut down meanwhile
        self.running -= 1
        return self._failed(task, error, delay, now, False)

    def _failed(
        self, task: Task, error: BaseException, delay: float | None, now: float, may_sleep: bool
    ) -> int:
        if delay is not None and self.retries_allowed:
            self.retried += 1
            self.delayed += 1
            task.state = RETRYING
            task._error = error
            task.start = now + delay
            if may_sleep and task.opts.retry_mode is RetryMode.IMMEDIATE:
                # The worker sleeps on this context's event: cancel and stop set it.
                task.ctx = TaskContext(task, task.attempts, None)
                return SLEEP
            task.ctx = None
            heappush(self._timers, task)
            return REQUEUED
        task.ctx = None
        state = TIMED_OUT if isinstance(error, TaskTimeoutError) else FAILED
        self._finalize(task, state, None, error, now)
        return DONE

    def resume(self, task: Task, ctx: TaskContext, now: float) -> bool:
        """After an IMMEDIATE backoff slept on ``ctx``: start the next attempt (with a
        fresh context in ``task.ctx``) unless the task was cancelled meanwhile."""
        if task.ctx is not ctx or task.state is not RETRYING:
            return False
        ctx._task = None
        task.state = RUNNING
        self.delayed -= 1
        self.running += 1
        self._begin(task, TaskContext(task, task.attempts, None), now)
        return True

    def wake_sleepers(self) -> None:
        """Cut every IMMEDIATE backoff short (graceful stop): the retries run now."""
        for task in self.tasks.values():
            if task.state is RETRYING and task.ctx is not None:
                task.ctx.signal("shutdown")

    # -- timeouts -------------------------------------------------------------

    def expire(self, now: float) -> list[TaskContext]:
        """Detach and signal every running attempt whose deadline has passed.

        The task stays RUNNING with no attempt (so a late return is STALE) and each
        returned context keeps naming its task until ``fail_detached`` settles it
        with the retry decision, which the caller computes outside its lock.
        """
        deadlines = self._deadlines
        expired = []
        while deadlines and deadlines[0][0] <= now:
            ctx = heappop(deadlines)[2]
            task = ctx._task
            if task is None or task.ctx is not ctx:
                continue  # the attempt ended before its deadline
            task.ctx = None
            ctx.signal("timeout")
            if ctx._worker is not None:
                self.abandoned.append(ctx._worker)
            expired.append(ctx)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline of a running attempt, or None."""
        deadlines = self._deadlines
        while deadlines:
            ctx = deadlines[0][2]
            task = ctx._task
            if task is not None and task.ctx is ctx:
                return deadlines[0][0]
            heappop(deadlines)
        return None

    # -- cancellation ---------------------------------------------------------

    def cancel(self, task: Task, reason: str, now: float) -> bool:
        """Cancel ``task``; False if it was already terminal.

        The worker of a cancelled running attempt is stuck in user code: it is
        appended to ``abandoned`` for the caller to replace.
        """
        state = task.state
        if state is PENDING:  # (a queued task has no ctx)
            self.queued -= 1
            self._ready_dead += 1
        elif state is DELAYED or state is RETRYING:
            self.delayed -= 1
            if task.ctx is None:
                self._timer_dead += 1
            else:  # an IMMEDIATE retry: wake the worker sleeping on it
                task.ctx.signal(reason)
                task.ctx = None
        elif state is RUNNING:
            self.running -= 1
            ctx = task.ctx
            if ctx is not None:  # None: a timed-out attempt being settled
                if ctx._worker is not None:
                    self.abandoned.append(ctx._worker)
                ctx._task = None
                ctx._worker = None
                ctx.signal(reason)
                task.ctx = None
        else:
            return False
        # The reason stands for the TaskCancelledError, created when first read.
        self._finalize(task, CANCELLED, None, reason, now)  # first: the entry is now dead
        if state is PENDING:
            if self._ready_dead > self.queued:  # dead entries are the majority
                self._ready.compact(self.queued)  # O(live): amortised O(1) per cancel
                self._ready_dead = 0
        elif self._timer_dead:
            self._compact_timers()
        return True

    def cancel_all(self, reason: str, now: float, running: bool) -> list[Task]:
        """Cancel every task not yet terminal (``running``: running ones too)."""
        done: list[Task] = []
        for task in [t for t in self.tasks.values() if t.state not in TERMINAL]:
            if task.state is RUNNING and not running:
                continue
            self.cancel(task, reason, now)
            done.append(task)
        return done

    def _compact_timers(self) -> None:
        """The same for the timer heap, after a waiting task died."""
        timers = self._timers
        dead = self._timer_dead
        if dead == len(timers):
            timers.clear()
            self._timer_dead = 0
        elif dead > _COMPACT_MIN and 2 * dead > len(timers):
            timers[:] = [t for t in timers if _waiting(t)]
            heapify(timers)
            self._timer_dead = 0

    # -- terminal transition ----------------------------------------------------

    def _finalize(
        self,
        task: Task,
        state: TaskState,
        value: object,
        error: BaseException | str | None,
        now: float,
    ) -> None:
        """The one terminal transition of a task (the caller checked it was live).

        ``error`` is the exception, or for CANCELLED the reason (see ``Task.error``).
        """
        task.state = state
        task.value = value
        task._error = error
        task.finished_at = now
        task.fn = None  # drop references to the work itself at once
        task.args = ()
        task.kwargs = _NO_KWARGS
        if state is SUCCEEDED:
            self.succeeded += 1
        elif state is FAILED:
            self.failed += 1
        elif state is CANCELLED:
            self.cancelled += 1
        else:
            self.timed_out += 1
        ttl = task.opts.ttl
        if ttl is None:
            # Registered by submit; only this transition, or the purge of a task
            # that went through it, removes it: it is still there, and it is this task.
            del self.tasks[task.id]  # type: ignore[arg-type]
        else:
            heappush(self._expiry, (now + ttl, task.seq, task))
        if not self.running and self._deadlines:
            self._deadlines.clear()  # all dead: no attempt is running

    # -- introspection ----------------------------------------------------------

    @property
    def live(self) -> int:
        """Tasks accepted and not yet terminal."""
        return self.queued + self.delayed + self.running

    def sizes(self) -> dict[str, int]:
        """Lengths of the internal structures (for tests of memory bounds)."""
        return {
            "tasks": len(self.tasks),
            "ready": len(self._ready),
            "timers": len(self._timers),
            "deadlines": len(self._deadlines),
            "expiry": len(self._expiry),
        }
