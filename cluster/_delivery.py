"""Delivering Results, and the runner threads that run user code for other threads.

The thread that makes a task terminal hands its Result to every sink (subscriber
queue, handle waiter, future) outside the lock, then runs the callbacks: inline
on a worker, or on a runner thread when the task ended where user code must not
run (a cancel from the caller's thread, a timeout found by the service thread, a
shutdown). Runners also make the retry decision of timed-out attempts (the retry
predicate and backoff are user code: the service thread never runs them).

Runners start on demand and linger ``LINGER`` seconds for the next burst. One
runner normally serves every job in order; when every runner has been inside a
single job for ``STUCK`` seconds while others wait, the service thread adds one
more (up to ``MAX_RUNNERS``), so a stuck callback never holds up the rest.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from ._task import Result, Sink, Task

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = [
    "LINGER",
    "STUCK",
    "Runners",
    "SeriesSink",
    "Signal",
    "clear_frames",
    "deliver_sinks",
    "run_callbacks",
]

log = logging.getLogger("cluster")

#: Seconds an idle runner waits for more work before it exits (while running).
LINGER = 1.0
#: Seconds inside one job after which a runner counts as stuck.
STUCK = 0.25
#: Runners at most; past this a stuck cluster logs instead of starting more threads.
MAX_RUNNERS = 32

Job = tuple[Callable[[Any], object], Any]


class Signal:
    """A sink that sets an event: what ``TaskHandle.wait`` sleeps on."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, result: Result[Any]) -> None:
        self.event.set()


class SeriesSink:
    """What ``TaskHandle.results()`` reads: every run's Result, then the last one,
    marked final (``(result, True)``), so the reader knows the series ended."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: SimpleQueue[tuple[Result[Any], bool]] = SimpleQueue()

    def __call__(self, result: Result[Any]) -> None:
        self.queue.put((result, True))


def deliver_sinks(task: Task, late: list[Sink] | None = None) -> None:
    """Hand a terminal task's Result to each of its sinks (outside every lock), or
    to the ``late`` ones (which came after it ended, see ``Runtime._late``)."""
    sinks = task.sinks if late is None else late
    if sinks is None:
        return
    result = task.result()
    for sink in sinks:
        if type(sink) is SimpleQueue:
            sink.put(result)
        else:
            try:
                sink(result)  # type: ignore[operator]
            except BaseException:  # a future's done-callback, say: never stop delivery
                log.exception("delivering the result of task %r raised", task.id)
    if late is None:
        task.sinks = None


def run_callbacks(task: Task, result: Result[Any] | None = None) -> None:
    """Run on_complete then on_failure for the task's Result (or one run's ``result``);
    an exception is logged and changes nothing."""
    opts = task.opts
    if result is None:
        value, error = task.value, task._error
        if error is not None and type(error) is str:  # (the property is a slow load)
            error = task.error
    else:
        value, error = result.value, result.error
    # Loaded, then called: a callable held in a slot is not a method.
    on_complete = opts.on_complete
    if on_complete is not None:
        try:
            on_complete(task.id, value, error)  # type: ignore[arg-type]
        except BaseException:
            log.exception("on_complete callback of task %r raised", task.id)
    on_failure = opts.on_failure
    if error is not None and on_failure is not None:
        try:
            on_failure(task.id, error)  # type: ignore[arg-type]
        except BaseException:
            log.exception("on_failure callback of task %r raised", task.id)


def clear_frames(error: BaseException | None) -> None:
    """Clear the locals of ``error``'s traceback frames (a dead letter's, once its
    Result is delivered: SPEC §13 keeps the traceback text, not the frames' locals)."""
    while error is not None:
        tb = error.__traceback__
        if tb is not None:
            with contextlib.suppress(RuntimeError):  # a frame still running: leave it
                traceback.clear_frames(tb)
        error = error.__cause__ or error.__context__


def has_callbacks(task: Task) -> bool:
    """Does the task have an on_complete or on_failure callback?"""
    opts = task.opts
    return opts.on_complete is not None or opts.on_failure is not None


class _Runner:
    __slots__ = ("busy_since", "thread")

    def __init__(self) -> None:
        self.busy_since: float | None = None  # when its current job began; None: idle
        self.thread: threading.Thread | None = None


class Runners:
    """The runner threads of one cluster and their job queue.

    Every field is guarded by the cluster lock (``rt.lock``).
    """

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._jobs: deque[Job] = deque()
        self._runners: list[_Runner] = []
        self._idle = 0  # runners waiting on _wake
        self._wake = threading.Condition(rt.lock)
        self._warned = False

    def submit(self, fn: Callable[[Any], object], arg: Any) -> None:
        """Queue ``fn(arg)`` for a runner (takes the cluster lock)."""
        with self._rt.lock:
            self.submit_locked(fn, arg, None)

    def submit_locked(
        self, fn: Callable[[Any], object], arg: Any, fresh: list[threading.Thread] | None
    ) -> None:
        """Queue ``fn(arg)``; a runner thread started for it goes to ``fresh`` (to be
        started by the caller once it released the lock), or is started at once."""
        self._jobs.append((fn, arg))
        if self._idle:
            self._wake.notify()  # a woken runner drains the queue before it waits again
        elif not self._runners:
            self._spawn_locked(fresh)
        elif len(self._jobs) == 1:
            # Every runner is busy: the service thread watches for a stuck one.
            self._rt.arm_service_locked(self._rt.monotonic() + STUCK)

    def check_locked(self, now: float, fresh: list[threading.Thread]) -> float | None:
        """Called by the service thread: add a runner if all are stuck while jobs wait;
        return when to look again (None: nothing to watch)."""
        if not self._jobs or self._idle:
            return None
        busy = [r.busy_since for r in self._runners if r.busy_since is not None]
        if len(busy) < len(self._runners):
            return now + STUCK  # one is between jobs: it will take the next
        oldest = min(busy, default=now)
        if now - oldest < STUCK:
            return oldest + STUCK
        if len(self._runners) >= MAX_RUNNERS:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%d cluster runner threads are all stuck in callbacks; %d jobs wait",
                    len(self._runners),
                    len(self._jobs),
                )
            return now + STUCK
        self._spawn_locked(fresh)
        return now + STUCK

    def wake_all_locked(self) -> None:
        """Stopping: lingering runners look again (and exit once the queue is empty)."""
        if self._idle:
            self._wake.notify_all()

    def threads_locked(self) -> list[threading.Thread]:
        """The runner threads (for joining)."""
        return [r.thread for r in self._runners if r.thread is not None]

    def busy_locked(self) -> bool:
        """Are jobs waiting, or is a runner inside one?"""
        return bool(self._jobs) or any(r.busy_since is not None for r in self._runners)

    def pending_locked(self) -> int:
        """Jobs not yet taken."""
        return len(self._jobs)

    def reset_in_child(self, lock: threading.Lock) -> None:
        """After fork: no runner exists in the child; its queued jobs belong to the parent."""
        self._jobs.clear()
        self._runners.clear()
        self._idle = 0
        self._wake = threading.Condition(lock)

    def _spawn_locked(self, fresh: list[threading.Thread] | None) -> None:
        runner = _Runner()
        thread = runner.thread = threading.Thread(
            target=self._loop, args=(runner,), name=self._rt.thread_name("runner"), daemon=True
        )
        self._runners.append(runner)
        if fresh is None:
            thread.start()
        else:
            fresh.append(thread)

    def _loop(self, me: _Runner) -> None:
        rt = self._rt
        rt.enter_thread()
        lock = rt.lock
        clock = rt.monotonic
        while True:
            with lock:
                me.busy_since = None
                if not self._jobs and rt.lingering_locked():
                    # Linger: timeouts and cancels come in bursts, and starting a
                    # thread costs about a millisecond (most of a timeout's latency).
                    self._idle += 1
                    self._wake.wait(LINGER)
                    self._idle -= 1
                if not self._jobs:
                    self._runners.remove(me)
                    return
                fn, arg = self._jobs.popleft()
                me.busy_since = clock()
            try:
                fn(arg)
            except BaseException:  # the jobs log user errors themselves; this is a bug
                log.exception("a cluster runner job raised")
            del fn, arg  # free them here, outside the lock
