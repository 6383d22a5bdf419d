"""The fluent TaskBuilder and the TaskHandle that ``submit()`` returns."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from datetime import datetime
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._backoff import RetryMode
from ._policy import make_rule
from ._task import (
    DEFAULT_OPTIONS,
    CompleteCallback,
    FailureCallback,
    Options,
    Result,
    Series,
    Task,
    ended,
)
from ._validate import Duration, function, integer, seconds
from ._validate import retries as retry_count

if TYPE_CHECKING:
    from ._host import TaskHost

__all__ = ["TaskBuilder", "TaskHandle"]

T = TypeVar("T")

# A bound method held in a global: ``DEFAULT_OPTIONS.copy()`` on an imported name
# compiles to an attribute load that CPython 3.11 cannot specialize.
_private_options = DEFAULT_OPTIONS.copy


class TaskBuilder(Generic[T]):
    """Describes one submission; every setter validates at once and returns the builder.

    Obtained from ``Cluster.add_task(fn, *args, **kwargs)``; ``submit()`` queues it.
    """

    __slots__ = ("_host", "_task")

    def __init__(self, host: TaskHost, task: Task) -> None:
        self._host = host
        self._task: Task | None = task  # None once submitted

    def _live(self) -> Task:
        task = self._task
        if task is None:
            raise RuntimeError("this TaskBuilder was already submitted")
        return task

    def _options(self) -> Options:
        task = self._task
        if task is None:
            raise RuntimeError("this TaskBuilder was already submitted")
        opts = task.opts
        if opts is DEFAULT_OPTIONS:  # copy on first write: plain tasks share one
            opts = task.opts = _private_options()
        return opts

    def with_id(self, task_id: str) -> TaskBuilder[T]:
        """Use ``task_id`` (a non-empty str) instead of a generated id."""
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be a str, got {type(task_id).__name__}")
        if not task_id:
            raise ValueError("task_id must be a non-empty str")
        self._live().id = task_id
        return self

    def with_start_time(self, when: datetime) -> TaskBuilder[T]:
        """Do not start before ``when`` (aware, or naive meaning local time)."""
        if not isinstance(when, datetime):
            raise TypeError(f"when must be a datetime, got {type(when).__name__}")
        task = self._live()
        # Through the cluster clock's one wall/monotonic anchor, so that equal datetimes
        # give equal start times (and FIFO among them), as info() shows them.
        task.start = self._host.clock.from_date(when)
        return self

    def with_delay(self, delay: Duration) -> TaskBuilder[T]:
        """Do not start before ``delay`` seconds from now."""
        task = self._live()
        task.start = self._host.clock.monotonic() + seconds(delay, "delay")
        return self

    def with_timeout(self, timeout: Duration) -> TaskBuilder[T]:
        """Fail an attempt with TaskTimeoutError after ``timeout`` seconds (> 0)."""
        self._options().timeout = seconds(timeout, "timeout", positive=True)
        return self

    def with_priority(self, priority: int) -> TaskBuilder[T]:
        """Among due tasks, a higher ``priority`` runs first (default 0)."""
        self._live().priority = integer(priority, "priority")
        return self

    def with_retry(self, retries: int) -> TaskBuilder[T]:
        """Retry up to ``retries`` times after the first attempt fails (0: never;
        ``UNLIMITED``: until it succeeds, is cancelled, the cluster stops, or an error
        is final). It is the rule for any ``Exception`` no ``with_retry_rule`` matched."""
        self._options().retries = retry_count(retries, "retries")
        return self

    def with_retry_rule(
        self,
        *errors: type[BaseException],
        retries: int = 3,
        backoff: Callable[[int], float] | None = None,
    ) -> TaskBuilder[T]:
        """For an error that is an instance of one of ``errors``: retry up to ``retries``
        consecutive times, waiting ``backoff(n)`` (default: the task's backoff; ``n``
        counts this rule's retries from 0). Rules are tried in the order added; the
        first that matches decides, on its own budget."""
        rule = make_rule(errors, retries, backoff)
        opts = self._options()
        opts.rules = (*opts.rules, rule)
        return self

    def repeat(
        self,
        every: Duration | None = None,
        *,
        cron: str | None = None,
        count: int | None = None,
        until: datetime | None = None,
        stop_on_error: bool = False,
    ) -> TaskBuilder[T]:
        """Run the task as a series of runs: every ``every`` seconds (fixed rate: run
        ``k`` is due at first start + ``k * every``), or at the times of the 5-field
        ``cron`` expression (local time; the ``cron`` extra). ``count``: at most that
        many runs; ``until``: no run starts after it; ``stop_on_error``: a run that
        ends in a final error ends the series. Each run's Result reaches every
        subscriber and the callbacks; ``handle.results()`` iterates them."""
        from ._repeat import Repeat

        if not isinstance(stop_on_error, bool):
            raise TypeError(f"stop_on_error must be a bool, got {type(stop_on_error).__name__}")
        self._options().repeat = Repeat(
            every, cron=cron, count=count, until=until, stop_on_error=stop_on_error
        )
        return self

    def with_backoff(self, strategy: Callable[[int], float]) -> TaskBuilder[T]:
        """Wait ``strategy(attempt)`` seconds before each retry (attempt 0 = first retry)."""
        self._options().backoff = function(strategy, "strategy")
        return self

    def with_jitter(self, ratio: float = 0.2) -> TaskBuilder[T]:
        """Multiply each retry delay by a random factor in ``[1 - ratio, 1 + ratio]``."""
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
            raise TypeError(f"ratio must be a number, got {type(ratio).__name__}")
        if not 0 < ratio <= 1:  # also rejects NaN
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        self._options().jitter = float(ratio)
        return self

    def retry_if(self, predicate: Callable[[BaseException], object]) -> TaskBuilder[T]:
        """Retry only when ``predicate(exc)`` is true (a predicate that raises: False)."""
        self._options().retry_if = function(predicate, "predicate")
        return self

    def with_name(self, name: str) -> TaskBuilder[T]:
        """The task's type name (default: the function's ``__qualname__``); listing,
        per-name stats and dead letters use it."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("name must be a non-empty str")
        self._options().name = name
        return self

    def with_tags(self, *tags: str) -> TaskBuilder[T]:
        """Free ``str`` labels for listing (``Cluster.tasks(tag=...)``)."""
        for tag in tags:
            if not isinstance(tag, str):
                raise TypeError(f"tags must be str, got {type(tag).__name__}")
        opts = self._options()
        opts.tags = tuple(dict.fromkeys((*opts.tags, *tags)))
        return self

    def with_key(self, key: str) -> TaskBuilder[T]:
        """Tasks with the same ``key`` run at most ``Cluster.limit(key)`` at a time
        (default 1: one after another, in priority and submission order); a task
        waiting for its key holds no worker and delays no task of another key."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if not key:
            raise ValueError("key must be a non-empty str")
        self._options().key = key
        return self

    def with_executor(self, name: str) -> TaskBuilder[T]:
        """Run this task on executor ``name`` (``"threads"``, ``"async"``, or one given as
        ``Cluster(executors=...)``); an unknown name raises ValueError."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        task = self._live()
        lane = self._host._lane(name)
        if not lane.backend.runs_coroutines and inspect.iscoroutinefunction(task.fn):  # type: ignore[attr-defined]
            raise ValueError(
                f"{task.fn!r} is an async def function: it runs on the 'async' executor, "
                f"not on {name!r}"
            )
        task.lane = lane
        return self

    def with_retry_mode(self, mode: RetryMode) -> TaskBuilder[T]:
        """REQUEUE (default): back to the queue; IMMEDIATE: the same worker waits and retries."""
        if not isinstance(mode, RetryMode):
            raise TypeError(f"mode must be a RetryMode, got {type(mode).__name__}")
        self._options().retry_mode = mode
        return self

    def with_cache(self, ttl: Duration = 300) -> TaskBuilder[T]:
        """Keep the Result for ``ttl`` seconds after the task ends (subscribe/info work)."""
        self._options().ttl = seconds(ttl, "ttl")
        return self

    def on_complete(self, fn: CompleteCallback) -> TaskBuilder[T]:
        """Call ``fn(task_id, value, error)`` once the task ends, however it ends."""
        self._options().on_complete = function(fn, "on_complete fn")
        return self

    def on_failure(self, fn: FailureCallback) -> TaskBuilder[T]:
        """Call ``fn(task_id, error)`` once the task ends with an error, timeout or cancel."""
        self._options().on_failure = function(fn, "on_failure fn")
        return self

    def submit(self) -> TaskHandle[T]:
        """Queue the task and return its handle; a builder is submitted once.

        Raises DuplicateTaskError if the id is taken, ClusterStoppedError after
        ``stop()``; after such an error the builder may be fixed and submitted again.
        """
        task = self._task
        if task is None:
            raise RuntimeError("this TaskBuilder was already submitted")
        opts = task.opts
        if opts.repeat is not None and opts.series is None:  # _prepare_submit, inlined
            self._start_series(task)
        self._task = None
        try:
            self._host._submit(task)
        except BaseException:
            self._task = task
            raise
        return TaskHandle(self._host, task)

    def _prepare_submit(self) -> None:
        """What submit does before the task is handed over (a series' first run)."""
        task = self._task
        assert task is not None
        opts = task.opts
        if opts.repeat is not None and opts.series is None:
            self._start_series(task)

    def _start_series(self, task: Task) -> None:
        """A repeating task's first run: its grid's origin (SPEC §11)."""
        clock = self._host.clock
        repeat = task.opts.repeat
        assert repeat is not None
        start = clock.monotonic() if task.start is None else task.start
        first = repeat.first_due(start, now_wall=clock.to_date, from_wall=clock.from_date)
        if first is None:
            raise ValueError("this repeat() has no run at all: until is before its first run")
        task.start = first
        task.opts.series = Series(first)

    def __repr__(self) -> str:
        task = self._task
        return f"<TaskBuilder {'submitted' if task is None else repr(task.fn)}>"


class TaskHandle(Generic[T]):
    """A submitted task: its id, its result, and control over it."""

    __slots__ = ("_host", "_task")

    def __init__(self, host: TaskHost, task: Task) -> None:
        self._host = host
        self._task = task

    @property
    def id(self) -> str:
        """The task's id."""
        return self._task.id  # type: ignore[return-value]

    def done(self) -> bool:
        """True once the task is terminal (a durable task: and that is committed)."""
        return ended(self._task)

    def wait(self, timeout: Duration | None = None) -> Result[T] | None:
        """The Result once terminal, or None if ``timeout`` seconds pass first."""
        limit = None if timeout is None else seconds(timeout, "timeout")
        return self._host._wait(self._task, limit)

    def result(self, timeout: Duration | None = None) -> T:
        """The task's value; raises its error, or TimeoutError if not done in time."""
        result = self.wait(timeout)
        if result is None:
            raise TimeoutError(f"task {self.id!r} did not finish within {timeout}s")
        return result.unwrap()

    def cancel(self) -> bool:
        """Cancel the task; True if this call cancelled it, False if it had finished."""
        return self._host._cancel(self._task)

    def subscribe(self) -> SimpleQueue[Result[Any]]:
        """A new queue that receives the Result (at once if already terminal)."""
        return self._host._subscribe(self._task)

    def results(self, timeout: Duration | None = None) -> Iterator[Result[T]]:
        """Iterate the task's Results as they arrive: one per run of a repeating task
        (the last one when the series ends), or the one Result of any other task.
        ``timeout`` bounds each wait (TimeoutError); start iterating before the runs
        you want to see end (Results that came before are not replayed)."""
        limit = None if timeout is None else seconds(timeout, "timeout")
        return self._host._results(self._task, limit)

    def future(self) -> Future[T]:
        """A concurrent.futures.Future of the value; cancelling it cancels the task."""
        return self._host._future(self._task)

    def __await__(self) -> Generator[Any, None, T]:
        """``await handle`` from any running event loop: the value, or the task's error.
        Cancelling the awaiting coroutine does not cancel the task (``cancel()`` does)."""
        return await_handle(self)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id!r} {self._task.state.value}>"


def await_handle(handle: TaskHandle[T]) -> Generator[Any, None, T]:
    """``TaskHandle.__await__``: the task's value, or its error raised, in a coroutine.

    Works from any running event loop. Cancelling the awaiting coroutine does not
    cancel the task (``handle.cancel()`` does that): it waits on a future of its own
    loop, which a done-callback on the task's future completes from the cluster.
    A task that has already ended is not waited for at all.
    """
    if not handle.done():
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        handle.future().add_done_callback(_Wake(loop, waiter))
        yield from waiter
    return handle.result()  # the task is terminal: its value, or its error raised


class _Wake:
    """A done-callback (on a cluster thread) that completes a loop future."""

    __slots__ = ("loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
        self.loop = loop
        self.waiter = waiter

    def __call__(self, _future: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(_settle, self.waiter)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # cancelled, if the awaiting coroutine was
        waiter.set_result(None)
