"""The threaded edge of the cluster: workers, the watchdog, callbacks and shutdown.

All scheduling decisions are made by the thread-free ``Scheduler`` while
``Cluster._lock`` is held; this module only moves threads around it:

* Workers. A worker that finishes an attempt records it and takes the next due
  task in one critical section, so a busy pool never sleeps between tasks. Idle
  workers wait on a private wake queue; a submit wakes at most one of them. One
  idle worker, the *timekeeper*, sleeps only until the next start time; the others
  sleep until woken, so nothing polls.
* The watchdog. One thread, started with the first attempt that has a timeout,
  sleeps until the earliest deadline. On expiry it signals the attempt's context,
  settles the task (retry or TaskTimeoutError) and replaces the stuck worker, so
  the pool stays at full strength; the stuck thread exits when its call returns
  and its late value is dropped.
* Locking. One lock, ``Cluster._lock``, guards the scheduler and every field
  marked below. The hot paths (submit, subscribe, cancel, the worker loop) take it
  through ``_acquire_contended`` when it is held, which yields the GIL instead of
  blocking: see there for the lock convoy this avoids.
* Delivery. The thread that makes a task terminal delivers its Result to every
  sink (subscriber queue, handle waiter, future) outside the lock, then runs the
  callbacks: inline on a worker, or on the callback thread when the task ended by
  cancel, timeout or shutdown (the caller of ``cancel_task`` is not a cluster
  thread). The callback thread starts on demand and, once drained, lingers
  ``CALLBACK_LINGER`` seconds for more before it exits (at once when stopping).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from datetime import UTC, datetime
from queue import Empty, SimpleQueue
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from . import _task
from ._builder import TaskBuilder
from ._core import DONE, REQUEUED, SLEEP, STALE, Scheduler, retry_delay
from ._errors import ClusterStoppedError, StopTimeoutError, TaskTimeoutError
from ._task import (
    _CURRENT,
    DEFAULT_OPTIONS,
    TERMINAL,
    ClusterStats,
    Result,
    Sink,
    Task,
    TaskContext,
    TaskInfo,
)
from ._validate import Duration, integer, seconds

__all__ = ["Cluster"]

log = logging.getLogger("cluster")

P = ParamSpec("P")
T = TypeVar("T")

#: The longest single wait. Longer waits loop, so that a start time in year 9999,
#: ``with_delay(1e9)`` or ``stop(timeout=1e12)`` never overflows a lock timeout.
MAX_WAIT = 3600.0

#: Seconds an idle callback thread waits for more work before it exits (while running).
CALLBACK_LINGER = 1.0

# Cluster life cycle (ordered: a state only ever moves forward).
_NEW, _RUNNING, _STOPPING, _TERMINATED = range(4)

#: ``_LOCAL.cluster`` is the Cluster a thread works for (worker, watchdog, callbacks).
_LOCAL = threading.local()

#: Clusters not yet garbage collected, for the exit hook and the fork handler.
_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


#: How many times a contended hot-path acquire yields the GIL before it blocks.
_SPINS = 64


def _acquire_contended(lock: threading.Lock) -> None:
    """Take ``lock``, found held, without starting a lock convoy.

    A blocking ``acquire`` releases the GIL and, once woken, owns the lock while it
    waits to get the GIL back; the thread that holds the GIL soon needs the lock
    again and blocks in turn, and from then on every hand-off between the
    submitter and the workers costs context switches (measured: 8 µs per task
    instead of 3). Whoever holds the lock now is waiting for the GIL, so yield it
    (``sleep(0)``) and retry: the lock is then only ever taken with the GIL held.
    A holder that is not waiting for the GIL (it is starting a thread) ends the
    spinning with a normal blocking acquire.

    The hot paths call it as ``if not lock.acquire(False): _acquire_contended(lock)``.
    (Testing ``lock.locked()`` and then calling a blocking ``acquire()`` is a
    cheaper call, but the GIL can change hands in between: measured, four workers
    draining a queue then fell into the convoy in most runs.)
    """
    sleep = time.sleep
    for _ in range(_SPINS):
        sleep(0)
        if lock.acquire(False):
            return
    lock.acquire()


def wait_event(event: threading.Event, timeout: float | None) -> bool:
    """``event.wait(timeout)`` that accepts any finite timeout without overflowing."""
    if timeout is None:
        while not event.wait(MAX_WAIT):
            pass
        return True
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return event.is_set()
        if event.wait(min(remaining, MAX_WAIT)):
            return True


class _Signal:
    """A sink that sets an event: what ``TaskHandle.wait`` sleeps on."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, result: Result[Any]) -> None:
        self.event.set()


class _Worker:
    """One pool thread's wake-up channel and bookkeeping (guarded by the cluster lock)."""

    __slots__ = ("idle", "owed", "thread", "wake")

    def __init__(self) -> None:
        self.wake: SimpleQueue[None] = SimpleQueue()  # a token wakes the worker
        self.idle = False  # in Cluster._idle
        # True while this worker serves a terminal task's sinks outside the lock;
        # stop() waits for it. Written by the worker alone; cleared before the
        # task's callbacks run and before the next attempt starts.
        self.owed = False
        self.thread: threading.Thread | None = None


class Cluster:
    """A pool of worker threads that runs submitted tasks by start time and priority.

    ``Cluster(workers=4)``; ``run()`` starts the workers (``with Cluster() as c:``
    runs it and stops it gracefully at the end of the block). Every method is
    thread-safe and may be called from tasks and callbacks.
    """

    def __init__(self, workers: int | None = None) -> None:
        size = os.cpu_count() or 1 if workers is None else integer(workers, "workers", minimum=1)
        self._size = size
        self._lock = threading.Lock()
        # ---- guarded by _lock ----
        self._sched = Scheduler()
        self._state = _NEW
        self._pool: set[_Worker] = set()  # workers at full strength (abandoned ones leave)
        self._idle: list[_Worker] = []  # idle workers, most recently idle last
        self._timekeeper: _Worker | None = None  # the idle worker waiting for the next start
        self._timer_target = math.inf  # when the timekeeper wakes by itself
        self._unsettled = 0  # accepted tasks whose Result is not yet delivered
        self._abandoned = 0  # threads still inside an abandoned attempt
        self._watchdog: threading.Thread | None = None
        self._watchdog_target = math.inf  # when the watchdog wakes by itself
        self._callbacks: deque[Task] = deque()  # tasks whose callbacks the callback thread runs
        self._callback_thread: threading.Thread | None = None  # the latest callback thread
        self._callbacks_running = False  # the callback thread is draining _callbacks
        self._callbacks_idle = False  # ... or lingers on _callbacks_wake for more
        self._threads = 0  # serial number for thread names
        # Conditions on _lock: stop() waits for _unsettled == 0; the watchdog sleeps;
        # an idle callback thread lingers.
        self._settled = threading.Condition(self._lock)
        self._watchdog_wake = threading.Condition(self._lock)
        self._callbacks_wake = threading.Condition(self._lock)
        # ---- immutable ----
        self._anchor = (time.time(), time.monotonic())  # to show monotonic times as dates
        _LIVE.add(self)

    # ------------------------------------------------------------------ life cycle

    def run(self) -> None:
        """Start the workers. A no-op if running; ClusterStoppedError after stop()/cancel()."""
        with self._lock:
            if self._state >= _STOPPING:
                raise ClusterStoppedError("the cluster was stopped; it cannot run again")
            if self._state == _RUNNING:
                return
            self._state = _RUNNING
            for _ in range(self._size):
                self._spawn_locked()

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
        gets its Result) and StopTimeoutError is raised. Called from one of this
        cluster's own threads (a task or a callback) with no timeout, it starts the
        shutdown and returns, since it cannot wait for the thread it runs on.
        """
        limit = None if timeout is None else seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        cancelled: list[Task] = []
        with self._lock:
            finished = self._state == _TERMINATED
        if finished:  # stopped, cancelled, or inherited by a forked child
            self._join()
            return
        with self._lock:
            if self._state == _NEW:  # graceful means the queued tasks still run
                self._state = _RUNNING
                for _ in range(self._size):
                    self._spawn_locked()
            if self._state == _RUNNING:
                self._state = _STOPPING
            if cancel_pending and self._state == _STOPPING:
                self._sched.retries_allowed = False
                cancelled = self._sched.cancel_all("shutdown", time.monotonic(), False)
            self._sched.wake_sleepers()
            self._wake_all_locked()
        self._deliver_all(cancelled)
        own = getattr(_LOCAL, "cluster", None) is self
        if own and limit is None:
            return
        with self._lock:
            while self._unsettled or any(w.owed for w in self._pool):
                if deadline is None:
                    self._settled.wait(MAX_WAIT)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._settled.wait(min(remaining, MAX_WAIT))
            unfinished = self._unsettled
        if unfinished:
            count = self._terminate()
            raise StopTimeoutError(
                f"stop() timed out after {limit}s; {count} unfinished tasks were cancelled"
            )
        self._terminate()
        self._join()

    def cancel(self) -> None:
        """Shut down at once: cancel every task, signal the running ones, do not wait."""
        self._terminate()

    def _terminate(self) -> int:
        """Enter the final state, cancelling whatever is not terminal; return that count."""
        with self._lock:
            self._state = _TERMINATED
            self._sched.retries_allowed = False
            done = self._sched.cancel_all("shutdown", time.monotonic(), True)
            self._replace_abandoned_locked()
            self._wake_all_locked()
            self._watchdog_wake.notify()
        self._deliver_all(done)
        return len(done)

    def _join(self) -> None:
        """Wait for the pool, watchdog and callback threads (not abandoned ones) to exit."""
        me = threading.current_thread()
        with self._lock:
            watchdog = self._watchdog
        if watchdog is not None and watchdog is not me:
            watchdog.join()  # first: it may be about to start replacement workers
        with self._lock:
            threads = [w.thread for w in self._pool]
            threads.append(self._callback_thread)
        for thread in threads:
            if thread is not None and thread is not me:
                thread.join()

    # ------------------------------------------------------------------ submission

    def add_task(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> TaskBuilder[T]:
        """Start building a task that calls ``fn(*args, **kwargs)``; finish with ``submit()``."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        return TaskBuilder(self, Task(fn, args, kwargs))

    def _submit(self, task: Task) -> None:
        lock = self._lock
        if not lock.acquire(False):
            _acquire_contended(lock)
        try:
            if self._state >= _STOPPING:
                raise ClusterStoppedError("the cluster is stopped; submit() is refused")
            ready = self._sched.submit(task, time.monotonic())
            self._unsettled += 1
            if self._state == _RUNNING:
                if ready:
                    if self._idle:
                        worker = self._idle.pop()
                        worker.idle = False
                        worker.wake.put(None)
                elif task.start < self._timer_target:  # type: ignore[operator]
                    self._wake_timekeeper_locked()
        finally:
            lock.release()

    # ------------------------------------------------------------------ queries and control

    def subscribe(self, task_id: str) -> SimpleQueue[Result[Any]]:
        """A new queue that will receive the task's Result exactly once."""
        return self._subscribe(None, task_id)

    def _subscribe(self, task: Task | None, task_id: str = "") -> SimpleQueue[Result[Any]]:
        """Subscribe to ``task`` (or the task with ``task_id``)."""
        queue: SimpleQueue[Result[Any]] = SimpleQueue()
        lock = self._lock
        if not lock.acquire(False):
            _acquire_contended(lock)
        try:
            if task is None:
                task = self._sched.lookup(task_id, time.monotonic())
            if task.state not in TERMINAL:
                self._add_sink_locked(task, queue)
                return queue
        finally:
            lock.release()
        queue.put(task.result())  # terminal: the Result no longer changes
        return queue

    @staticmethod
    def _add_sink_locked(task: Task, sink: Sink) -> None:
        if task.sinks is None:
            task.sinks = [sink]
        else:
            task.sinks.append(sink)

    def cancel_task(self, task_id: str) -> bool:
        """Cancel one task; True if this call cancelled it, False if it had finished."""
        try:
            # A lock-free read (atomic dict access) is enough to find a live task: only
            # terminal ones are purged, and _cancel re-checks the state under the lock.
            task = self._sched.tasks.get(task_id)
        except TypeError:  # unhashable: lookup() names the error
            task = None
        if task is None or task.state in TERMINAL:
            with self._lock:
                task = self._sched.lookup(task_id, time.monotonic())  # or TaskNotFoundError
        return self._cancel(task)

    def _cancel(self, task: Task) -> bool:
        """Cancel ``task`` in one critical section; deliver its Result if anyone listens."""
        lock = self._lock
        if not lock.acquire(False):
            _acquire_contended(lock)
        try:
            sched = self._sched
            if not sched.cancel(task, "cancelled", time.monotonic()):
                return False
            if sched.abandoned:
                self._replace_abandoned_locked()
            opts = task.opts
            if task.sinks is None and opts.on_complete is None and opts.on_failure is None:
                self._unsettled -= 1  # nothing to deliver: settled already
                if not self._unsettled:
                    self._settle_locked(0)
                return True
        finally:
            lock.release()
        self._deliver_all([task])
        return True

    def info(self, task_id: str) -> TaskInfo:
        """A snapshot of one task (queued, running, or finished and still cached)."""
        with self._lock:
            task = self._sched.lookup(task_id, time.monotonic())
            to_date = self._to_date
            return TaskInfo(
                id=task_id,
                state=task.state,
                priority=task.priority,
                attempts=task.attempts,
                submitted_at=to_date(task.submitted_at),
                started_at=None if task.started_at is None else to_date(task.started_at),
                finished_at=None if task.finished_at is None else to_date(task.finished_at),
                error=task.error,
                progress=task.progress,
                start_at=to_date(task.start),  # type: ignore[arg-type]
                retries=task.opts.retries,
                value=task.value,
            )

    def _to_date(self, monotonic: float) -> datetime:
        wall, mono = self._anchor
        try:
            return datetime.fromtimestamp(wall + (monotonic - mono), UTC).astimezone()
        except (OverflowError, OSError, ValueError):
            edge = datetime.max if monotonic > mono else datetime.min
            return edge.replace(tzinfo=UTC)

    def stats(self) -> ClusterStats:
        """Counters since creation and gauges of the present moment."""
        with self._lock:
            s = self._sched
            return ClusterStats(
                submitted=s.submitted,
                succeeded=s.succeeded,
                failed=s.failed,
                cancelled=s.cancelled,
                timed_out=s.timed_out,
                retried=s.retried,
                queued=s.queued,
                delayed=s.delayed,
                running=s.running,
                workers=sum(1 for w in self._pool if w.thread and w.thread.is_alive()),
                abandoned=self._abandoned,
            )

    def __repr__(self) -> str:
        state = ("new", "running", "stopping", "stopped")[self._state]
        return f"<Cluster {state} workers={self._size} live={self._sched.live}>"

    # ------------------------------------------------------------------ handle support

    def _wait(self, task: Task, timeout: float | None) -> Result[Any] | None:
        if task.state not in TERMINAL:
            with self._lock:
                if task.state in TERMINAL:
                    return task.result()
                # One shared event per task, so that polling wait(0.01) adds nothing.
                for sink in task.sinks or ():
                    if isinstance(sink, _Signal):
                        break
                else:
                    sink = _Signal()
                    self._add_sink_locked(task, sink)
            if not wait_event(sink.event, timeout):
                return None
        return task.result()

    def _future(self, task: Task) -> Future[Any]:
        future: Future[Any] = Future()

        def settle(result: Result[Any]) -> None:
            try:
                if result.error is None:
                    future.set_result(result.value)
                else:
                    future.set_exception(result.error)
            except InvalidStateError:  # the caller cancelled the future itself
                pass

        with self._lock:
            if task.state in TERMINAL:
                settle(task.result())
            else:
                self._add_sink_locked(task, settle)
        future.add_done_callback(lambda f: self._cancel(task) if f.cancelled() else None)
        return future

    # ------------------------------------------------------------------ workers

    def _spawn_locked(self, start: bool = True) -> threading.Thread:
        """Add a pool worker and return its thread.

        Started here, under the lock, so that no other thread sees an unstarted
        worker in the pool (a new thread signals "started" before it first takes
        the lock, so this cannot deadlock). Only the watchdog passes
        ``start=False`` and starts the thread just after: ``_join`` joins the
        watchdog before it looks at the pool.
        """
        worker = _Worker()
        self._threads += 1
        thread = worker.thread = threading.Thread(
            target=self._work, args=(worker,), name=f"cluster-worker-{self._threads}", daemon=True
        )
        self._pool.add(worker)
        if start:
            thread.start()
        return thread

    def _replace_abandoned_locked(self, start: bool = True) -> list[threading.Thread]:
        """Replace each worker stuck in an abandoned attempt (``Scheduler.abandoned``),
        unless shutting down; return the replacements' threads (see ``_spawn_locked``)."""
        abandoned = self._sched.abandoned
        fresh = []
        for worker in abandoned:
            self._pool.discard(worker)
            self._abandoned += 1
            if self._state != _TERMINATED:
                fresh.append(self._spawn_locked(start))
        abandoned.clear()
        return fresh

    def _wake_all_locked(self) -> None:
        for worker in self._idle:
            worker.idle = False
            worker.wake.put(None)
        self._idle.clear()
        if self._callbacks_idle:  # stopping: a lingering callback thread exits now
            self._callbacks_idle = False
            self._callbacks_wake.notify()

    def _wake_timekeeper_locked(self) -> None:
        """An earlier start time was added: the timekeeper (or any idle worker) re-plans."""
        keeper = self._timekeeper
        if keeper is not None and keeper.idle:
            self._idle.remove(keeper)
            keeper.idle = False
            keeper.wake.put(None)
        elif self._idle:
            worker = self._idle.pop()
            worker.idle = False
            worker.wake.put(None)

    def _settle_locked(self, count: int) -> None:
        self._unsettled -= count
        if not self._unsettled and self._state >= _STOPPING:
            self._settled.notify_all()
            self._wake_all_locked()  # idle workers may exit now

    def _take_locked(self, worker: _Worker, now: float) -> Task | None:
        """Pop the next due task for ``worker`` and keep the other threads informed."""
        sched = self._sched
        task = sched.pop(now)
        if task is None:
            return None
        ctx: TaskContext = task.ctx  # type: ignore[assignment]
        ctx._worker = worker
        if ctx.deadline is not None:
            self._arm_watchdog_locked(ctx.deadline)
        if self._idle and (sched.queued or (sched.delayed and self._timekeeper is None)):
            # More due work, or start times with nobody keeping time: wake a helper.
            helper = self._idle.pop()
            helper.idle = False
            helper.wake.put(None)
        return task

    def _work(self, me: _Worker) -> None:
        """A pool worker's loop; returns when the pool shuts down or its attempt is abandoned."""
        _LOCAL.cluster = self
        sched = self._sched
        clock = time.monotonic
        current = _CURRENT
        task: Task | None = None  # the task whose attempt this worker runs next / just ran
        ctx: TaskContext | None = None
        value: Any = None
        error: BaseException | None = None
        delay: float | None = None
        ran = False  # task's attempt just returned and is not yet recorded
        sleeping: TaskContext | None = None  # an IMMEDIATE retry's context after its backoff
        while True:
            done: Task | None = None
            timeout: float | None = -1.0  # < 0: no wait, run ``task``
            lock = self._lock  # read every time: a forked child replaces it
            if not lock.acquire(False):
                _acquire_contended(lock)
            try:
                now = clock()
                if me.idle:  # woke by timeout: leave the idle list
                    self._idle.remove(me)
                    me.idle = False
                if self._timekeeper is me:
                    self._timekeeper = None
                    self._timer_target = math.inf
                if ran:
                    ran = False
                    code = sched.finish(task, ctx, value, error, delay, now)  # type: ignore[arg-type]
                    value = error = None
                    if code == STALE:  # abandoned; a replacement took this worker's place
                        self._abandoned -= 1
                        return
                    if code == DONE:
                        self._settle_locked(1)
                        if task.sinks is not None:  # type: ignore[union-attr]
                            me.owed = True  # until its sinks are served, below
                            done = task
                        elif task.opts is not DEFAULT_OPTIONS:  # type: ignore[union-attr]
                            done = task  # may have callbacks
                    elif code == SLEEP:
                        sleeping = task.ctx  # type: ignore[union-attr]
                    elif code == REQUEUED and task.start < self._timer_target:  # type: ignore[union-attr,operator]
                        self._wake_timekeeper_locked()
                    if sleeping is None:
                        task = None
                elif sleeping is not None:  # the backoff is over (or was cut short)
                    if sched.resume(task, sleeping, now):  # type: ignore[arg-type]
                        ctx = task.ctx  # type: ignore[union-attr]
                        ctx._worker = me  # type: ignore[union-attr]
                        if ctx.deadline is not None:  # type: ignore[union-attr]
                            self._arm_watchdog_locked(ctx.deadline)  # type: ignore[union-attr]
                    else:
                        task = None
                    sleeping = None
                if sleeping is not None:
                    timeout = 0.0  # sleep on the retry's context instead, below
                elif task is None:
                    task = self._take_locked(me, now)
                    if task is not None:
                        ctx = task.ctx
                    elif done is not None:
                        timeout = 0.0  # deliver, then decide whether to sleep
                    elif self._state == _TERMINATED or (
                        self._state == _STOPPING and not self._unsettled
                    ):
                        timeout = math.nan  # exit
                    else:
                        self._idle.append(me)
                        me.idle = True
                        due = sched.next_due()
                        timeout = None
                        if due is not None and self._timekeeper is None:
                            self._timekeeper = me
                            self._timer_target = due
                            timeout = min(due - now, MAX_WAIT)
            finally:
                lock.release()
            # ---- outside the lock ----
            if done is not None:
                self._deliver(done, True, me)
                done = None
            if timeout is None or timeout >= 0:
                if sleeping is not None:
                    wait_event(sleeping.cancelled, max(0.0, task.start - clock()))  # type: ignore[union-attr,operator]
                    continue
                task = ctx = None  # hold no references while idle
                if timeout == 0.0:
                    continue
                try:  # noqa: SIM105 - cheaper than contextlib.suppress on this path
                    me.wake.get(timeout=timeout)
                except Empty:
                    pass
                continue
            if timeout != timeout:  # NaN: exit
                return
            # ---- run one attempt ----
            token = current.set(ctx)  # type: ignore[arg-type]
            try:
                value = task.fn(*task.args, **task.kwargs)  # type: ignore[union-attr,misc]
                error = None
            except BaseException as exc:
                value = None
                error = exc
                # Drop this frame from the traceback: it would keep the worker's locals
                # (and through them the error itself) alive in a reference cycle.
                error.__traceback__ = exc.__traceback__.tb_next  # type: ignore[union-attr]
            finally:
                current.reset(token)
            delay = None
            if error is not None and task.attempts <= task.opts.retries:  # type: ignore[union-attr]
                delay = retry_delay(task, error, sched.rng)  # type: ignore[arg-type]
            ran = True

    # ------------------------------------------------------------------ timeouts

    def _arm_watchdog_locked(self, deadline: float) -> None:
        if self._watchdog is None:
            self._threads += 1
            self._watchdog = threading.Thread(
                target=self._watch, name=f"cluster-watchdog-{self._threads}", daemon=True
            )
            self._watchdog.start()
        elif deadline < self._watchdog_target:
            self._watchdog_wake.notify()

    def _watch(self) -> None:
        """The watchdog: sleep until the earliest deadline, then time those attempts out."""
        _LOCAL.cluster = self
        sched = self._sched
        while True:
            with self._lock:
                while True:
                    if self._state == _TERMINATED:
                        return
                    now = time.monotonic()
                    expired = sched.expire(now)
                    if expired:
                        break
                    nearest = sched.next_deadline()
                    self._watchdog_target = math.inf if nearest is None else nearest
                    self._watchdog_wake.wait(
                        MAX_WAIT if nearest is None else min(nearest - now, MAX_WAIT)
                    )
                done: list[Task] = []
                retryable: list[tuple[TaskContext, TaskTimeoutError]] = []
                now = time.monotonic()
                for ctx in expired:
                    task: Task = ctx._task  # type: ignore[assignment]
                    error = TaskTimeoutError(
                        f"task {task.id!r} attempt {ctx.attempt} timed out after "
                        f"{task.opts.timeout}s"
                    )
                    if task.attempts > task.opts.retries:  # no retry left: settle now
                        if sched.fail_detached(ctx, error, None, now) == DONE:
                            done.append(task)
                    else:
                        retryable.append((ctx, error))
            # The retry predicate and backoff are user code: outside the lock.
            for ctx, error in retryable:
                task = ctx._task  # type: ignore[assignment]
                delay = retry_delay(task, error, sched.rng)
                with self._lock:
                    code = sched.fail_detached(ctx, error, delay, time.monotonic())
                    if code == DONE:
                        done.append(task)
                    elif code == REQUEUED and task.start < self._timer_target:  # type: ignore[operator]
                        self._wake_timekeeper_locked()
            self._deliver_all(done)
            # Only now, and outside the lock: starting a thread takes a while (about
            # 0.3 ms here), and the callback thread must not wait for that.
            with self._lock:
                fresh = self._replace_abandoned_locked(start=False)
            for thread in fresh:
                thread.start()

    # ------------------------------------------------------------------ delivery

    def _deliver(self, task: Task, inline: bool, worker: _Worker | None = None) -> None:
        """Hand a terminal task's Result to its sinks, then run (or queue) its callbacks."""
        sinks = task.sinks
        if sinks is not None:
            result = task.result()
            for sink in sinks:
                if type(sink) is SimpleQueue:
                    sink.put(result)
                else:
                    sink(result)  # type: ignore[operator]
            task.sinks = None
            if worker is not None:
                # Clear owed before reading the state: see stop(). Only the last owed
                # worker of a stop needs to wake it: while tasks are unsettled, the
                # last settle does (stop() never sees _unsettled grow again).
                worker.owed = False
                if self._state >= _STOPPING and not self._unsettled:
                    with self._lock:
                        self._settled.notify_all()
        opts = task.opts
        if opts.on_complete is not None or opts.on_failure is not None:
            if inline:
                _run_callbacks(task)
            else:
                self._queue_callbacks(task)

    def _deliver_all(self, tasks: list[Task]) -> None:
        """Deliver tasks ended by a non-worker thread, then count them as settled."""
        if not tasks:
            return
        for task in tasks:
            self._deliver(task, False)
        with self._lock:
            self._settle_locked(len(tasks))

    def _queue_callbacks(self, task: Task) -> None:
        with self._lock:
            self._callbacks.append(task)
            if self._callbacks_idle:
                self._callbacks_idle = False
                self._callbacks_wake.notify()
            elif not self._callbacks_running:  # started on demand
                self._callbacks_running = True
                self._threads += 1
                previous = self._callback_thread
                self._callback_thread = threading.Thread(
                    target=self._run_callback_queue,
                    args=(previous,),
                    name=f"cluster-callbacks-{self._threads}",
                    daemon=True,
                )
                self._callback_thread.start()

    def _run_callback_queue(self, previous: threading.Thread | None) -> None:
        _LOCAL.cluster = self
        if previous is not None:
            previous.join()  # so that joining the latest callback thread joins them all
        while True:
            with self._lock:
                if not self._callbacks and self._state == _RUNNING:
                    # Linger: timeouts and cancels come in bursts, and starting a
                    # thread costs about a millisecond (most of a timeout's latency).
                    self._callbacks_idle = True
                    self._callbacks_wake.wait(CALLBACK_LINGER)
                    self._callbacks_idle = False
                if not self._callbacks:
                    self._callbacks_running = False
                    return
                task = self._callbacks.popleft()
            _run_callbacks(task)
            del task

    # ------------------------------------------------------------------ process events

    def _at_exit(self) -> None:
        with self._lock:
            if self._state == _TERMINATED:
                return
        self._terminate()
        with self._lock:
            thread = self._callback_thread
        if thread is not None:
            thread.join(5.0)  # let the cancellation callbacks run, within reason

    def _reset_in_child(self) -> None:
        """After fork: the child has none of our threads; leave a stopped, unlocked cluster."""
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._watchdog_wake = threading.Condition(self._lock)
        self._callbacks_wake = threading.Condition(self._lock)
        self._state = _TERMINATED
        self._unsettled = 0  # the parent delivers these; the child never will
        self._pool.clear()
        self._idle.clear()
        self._timekeeper = None
        self._watchdog = None
        self._callbacks.clear()
        self._callback_thread = None
        self._callbacks_running = False
        self._callbacks_idle = False


def _run_callbacks(task: Task) -> None:
    """Run on_complete then on_failure; an exception is logged and changes nothing."""
    opts = task.opts
    error = task.error
    if opts.on_complete is not None:
        try:
            opts.on_complete(task.id, task.value, error)  # type: ignore[arg-type]
        except BaseException:
            log.exception("on_complete callback of task %r raised", task.id)
    if error is not None and opts.on_failure is not None:
        try:
            opts.on_failure(task.id, error)  # type: ignore[arg-type]
        except BaseException:
            log.exception("on_failure callback of task %r raised", task.id)


def _shutdown_all() -> None:
    """At interpreter exit: cancel what every unstopped cluster still holds."""
    for cluster in list(_LIVE):
        try:
            cluster._at_exit()
        except Exception:  # never let one cluster keep the others from shutting down
            log.exception("shutting down %r at exit failed", cluster)


def _after_fork_in_child() -> None:
    _task.reset_after_fork()
    for cluster in list(_LIVE):
        cluster._reset_in_child()


# threading's exit hook runs before atexit hooks and before daemon threads are
# frozen, so a submit() from any atexit hook already sees a stopped cluster.
try:
    threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - other interpreters
    import atexit

    atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
