"""The scheduling core: lanes, queues, state transitions, retry decisions and TTL purge.

Plain Python with no threads of its own and no clock of its own. The cluster holds
its lock around every ``Scheduler`` method and passes ``now`` (monotonic seconds),
so ordering, backoff, jitter and TTL can be driven deterministically in tests.

Lanes. Each executor of a cluster (the thread pool, a process pool, the event loop)
owns one ``Lane``: its own due queue and timer heap, so that §4's order holds among
the due tasks of one executor, and one executor's backlog never delays another's.
Deadlines (timeouts) and cached results' expiry are kept once, for all lanes.

Two-stage scheduling: tasks not yet due wait in their lane's ``timers``, a heap of
the tasks themselves ordered by (start, seq) (``Task.__lt__``: no tuple per entry,
so a million delayed tasks cost little memory); due tasks wait in the lane's
``ready``, a ``ReadyQueue`` ordered by (-priority, start, seq), where seq is the
submission order. Timers are promoted to ``ready`` when the lane's executor looks
for work, so a due task always competes on priority.

Cancel is O(1): the task's state becomes terminal and its queue entry is left
behind as a dead entry, skipped when popped. When dead entries outnumber live
ones they are dropped (amortised O(1) per cancel), which keeps a structure at
most about twice its live size: the ready queue trims them off the ends of its
FIFOs, where cancelling in submission order leaves them, and rebuilds only if
some remain inside.

No user object is freed here. A task that becomes terminal keeps its function and
arguments until the thread that ended it calls ``Task.release`` outside the lock;
whatever else a method drops that may hold the last reference to user objects (a
dead queue entry, a purged cached result) goes to ``graveyard``, which the caller
empties *after* releasing its lock. A ``__del__`` or ``weakref.finalize`` that
calls the cluster then runs where it cannot deadlock it.
"""

from __future__ import annotations

import itertools
import logging
import random
from heapq import heapify, heappop, heappush

from ._backoff import RetryMode
from ._clock import Clock
from ._errors import DuplicateTaskError, TaskNotFoundError, TaskTimeoutError
from ._policy import DEFAULT, Decision, RetryCounts, applied
from ._queues import ReadyQueue
from ._task import DEFAULT_OPTIONS, TERMINAL, Options, Result, Task, TaskContext, TaskState
from ._validate import UNLIMITED

__all__ = [
    "DONE",
    "REQUEUED",
    "RUN_ENDED",
    "SLEEP",
    "STALE",
    "Lane",
    "ReadyQueue",
    "Scheduler",
    "decide",
    "plan",
    "retry_delay",
]

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
RUN_ENDED = 4  #: a repeating task's run ended, the series goes on: deliver ``run_result``

_COMPACT_MIN = 64  # dead heap entries tolerated before a rebuild is considered


def decide(
    task: Task, ctx: TaskContext, error: BaseException, rng: random.Random, stopping: bool
) -> Decision | None:
    """The retry policy's answer after ``error`` ended attempt ``ctx`` of ``task``;
    None when nothing may ever be retried (no user code runs then).

    Runs the user's predicate and backoff: the cluster calls it *outside* its lock,
    and applies the answer with ``Scheduler.finish`` or ``fail_detached``.
    """
    policy = task.opts.retry_policy()
    if policy is None:
        return None
    return policy.decide(
        error, task.opts.counts, rng, stopping=stopping, reset=ctx._reset, task_id=task.id
    )


def plan(
    task: Task,
    ctx: TaskContext,
    error: BaseException | None,
    rng: random.Random,
    stopping: bool,
    now: float,
    clock: Clock,
) -> tuple[Decision | None, float | None]:
    """What follows attempt ``ctx``: the retry decision for ``error``, and, when this
    ends a run of a repeating task, when its next run is due (None: the series ends).

    Runs user code (the retry predicate and backoff) and cron arithmetic: called
    outside the lock by the thread that saw the attempt end; ``finish`` applies it.
    """
    decision = None
    opts = task.opts
    if error is not None:
        decision = decide(task, ctx, error, rng, stopping)
        if decision is not None and decision.delay is not None:
            return decision, None  # a retry: the run goes on
    repeat = opts.repeat
    series = opts.series
    if repeat is None or series is None or stopping or (error is not None and repeat.stop_on_error):
        return decision, None
    rearm = repeat.next_due(
        series.first,
        series.last_due,
        now,
        runs=series.run + 1,
        now_wall=clock.to_date,
        from_wall=clock.from_date,
    )
    return decision, rearm


def retry_delay(task: Task, error: BaseException, rng: random.Random) -> float | None:
    """Seconds to wait before retrying ``task`` after ``error``; None: no retry.

    ``decide``'s delay for the task's current attempt (the core's tests drive the
    scheduler with it, and set ``attempts`` by hand: without counts yet, the default
    rule's count is taken as the retries so far, ``attempts - 1``).
    """
    opts = task.opts
    policy = opts.retry_policy()
    if policy is None:
        return None
    counts = opts.counts
    if counts is None and task.attempts > 1:
        counts = RetryCounts([0] * len(opts.rules), task.attempts - 1)
    decision = policy.decide(error, counts, rng, task_id=task.id)
    return decision.delay


class Lane:
    """The tasks of one executor: its due queue, its timer heap and its gauges.

    Every field is guarded by the cluster lock, like the Scheduler that owns it.
    """

    __slots__ = (
        "backend",
        "delayed",
        "index",
        "name",
        "queued",
        "ready",
        "ready_dead",
        "running",
        "timer_dead",
        "timers",
    )

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.ready = ReadyQueue()
        self.timers: list[Task] = []  # heap by (start, seq); see Task.__lt__
        self.ready_dead = 0  # dead entries in ready (live ones: ``queued``)
        self.timer_dead = 0
        # Gauges: tasks PENDING, DELAYED or RETRYING, RUNNING on this lane.
        self.queued = self.delayed = self.running = 0
        #: The executor serving this lane (set by the cluster; the core never calls it).
        self.backend: object = None

    def __repr__(self) -> str:
        return f"<Lane {self.name!r} queued={self.queued} running={self.running}>"


def _budget(opts: Options, rule: int) -> int | None:
    """The retry budget of ``rule`` (an index into ``opts.rules``, or DEFAULT)."""
    if rule == DEFAULT:
        return opts.retries
    if 0 <= rule < len(opts.rules):
        return opts.rules[rule].retries
    return None


def _waiting(task: Task) -> bool:
    """Is this timer-heap entry live? (A task has at most one entry there.)"""
    state = task.state
    return (state is DELAYED or state is RETRYING) and task.ctx is None


class Scheduler:
    """Queues and state machine of one cluster; every method expects the caller's lock."""

    def __init__(self, rng: random.Random | None = None) -> None:
        #: Every task whose id is reserved: not yet terminal, or terminal and cached.
        self.tasks: dict[str, Task] = {}
        #: One lane per executor; lane 0 is the thread pool, and the default.
        self.lanes: list[Lane] = [Lane(0, "threads")]
        self._lane0 = self.lanes[0]
        self._deadlines: list[tuple[float, int, TaskContext]] = []
        self._expiry: list[tuple[float, int, Task]] = []  # cached results: (purge at, seq, task)
        #: Set when ``_expiry`` gains its first entry: whoever keeps time for the purge
        #: (the cluster's service thread) must be told. The caller clears it.
        self.expiry_armed = False
        #: Objects dropped under the lock that may hold the last reference to user
        #: objects; the caller frees them after releasing the lock (see the module doc).
        self.graveyard: list[object] = []
        #: Slots (whatever ``ctx._worker`` held) stuck in a cancelled or timed-out
        #: attempt, for the caller to replace or abort.
        self.abandoned: list[object] = []
        self._seq = itertools.count(1).__next__
        self._ids = itertools.count(1).__next__
        self.rng = rng if rng is not None else random.Random()
        #: False once a shutdown has cancelled whatever has not started.
        self.retries_allowed = True
        #: False once a stop has begun: no repeating task starts another run.
        self.runs_allowed = True
        #: The Result of the run that the last RUN_ENDED ended (for the caller).
        self.run_result: Result[object] | None = None
        # Counters.
        self.submitted = self.succeeded = self.failed = 0
        self.cancelled = self.timed_out = self.retried = 0

    def add_lane(self, name: str) -> Lane:
        """A new lane for an executor named ``name``."""
        lane = Lane(len(self.lanes), name)
        self.lanes.append(lane)
        return lane

    # -- submission and lookup ------------------------------------------------

    def submit(self, task: Task, now: float) -> bool:
        """Accept ``task``; return True if it is due now (its executor should take it)."""
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
        lane = task.lane
        if lane is None:
            lane = task.lane = self._lane0
        tasks[tid] = task
        task.seq = self._seq()
        task.submitted_at = now
        self.submitted += 1
        start = task.start
        if start is None or start <= now:
            if start is None:
                start = task.start = now
            lane.queued += 1
            lane.ready.push(task)
            return True
        task.state = DELAYED
        lane.delayed += 1
        heappush(lane.timers, task)
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
        bury = self.graveyard.append
        while expiry and expiry[0][0] <= now:
            task = heappop(expiry)[2]
            bury(task)
            if tasks.get(task.id) is task:  # type: ignore[arg-type]
                del tasks[task.id]  # type: ignore[arg-type]

    def next_expiry(self) -> float | None:
        """When the earliest cached result is due to be purged, or None."""
        expiry = self._expiry
        return expiry[0][0] if expiry else None

    # -- dispatch -------------------------------------------------------------

    def pop(self, now: float, lane: Lane | None = None) -> Task | None:
        """Start the next attempt of ``lane`` (default: lane 0): the best due task,
        now RUNNING with a fresh ctx."""
        if lane is None:
            lane = self._lane0
        timers = lane.timers
        if timers and timers[0].start <= now:  # type: ignore[operator]
            self._promote(lane, now)
        pop = lane.ready.pop
        while True:
            task = pop()
            if task is None:
                return None
            if task.state is PENDING:
                break
            lane.ready_dead -= 1
            self.graveyard.append(task)
        lane.queued -= 1
        lane.running += 1
        task.state = RUNNING
        if task.opts.timeout is not None or task.attempts:
            self._begin(task, lane, TaskContext(task, task.attempts, None), now)
        else:  # the common case, inlined: a first attempt without timeout
            task.attempts = 1
            task.started_at = now
            task.ctx = TaskContext(task, 0, None)
        return task

    def _begin(self, task: Task, lane: Lane, ctx: TaskContext, now: float) -> None:
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

    def _promote(self, lane: Lane, now: float) -> None:
        timers = lane.timers
        ready = lane.ready
        while timers and timers[0].start <= now:  # type: ignore[operator]
            task = heappop(timers)
            if _waiting(task):
                task.state = PENDING
                lane.delayed -= 1
                lane.queued += 1
                ready.push(task)
            else:
                lane.timer_dead -= 1
                self.graveyard.append(task)

    def next_due(self, lane: Lane | None = None) -> float | None:
        """When the earliest waiting task of ``lane`` becomes due, or None if none waits."""
        timers = (self._lane0 if lane is None else lane).timers
        while timers:
            task = timers[0]
            if _waiting(task):
                return task.start
            self.graveyard.append(heappop(timers))
            (self._lane0 if lane is None else lane).timer_dead -= 1
        return None

    # -- the end of an attempt -------------------------------------------------

    def finish(
        self,
        task: Task,
        ctx: TaskContext,
        value: object,
        error: BaseException | None,
        decision: Decision | float | None,
        now: float,
        rearm: float | None = None,
    ) -> int:
        """Record how the attempt ``ctx`` ended.

        ``decision`` is the retry policy's answer for ``error`` (a plain float is a
        retry after that many seconds on the default rule); ``rearm`` is, for a
        repeating task whose run ends here, when its next run is due (None: the
        series ends). The edge computes both outside the lock (user code).

        The compare-and-set at the heart of exactly-once: only the attempt that is
        still ``task.ctx`` may move the task on; a timed-out or cancelled attempt
        was detached and gets STALE.
        """
        if task.ctx is not ctx:
            return STALE
        ctx._task = None
        ctx._worker = None
        task.lane.running -= 1  # type: ignore[union-attr]
        task.ctx = None
        if error is None:
            return self._end_run(task, SUCCEEDED, value, None, rearm, now)
        return self._failed(task, error, decision, rearm, now, True, ctx._reset)

    def fail_detached(
        self,
        ctx: TaskContext,
        error: BaseException,
        decision: Decision | float | None,
        now: float,
        rearm: float | None = None,
    ) -> int:
        """Settle an attempt that ``expire`` detached: schedule its retry or end the run."""
        task = ctx._task
        ctx._task = None
        ctx._worker = None
        if task is None or task.state is not RUNNING or task.ctx is not None:
            return STALE  # cancelled or shut down meanwhile
        task.lane.running -= 1  # type: ignore[union-attr]
        return self._failed(task, error, decision, rearm, now, False, ctx._reset)

    def _failed(
        self,
        task: Task,
        error: BaseException,
        decision: Decision | float | None,
        rearm: float | None,
        now: float,
        may_sleep: bool,
        reset: bool,
    ) -> int:
        opts = task.opts
        if decision is None or type(decision) is float:
            delay, rule, ending = decision, DEFAULT, error
        else:
            delay, rule, ending = decision.delay, decision.rule, decision.error  # type: ignore[union-attr]
        if opts is not DEFAULT_OPTIONS:
            opts.last_error = error if ending is error else ending
        if delay is not None and self.retries_allowed:
            if opts is not DEFAULT_OPTIONS:
                counted = decision if type(decision) is Decision else Decision(delay, rule, ending)
                opts.counts = applied(opts.counts, counted, len(opts.rules), reset=reset)
                opts.unlimited = _budget(opts, rule) == UNLIMITED
            self.retried += 1
            lane = task.lane
            lane.delayed += 1  # type: ignore[union-attr]
            task.state = RETRYING
            task._error = ending
            task.start = now + delay
            if may_sleep and opts.retry_mode is RetryMode.IMMEDIATE:
                # The worker sleeps on this context: cancel and stop signal it.
                task.ctx = TaskContext(task, task.attempts, None)
                return SLEEP
            task.ctx = None
            heappush(lane.timers, task)  # type: ignore[union-attr]
            return REQUEUED
        task.ctx = None
        state = TIMED_OUT if isinstance(ending, TaskTimeoutError) else FAILED
        return self._end_run(task, state, None, ending, rearm, now)

    def _end_run(
        self,
        task: Task,
        state: TaskState,
        value: object,
        error: BaseException | None,
        rearm: float | None,
        now: float,
    ) -> int:
        """A run ended in ``state``: the task is terminal (DONE), or, for a repeating
        task whose series goes on, it waits for its next run (RUN_ENDED: the run's
        Result is in ``run_result`` for the caller to deliver)."""
        series = task.opts.series
        if series is None or rearm is None or not self.runs_allowed:
            self._finalize(task, state, value, error, now)
            return DONE
        task.value = value
        task._error = error
        task.finished_at = now
        self.run_result = task.result()
        opts = task.opts
        opts.counts = None  # retries and rules start afresh in every run
        opts.unlimited = False
        series.run += 1
        series.last_due = rearm
        task.attempts = 0
        task.start = rearm
        lane: Lane = task.lane  # type: ignore[assignment]
        if rearm <= now:  # missed occurrences collapsed into one run, due now
            task.state = PENDING
            lane.queued += 1
            lane.ready.push(task)
        else:
            task.state = DELAYED
            lane.delayed += 1
            heappush(lane.timers, task)
        return RUN_ENDED

    def resume(self, task: Task, ctx: TaskContext, now: float) -> bool:
        """After an IMMEDIATE backoff slept on ``ctx``: start the next attempt (with a
        fresh context in ``task.ctx``) unless the task was cancelled meanwhile."""
        if task.ctx is not ctx or task.state is not RETRYING:
            return False
        ctx._task = None
        task.state = RUNNING
        lane = task.lane
        lane.delayed -= 1  # type: ignore[union-attr]
        lane.running += 1  # type: ignore[union-attr]
        self._begin(task, lane, TaskContext(task, task.attempts, None), now)  # type: ignore[arg-type]
        return True

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

        The slot of a cancelled running attempt is stuck in user code: it is
        appended to ``abandoned`` for the caller to replace or abort.
        """
        state = task.state
        lane: Lane = task.lane  # type: ignore[assignment]
        if state is PENDING:  # (a queued task has no ctx)
            lane.queued -= 1
            lane.ready_dead += 1
        elif state is DELAYED or state is RETRYING:
            lane.delayed -= 1
            if task.ctx is None:
                lane.timer_dead += 1
            else:  # an IMMEDIATE retry: wake the worker sleeping on it
                task.ctx.signal(reason)
                task.ctx = None
        elif state is RUNNING:
            lane.running -= 1
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
            if lane.ready_dead > lane.queued:  # dead entries are the majority
                lane.ready.compact(lane.queued, self.graveyard)  # amortised O(1) per cancel
                lane.ready_dead = 0
        elif lane.timer_dead:
            self._compact_timers(lane)
        return True

    def stop_series(self, now: float) -> list[Task]:
        """A graceful stop began: no series starts another run. A series waiting for its
        next run is cancelled (reason "shutdown"); a task waiting to retry on an
        UNLIMITED budget ends with its last error. Returns the tasks made terminal."""
        self.runs_allowed = False
        done: list[Task] = []
        for task in [t for t in self.tasks.values() if t.state not in TERMINAL]:
            opts = task.opts
            if opts is DEFAULT_OPTIONS:
                continue
            state = task.state
            if opts.series is not None and (state is DELAYED or state is PENDING):
                self.cancel(task, "shutdown", now)
                done.append(task)
            elif state is RETRYING and opts.unlimited:
                lane: Lane = task.lane  # type: ignore[assignment]
                lane.delayed -= 1
                if task.ctx is None:
                    lane.timer_dead += 1
                else:  # an IMMEDIATE backoff: wake the worker sleeping on it
                    task.ctx.signal("shutdown")
                    task.ctx = None
                error = task._error
                finished = TIMED_OUT if isinstance(error, TaskTimeoutError) else FAILED
                self._finalize(task, finished, None, error, now)
                done.append(task)
        return done

    def cancel_all(self, reason: str, now: float, running: bool) -> list[Task]:
        """Cancel every task not yet terminal (``running``: running ones too)."""
        done: list[Task] = []
        for task in [t for t in self.tasks.values() if t.state not in TERMINAL]:
            if task.state is RUNNING and not running:
                continue
            self.cancel(task, reason, now)
            done.append(task)
        return done

    def _compact_timers(self, lane: Lane) -> None:
        """The same for a lane's timer heap, after a waiting task died."""
        timers = lane.timers
        dead = lane.timer_dead
        if dead == len(timers):
            self.graveyard.append(timers)  # a new list replaces it: no copy
            lane.timers = []
            lane.timer_dead = 0
        elif dead > _COMPACT_MIN and 2 * dead > len(timers):
            self.graveyard.append(timers)
            live = lane.timers = [t for t in timers if _waiting(t)]
            heapify(live)
            lane.timer_dead = 0

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
        The task keeps its function and arguments: the thread that ended it (the
        caller of ``finish``, ``fail_detached``, ``cancel`` or ``cancel_all``) drops
        them with ``Task.release`` once it has released the lock.
        """
        task.state = state
        task.value = value
        task._error = error
        task.finished_at = now
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
            if not self._expiry:
                self.expiry_armed = True
            heappush(self._expiry, (now + ttl, task.seq, task))
        if self._deadlines and not self.running:
            self._deadlines.clear()  # all dead: no attempt is running

    # -- introspection ----------------------------------------------------------

    @property
    def queued(self) -> int:
        """Tasks due and waiting for a slot of their executor, over all lanes."""
        return sum(lane.queued for lane in self.lanes)

    @property
    def delayed(self) -> int:
        """Tasks waiting for a start time or a retry backoff, over all lanes."""
        return sum(lane.delayed for lane in self.lanes)

    @property
    def running(self) -> int:
        """Attempts running (not detached), over all lanes."""
        return sum(lane.running for lane in self.lanes)

    @property
    def live(self) -> int:
        """Tasks accepted and not yet terminal."""
        return sum(lane.queued + lane.delayed + lane.running for lane in self.lanes)

    def sizes(self) -> dict[str, int]:
        """Lengths of the internal structures (for tests of memory bounds)."""
        return {
            "tasks": len(self.tasks),
            "ready": sum(len(lane.ready) for lane in self.lanes),
            "timers": sum(len(lane.timers) for lane in self.lanes),
            "deadlines": len(self._deadlines),
            "expiry": len(self._expiry),
        }
