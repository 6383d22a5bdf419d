"""Value types (Result, TaskInfo, ClusterStats, TaskState), the per-task record and
the running task's context.

The per-task record is deliberately small: a slotted object whose rarely used
settings live in a shared, immutable-after-submit ``Options`` object, so that a
plain task costs one record plus its heap entry.
"""

from __future__ import annotations

import contextvars
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from ._backoff import FixedBackoff, RetryMode
from ._errors import TaskCancelledError, TaskTimeoutError
from ._policy import RetryCounts, RetryPolicy, RetryRule

if TYPE_CHECKING:
    from ._core import Lane
    from ._durable import Durable
    from ._repeat import Repeat

T = TypeVar("T")

#: What a subscriber, a handle waiter or a future registers to hear the result: a
#: subscriber's queue itself (no bound method per subscription), or a callable.
Sink: TypeAlias = "SimpleQueue[Result[Any]] | Callable[[Result[Any]], object]"
#: ``on_complete(task_id, value, error)``.
CompleteCallback = Callable[[str, Any, "BaseException | None"], object]
#: ``on_failure(task_id, error)``.
FailureCallback = Callable[[str, BaseException], object]


class TaskState(enum.Enum):
    """Where a task is in its life; the last four are terminal."""

    PENDING = "pending"  #: due, waiting for a worker
    DELAYED = "delayed"  #: waiting for its start time
    RUNNING = "running"  #: an attempt is running
    RETRYING = "retrying"  #: waiting for the backoff before its next attempt
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    # Members are singletons compared by identity, so an identity hash is right and
    # keeps ``state in TERMINAL`` in C (Enum's own hash runs Python code).
    __hash__ = object.__hash__

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED, CANCELLED and TIMED_OUT."""
        return self in TERMINAL


#: The terminal states (``state in TERMINAL`` is the fast form of ``state.terminal``).
TERMINAL = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT}
)
_PENDING = TaskState.PENDING  # a module constant: Enum member lookup is slow


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """The terminal outcome of a task (or of one run of a repeating task): its value,
    or the error that ended it. ``run`` is the 0-based count of runs started before
    it (0 for a task that does not repeat)."""

    value: T | None = None
    error: BaseException | None = None
    run: int = 0

    @property
    def ok(self) -> bool:
        """True if the task succeeded."""
        return self.error is None

    def unwrap(self) -> T:
        """Return the value, or raise the task's error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A snapshot of one task, as returned by ``Cluster.info()``."""

    id: str
    state: TaskState
    priority: int
    attempts: int  #: attempts started so far
    submitted_at: datetime
    started_at: datetime | None  #: start of the latest attempt
    finished_at: datetime | None
    error: BaseException | None
    progress: Any
    start_at: datetime  #: when the task (or its pending retry) becomes due
    retries: int  #: the retry budget set with ``with_retry``
    value: Any = None
    #: The error of the latest failed attempt (also while a retry waits, and kept
    #: after a later success), or None.
    last_error: BaseException | None = None
    #: When a waiting retry is due, or None.
    next_attempt_at: datetime | None = None
    runs: int = 0  #: runs started (a repeating task; 1 once a plain task started)
    next_run_at: datetime | None = None  #: a repeating task's next run, or None
    name: str = ""  #: the task's type name (``with_name``; default: the function's)
    tags: tuple[str, ...] = ()  #: ``with_tags``
    key: str | None = None  #: ``with_key``


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A task that failed for good (FAILED or TIMED_OUT), kept for ``resurrect``."""

    id: str
    name: str
    tags: tuple[str, ...]
    error: BaseException  #: the exception (its traceback frames' locals are cleared)
    error_text: str  #: its formatted traceback
    attempts: int  #: attempts made
    submitted_at: datetime
    failed_at: datetime


@dataclass(frozen=True, slots=True)
class NameStats:
    """Per task name, from ``Cluster.stats_by_name()``."""

    active: int  #: tasks of this name not yet terminal
    dead: int  #: dead letters of this name now
    succeeded: int  #: counters since the cluster was created
    failed: int
    cancelled: int
    timed_out: int


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """The gauges of one executor, in ``ClusterStats.executors``."""

    capacity: int  #: its workers (``async_limit`` for "async", ``slots`` for Dask)
    running: int  #: attempts running on it now
    queued: int  #: its tasks that are due and wait for a free slot


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """Counters since the cluster was created, and gauges of the present moment."""

    submitted: int
    succeeded: int
    failed: int
    cancelled: int
    timed_out: int
    retried: int  #: retries scheduled
    queued: int  #: due and waiting for a worker
    delayed: int  #: waiting for a start time or a retry backoff
    running: int
    workers: int  #: pool strength
    abandoned: int = 0  #: threads still stuck in a timed-out or cancelled attempt
    waiting: int = 0  #: due tasks parked until their key or its rate lets them start
    dead_letters: int = 0  #: dead letters held now
    dead_letters_evicted: int = 0  #: dead letters dropped for room (oldest first)
    #: Per executor (``"threads"``, ``"async"`` once used, and every named one).
    executors: dict[str, ExecutorStats] = field(default_factory=dict)


class Options:
    """Settings most tasks leave at their defaults; shared until a builder changes one."""

    __slots__ = (
        "backoff",
        "counts",
        "durable",
        "holds",
        "jitter",
        "key",
        "last_error",
        "name",
        "on_complete",
        "on_failure",
        "parked",
        "policy",
        "repeat",
        "retries",
        "retry_if",
        "retry_mode",
        "rules",
        "series",
        "tags",
        "timeout",
        "ttl",
        "unlimited",
    )

    def __init__(self) -> None:
        self.timeout: float | None = None
        self.retries = 0  #: the default rule's budget (``with_retry``); UNLIMITED is -1
        self.backoff: Callable[[int], float] = FixedBackoff(0)
        self.jitter = 0.0
        self.retry_if: Callable[[BaseException], object] | None = None
        self.retry_mode = RetryMode.REQUEUE
        self.rules: tuple[RetryRule, ...] = ()  #: ``with_retry_rule``, in order
        self.ttl: float | None = None  #: None: purge once delivered
        self.on_complete: CompleteCallback | None = None
        self.on_failure: FailureCallback | None = None
        self.repeat: Repeat | None = None  #: ``repeat(...)``
        self.name: str | None = None  #: ``with_name``; None: the function's qualified name
        self.tags: tuple[str, ...] = ()  #: ``with_tags``
        self.key: str | None = None  #: ``with_key``
        # ---- per-task state (a task with any of it has private Options). Changed under
        # the cluster lock, except ``policy``, built once by ``retry_policy()`` outside
        # it; the thread whose attempt just ended reads ``policy`` and ``counts`` without
        # the lock (``plan``), as only that thread's ``finish`` changes them next. The
        # user options above are fixed once the task is submitted. ----
        self.policy: RetryPolicy | None = None  # built from the above on first failure
        self.counts: RetryCounts | None = None  # consecutive failures per rule
        self.unlimited = False  # the pending retry came from an UNLIMITED budget
        self.last_error: BaseException | None = None  # of the latest failed attempt
        self.series: Series | None = None  # a repeating task's runs
        self.durable: Durable | None = None  # a registered type on a cluster with a store
        self.holds = False  # it holds its key (from its first attempt to its end)
        self.parked = False  # it waits on its key's gate (state PENDING, in no queue)

    def copy(self) -> Options:
        """A private copy for a builder to change (per-task state starts afresh)."""
        new: Options = _new(Options)
        new.timeout = self.timeout
        new.retries = self.retries
        new.backoff = self.backoff
        new.jitter = self.jitter
        new.retry_if = self.retry_if
        new.retry_mode = self.retry_mode
        new.rules = self.rules
        new.ttl = self.ttl
        new.on_complete = self.on_complete
        new.on_failure = self.on_failure
        new.repeat = self.repeat
        new.name = self.name
        new.tags = self.tags
        new.key = self.key
        new.policy = None
        new.counts = None
        new.unlimited = False
        new.last_error = None
        new.series = None
        new.holds = False
        new.parked = False
        new.durable = None
        return new

    def retry_policy(self) -> RetryPolicy | None:
        """The retry policy, or None when nothing may ever be retried (no user code
        then runs on a failure). Built once, outside any lock, on first use."""
        policy = self.policy
        if policy is None and (self.retries or self.rules):
            policy = self.policy = RetryPolicy(
                retries=self.retries,
                rules=self.rules,
                backoff=self.backoff,
                jitter=self.jitter,
                predicate=self.retry_if,
            )
        return policy


class Series:
    """A repeating task's runs (SPEC §11); guarded by the cluster lock."""

    __slots__ = ("began", "first", "last_due", "run")

    def __init__(self, first: float) -> None:
        self.first = first  #: when run 0 was due (monotonic): the grid's origin
        self.last_due = first  #: when the current (or latest) run was due
        self.began = first  #: when the current (or latest) run's first attempt began
        self.run = 0  #: runs started before the current one


_new = object.__new__
_set_value = Result.__dict__["value"].__set__
_set_error = Result.__dict__["error"].__set__
_set_run = Result.__dict__["run"].__set__

DEFAULT_OPTIONS = Options()
_NO_KWARGS: dict[str, Any] = {}  # shared, never mutated


def ended(task: Task) -> bool:
    """May the task's end be seen (``done()``, ``wait()``, a new subscriber)? Once it
    is terminal, and for a durable task once that is committed (persist, then deliver)."""
    if task.state not in TERMINAL:
        return False
    opts = task.opts
    return opts is DEFAULT_OPTIONS or opts.durable is None or opts.durable.recorded


# Guards what is created lazily, by whichever thread first needs it: a
# TaskContext's event (against a concurrent signal) and a cancelled task's error.
# Always taken last (after a cluster lock, never before one).
_GUARD = threading.Lock()

_REASON_WORDS = {
    "cancelled": "cancelled",
    "shutdown": "cancelled by shutdown",
    "fork": "cancelled: it was inherited by a forked child process, where it cannot run",
}


class Task:
    """The scheduler's record of one submitted task.

    Every field is guarded by the owning cluster's lock, except that the worker
    running an attempt reads ``fn``/``args``/``kwargs`` (fixed while it runs),
    ``TaskContext.progress`` writes ``progress`` (a single attribute store), a
    cancelled task's error is created by its first reader under ``_GUARD``, and
    ``release()`` clears the work of a terminal task outside the lock.
    """

    __slots__ = (
        "_error",
        "args",
        "attempts",
        "ctx",
        "finished_at",
        "fn",
        "id",
        "kwargs",
        "lane",
        "opts",
        "priority",
        "progress",
        "seq",
        "sinks",
        "start",
        "started_at",
        "state",
        "submitted_at",
        "value",
    )
    # Set by Scheduler.submit, left unset until then to keep the builder cheap.
    seq: int  #: submission order, the FIFO tie-breaker
    submitted_at: float

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.fn: Callable[..., Any] | None = fn
        self.args = args
        self.kwargs = kwargs or _NO_KWARGS
        self.id: str | None = None  # assigned at submit when not set by with_id
        self.priority = 0
        self.start: float | None = None  # monotonic due time; None: at submit
        self.opts = DEFAULT_OPTIONS  # replaced by a private copy before any change
        self.lane: Lane | None = None  # the executor's lane; None: the default (threads)
        self.state = _PENDING
        self.attempts = 0
        self.ctx: TaskContext | None = None  # the current attempt's context
        self.value: Any = None
        # The error, or for a cancelled task the reason (a str) until ``error`` is
        # first read: cancelling creates no exception (that was most of its cost).
        self._error: BaseException | str | None = None
        self.sinks: list[Sink] | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.progress: Any = None

    def release(self) -> None:
        """Drop the references to the work itself (called outside every lock, once the
        task is terminal: user finalizers may run here)."""
        self.fn = None
        self.args = ()
        self.kwargs = _NO_KWARGS

    def __lt__(self, other: Task) -> bool:
        # The timer heap's order: (start, seq). Only tasks waiting there compare.
        start = self.start
        other_start = other.start
        return start < other_start or (start == other_start and self.seq < other.seq)  # type: ignore[operator]

    @property
    def error(self) -> BaseException | None:
        """The error that ended the task (or its last failed attempt), or None."""
        error = self._error
        if type(error) is str:
            with _GUARD:  # so that every reader gets the same exception object
                error = self._error
                if type(error) is str:
                    error = self._error = TaskCancelledError(
                        f"task {self.id!r} was {_REASON_WORDS[error]}", reason=error
                    )
        return error  # type: ignore[return-value]

    def result(self) -> Result[Any]:
        """The terminal Result (only meaningful once the state is terminal)."""
        # Result's frozen __init__ sets each field through object.__setattr__; its
        # slot descriptors do the same job at half the cost, once per task.
        result: Result[Any] = _new(Result)
        _set_value(result, self.value)
        error = self._error
        if error is not None and type(error) is str:  # (the property is a slow load)
            error = self.error
        _set_error(result, error)
        series = self.opts.series
        _set_run(result, 0 if series is None else series.run)
        return result

    def __repr__(self) -> str:
        return f"<Task {self.id!r} {self.state.value} priority={self.priority}>"


class TaskContext:
    """What a running task can know and do about itself; see ``cluster.current()``."""

    __slots__ = (
        "_event",
        "_hook",
        "_reason",
        "_reset",
        "_task",
        "_worker",
        "attempt",
        "deadline",
        "task_id",
    )
    # Left unset by __init__ (see there): read with getattr and a default.
    _hook: Callable[[], object] | None
    _reset: bool

    def __init__(self, task: Task, attempt: int, deadline: float | None) -> None:
        self.task_id: str = task.id  # type: ignore[assignment]
        self.attempt = attempt  #: 0-based attempt number
        self.deadline = deadline  #: monotonic seconds when this attempt times out, or None
        self._task: Task | None = task  # cleared when the attempt ends or is abandoned
        self._reason: str | None = None
        self._event: threading.Event | None = None  # created on first use
        self._worker: object = None  # the worker inside this attempt's call, if any
        # Two slots are left unset on a plain attempt (a store each, on every attempt)
        # and read with getattr and a default, off the hot path: ``_hook`` (a callable)
        # is called under the cluster lock (it must not block) when the attempt is
        # signalled, which is how the event loop learns to cancel a coroutine; ``_reset``
        # is True once reset_backoff() was called during this attempt.

    @property
    def cancelled(self) -> threading.Event:
        """Set when this attempt is cancelled, times out, or the cluster shuts down."""
        event = self._event
        if event is None:
            with _GUARD:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
                    if self._reason is not None:
                        event.set()
        return event

    @property
    def reason(self) -> str | None:
        """``None``, ``"cancelled"``, ``"timeout"`` or ``"shutdown"``."""
        return self._reason

    def check(self) -> None:
        """Raise TaskTimeoutError or TaskCancelledError if this attempt was signalled."""
        reason = self._reason
        if reason is None:
            return
        if reason == "timeout":
            raise TaskTimeoutError(f"task {self.task_id!r} attempt {self.attempt} timed out")
        raise TaskCancelledError(
            f"task {self.task_id!r} was {_REASON_WORDS[reason]}", reason=reason
        )

    def progress(self, value: Any) -> None:
        """Record progress, visible through ``Cluster.info(task_id).progress``."""
        task = self._task
        if task is not None:
            task.progress = value

    def reset_backoff(self) -> None:
        """This attempt made progress: if it fails, the next retry's backoff starts again
        at ``n = 0`` and every retry rule's consecutive count restarts at 0."""
        self._reset = True

    def signal(self, reason: str) -> None:
        """Mark the attempt as ended by ``reason`` and set its event (internal)."""
        with _GUARD:
            if self._reason is None:
                self._reason = reason
            event = self._event
        if event is not None:
            event.set()
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook()

    def __repr__(self) -> str:
        return f"<TaskContext {self.task_id!r} attempt={self.attempt} reason={self._reason}>"


_CURRENT: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("cluster_current")


def current() -> TaskContext:
    """The context of the task running on this thread; ``LookupError`` outside a task."""
    return _CURRENT.get()


def reset_after_fork() -> None:
    """Replace the module lock in a forked child, where its holder no longer exists."""
    global _GUARD
    _GUARD = threading.Lock()
