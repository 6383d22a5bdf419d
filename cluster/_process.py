"""``ProcessExecutor``: each attempt runs in a child process that can really be killed.

A pull executor (``_slots.SlotPool``): each of its slot threads owns one child
process (``_child.Child``: its own duplex pipe, its own process group, nothing
shared with the other children, so a child killed at any moment cannot wedge the
pool — the bug class of pebble#163 and celery#4185) and runs attempts on it one at
a time, through the same worker loop as the thread pool.

* At ``submit()`` the call is pickled (``prepare``): a function or argument that
  does not pickle fails there with a ``TypeError`` naming it. The task then carries
  only the pickle (``_Pickled``), so big arguments are not held twice.
* Timeout or cancel: the service thread (or the canceller) detaches the attempt and
  delivers the Result at once, as for threads; ``abandon_locked`` rings the slot's
  doorbell, and the slot kills the child's whole process group (TERM, ``grace``
  seconds on the monotonic clock, then KILL) and starts a fresh child. The slot
  itself is never stuck, so nothing replaces it: the executor is back at full
  strength as soon as the new child is forked.
* A child that dies by itself fails only its attempt, with ``WorkerCrashedError``
  (retried like any error), and is replaced.
* ``max_tasks_per_child`` recycles a child between attempts.
* ``current()`` in the child gives the task id, attempt and deadline; ``progress()``
  there reaches ``info()`` here.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import threading
from typing import Any

from ._child import Attempt, Child, dump_call, mp_context
from ._slots import Slot, SlotPool
from ._task import Task, TaskContext
from ._validate import Duration, integer, seconds

__all__ = ["ProcessExecutor"]

#: ``run`` returns this for an attempt whose child it killed (the attempt was
#: detached; the slot loop drops the outcome as STALE).
_ABORTED = object()


class _Pickled:
    """A task's call, pickled at submit: what the slot sends to its child."""

    __slots__ = ("__qualname__", "payload")

    def __init__(self, payload: bytes, name: str) -> None:
        self.payload = payload
        self.__qualname__ = name  # the task's default name stays the function's

    def __call__(self) -> Any:  # pragma: no cover - never called in the parent
        raise RuntimeError("a process task's call runs in its child process")

    def __repr__(self) -> str:
        return f"<pickled call of {self.__qualname__} ({len(self.payload)} bytes)>"


class _ProcSlot(Slot):
    """A slot thread of a process executor, with its child and its doorbell."""

    __slots__ = ("bell", "child", "door")

    def __init__(self, backend: ProcessExecutor) -> None:
        super().__init__(backend)
        self.child: Child | None = None  # touched by the slot thread only
        # Ringing the bell (a byte down the pipe) makes the slot's wait() return:
        # how an abort reaches a slot blocked on its child. Rung under the cluster
        # lock; a few bytes never fill the pipe (each wake drains it).
        self.door, self.bell = multiprocessing.Pipe(duplex=False)


class ProcessExecutor(SlotPool):
    """Run attempts in ``workers`` child processes (default: ``os.cpu_count()``).

    ``fn``, its arguments and its value must pickle with the standard library's
    ``pickle`` (functions by reference: define them at module level, and guard the
    script's entry with ``if __name__ == "__main__":``, as for any ``spawn`` or
    ``forkserver`` pool). ``start_method``: ``"forkserver"`` (default where
    available) or ``"spawn"``; never ``"fork"`` from a threaded process.
    ``max_tasks_per_child`` recycles each child after that many attempts. ``grace``
    is how long a killed child may take to exit after SIGTERM before SIGKILL.
    """

    kills = True
    prepares = True

    def __init__(
        self,
        workers: int | None = None,
        *,
        max_tasks_per_child: int | None = None,
        start_method: str | None = None,
        grace: Duration = 0.5,
    ) -> None:
        size = os.cpu_count() or 1 if workers is None else integer(workers, "workers", minimum=1)
        super().__init__(size)
        if max_tasks_per_child is not None:
            max_tasks_per_child = integer(max_tasks_per_child, "max_tasks_per_child", minimum=1)
        self._max_tasks = max_tasks_per_child
        self._ctx = mp_context(start_method)
        self._grace = seconds(grace, "grace")

    def __repr__(self) -> str:
        return f"<ProcessExecutor {self.name!r} workers={self._size}>"

    # ------------------------------------------------------------------ Backend

    def prepare(self, task: Task) -> None:
        """Pickle the call now: a function or argument that does not pickle is a
        TypeError at ``submit()``, never an error later in a child."""
        fn = task.fn
        if type(fn) is _Pickled:  # a resubmit of a builder refused once
            return
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        payload = dump_call(fn, task.args, task.kwargs)  # type: ignore[arg-type]
        task.fn = _Pickled(payload, name)
        task.args = ()
        task.kwargs = {}

    def abandon_locked(self, slot: object, fresh: list[threading.Thread] | None) -> None:
        """Ring the slot's bell: it kills its child's process group and carries on."""
        assert isinstance(slot, _ProcSlot)
        with contextlib.suppress(OSError):  # OSError: the slot is gone already
            slot.bell.send_bytes(b"!")

    # ------------------------------------------------------------------ slots

    def _new_slot(self) -> Slot:
        return _ProcSlot(self)

    def _runner(self) -> Any:
        return self._run_in_child

    def _fresh_child(self, slot: _ProcSlot) -> Child:
        child = slot.child = Child(self._ctx, name=f"{self.name}-{threading.get_ident()}")
        child.start()
        return child

    def _run_in_child(self, slot: Slot, task: Task, ctx: TaskContext) -> Any:
        """Run one attempt on the slot's child; its value, or raise its error."""
        assert isinstance(slot, _ProcSlot)
        child = slot.child
        if child is None or not child.alive:
            if child is not None:
                child.kill(0)  # what is left of its group
            child = self._fresh_child(slot)
        fn: _Pickled = task.fn  # type: ignore[assignment]
        child.begin(fn.payload, Attempt(ctx.task_id, ctx.attempt, ctx.deadline))

        def on_event(kind: str, value: Any) -> None:
            if kind == "progress":
                ctx.progress(value)
            else:
                reset = getattr(ctx, "reset_backoff", None)
                if reset is not None:
                    reset()

        while True:
            outcome = child.wait(slot.door, on_event)
            if outcome is not None:
                break
            if ctx._task is None or ctx._task.ctx is not ctx:  # detached: kill it
                child.kill(self._grace)
                self._fresh_child(slot)  # back at full strength
                return _ABORTED
            # A stale ring (an abort that lost the race with the outcome): wait on.
        if outcome.error is not None:
            if not child.alive:  # it crashed: replace it now, not at the next attempt
                self._fresh_child(slot)
            raise outcome.error
        if self._max_tasks is not None and child.tasks >= self._max_tasks:
            child.close()
            self._fresh_child(slot)
        return outcome.value

    def _slot_enter(self, slot: Slot) -> None:
        assert isinstance(slot, _ProcSlot)
        self._fresh_child(slot)  # ready before the first attempt comes

    def _slot_exit(self, slot: Slot) -> None:
        assert isinstance(slot, _ProcSlot)
        child = slot.child
        slot.child = None
        if child is not None:
            child.close()
        slot.door.close()
        slot.bell.close()
