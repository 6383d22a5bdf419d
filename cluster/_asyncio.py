"""The built-in ``"async"`` executor: ``async def`` tasks on one event-loop thread.

A push backend: the loop thread itself takes due tasks from its lane (``_dispatch``,
scheduled by a submit, a requeue or a timer) and runs each attempt as an
``asyncio.Task``, at most ``limit`` at once. An attempt ends in ``_attempt``: the
retry decision, then one critical section to record it; the Result goes to the
sinks on the loop thread, and the callbacks (plain functions that may block) to a
runner thread, so that they never stall the loop.

Timeout and cancel signal the attempt's context under the cluster lock; its hook
(``_Slot.abort``) asks the loop to ``Task.cancel()`` the coroutine, which sees
``CancelledError`` at its next ``await``. The Result does not wait for that: it is
delivered at once, as for a thread (SPEC §5); a coroutine that swallows the
cancellation runs on, abandoned, and its outcome is dropped. IMMEDIATE retries
sleep with ``asyncio`` (a future that a cancel, a stop or a fake clock's jump
resolves early), never blocking the loop.

A coroutine that blocks the loop (``time.sleep`` in ``async def``) delays only the
loop's own tasks. While attempts run, the loop stamps a heartbeat every
``BEAT`` seconds, and the service thread logs a warning, with the loop thread's
stack, when the heartbeat is older than ``LAG``: timeouts and cancels of async
tasks cannot take effect while the loop is blocked.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
import traceback
from typing import Any

from ._backend import Backend, join_threads
from ._core import DONE, REQUEUED, RUN_ENDED, SLEEP, plan
from ._delivery import deliver_sinks, has_callbacks, run_callbacks
from ._slots import _drop_frame
from ._task import _CURRENT, DEFAULT_OPTIONS, Result, Task, TaskContext, TaskState

__all__ = ["AsyncBackend"]

log = logging.getLogger("cluster")

#: Seconds between the loop's heartbeats while attempts run.
BEAT = 0.1
#: A heartbeat older than this means the loop is blocked: it is logged.
LAG = 0.5


class _Slot:
    """One async attempt (what ``ctx._worker``/``ctx._hook`` lead to)."""

    __slots__ = ("aborted", "atask", "backend", "wakeup")

    def __init__(self, backend: AsyncBackend) -> None:
        self.backend = backend
        self.atask: asyncio.Task[None] | None = None  # set on the loop right after dispatch
        self.aborted = False  # the attempt (or its IMMEDIATE backoff) was signalled
        self.wakeup: asyncio.Future[None] | None = None  # an IMMEDIATE backoff's sleep

    def abort(self) -> None:
        """The context was signalled (cluster lock held): cancel the coroutine, or cut
        its backoff short, on the loop."""
        self.aborted = True
        loop = self.backend._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._abort_on_loop)

    def poke_on_loop(self) -> None:
        """A fake clock moved: an IMMEDIATE backoff in progress looks at the time again."""
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _abort_on_loop(self) -> None:
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        elif self.atask is not None:
            self.atask.cancel()


class AsyncBackend(Backend):
    """One event-loop thread running ``async def`` attempts, at most ``limit`` at once."""

    kills = True  # a cancelled coroutine needs no replacement slot
    runs_coroutines = True

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        # ---- guarded by the cluster lock ----
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kicked = False  # a _dispatch is scheduled on the loop
        self._timer_at = float("inf")  # when the loop's dispatch timer fires
        self._owed = 0  # attempts delivering their Result on the loop, outside the lock
        self._sleepers: dict[_Slot, Task] = {}  # IMMEDIATE backoffs in progress
        self._token_waits: set[_Slot] = set()  # ... whose retry waits for a token
        self._closing = False
        # ---- loop thread only ----
        self._timer: asyncio.TimerHandle | None = None
        self._attempts: set[asyncio.Task[None]] = set()  # running coroutines (strong refs)
        self._beat = time.monotonic()  # written by the loop, read by the service thread
        self._beating = False
        self._blocked_since: float | None = None  # a blocked episode already reported

    @property
    def capacity(self) -> int:
        """``async_limit``."""
        return self._limit

    # ------------------------------------------------------------------ Backend

    def start_locked(self) -> None:
        """Tasks submitted before ``run()`` start now (the loop starts on first use)."""
        lane = self.lane
        if lane is not None and (lane.queued or lane.delayed):
            self._kick_locked()

    def queued_locked(self, task: Task, ready: bool) -> None:
        """A due task: dispatch soon; a later one: re-arm the timer if it is earlier."""
        if ready or task.start < self._timer_at:  # type: ignore[operator]
            self._kick_locked()

    def wake_locked(self) -> None:
        """Due tasks came back from a gate: dispatch."""
        self._kick_locked()

    def stopping_locked(self) -> None:
        """At the end: stop the loop (abandoned coroutines are cancelled and dropped)."""
        if self.rt.terminated_locked() and self._loop is not None and not self._closing:
            self._closing = True
            self._loop.call_soon_threadsafe(self._loop.stop)

    def clock_jumped_locked(self) -> None:
        """A fake clock moved: look for due tasks, end backoffs that are over."""
        if self._loop is not None:
            self._kick_locked()
            for slot in self._sleepers:
                self._loop.call_soon_threadsafe(slot.poke_on_loop)

    def owed_locked(self) -> bool:
        """The loop is delivering a Result."""
        return self._owed > 0

    def waiting_locked(self, now: float) -> int:
        """IMMEDIATE retries whose backoff is over but whose key gives no token yet."""
        return len(self._token_waits)

    def busy_locked(self, now: float) -> bool:
        """An IMMEDIATE backoff is over and its retry has not resumed yet."""
        return any(task.start <= now for task in self._sleepers.values())  # type: ignore[operator]

    def watch_locked(self, now: float) -> float | None:
        """The service thread's look: is the loop blocked while attempts run?"""
        lane = self.lane
        if self._thread is None or lane is None or not lane.running:
            self._blocked_since = None
            return None
        real = time.monotonic()
        lag = real - self._beat
        if lag > LAG and self._blocked_since != self._beat:
            self._blocked_since = self._beat  # once per blocked episode
            frame = sys._current_frames().get(self._thread.ident or -1)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
            log.warning(
                "the cluster's event loop has been blocked for %.2f s: timeouts and "
                "cancels of async tasks wait for it. A coroutine blocks it here:\n%s",
                lag,
                stack,
            )
        return now + BEAT * 2.5

    def join(self, deadline: float | None) -> int:
        """Join the loop thread."""
        with self.rt.lock:
            thread = self._thread
        return join_threads([thread] if thread is not None else [], deadline)

    def reset_in_child(self) -> None:
        """After fork: the loop thread does not exist in the child."""
        self._loop = None
        self._thread = None
        self._kicked = False
        self._owed = 0
        self._sleepers.clear()
        self._attempts.clear()

    # ------------------------------------------------------------------ the loop thread

    def _kick_locked(self) -> None:
        if self._closing:
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._run_loop, name=self.rt.thread_name("loop"), daemon=True
            )
            self._thread.start()
            self.rt.watch_locked(self)
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon_threadsafe(self._dispatch)

    def _run_loop(self) -> None:
        rt = self.rt
        rt.enter_thread()
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Stopped: whatever still runs was abandoned (its Result is out already).
            leftovers = [t for t in self._attempts if not t.done()]
            for atask in leftovers:
                atask.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.wait(leftovers, timeout=0.1))
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def _dispatch(self) -> None:
        """On the loop: start due attempts up to the limit; arm the timer for the next."""
        rt = self.rt
        sched = rt.sched
        lane = self.lane
        started: list[tuple[Task, TaskContext, _Slot]] = []
        with rt.lock:
            self._kicked = False
            now = rt.monotonic()
            while lane.running < self._limit:
                task = sched.pop(now, lane)
                if task is None:
                    break
                ctx: TaskContext = task.ctx  # type: ignore[assignment]
                slot = _Slot(self)
                ctx._hook = slot.abort
                if ctx.deadline is not None:
                    rt.arm_service_locked(ctx.deadline)
                started.append((task, ctx, slot))
            if started and not self._beating:
                rt.arm_service_locked(now + BEAT)  # watch the loop while attempts run
            if rt.room_waiters and started:
                rt.room_locked()
            if sched.woken:
                rt.wake_lanes_locked()
            due = sched.next_due(lane)
            self._timer_at = float("inf") if due is None else due
            wait = None if due is None else rt.clock.timeout(max(0.0, due - now))
            left = rt.leftovers_locked()
        if left is not None:
            rt.after_lock(left)  # (durable attempts are recorded before they start)
        loop = self._loop
        assert loop is not None
        for task, ctx, slot in started:
            atask = loop.create_task(self._attempt(task, ctx, slot))
            slot.atask = atask
            self._attempts.add(atask)
            atask.add_done_callback(self._attempts.discard)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wait is not None:
            self._timer = loop.call_later(wait, self._dispatch)
        if started and not self._beating:
            self._beating = True
            loop.call_soon(self._heartbeat)

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        lane = self.lane
        if lane is not None and (lane.running or self._attempts):
            assert self._loop is not None
            self._loop.call_later(BEAT, self._heartbeat)
        else:
            self._beating = False

    async def _backoff(self, task: Task, sleeping: TaskContext, slot: _Slot) -> bool:
        """Sleep an IMMEDIATE retry's backoff on the loop (a cancel, a stop or a fake
        clock's jump cuts it short), then resume: True if the next attempt starts."""
        rt = self.rt
        loop = asyncio.get_running_loop()
        while True:
            slot.wakeup = loop.create_future()
            wait = rt.clock.timeout(max(0.0, task.start - rt.monotonic()))  # type: ignore[operator]
            timer = None if wait is None else loop.call_later(wait, _wake, slot.wakeup)
            try:
                while rt.monotonic() < task.start and not slot.aborted:  # type: ignore[operator]
                    await slot.wakeup
                    slot.wakeup = loop.create_future()  # a fake clock's jump: look again
            except asyncio.CancelledError:
                pass
            finally:
                if timer is not None:
                    timer.cancel()
                slot.wakeup = None
            with rt.lock:
                resumed = rt.sched.resume(task, sleeping, rt.monotonic())
                later = not resumed and task.ctx is sleeping and not slot.aborted
                if later:
                    self._token_waits.add(slot)
                else:
                    self._sleepers.pop(slot, None)
                    self._token_waits.discard(slot)
                if resumed:
                    ctx: TaskContext = task.ctx  # type: ignore[assignment]
                    ctx._hook = slot.abort
                    slot.aborted = False
                    if ctx.deadline is not None:
                        rt.arm_service_locked(ctx.deadline)
            if not later:  # (later: its key's rate gives no token yet; sleep on)
                return resumed

    async def _attempt(self, task: Task, ctx: TaskContext, slot: _Slot) -> None:
        """Run attempts of ``task`` (more than one for IMMEDIATE retries) and record them."""
        rt = self.rt
        sched = rt.sched
        while True:
            value: Any = None
            error: BaseException | None = None
            if not slot.aborted:  # (an abort can land before the coroutine started)
                _CURRENT.set(ctx)
                try:
                    value = task.fn(*task.args, **task.kwargs)  # type: ignore[misc]
                    if inspect.isawaitable(value):
                        value = await value
                except BaseException as exc:  # CancelledError too: ours, or the task's own
                    value = None
                    error = exc
                    _drop_frame(exc)
                if slot.aborted and error is None:
                    log.warning(
                        "async task %r ignored its cancellation; its outcome is dropped",
                        ctx.task_id,
                    )
                if rt.observers:
                    rt.report_attempt(task, rt.monotonic(), error)
            decision = rearm = None
            opts = task.opts
            if error is not None or (opts is not DEFAULT_OPTIONS and opts.repeat is not None):
                stopping = not sched.runs_allowed  # user code, on the loop:
                decision, rearm = plan(
                    task, ctx, error, sched.rng, stopping, rt.monotonic(), rt.clock
                )
            sleeping: TaskContext | None = None
            run_ended: Result[Any] | None = None
            with rt.lock:
                code = sched.finish(task, ctx, value, error, decision, rt.monotonic(), rearm)
                if code == DONE:
                    rt.settle_locked(1)
                    if task.sinks is not None or has_callbacks(task):
                        self._owed += 1  # until delivered and its callbacks handed over
                    if sched.expiry_armed:
                        rt.arm_expiry_locked()
                elif code == REQUEUED:
                    self.queued_locked(task, False)
                elif code == RUN_ENDED:
                    run_ended = rt.deliver_run_locked(task)
                    if run_ended is not None:  # callbacks: to a runner, now (wait_idle)
                        rt.runners.submit_locked(_run_callbacks, (task, run_ended), None)
                    self.queued_locked(task, task.state is TaskState.PENDING)
                elif code == SLEEP:
                    sleeping = task.ctx
                    sleeping._hook = slot.abort  # type: ignore[union-attr]
                    slot.aborted = False
                    self._sleepers[slot] = task
                if sched.woken:
                    rt.wake_lanes_locked()
                if self.lane.queued and not self._kicked:
                    self._kicked = True  # a slot is free and tasks wait: on this loop
                    asyncio.get_running_loop().call_soon(self._dispatch)
                left = rt.leftovers_locked()
            del value, error
            if left is not None:
                rt.after_lock(left)  # persist, then deliver
            if code == DONE:
                callbacks = has_callbacks(task)
                if task.sinks is not None or callbacks:
                    deliver_sinks(task)
                    with rt.lock:
                        if callbacks:  # plain functions, maybe slow: not on the loop
                            rt.runners.submit_locked(rt.callbacks_then_release, task, None)
                        self._owed -= 1
                        rt.settle_locked(0)  # a stop() may wait for this delivery
                if not callbacks:
                    if task._error is not None and sched.dead_limit:
                        rt.seal_dead(task)  # a dead letter: its text made, its frames cleared
                    task.release()
                return
            if code != SLEEP:
                return
            # IMMEDIATE retry: sleep the backoff on the loop, then resume.
            if not await self._backoff(task, sleeping, slot):  # type: ignore[arg-type]
                return
            ctx = task.ctx  # type: ignore[assignment]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _run_callbacks(job: tuple[Task, Result[Any]]) -> None:
    run_callbacks(*job)
