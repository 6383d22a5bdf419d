"""Pull executors: a pool of slot threads, each running the shared worker loop.

The thread pool (``ThreadPool``, the cluster's ``"threads"``) calls the task's
function on the slot thread itself; the process executor (``ProcessExecutor``)
runs it in the slot's own child process. Everything else is this one loop:

* A slot that finishes an attempt records it and takes the next due task in one
  critical section, so a busy pool never sleeps between tasks.
* Idle slots wait on a private wake queue; a submit wakes at most one of them.
  One idle slot, the *timekeeper*, sleeps only until the lane's next start time;
  the others sleep until woken, so nothing polls.
* A slot never drops its last reference to an attempt's value, error or task while
  it holds the lock: they are freed after it releases it (user finalizers).
* Abandonment (timeout, cancel of a running attempt): a thread slot is stuck in
  user code, so a replacement takes its place and the stuck thread exits when its
  call returns (its late outcome is STALE). A process slot is not stuck: the
  backend kills its child (``kills``), and the slot carries on with a new one.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any

from ._backend import Backend, join_threads
from ._core import DONE, REQUEUED, RUN_ENDED, SLEEP, Lane, Scheduler, plan
from ._delivery import has_callbacks, run_callbacks
from ._policy import Decision
from ._sync import MAX_WAIT, acquire_contended
from ._task import _CURRENT, _NO_KWARGS, DEFAULT_OPTIONS, Result, Task, TaskContext
from ._validate import integer

if TYPE_CHECKING:
    from ._runtime import Leftovers

__all__ = ["Slot", "SlotPool", "ThreadPool"]

log = logging.getLogger("cluster")

# What a slot does once it has released the lock.
_RUN = 0  #: run the attempt it took
_BACKOFF = 1  #: sleep an IMMEDIATE retry's backoff, then resume the task
_AGAIN = 2  #: deliver what it finished, then look again
_IDLE = 3  #: wait on its wake queue (the timekeeper: until the next start time)
_EXIT = 4  #: leave the pool

_BASE = BaseException.with_traceback  # C-level: bypasses the exception's own __setattr__


def _drop_frame(error: BaseException) -> None:
    """Drop the worker's own frame from ``error``'s traceback.

    It would keep the worker's locals (and through them the error itself) alive in
    a reference cycle. Done through ``BaseException.with_traceback`` so that an
    exception that refuses attribute assignment (a frozen dataclass) still fails
    only its task.
    """
    tb = error.__traceback__
    if tb is not None:
        _BASE(error, tb.tb_next)


class Slot:
    """One slot thread's wake-up channel and bookkeeping (guarded by the cluster lock)."""

    __slots__ = ("backend", "calling", "idle", "owed", "poke", "thread", "wake")

    def __init__(self, backend: SlotPool) -> None:
        self.backend = backend
        self.wake: SimpleQueue[None] = SimpleQueue()  # a token wakes the slot
        #: Puts a token (safe under the lock: no user code, never blocks).
        self.poke = functools.partial(self.wake.put, None)
        self.idle = False  # in the pool's idle list
        # True while this slot serves a terminal task's sinks outside the lock;
        # stop() waits for it. Written by the slot alone; cleared before the
        # task's callbacks run and before the next attempt starts.
        self.owed = False
        self.calling = False  # inside a settled task's callbacks (written by the slot)
        self.thread: threading.Thread | None = None


class SlotPool(Backend):
    """A pull executor of ``size`` slot threads sharing the worker loop."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        # ---- guarded by the cluster lock ----
        self._pool: set[Slot] = set()  # slots at full strength (abandoned ones leave)
        self._idle: list[Slot] = []  # idle slots, most recently idle last
        self._timekeeper: Slot | None = None  # the idle slot waiting for the next start
        self._timer_target = math.inf  # when the timekeeper wakes by itself
        #: Slots sleeping an IMMEDIATE retry's backoff, and the task each sleeps for.
        self._sleepers: dict[Slot, Task] = {}
        self._token_waits: set[Slot] = set()  # sleepers whose retry waits for a token

    @property
    def capacity(self) -> int:
        """Its number of slots."""
        return self._size

    # ------------------------------------------------------------------ Backend

    def start_locked(self) -> None:
        """Start every slot."""
        for _ in range(self._size - len(self._pool)):
            self._spawn_locked(None)

    def queued_locked(self, task: Task, ready: bool) -> None:
        """Wake an idle slot for a due task, or the timekeeper for an earlier start."""
        if ready:
            idle = self._idle
            if idle:
                slot = idle.pop()
                slot.idle = False
                slot.wake.put(None)
        elif task.start < self._timer_target:  # type: ignore[operator]
            self._wake_timekeeper_locked()

    def wake_locked(self) -> None:
        """Due work came back from a gate: wake an idle slot."""
        idle = self._idle
        if idle:
            slot = idle.pop()
            slot.idle = False
            slot.wake.put(None)

    def abandon_locked(self, slot: object, fresh: list[threading.Thread] | None) -> None:
        """A thread stuck in a detached attempt leaves the pool; a new one replaces it."""
        assert isinstance(slot, Slot)
        self._pool.discard(slot)
        self.rt.abandoned_threads += 1
        if not self.rt.terminated_locked():
            self._spawn_locked(fresh)

    def stopping_locked(self) -> None:
        """Wake every idle slot: each exits once nothing is left for it."""
        for slot in self._idle:
            slot.idle = False
            slot.wake.put(None)
        self._idle.clear()

    def clock_jumped_locked(self) -> None:
        """A fake clock moved: the timekeeper re-plans, backoff sleepers look again."""
        self._wake_timekeeper_locked()
        for slot in self._sleepers:
            slot.poke()

    def owed_locked(self) -> bool:
        """A slot is delivering a Result outside the lock."""
        return any(slot.owed for slot in self._pool)

    def waiting_locked(self, now: float) -> int:
        """IMMEDIATE retries whose backoff is over but whose key gives no token yet."""
        return len(self._token_waits)

    def busy_locked(self, now: float) -> bool:
        """A slot delivers or runs callbacks, or an IMMEDIATE backoff is over."""
        if any(slot.calling for slot in self._pool):
            return True
        return any(task.start <= now for task in self._sleepers.values())  # type: ignore[operator]

    def join(self, deadline: float | None) -> int:
        """Join the slot threads (not the abandoned ones) until ``deadline``."""
        with self.rt.lock:
            threads = [s.thread for s in self._pool if s.thread is not None]
        return join_threads(threads, deadline)

    def reset_in_child(self) -> None:
        """After fork: the child has none of the slot threads."""
        self._pool.clear()
        self._idle.clear()
        self._sleepers.clear()
        self._token_waits.clear()
        self._timekeeper = None
        self._timer_target = math.inf

    def alive_locked(self) -> int:
        """Slot threads alive (the pool's strength)."""
        return sum(1 for s in self._pool if s.thread is not None and s.thread.is_alive())

    # ------------------------------------------------------------------ slots

    def _new_slot(self) -> Slot:
        return Slot(self)

    def _spawn_locked(self, fresh: list[threading.Thread] | None) -> threading.Thread:
        """Add a slot; start its thread now, or leave it in ``fresh`` for the caller.

        Started here, under the lock, so that no other thread sees an unstarted slot
        in the pool, except when the service thread (which starts replacements just
        after releasing the lock) passes ``fresh``: ``join_threads`` waits for those.
        """
        slot = self._new_slot()
        thread = slot.thread = threading.Thread(
            target=self._work, args=(slot,), name=self.rt.thread_name(self.name), daemon=True
        )
        self._pool.add(slot)
        if fresh is None:
            thread.start()
        else:
            fresh.append(thread)
        return thread

    def _wake_timekeeper_locked(self) -> None:
        """An earlier start time was added: the timekeeper (or any idle slot) re-plans."""
        keeper = self._timekeeper
        if keeper is not None and keeper.idle:
            self._idle.remove(keeper)
            keeper.idle = False
            keeper.wake.put(None)
        elif self._idle:
            slot = self._idle.pop()
            slot.idle = False
            slot.wake.put(None)

    def _take_locked(self, slot: Slot, sched: Scheduler, lane: Lane, now: float) -> Task | None:
        """Pop the next due task for ``slot`` and keep the other slots informed."""
        task = sched.pop(now, lane)
        if task is None:
            return None
        ctx: TaskContext = task.ctx  # type: ignore[assignment]
        ctx._worker = slot
        if ctx.deadline is not None:
            self.rt.service.arm_locked(ctx.deadline)
        if self._idle and (lane.queued or (lane.delayed and self._timekeeper is None)):
            # More due work, or start times with nobody keeping time: wake a helper.
            helper = self._idle.pop()
            helper.idle = False
            helper.wake.put(None)
        return task

    def _runner(self) -> Callable[[Slot, Task, TaskContext], Any] | None:
        """``run(slot, task, ctx) -> value`` (raising the attempt's error) that runs an
        attempt elsewhere, or None to call ``task.fn`` on the slot thread itself (the
        thread pool's hot path)."""
        return None

    def _slot_exit(self, slot: Slot) -> None:
        """A slot leaves its loop (outside the lock): subclasses release what it owns."""

    def _slot_enter(self, slot: Slot) -> None:
        """A slot thread starts (outside the lock): subclasses prepare what it owns."""

    def _work(self, me: Slot) -> None:
        """A slot's loop; returns when the pool shuts down or its attempt is abandoned."""
        try:
            self._slot_enter(me)
            self._loop(me)
        except BaseException:  # a bug of ours, never a user error: keep the pool whole
            log.critical(
                "cluster slot thread %s crashed", threading.current_thread().name, exc_info=True
            )
            rt = self.rt
            with rt.lock:
                if me in self._pool:
                    self._pool.discard(me)
                    if not rt.terminated_locked():
                        self._spawn_locked(None)
        finally:
            self._slot_exit(me)

    def _loop(self, me: Slot) -> None:
        rt = self.rt
        rt.enter_thread()
        sched = rt.sched
        lane = self.lane
        clock = rt.monotonic
        timeout_of = rt.clock.timeout
        current = _CURRENT
        run = self._runner()
        kills = self.kills
        rt_clock = rt.clock
        task: Task | None = None  # the task whose attempt this slot runs / just ran
        ctx: TaskContext | None = None
        value: Any = None
        error: BaseException | None = None
        decision: Decision | None = None  # the retry policy's answer for error
        rearm: float | None = None  # a repeating task's next run, if this run ended
        ran = False  # task's attempt just returned and is not yet recorded
        sleeping: TaskContext | None = None  # an IMMEDIATE retry's context
        # Each of these is reset where it is consumed, not at every turn of the loop.
        finished: Task | None = None  # made terminal here: delivered/released outside
        run_ended: Result[Any] | None = None  # a run of a series ended: its callbacks
        deliver = False  # finished has sinks or callbacks
        nxt: Task | None = None  # the task whose attempt runs next
        left: Leftovers | None = None
        wait: float | None = None
        idled = False  # this slot joined the idle list (and may keep time) and waited
        while True:
            action = _RUN
            lock = rt.lock  # read every time: a forked child replaces it
            if not lock.acquire(False):
                acquire_contended(lock)
            try:
                now = clock()
                if idled:  # back from the idle wait below (only it joins these)
                    idled = False
                    if me.idle:  # woke by timeout: leave the idle list
                        self._idle.remove(me)
                        me.idle = False
                    if self._timekeeper is me:
                        self._timekeeper = None
                        self._timer_target = math.inf
                if ran:
                    ran = False
                    code = sched.finish(task, ctx, value, error, decision, now, rearm)  # type: ignore[arg-type]
                    decision = rearm = None
                    if code == DONE:
                        rt.unsettled -= 1  # rt.settle_locked(1), inlined
                        if not rt.unsettled:
                            rt.settle_locked(0)
                        finished = task
                        if task.sinks is not None:  # type: ignore[union-attr]
                            me.owed = True  # until its sinks are served, below
                            deliver = True
                        if task.opts is not DEFAULT_OPTIONS:  # type: ignore[union-attr]
                            deliver = deliver or has_callbacks(task)  # type: ignore[arg-type]
                            if sched.expiry_armed:
                                rt.arm_expiry_locked()
                        if deliver:
                            me.calling = True  # until delivered (wait_idle looks)
                    elif code == SLEEP:
                        sleeping = task.ctx  # type: ignore[union-attr]
                        sleeping._hook = me.poke  # type: ignore[union-attr]  # cancel/stop wake it
                        self._sleepers[me] = task  # type: ignore[assignment]
                    elif code == RUN_ENDED:
                        run_ended = rt.deliver_run_locked(task)  # type: ignore[arg-type]
                        if run_ended is not None:
                            me.calling = True  # until its callbacks ran
                        if task.start > now and task.start < self._timer_target:  # type: ignore[union-attr,operator]
                            self._wake_timekeeper_locked()
                    elif code == REQUEUED:
                        if task.start < self._timer_target:  # type: ignore[union-attr,operator]
                            self._wake_timekeeper_locked()
                    elif not kills:  # STALE: a replacement took this thread's place
                        rt.abandoned_threads -= 1
                        return  # (this critical section left nothing to free or record)
                    # (STALE on a killing backend: the slot already recovered; go on.)
                elif sleeping is not None:  # the backoff is over (or was cut short)
                    if sched.resume(task, sleeping, now):  # type: ignore[arg-type]
                        nxt = task
                        fresh_ctx: TaskContext = task.ctx  # type: ignore[union-attr,assignment]
                        fresh_ctx._worker = me
                        if fresh_ctx.deadline is not None:
                            rt.service.arm_locked(fresh_ctx.deadline)  # (as _take_locked)
                        sleeping = None
                    elif task.ctx is not sleeping:  # type: ignore[union-attr]  # cancelled
                        sleeping = None
                    else:  # its key's rate gives no token yet: the backoff goes on
                        self._token_waits.add(me)
                    if sleeping is None:
                        self._sleepers.pop(me, None)
                        self._token_waits.discard(me)
                if sleeping is not None:
                    action = _BACKOFF
                elif nxt is None:
                    nxt = self._take_locked(me, sched, lane, now)
                    if nxt is None:
                        if deliver:
                            action = _AGAIN  # deliver, then decide whether to sleep
                        elif rt.exiting_locked():
                            action = _EXIT
                        else:
                            action = _IDLE
                            wait = None
                            self._idle.append(me)
                            me.idle = True
                            due = sched.next_due(lane)
                            if due is not None and self._timekeeper is None:
                                self._timekeeper = me
                                self._timer_target = due
                                wait = timeout_of(due - now)
                if sched.woken:  # keys freed: tasks came back to their lanes
                    rt.wake_lanes_locked()
                if rt.room_waiters and nxt is not None:  # max_pending: a task started
                    rt.room_locked()
                # Dropped objects to free, durable transitions to wait for (rare).
                if sched.graveyard or sched.journal:
                    left = rt.leftovers_locked()
                if nxt is not None:
                    # Read under the lock: a callback delivered below may cancel nxt.
                    ctx = nxt.ctx
            finally:
                lock.release()
            # ---- outside the lock: persist, free, deliver, then act ----
            value = error = None
            if left is not None:
                rt.after_lock(left)
                left = None
            if finished is not None:
                if deliver:
                    deliver = False
                    rt.deliver(finished, me)
                if finished._error is not None and sched.dead_limit:
                    rt.seal_dead(finished)  # a dead letter: its text made, its frames cleared
                # Task.release, inlined: this runs once per task.
                finished.fn = None
                finished.args = ()
                finished.kwargs = _NO_KWARGS
                finished = None
            elif run_ended is not None:
                try:
                    run_callbacks(task, run_ended)  # type: ignore[arg-type]
                finally:
                    me.calling = False
                run_ended = None
            if action == _RUN:
                task = nxt
                nxt = None
            elif action == _BACKOFF:  # woken early by cancel, stop or a fake clock's jump
                while sleeping._reason is None:  # type: ignore[union-attr]
                    remaining = task.start - clock()  # type: ignore[union-attr,operator]
                    if remaining <= 0:
                        break
                    wait = timeout_of(remaining)
                    try:  # noqa: SIM105
                        me.wake.get(timeout=None if wait is None else min(wait, MAX_WAIT))
                    except Empty:
                        pass
                continue
            else:
                task = ctx = None  # hold no references while idle
                if action == _AGAIN:
                    continue
                if action == _EXIT:
                    return
                idled = True
                try:  # noqa: SIM105 - cheaper than contextlib.suppress on this path
                    me.wake.get(timeout=None if wait is None else min(wait, MAX_WAIT))
                except Empty:
                    pass
                continue
            # ---- run one attempt ----
            if ctx._task is None:  # type: ignore[union-attr]  # cancelled by a callback above
                ran = True  # never started: its finish is STALE (a replacement runs on)
                continue
            token = current.set(ctx)  # type: ignore[arg-type]
            try:
                if run is None:  # noqa: SIM108 - the thread pool's path, kept apart
                    value = task.fn(*task.args, **task.kwargs)  # type: ignore[union-attr,misc]
                else:
                    value = run(me, task, ctx)  # type: ignore[arg-type]
                error = None
            except BaseException as exc:
                value = None
                error = exc
                _drop_frame(exc)
            finally:
                current.reset(token)
            if rt.observers:
                rt.report_attempt(task, clock(), error)  # type: ignore[arg-type]
            if error is not None or task.opts.repeat is not None:  # type: ignore[union-attr]
                stopping = not sched.runs_allowed
                decision, rearm = plan(task, ctx, error, sched.rng, stopping, clock(), rt_clock)  # type: ignore[arg-type]
            ran = True


class ThreadPool(SlotPool):
    """The cluster's built-in ``"threads"`` executor: ``workers`` threads."""

    def __init__(self, workers: int) -> None:
        super().__init__(integer(workers, "workers", minimum=1))

    def __repr__(self) -> str:
        return f"<ThreadPool {self.name!r} workers={self._size}>"
