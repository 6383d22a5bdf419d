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
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

from ._backoff import RetryMode
from ._clock import Clock
from ._durable_ids import DEAD_PREFIX
from ._errors import (
    DuplicateTaskError,
    RetryAfter,
    StopRetrying,
    TaskNotFoundError,
    TaskTimeoutError,
)
from ._gates import Gate
from ._listing import Entry, Listing, fn_name
from ._policy import DEFAULT, NONE, Decision, RetryCounts, applied
from ._queues import ReadyQueue
from ._task import DEFAULT_OPTIONS, TERMINAL, Options, Result, Task, TaskContext, TaskState
from ._validate import UNLIMITED

if TYPE_CHECKING:
    from ._store import Row

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

_DIRECTIVES = (RetryAfter, StopRetrying)
_COMPACT_MIN = 64  # dead heap entries tolerated before a rebuild is considered
MAX_NAMES = 10_000  # distinct task names counted; further names share "other"


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
        if isinstance(error, _DIRECTIVES) and error.__cause__ is not None:
            return Decision(None, NONE, error.__cause__)  # no retry: end with the cause
        return None
    return policy.decide(
        error,
        task.opts.counts,
        rng,
        stopping=stopping,
        reset=getattr(ctx, "_reset", False),
        task_id=task.id,
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
    to_date, from_date = clock.to_date, clock.from_date
    last = series.last_due
    began = series.began
    if began > last:
        # Occurrences that passed before this run began (a clock jump, no free
        # worker) collapsed into this run: the grid goes on from the latest of them.
        caught = repeat.next_due(
            series.first, last, began, runs=0, now_wall=to_date, from_wall=from_date
        )
        if caught is not None and caught <= began:
            last = caught
    rearm = repeat.next_due(
        series.first, last, now, runs=series.run + 1, now_wall=to_date, from_wall=from_date
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


class DeadRecord:
    """A dead letter: what a resurrect needs (function, arguments, options) and the
    error. Keeps its own references, so the task itself is released as usual."""

    __slots__ = ("args", "attempts", "error", "error_state", "evicted", "failed_at", "fn", "id",
                 "key", "kwargs", "lane", "name", "opts", "priority", "seq", "submitted_at",
                 "tags", "text")  # fmt: skip

    def __init__(self, task: Task, now: float, name: str) -> None:
        opts = task.opts
        self.id: str = task.id  # type: ignore[assignment]
        self.seq = task.seq
        self.name = name
        self.tags = opts.tags
        self.key = opts.key
        self.fn = task.fn
        self.args = task.args
        self.kwargs = task.kwargs
        self.opts = opts
        self.priority = task.priority
        self.lane = task.lane
        self.error: BaseException = task.error  # type: ignore[assignment]
        self.attempts = task.attempts
        self.submitted_at = task.submitted_at
        self.failed_at = now
        self.text: str | None = None  # the formatted traceback, made outside the lock
        self.error_state = task.state  #: FAILED or TIMED_OUT
        self.evicted = False  #: dropped for room (logged when freed)


def index_snapshot(snapshot: list[Task], since: int) -> Listing:
    """The index of the snapshot's tasks after ``since`` (outside the lock: their seq,
    name, tags and key are fixed; one that ends meanwhile is in the removal log)."""
    fresh = []
    for task in reversed(snapshot):
        if task.seq <= since:
            break
        fresh.append(_task_entry(task))
    part = Listing()
    part.add_many(fresh)
    return part


def _task_entry(task: Task) -> Entry:
    opts = task.opts
    name = opts.name or fn_name(task.fn)
    return Entry(task.seq, task, name, opts.tags, opts.key)


class NameCounts:
    """One task name's terminal counts since the cluster was created (guarded by the
    cluster lock). Slots, not a list: an attribute increment is the cheaper one."""

    __slots__ = ("cancelled", "failed", "succeeded", "timed_out")

    def __init__(self) -> None:
        self.succeeded = self.failed = self.cancelled = self.timed_out = 0

    def values(self) -> tuple[int, int, int, int]:
        """(succeeded, failed, cancelled, timed_out)."""
        return (self.succeeded, self.failed, self.cancelled, self.timed_out)


class ByName(dict[str, NameCounts]):
    """``Scheduler.by_name``: a name's counters are made on first use (``d[name]``, in
    C; at most ``MAX_NAMES`` names, the rest share "other")."""

    def __missing__(self, name: str) -> NameCounts:
        if len(self) >= MAX_NAMES:
            other = self.get("other")
            if other is None:
                other = self["other"] = NameCounts()
            return other
        counts = self[name] = NameCounts()
        return counts


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

    # Slots: the hot paths read these attributes on every task, and a slot is the
    # fastest attribute load CPython has (an instance dict of this many keys loses
    # the shared-key fast path).
    __slots__ = (
        "_deadlines",
        "_expiry",
        "_gate_timers",
        "_ids",
        "_lane0",
        "_seq",
        "abandoned",
        "by_name",
        "dead",
        "dead_evicted",
        "dead_limit",
        "encode",
        "expiry_armed",
        "gate_armed",
        "gates",
        "graveyard",
        "journal",
        "lanes",
        "listing",
        "parked",
        "reserved",
        "retried",
        "retries_allowed",
        "rng",
        "run_result",
        "runs_allowed",
        "settling",
        "submitted",
        "tasks",
        "woken",
    )

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
        self._seq = itertools.count(1)  # next(): a builtin call, faster than a bound __next__
        self._ids = itertools.count(1)
        self.rng = rng if rng is not None else random.Random()
        #: False once a shutdown has cancelled whatever has not started.
        self.retries_allowed = True
        #: False once a stop has begun: no repeating task starts another run.
        self.runs_allowed = True
        #: The Result of the run that the last RUN_ENDED ended (for the caller).
        self.run_result: Result[object] | None = None
        # Keys (SPEC §12): a gate per key; parked tasks wait there, off every queue.
        self.gates: dict[str, Gate] = {}
        self.parked = 0  #: tasks parked on a gate
        #: Lanes that got a task back from a gate: the caller wakes their executors.
        self.woken: list[Lane] = []
        #: Set when a gate timer became the earliest: the caller keeps time for it.
        self.gate_armed = False
        self._gate_timers: list[tuple[float, int, Gate]] = []  # a token comes back
        # Dead letters (SPEC §13), oldest first; bounded by dead_limit.
        self.dead: dict[str, DeadRecord] = {}
        self.dead_limit = 1000
        self.dead_evicted = 0
        #: Per task name: its terminal counts since creation (``NameCounts``).
        self.by_name = ByName()
        self.listing = Listing()
        # Durable tasks (SPEC §14): each transition a restart must know of leaves its
        # row (or, for a task the store forgets, its id) here; the caller hands them to
        # the store while it holds the lock (so rows reach it in transition order) and
        # waits for the commit after releasing it, before it delivers or runs anything.
        self.journal: list[Row | str] = []
        #: Durable tasks that ended in this critical section (see ``Durable.recorded``).
        self.settling: list[Task] = []
        #: Makes a durable task's row (injected by the cluster when it has a store).
        self.encode: Callable[[Task, str | None], Row] | None = None
        #: Ids reserved by a durable submit that is being committed (see ``reserve``).
        self.reserved: dict[str, Task] = {}
        # Counters.
        self.submitted = self.retried = 0  # (the terminal counts are by_name's sums)

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
        if self.reserved:  # durable submits are committing, or stored ids wait: see reserve
            tid = self._claim(task, now)
        else:
            if tid is None:
                tid = f"t{next(self._ids)}"
                while tid in tasks:  # a user took this id with with_id()
                    tid = f"t{next(self._ids)}"
                task.id = tid
            elif tid in tasks:
                raise DuplicateTaskError(f"task id {tid!r} is already queued, running or cached")
            task.seq = next(self._seq)
            task.submitted_at = now
        lane = task.lane = task.lane or self._lane0  # None: the default lane (threads)
        tasks[tid] = task
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

    # The terminal counts: sums of the per-name counters (one increment per task).

    @property
    def succeeded(self) -> int:
        return sum(c.succeeded for c in self.by_name.values())

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.by_name.values())

    @property
    def cancelled(self) -> int:
        return sum(c.cancelled for c in self.by_name.values())

    @property
    def timed_out(self) -> int:
        return sum(c.timed_out for c in self.by_name.values())

    def purge(self, now: float) -> None:
        """Forget cached results whose TTL has passed."""
        expiry = self._expiry
        tasks = self.tasks
        bury = self.graveyard.append
        listing = self.listing
        while expiry and expiry[0][0] <= now:
            task = heappop(expiry)[2]
            bury(task)
            if tasks.get(task.id) is task:  # type: ignore[arg-type]
                del tasks[task.id]  # type: ignore[arg-type]
                if task.seq <= listing.upto:
                    listing.note_removed(task.seq)
                if task.opts.durable is not None:
                    self._forget_row(task)

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
        ready = lane.ready
        while True:
            task = ready.pop()
            if task is None:
                return None
            if task.state is PENDING:
                opts = task.opts
                if opts is DEFAULT_OPTIONS:
                    # A plain task (no timeout, no retry, no key): its one attempt, the
                    # common case, inlined.
                    lane.queued -= 1
                    lane.running += 1
                    task.state = RUNNING
                    task.attempts = 1
                    task.started_at = now
                    task.ctx = TaskContext(task, 0, None)
                    return task
                if opts.key is None or self._admit(task, lane, now):
                    break
                continue  # parked on its key: it holds no worker; look further
            lane.ready_dead -= 1
            self.graveyard.append(task)
        lane.queued -= 1
        lane.running += 1
        task.state = RUNNING
        self._begin(task, lane, TaskContext(task, task.attempts, None), now)
        if opts.series is not None and task.attempts == 1:
            opts.series.began = now  # a run begins
        if opts.durable is not None:
            self._journal(task)  # running: after a crash, it was interrupted
        return task

    # -- durable tasks ---------------------------------------------------------------

    def _journal(self, task: Task, state: str | None = None) -> None:
        """Note the row of durable ``task`` as it now stands."""
        encode = self.encode
        if encode is not None:
            self.journal.append(encode(task, state))

    def _forget_row(self, task: Task, keep: bool = False) -> None:
        """The store forgets ``task`` (``keep``: it keeps its row), unless it keeps it
        as a dead letter (a row of its own)."""
        if self.encode is None:
            return
        if not keep:
            self.journal.append(task.id)  # type: ignore[arg-type]
        record = self.dead.get(task.id)  # type: ignore[arg-type]
        if record is not None and record.seq == task.seq:
            self.journal.append(self.encode(task, "dead"))  # under its own row id

    def reserve(self, task: Task, now: float) -> None:
        """Phase one of a durable submit: take the id and the submission order now, so
        that the task's row is committed before the task is queued (``submit``)."""
        tasks = self.tasks
        reserved = self.reserved
        tid = task.id
        if tid is None:
            tid = f"t{next(self._ids)}"
            while tid in tasks or tid in reserved:
                tid = f"t{next(self._ids)}"
            task.id = tid
        elif tid in tasks or tid in reserved:
            raise DuplicateTaskError(f"task id {tid!r} is already queued, running or cached")
        reserved[tid] = task
        task.seq = next(self._seq)
        task.submitted_at = now

    def _claim(self, task: Task, now: float) -> str:
        """``submit``'s id and order while some ids are reserved."""
        reserved = self.reserved
        tid = task.id
        if tid is not None and reserved.get(tid) is task:
            del reserved[tid]  # phase two of a durable submit: id and seq are set
            return tid
        self.reserve(task, now)  # checks both the held and the reserved ids
        del reserved[task.id]  # type: ignore[arg-type]
        return task.id  # type: ignore[return-value]

    def unreserve(self, task: Task) -> None:
        """Phase one undone (its commit failed)."""
        if self.reserved.get(task.id) is task:  # type: ignore[arg-type]
            del self.reserved[task.id]  # type: ignore[arg-type]

    def restore(self, task: Task, now: float) -> None:
        """Put a task read back from the store where its state says it waits (its id,
        seq, times and state are set). Terminal ones come back cached."""
        self.tasks[task.id] = task  # type: ignore[index]
        lane: Lane = task.lane  # type: ignore[assignment]
        state = task.state
        if state in TERMINAL:
            if task.opts.ttl is not None and task.finished_at is not None:
                heappush(self._expiry, (task.finished_at + task.opts.ttl, task.seq, task))
                self.expiry_armed = True
            return
        if task.start <= now:  # type: ignore[operator]
            task.state = PENDING
            lane.queued += 1
            lane.ready.push(task)
        else:
            if state is not RETRYING:
                task.state = DELAYED
            lane.delayed += 1
            heappush(lane.timers, task)

    def restore_dead(self, record: DeadRecord) -> None:
        """A dead letter read back from the store."""
        self.dead[record.id] = record

    def start_ids_after(self, n: int) -> None:
        """Generated ids (``t1``, ``t2``...) start past ``t{n}``."""
        self._ids = itertools.count(n + 1)

    def start_seq_after(self, seq: int) -> None:
        """New submissions come after ``seq`` (the newest one a store holds)."""
        self._seq = itertools.count(seq + 1)

    # -- keys and limits -----------------------------------------------------------

    def gate(self, key: str) -> Gate:
        """The gate of ``key`` (created with limit 1 on first use)."""
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = Gate(key)
        return gate

    def limit(self, key: str, limit: int, rate: float | None, burst: int, now: float) -> None:
        """Set ``key``'s concurrency and start rate; parked tasks that now fit go back."""
        gate = self.gate(key)
        gate.configure(limit, rate, burst, now)
        for _ in range(max(0, limit - gate.holders)):
            if not self._unpark(gate):
                break

    def _admit(self, task: Task, lane: Lane, now: float) -> bool:
        """May ``task`` (just popped, PENDING) start now? Else it is parked."""
        opts = task.opts
        gate = self.gate(opts.key)  # type: ignore[arg-type]
        if not opts.holds and gate.holders >= gate.limit:
            self._park(task, gate, lane)
            return False
        back = gate.take_token(now)
        if back is not None:  # no token: park until one comes back
            self._park(task, gate, lane)
            if gate.timer is None or back < gate.timer:
                gate.timer = back
                heappush(self._gate_timers, (back, next(self._seq), gate))
                self.gate_armed = True
                if lane not in self.woken:
                    self.woken.append(lane)  # (the edge looks at woken, then at timers)
            return False
        if not opts.holds:
            opts.holds = True
            gate.holders += 1
        return True

    def _park(self, task: Task, gate: Gate, lane: Lane) -> None:
        lane.queued -= 1
        self.parked += 1
        task.opts.parked = True
        gate.park(task)

    def _unpark(self, gate: Gate) -> bool:
        """The best task parked on ``gate`` goes back to its due queue; False if none."""
        task = gate.unpark()
        if task is None:
            return False
        self.parked -= 1
        lane: Lane = task.lane  # type: ignore[assignment]
        lane.queued += 1
        lane.ready.push(task)  # its old place: (priority, start, seq)
        if lane not in self.woken:
            self.woken.append(lane)
        return True

    def _release_key(self, task: Task) -> None:
        """``task`` stops holding its key (it ended, or its run did)."""
        opts = task.opts
        opts.holds = False
        gate = self.gates[opts.key]  # type: ignore[index]
        gate.holders -= 1
        if gate.holders < gate.limit:
            self._unpark(gate)

    def next_gate_timer(self) -> float | None:
        """When a token comes back for a task parked on a rate, or None."""
        timers = self._gate_timers
        while timers:
            when, _, gate = timers[0]
            if gate.timer == when and gate.parked:
                return when
            heappop(timers)
        return None

    def fire_gate_timers(self, now: float) -> None:
        """Tokens came back: as many waiting tasks as there are tokens (and free holder
        places) go back to their queues; if more wait, the next token is timed."""
        timers = self._gate_timers
        while timers and timers[0][0] <= now:
            when, _, gate = heappop(timers)
            if gate.timer != when:
                continue
            gate.timer = None
            ready = gate.tokens_now(now)
            while ready >= 1 and self._unpark(gate):
                ready -= 1
            if gate.parked:
                back = gate.next_token(now)
                gate.timer = back
                heappush(timers, (back, next(self._seq), gate))
                self.gate_armed = True

    def _begin(self, task: Task, lane: Lane, ctx: TaskContext, now: float) -> None:
        task.attempts += 1
        task.started_at = now
        task.ctx = ctx
        timeout = task.opts.timeout
        if timeout is not None:
            ctx.deadline = now + timeout
            deadlines = self._deadlines
            # Entries of attempts that ended are dropped when they pile up (looked at
            # every 64 pushes: counting the running attempts sums over the lanes).
            if len(deadlines) & 63 == 63 and len(deadlines) > 2 * self.running + _COMPACT_MIN:
                deadlines[:] = [e for e in deadlines if e[2]._task is not None]
                heapify(deadlines)
            heappush(deadlines, (ctx.deadline, next(self._seq), ctx))

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
            if rearm is None:  # no next run (not a series, or it ends): _end_run, inlined
                if task.opts is not DEFAULT_OPTIONS:
                    self._finalize(task, SUCCEEDED, value, None, now)
                    return DONE
                # _finalize's plain branch, inlined: a success is the one transition
                # that every task makes (no error to set, nothing to dead-letter).
                task.state = SUCCEEDED
                task.value = value
                task.finished_at = now
                try:
                    name = task.fn.__qualname__  # type: ignore[union-attr]
                except AttributeError:
                    name = fn_name(task.fn)
                self.by_name[name].succeeded += 1
                del self.tasks[task.id]  # type: ignore[arg-type]
                if task.seq <= self.listing.upto:
                    self.listing.note_removed(task.seq)
                return DONE
            return self._end_run(task, SUCCEEDED, value, None, rearm, now)
        return self._failed(task, error, decision, rearm, now, True, getattr(ctx, "_reset", False))

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
        return self._failed(task, error, decision, rearm, now, False, getattr(ctx, "_reset", False))

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
        unlimited = False
        if opts is not DEFAULT_OPTIONS:
            opts.last_error = error if ending is error else ending
            unlimited = delay is not None and _budget(opts, rule) == UNLIMITED
        # (An UNLIMITED retry decided just before a stop began is not one after it.)
        if delay is not None and self.retries_allowed and (self.runs_allowed or not unlimited):
            if opts is not DEFAULT_OPTIONS:
                counted = decision if type(decision) is Decision else Decision(delay, rule, ending)
                opts.counts = applied(opts.counts, counted, len(opts.rules), reset=reset)
                opts.unlimited = unlimited
            self.retried += 1
            lane = task.lane
            lane.delayed += 1  # type: ignore[union-attr]
            task.state = RETRYING
            task._error = ending
            task.start = now + delay
            if opts is not DEFAULT_OPTIONS and opts.durable is not None:
                self._journal(task)
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
        if task.opts.holds:
            self._release_key(task)  # between runs, the key is free
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
        if opts.durable is not None:
            self._journal(task)
        return RUN_ENDED

    def resume(self, task: Task, ctx: TaskContext, now: float) -> bool:
        """After an IMMEDIATE backoff slept on ``ctx``: start the next attempt (with a
        fresh context in ``task.ctx``) unless the task was cancelled meanwhile. False
        with ``task.ctx`` still ``ctx``: its key's rate gives no token yet, and the
        backoff goes on until ``task.start``."""
        if task.ctx is not ctx or task.state is not RETRYING:
            return False
        opts = task.opts
        if opts is not DEFAULT_OPTIONS and opts.key is not None:
            back = self.gate(opts.key).take_token(now)  # every attempt takes a token
            if back is not None:
                task.start = back  # not yet: the caller sleeps on until the token is back
                return False
        ctx._task = None
        task.state = RUNNING
        lane = task.lane
        lane.delayed -= 1  # type: ignore[union-attr]
        lane.running += 1  # type: ignore[union-attr]
        self._begin(task, lane, TaskContext(task, task.attempts, None), now)  # type: ignore[arg-type]
        if task.opts.durable is not None:
            self._journal(task)
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
        if state is PENDING and not task.opts.parked:  # _unqueue's common cases, inlined
            lane.queued -= 1
            lane.ready_dead += 1
        elif state is DELAYED and task.ctx is None:
            lane.delayed -= 1
            lane.timer_dead += 1
        elif state is PENDING or state is DELAYED or state is RETRYING:
            self._unqueue(task, reason)
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
        elif state is not RUNNING and lane.timer_dead:
            self._compact_timers(lane)
        return True

    def _unqueue(self, task: Task, reason: str = "shutdown") -> None:
        """A task that waits (PENDING, DELAYED or RETRYING) leaves its queue: its entry
        becomes a dead one (dropped lazily), or its IMMEDIATE backoff is cut short."""
        lane: Lane = task.lane  # type: ignore[assignment]
        if task.state is PENDING:  # (a queued task has no ctx)
            opts = task.opts
            if opts.parked:  # on its key's gate, in no queue
                self.parked -= 1
                self.gates[opts.key].forget(task)  # type: ignore[index]
            else:
                lane.queued -= 1
                lane.ready_dead += 1
        else:
            lane.delayed -= 1
            if task.ctx is None:
                lane.timer_dead += 1
            else:  # an IMMEDIATE retry: wake the worker sleeping on it
                task.ctx.signal(reason)
                task.ctx = None

    def _compact_after(self, task: Task, state: TaskState) -> None:
        """Drop dead entries once they are the majority (amortised O(1) per removal)."""
        lane: Lane = task.lane  # type: ignore[assignment]
        if state is PENDING:
            if lane.ready_dead > lane.queued:
                lane.ready.compact(lane.queued, self.graveyard)
                lane.ready_dead = 0
        elif state is not RUNNING and lane.timer_dead:
            self._compact_timers(lane)

    def stop_series(self, now: float) -> list[Task]:
        """A graceful stop began: no series starts another run. A series waiting for its
        next run is cancelled (reason "shutdown"); a task waiting to retry on an
        UNLIMITED budget (its backoff running, or due and queued) ends with its last
        error. Returns the tasks made terminal."""
        self.runs_allowed = False
        done: list[Task] = []
        carried = [t for t in self.tasks.values() if t.opts.series is not None or t.opts.unlimited]
        for task in carried:
            opts = task.opts
            state = task.state
            if state in TERMINAL:
                continue
            if state is not DELAYED and state is not PENDING and state is not RETRYING:
                continue  # running: carried to the end of its run
            if opts.series is not None and task.attempts == 0:  # waiting for a run
                self.cancel(task, "shutdown", now)
                done.append(task)
            elif opts.unlimited and task.attempts:  # waiting for an UNLIMITED retry
                error = task._error
                self._unqueue(task)
                finished = TIMED_OUT if isinstance(error, TaskTimeoutError) else FAILED
                self._finalize(task, finished, None, error, now)
                self._compact_after(task, state)
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
        opts = task.opts
        if opts is DEFAULT_OPTIONS:  # a plain task (once per task: kept short)
            try:
                name = task.fn.__qualname__  # type: ignore[union-attr]
            except AttributeError:  # a partial, a callable object
                name = fn_name(task.fn)
            if state is CANCELLED:  # (a plain success does not come here: see finish)
                self.by_name[name].cancelled += 1
            else:
                self._count_end(task, state, name, now)
            del self.tasks[task.id]  # type: ignore[arg-type]  # (see below)
            if task.seq <= self.listing.upto:
                self.listing.note_removed(task.seq)
            return
        name = opts.name
        if name is None:  # kept: the function is dropped once the task is released
            try:
                name = task.fn.__qualname__  # type: ignore[union-attr]
            except AttributeError:
                name = fn_name(task.fn)
            opts.name = name
        if state is CANCELLED:
            self.by_name[name].cancelled += 1
        else:
            self._count_end(task, state, name, now)
        if opts.holds:
            self._release_key(task)
        spec = opts.durable
        if spec is not None:
            if self.encode is None or error == "shutdown":
                # Nothing to record (a forked child), or a shutdown cancelled it:
                # its row stays as it was, and a restart carries it on (SPEC §14).
                spec.recorded = True
            else:
                if opts.ttl is None:
                    self._forget_row(task)
                else:
                    self._journal(task)  # cached: its Result survives a restart
                    if state is not SUCCEEDED and state is not CANCELLED:
                        self._forget_row(task, True)  # its dead letter, if any, too
                self.settling.append(task)  # seen as done once that is committed
        ttl = opts.ttl
        if ttl is None:
            # Registered by submit; only this transition, or the purge of a task
            # that went through it, removes it: it is still there, and it is this task.
            del self.tasks[task.id]  # type: ignore[arg-type]
            if task.seq <= self.listing.upto:
                self.listing.note_removed(task.seq)
        else:
            if not self._expiry:
                self.expiry_armed = True
            heappush(self._expiry, (now + ttl, task.seq, task))

    def _count_end(self, task: Task, state: TaskState, name: str, now: float) -> None:
        """Count an end other than a cancel; a failure leaves a dead letter."""
        counts = self.by_name[name]
        if state is SUCCEEDED:
            counts.succeeded += 1
            return
        if state is FAILED:
            counts.failed += 1
        else:
            counts.timed_out += 1
        if self.dead_limit:
            self._dead_letter(task, now, name)

    # -- dead letters -------------------------------------------------------------

    def _dead_letter(self, task: Task, now: float, name: str) -> None:
        """Keep a task that failed for good, with what a resurrect needs."""
        dead = self.dead
        tid: str = task.id  # type: ignore[assignment]
        old = dead.pop(tid, None)
        if old is not None:  # the same id failed again: the newer one stays
            self.graveyard.append(old)
            self._unlist_dead(old)
        record = DeadRecord(task, now, name)
        dead[tid] = record
        while len(dead) > self.dead_limit:
            evicted = dead.pop(next(iter(dead)))
            self.dead_evicted += 1
            evicted.evicted = True  # the edge logs it when it frees it
            self._unlist_dead(evicted)
            self.graveyard.append(evicted)  # its function and arguments, freed outside

    def _unlist_dead(self, record: DeadRecord) -> None:
        if record.seq <= self.listing.upto:
            self.listing.note_removed(record.seq)
        if record.opts.durable is not None and self.encode is not None:
            self.journal.append(DEAD_PREFIX + record.id)  # its own row

    @staticmethod
    def _dead_entry(record: DeadRecord) -> Entry:
        return Entry(record.seq, record, record.name, record.tags, record.key)

    def take_dead(self, tid: str) -> DeadRecord:
        """Remove and return the dead letter ``tid`` (it is there: resurrect)."""
        record = self.dead.pop(tid)
        self._unlist_dead(record)
        return record

    def clear_dead(self, ids: tuple[str, ...]) -> int:
        """Forget these dead letters (none given: all); how many were forgotten."""
        dead = self.dead
        chosen = list(dead) if not ids else [i for i in ids if i in dead]
        for tid in chosen:
            record = dead.pop(tid, None)
            if record is not None:
                self._unlist_dead(record)
                self.graveyard.append(record)
        return len(chosen)

    def resize_dead(self, limit: int) -> None:
        """Keep at most ``limit`` dead letters (0: none)."""
        self.dead_limit = limit
        while len(self.dead) > limit:
            evicted = self.dead.pop(next(iter(self.dead)))
            self.dead_evicted += 1
            evicted.evicted = True
            self._unlist_dead(evicted)
            self.graveyard.append(evicted)

    # -- listing --------------------------------------------------------------------

    def listing_snapshot(self, bulk: int) -> tuple[list[Task], int, int] | None:
        """If more than ``bulk`` held tasks are not indexed yet: the tasks (all of them,
        a copy, for ``index_snapshot`` to index outside the lock), the seq they are
        indexed after, and the index's generation; the index now counts them as its
        own (``building``: its other readers wait for ``install_listing``)."""
        listing = self.listing
        if listing.building or len(self.tasks) + len(self.dead) - len(listing) <= bulk:
            return None
        snapshot = list(self.tasks.values())
        since = listing.upto
        listing.upto = max(since, self._last_seq())  # removals from now on are logged
        listing.building = True
        return snapshot, since, listing.generation

    def install_listing(self, part: Listing, since: int, generation: int) -> None:
        """The index built from ``listing_snapshot`` joins the index (unless it was
        reset meanwhile); the dead letters after ``since`` are indexed here."""
        listing = self.listing
        listing.building = False
        if listing.generation != generation:
            return  # reset meanwhile: the next read rebuilds it
        listing.merge(part)
        self._index_dead(since)

    def catch_up_listing(self) -> Listing:
        """Bring the listing index up to date (at a read; see ``_listing``)."""
        listing = self.listing
        tasks = self.tasks
        dead = self.dead
        removed, listing.removed = listing.removed, []
        for seq in removed:
            entry = listing.entry(seq)
            if entry is None:
                continue
            item = entry.item
            if type(item) is DeadRecord:
                if dead.get(item.id) is item:
                    continue
            elif tasks.get(item.id) is item:
                continue
            listing.discard(seq)
            record = dead.get(item.id)
            if record is not None and record.seq == seq:  # it was cached, and is dead
                listing.add(self._dead_entry(record))
        upto = listing.upto
        fresh = []
        for task in reversed(tasks.values()):
            if task.seq <= upto:
                break
            fresh.append(_task_entry(task))
        listing.add_many(fresh)
        self._index_dead(upto)
        listing.upto = max(upto, self._last_seq())
        return listing

    def _index_dead(self, since: int) -> None:
        """Index the dead letters after ``since`` (all of them if 0) that are not a
        cached task's (bounded: at most ``dead_limit``)."""
        listing = self.listing
        tasks = self.tasks
        for record in self.dead.values():
            if record.seq > since or not since:
                held = tasks.get(record.id)
                if (held is None or held.seq != record.seq) and listing.entry(record.seq) is None:
                    listing.add(self._dead_entry(record))

    def _last_seq(self) -> int:
        """The newest seq handed out so far (without taking one)."""
        tasks = self.tasks
        newest = next(reversed(tasks.values())).seq if tasks else 0
        return max(newest, max((r.seq for r in self.dead.values()), default=0))

    # -- not started yet: new place -------------------------------------------------

    def reprioritize(self, task: Task, priority: int, now: float) -> bool:
        """Give a task that has not started ``priority``; False if it started or ended."""
        if not self._unstarted(task):
            return False
        if task.state is PENDING:
            self._lift(task)
            task.priority = priority
            self._place(task, now)
        else:  # DELAYED: the timer heap orders by start time only
            task.priority = priority
        if task.opts.durable is not None:
            self._journal(task)
        return True

    def reschedule(self, task: Task, start: float, now: float) -> bool:
        """Make a task that has not started due at ``start``; False if it started or ended."""
        if not self._unstarted(task):
            return False
        self._lift(task)
        task.start = start
        self._place(task, now)
        if task.opts.durable is not None:
            self._journal(task)
        return True

    def _unstarted(self, task: Task) -> bool:
        state = task.state
        if state is not PENDING and state is not DELAYED:
            return False
        series = task.opts.series
        return task.attempts == 0 and (series is None or series.run == 0)

    def _lift(self, task: Task) -> None:
        """Take a task that has not started out of wherever it waits."""
        lane: Lane = task.lane  # type: ignore[assignment]
        if task.state is DELAYED:
            lane.timers.remove(task)
            heapify(lane.timers)
            lane.delayed -= 1
        elif task.opts.parked:
            self.gates[task.opts.key].forget(task)  # type: ignore[index]
            self.parked -= 1
        else:
            lane.ready.remove(task)
            lane.queued -= 1

    def _place(self, task: Task, now: float) -> None:
        lane: Lane = task.lane  # type: ignore[assignment]
        if task.start <= now:  # type: ignore[operator]
            task.state = PENDING
            lane.queued += 1
            lane.ready.push(task)
            if lane not in self.woken:
                self.woken.append(lane)
        else:
            task.state = DELAYED
            lane.delayed += 1
            heappush(lane.timers, task)

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

    def pending(self) -> int:
        """Tasks not yet started: queued, delayed, waiting for a retry or a key."""
        return sum(lane.queued + lane.delayed for lane in self.lanes) + self.parked

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
