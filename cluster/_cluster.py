"""``Cluster``: the public face of a cluster.

Everything runs in the ``Runtime`` behind it (``_runtime.py``), which the
cluster's threads reference instead of this object. A ``Cluster`` nobody
references any more is therefore collected like any object, and its finalizer
stops the runtime gracefully: the accepted tasks still get their Results and the
threads exit (as a dropped ``ThreadPoolExecutor``'s do).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import datetime
from queue import SimpleQueue
from types import CodeType, FunctionType, TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._backend import Backend
from ._builder import TaskBuilder, TaskHandle
from ._clock import Clock, SystemClock
from ._errors import ClusterStoppedError, UnknownTaskTypeError
from ._events import Observer
from ._runtime import RESERVED, Runtime
from ._task import (
    DEFAULT_OPTIONS,
    ClusterStats,
    DeadLetter,
    NameStats,
    Result,
    Task,
    TaskInfo,
    TaskState,
)
from ._validate import Duration, integer, seconds

if TYPE_CHECKING:
    from ._background import Intermittent
    from ._group import TaskGroup
    from ._store import BadRow, SQLiteStore


def _listing_args(
    state: TaskState | Iterable[TaskState] | None,
    name: str | None,
    tag: str | None,
    key: str | None,
    limit: int,
    offset: int,
) -> tuple[frozenset[TaskState] | None, str | None, str | None, str | None, int, int]:
    """Validate the filters of ``tasks()``."""
    states: frozenset[TaskState] | None = None
    if isinstance(state, TaskState):
        states = frozenset((state,))
    elif state is not None:
        if isinstance(state, (str, bytes)) or not isinstance(state, Iterable):
            raise TypeError(f"state must be a TaskState or a collection of them, got {state!r}")
        states = frozenset(state)
        for s in states:
            if not isinstance(s, TaskState):
                raise TypeError(f"state must be TaskState values, got {s!r}")
    for label, value in (("name", name), ("tag", tag), ("key", key)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{label} must be a str, got {type(value).__name__}")
    return (
        states,
        name,
        tag,
        key,
        integer(limit, "limit", minimum=0),
        integer(offset, "offset", minimum=0),
    )


__all__ = ["Cluster"]

log = logging.getLogger("cluster")

P = ParamSpec("P")
T = TypeVar("T")


def _new_async_backend(limit: int) -> Backend:
    from ._asyncio import AsyncBackend  # only a cluster that runs coroutines needs it

    return AsyncBackend(limit)


class Cluster:
    """A pool of workers that runs submitted tasks by start time and priority.

    ``Cluster(workers=4)``; ``run()`` starts the workers (``with Cluster() as c:``
    runs it and stops it gracefully at the end of the block). Every method is
    thread-safe and may be called from tasks and callbacks.

    ``executors`` names further executors (e.g. ``{"cpu": ProcessExecutor(2)}``) that
    tasks choose with ``with_executor(name)``; ``"threads"`` (``workers`` threads) and
    ``"async"`` (the event loop that runs ``async def`` tasks, at most ``async_limit``
    at once) are built in. ``clock`` is what the cluster tells time by (a
    ``cluster.testing.FakeClock`` in tests).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        executors: Mapping[str, Backend] | None = None,
        async_limit: int = 1000,
        clock: Clock | None = None,
        max_pending: int | None = None,
        on_full: str = "block",
        dead_letters: int = 1000,
        store: str | os.PathLike[str] | SQLiteStore | None = None,
    ) -> None:
        size = os.cpu_count() or 1 if workers is None else integer(workers, "workers", minimum=1)
        named: dict[str, Backend] = {}
        if executors is not None:
            if not isinstance(executors, Mapping):
                raise TypeError(
                    f"executors must be a mapping of names to executors, "
                    f"got {type(executors).__name__}"
                )
            for name, backend in executors.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"executor names must be non-empty str, got {name!r}")
                if name in RESERVED:
                    raise ValueError(f"executor name {name!r} is reserved")
                if not isinstance(backend, Backend):
                    raise TypeError(
                        f"executors[{name!r}] must be an executor such as ProcessExecutor, "
                        f"got {type(backend).__name__}"
                    )
                named[name] = backend
        limit = integer(async_limit, "async_limit", minimum=1)
        if clock is None:
            clock = SystemClock()
        elif not isinstance(clock, Clock):
            raise TypeError(f"clock must be a cluster clock, got {type(clock).__name__}")
        if max_pending is not None:
            max_pending = integer(max_pending, "max_pending", minimum=1)
        if on_full not in ("block", "reject"):
            raise ValueError(f"on_full must be 'block' or 'reject', got {on_full!r}")
        dead_limit = integer(dead_letters, "dead_letters", minimum=0)
        rt = self._rt = Runtime(
            size,
            named,
            clock,
            limit,
            _new_async_backend,
            max_pending=max_pending,
            reject=on_full == "reject",
            dead_letters=dead_limit,
        )
        if store is not None:
            from ._store import SQLiteStore  # only a cluster with a store needs sqlite3

            if not isinstance(store, SQLiteStore):
                if not isinstance(store, (str, os.PathLike)):
                    raise TypeError(
                        f"store must be a path or a SQLiteStore, got {type(store).__name__}"
                    )
                store = SQLiteStore(store)
            rt.attach_store(store)
        self._sync_code: CodeType | None = None  # see add_task
        # The hot query paths go straight to the runtime (no extra call per use).
        self.cancel_task = rt.cancel_task  # type: ignore[method-assign]
        self.subscribe = rt.subscribe  # type: ignore[method-assign]
        finalizer = weakref.finalize(self, rt.collected)
        finalizer.atexit = False  # at exit the runtime's own hook cancels instead
        # What on_stop() registered; None once stop() or cancel() has run them.
        self._stop_lock = threading.Lock()
        self._on_stop: list[Callable[[], object]] | None = []

    # ------------------------------------------------------------------ life cycle

    def run(self) -> None:
        """Start the workers. A no-op if running; ClusterStoppedError after stop()/cancel()."""
        self._rt.run()

    def __enter__(self) -> Cluster:
        self.run()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # KeyboardInterrupt, SystemExit: leave now rather than drain the queue.
            self.cancel()
        else:
            self.stop()

    def stop(self, timeout: Duration | None = None, *, cancel_pending: bool = False) -> None:
        """Stop accepting work, carry every accepted task to its Result, stop the workers.

        ``cancel_pending=True`` cancels every task that is not running at once. If
        ``timeout`` passes first, whatever is left is cancelled (each subscriber still
        gets its Result) and StopTimeoutError is raised; it is also raised, after
        ``timeout``, if every task has its Result but a cluster thread is still stuck in
        a callback (that thread is abandoned, as a stuck attempt is). Called from one of
        this cluster's own threads (a task or a callback) it never waits for the other
        cluster threads; with no timeout it starts the shutdown and returns.
        """
        limit = None if timeout is None else seconds(timeout, "timeout")
        try:
            self._rt.stop(limit, cancel_pending)
        finally:
            self._stopped()

    def cancel(self) -> None:
        """Shut down at once: cancel every task, signal the running ones, do not wait."""
        try:
            self._rt.cancel()
        finally:
            self._stopped()

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the cluster has stopped: when ``stop()`` returns or
        raises, or ``cancel()`` returns (on that caller's thread; newest first). For
        extras that run beside the cluster, such as the dashboard server. An exception
        in it is logged. After ``stop()``/``cancel()``: ClusterStoppedError."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        with self._stop_lock:
            if self._on_stop is None:
                raise ClusterStoppedError("the cluster is stopped")
            self._on_stop.append(callback)

    def _stopped(self) -> None:
        with self._stop_lock:
            callbacks, self._on_stop = self._on_stop, None
        for callback in reversed(callbacks or ()):
            try:
                callback()
            except Exception:
                log.exception("on_stop callback %r raised", callback)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the dashboard (HTML, its JSON, ``/metrics``) on a daemon thread and
        return its URL; it stops with the cluster (SPEC §17, ``cluster.web``)."""
        from .web import serve

        return serve(self, host, port)

    # ------------------------------------------------------------------ submission

    @overload
    def add_task(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskBuilder[T]: ...

    @overload
    def add_task(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskBuilder[T]: ...

    @overload
    def add_task(self, fn: str, /, *args: Any, **kwargs: Any) -> TaskBuilder[Any]: ...

    def add_task(
        self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> TaskBuilder[Any]:
        """Start building a task that calls ``fn(*args, **kwargs)``; finish with ``submit()``.

        An ``async def`` function (also through ``functools.partial``) runs on the
        ``"async"`` executor unless ``with_executor`` says otherwise. A ``str`` names a
        registered task type (``register``): its arguments must be JSON, and on a
        cluster with a store the task is durable.
        """
        # _is_coroutine_function, with its fast path inlined: this runs once per task.
        if type(fn) is FunctionType:  # (callable: the common case, checked first)
            task = Task(fn, args, kwargs)
            code = fn.__code__
            # The code object last seen to be synchronous skips the flag test (the same
            # function, or the same lambda made anew per call). Racy but safe: only a
            # code object whose CO_COROUTINE flag is clear is ever stored.
            if code is not self._sync_code:
                if code.co_flags & 0x80:  # inspect.CO_COROUTINE
                    task.lane = self._rt._async_lane()
                else:
                    self._sync_code = code
            return TaskBuilder(self._rt, task)
        if not callable(fn):
            if isinstance(fn, str):
                return self._registered(fn, args, kwargs)
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        task = Task(fn, args, kwargs)
        if inspect.iscoroutinefunction(fn):
            task.lane = self._rt._async_lane()
        return TaskBuilder(self._rt, task)

    def _registered(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskBuilder[Any]:
        rt = self._rt
        fn = rt.registry.get(name)
        if fn is None:
            known = ", ".join(repr(n) for n in sorted(rt.registry)) or "none"
            raise UnknownTaskTypeError(
                f"fn must be callable or a registered task type; no task type named {name!r} "
                f"is registered (registered: {known})"
            )
        from ._durable import Durable, check_json

        check_json(args, kwargs)
        builder = self.add_task(fn, *args, **kwargs)
        task = builder._task
        assert task is not None
        opts = task.opts = DEFAULT_OPTIONS.copy()
        opts.name = name
        if rt.store is not None:
            opts.durable = Durable(name, args, kwargs)
            if task.lane is None:  # (submit looks for durable tasks among those with a lane)
                task.lane = rt.pool.lane
        return builder

    @overload
    def register(self, name: str) -> Callable[[Callable[P, T]], Callable[P, T]]: ...
    @overload
    def register(self, name: str, fn: Callable[P, T]) -> Callable[P, T]: ...
    def register(self, name: str, fn: Callable[P, T] | None = None) -> Any:
        """Register ``fn`` as the task type ``name``: ``c.add_task(name, ...)`` then runs it,
        and on a cluster with a store such tasks are durable (they survive restarts).
        Usable as a decorator: ``@c.register("send_email")``. A name registered twice:
        ValueError."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("name must be a non-empty str")
        if fn is None:

            def decorate(fn: Callable[P, T]) -> Callable[P, T]:
                self.register(name, fn)
                return fn

            return decorate
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self._rt.register(name, fn)
        return fn

    def submit_all(self, builders: Iterable[TaskBuilder[Any]]) -> list[TaskHandle[Any]]:
        """Submit several builders all or none: if one is refused (a duplicate id, bad
        input, a stopped cluster), none is queued and the error is raised. Durable tasks
        among them are committed in one transaction."""
        rt = self._rt
        items = list(builders)
        tasks: list[Task] = []
        seen: set[int] = set()
        for i, builder in enumerate(items):
            if not isinstance(builder, TaskBuilder):
                kind = type(builder).__name__
                raise TypeError(f"builders[{i}] must be a TaskBuilder, got {kind}")
            if builder._host is not rt:
                raise ValueError(f"builders[{i}] belongs to another cluster")
            task = builder._task
            if task is None:
                raise RuntimeError(f"builders[{i}] was already submitted")
            if id(task) in seen:
                raise ValueError(f"builders[{i}] is given twice")
            seen.add(id(task))
            tasks.append(task)
        for builder in items:
            builder._prepare_submit()
        rt.submit_many(tasks)
        for builder in items:
            builder._task = None
        return [TaskHandle(rt, task) for task in tasks]

    @property
    def unrecovered(self) -> list[BadRow]:
        """Stored rows that could not become tasks when the cluster ran (an unknown
        type, an unreadable doc): kept in the store, untouched, with the reason."""
        return list(self._rt.unrecovered)

    # ------------------------------------------------------------------ queries and control

    def subscribe(self, task_id: str) -> SimpleQueue[Result[Any]]:
        """A new queue that will receive the task's Result exactly once.

        Cost: O(1). Unknown id, or finished and not cached: TaskNotFoundError.
        """
        return self._rt.subscribe(task_id)

    def cancel_task(self, task_id: str) -> bool:
        """Cancel one task; True if this call cancelled it, False if it had finished.

        Cost: O(1) amortised. Unknown id: TaskNotFoundError.
        """
        return self._rt.cancel_task(task_id)

    def info(self, task_id: str) -> TaskInfo:
        """A snapshot of one task (queued, running, or finished and still cached)."""
        return self._rt.info(task_id)

    def stats(self) -> ClusterStats:
        """Counters since creation and gauges of the present moment (also per executor)."""
        return self._rt.stats()

    # ------------------------------------------------------------------ keys and listing

    def limit(
        self, key: str, concurrency: int = 1, *, rate: float | None = None, burst: int = 1
    ) -> None:
        """At most ``concurrency`` tasks of ``key`` at a time and, with ``rate``, at most
        ``rate`` attempt starts per second (a token bucket of ``burst`` tokens that
        starts full; every attempt, retries included, takes one). Applies to tasks
        queued now and later."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if not key:
            raise ValueError("key must be a non-empty str")
        concurrency = integer(concurrency, "concurrency", minimum=1)
        if rate is not None:
            if not isinstance(rate, (int, float)) or isinstance(rate, bool):
                raise TypeError(f"rate must be a number, got {type(rate).__name__}")
            if not (rate > 0 and rate < float("inf")):
                raise ValueError(f"rate must be > 0 starts per second, got {rate!r}")
            rate = float(rate)
        burst = integer(burst, "burst", minimum=1)
        self._rt.limit(key, concurrency, rate, burst)

    def tasks(
        self,
        *,
        state: TaskState | Iterable[TaskState] | None = None,
        name: str | None = None,
        tag: str | None = None,
        key: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskInfo]:
        """The tasks the cluster holds (live, cached and dead letters), newest submission
        first, filtered and paged. Cost: O(log n + page) (a ``state`` filter scans)."""
        return self._rt.tasks(*_listing_args(state, name, tag, key, limit, offset))[1]

    def count_tasks(
        self,
        *,
        state: TaskState | Iterable[TaskState] | None = None,
        name: str | None = None,
        tag: str | None = None,
        key: str | None = None,
    ) -> int:
        """How many tasks ``tasks()`` with these filters would list in all."""
        return self._rt.tasks(*_listing_args(state, name, tag, key, 0, 0))[0]

    def reprioritize(self, task_id: str, priority: int) -> bool:
        """Give a task that has not started a new priority; True if done, False if it
        already started or ended. Unknown id: TaskNotFoundError."""
        return self._rt.reprioritize(task_id, integer(priority, "priority"))

    def reschedule(self, task_id: str, when: datetime | Duration) -> bool:
        """Move a task that has not started to ``when`` (a datetime, or a duration from
        now); True if done, False if it already started or ended."""
        rt = self._rt
        if isinstance(when, datetime):
            start = rt.clock.from_date(when)
        else:
            start = rt.clock.monotonic() + seconds(when, "when")
        return rt.reschedule(task_id, start)

    def group(self, *, fail_fast: bool = False) -> TaskGroup:
        """A group of tasks: ``g.add_task(...)``, ``g.wait()``, ``g.as_completed()``,
        ``g.cancel()``; as a context manager it waits for them all (SPEC §12)."""
        from ._group import TaskGroup

        return TaskGroup(self, fail_fast=fail_fast)

    # ------------------------------------------------------------------ dead letters

    def dead_letters(
        self, *, name: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Tasks that failed for good (FAILED, TIMED_OUT), newest first."""
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        limit = integer(limit, "limit", minimum=0)
        offset = integer(offset, "offset", minimum=0)
        return self._rt.dead_letters(name, limit, offset)

    def resurrect(self, *task_ids: str) -> list[TaskHandle[Any]]:
        """Submit these dead letters again (same id, function, arguments, options;
        attempts from 0), all or none; they leave the dead letters. An id that is not
        a dead letter: TaskNotFoundError; one taken by a live task: DuplicateTaskError."""
        rt = self._rt
        return [TaskHandle(rt, task) for task in rt.resurrect(task_ids)]

    def clear_dead_letters(self, *task_ids: str) -> int:
        """Forget these dead letters (none given: all); how many were forgotten."""
        return self._rt.clear_dead_letters(task_ids)

    def stats_by_name(self) -> dict[str, NameStats]:
        """Per task name: ``active`` and ``dead`` gauges, and the counters since the
        cluster was created (as ``stats()`` counts them)."""
        return self._rt.stats_by_name()

    def wait_idle(self, timeout: Duration | None = None) -> bool:
        """Block until the cluster has nothing to do now: no task running, none due, no
        Result or callback still being delivered (a task waiting for its start time,
        a retry's backoff or a series' next run does not count). False if
        ``timeout`` (real seconds) passed first. With a ``FakeClock``, call it after
        each ``advance()``."""
        limit = None if timeout is None else seconds(timeout, "timeout")
        return self._rt.wait_idle(limit)

    # ------------------------------------------------------------------ observers

    def observe(self, observer: Observer) -> None:
        """Call ``observer`` (a ``cluster.Observer``) on every attempt's end, on the thread
        where it ends and outside every lock (metrics, dashboards, progress bars)."""
        if not isinstance(observer, Observer):
            raise TypeError(f"observer must be a cluster.Observer, got {type(observer).__name__}")
        self._rt.observe(observer)

    def unobserve(self, observer: Observer) -> None:
        """Stop calling ``observer``."""
        self._rt.unobserve(observer)

    # ------------------------------------------------------------------ background operations

    def intermittent(self, start: Callable[[], Callable[[], object] | None]) -> Intermittent:
        """A background operation that runs while at least one attachment holds it.

        ``start()`` begins it and returns its stop callable (or None); the first
        ``attach()`` calls it, and the stop runs on a cluster thread once the last
        attachment is released (SPEC §19).
        """
        from ._background import Intermittent

        return Intermittent(self, start)

    def poll(self, action: Callable[[], object], every: Duration) -> Intermittent:
        """An ``Intermittent`` that calls ``action()`` every ``every`` seconds (a repeating
        task named after ``action``) while attached; nothing runs before the first attach."""
        from ._background import poll

        return poll(self, action, every)

    def __repr__(self) -> str:
        rt = self._rt
        state = ("new", "running", "stopping", "stopped")[rt.state]
        return f"<Cluster {state} workers={rt.pool.capacity} live={rt.sched.live}>"
