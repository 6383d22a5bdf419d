"""The engine behind a ``Cluster``: the lock, the scheduler, the executors, the life cycle.

``Cluster`` (``_cluster.py``) is a thin public face; everything runs here, and the
cluster's own threads (slots, the service thread, runners, the event loop)
reference only this object. So a ``Cluster`` that nobody references any more is
garbage collected like any object, and its finalizer stops this engine gracefully:
the threads exit once the accepted tasks have their Results.

Locking. One lock, ``Runtime.lock``, guards the scheduler, every backend's and
runner's bookkeeping, and every field marked below. The hot paths (submit,
subscribe, cancel, the slot loop) take it through ``acquire_contended`` when it is
held (see ``_sync``). No user code runs under it, and nothing that may free user
objects: what the scheduler drops goes to its graveyard, freed by ``bury`` after
the lock is released; a terminal task's work is dropped by ``Task.release`` by the
thread that ended it, after it released the lock.

Who delivers: the thread that makes a task terminal hands its Result to every sink
outside the lock, then runs the callbacks (inline on a slot thread, on a runner
otherwise: see ``_delivery``).
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._durable import Durable
    from ._store import BadRow, Loaded, Row, SQLiteStore, Ticket, collector_paused

from . import _task
from ._backend import Backend, join_threads
from ._clock import Clock
from ._core import (
    DONE,
    REQUEUED,
    RUN_ENDED,
    DeadRecord,
    Lane,
    Scheduler,
    index_snapshot,
    plan,
)
from ._delivery import (
    Runners,
    SeriesSink,
    Signal,
    clear_frames,
    deliver_sinks,
    has_callbacks,
    run_callbacks,
)
from ._durable import (
    MAX_INTERRUPTS,
    BadDoc,
    Durable,
    OptionsCache,
    StoredError,
    decode_doc,
    encode,
    encode_submitted,
    expires_at,
)
from ._errors import (
    ClusterError,
    ClusterStoppedError,
    DuplicateTaskError,
    QueueFullError,
    StopTimeoutError,
    StoreWriteError,
    TaskInterruptedError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from ._events import Observer
from ._listing import Entry, fn_name
from ._policy import applied
from ._service import Service
from ._slots import Slot, ThreadPool
from ._store import BadRow, Loaded, Row, SQLiteStore, Ticket, collector_paused
from ._sync import MAX_WAIT, acquire_bounded, acquire_contended, wait_event
from ._task import (
    _NO_KWARGS,
    DEFAULT_OPTIONS,
    TERMINAL,
    ClusterStats,
    DeadLetter,
    ExecutorStats,
    NameStats,
    Result,
    Series,
    Sink,
    Task,
    TaskContext,
    TaskInfo,
    TaskState,
    ended,
)

__all__ = ["ASYNC", "RESERVED", "THREADS", "Leftovers", "Runtime", "current_runtime"]

log = logging.getLogger("cluster")

THREADS = "threads"
ASYNC = "async"
RESERVED = frozenset({THREADS, ASYNC})

#: How long cancel() and the exit hook wait for a lock that a thread never released
#: (a KeyboardInterrupt between a hot path's acquire and its ``try``).
LOCK_GIVE_UP = 5.0

#: How often ``wait_idle`` looks again: first after this, then twice as long each
#: time, up to ``IDLE_POLL_MAX``.
IDLE_POLL_MIN = 0.00005
IDLE_POLL_MAX = 0.005

#: How long past a stop's deadline its join still waits for threads that are exiting.
JOIN_GRACE = 0.25

#: A listing finds more held tasks than this not indexed yet: they are indexed outside
#: the lock (``_index_in_bulk``); fewer are indexed under it, at the read.
LIST_BULK = 5_000

# Life cycle (ordered: a state only ever moves forward).
NEW, RUNNING, STOPPING, TERMINATED = range(4)

#: ``_LOCAL.runtime`` is the Runtime a thread works for (slots, service, runners, loop).
_LOCAL = threading.local()

#: Runtimes not yet garbage collected, for the exit hook and the fork handler.
_LIVE: weakref.WeakSet[Runtime] = weakref.WeakSet()


#: What a stored task's id is reserved with until the store's tasks come back.
_STORED: Any = object()

#: A ``submit_many`` of at least this many tasks on a cluster with a store runs with
#: the cyclic collector paused (see ``submit_many``).
_PAUSED_BATCH = 256


class Leftovers:
    """See ``Runtime.leftovers_locked``."""

    __slots__ = ("dead", "settled", "ticket")

    def __init__(
        self, dead: list[object] | None, ticket: Ticket | None, settled: list[Task] | None
    ) -> None:
        self.dead = dead
        self.ticket = ticket
        self.settled = settled  # durable tasks whose end ``ticket`` commits


def current_runtime() -> Runtime | None:
    """The Runtime whose thread this is, or None."""
    return getattr(_LOCAL, "runtime", None)


class Runtime:
    """Lock, scheduler, executors, life cycle and delivery of one cluster."""

    # Slots: the hot paths read these attributes on every task, and a slot is the
    # fastest attribute load CPython has (an instance dict of this many keys loses
    # the shared-key fast path).
    __slots__ = (
        "__weakref__",
        "_async_factory",
        "_async_limit",
        "_awaiting",
        "_late",
        "_listed",
        "_loaded",
        "_outbox",
        "_record_waiters",
        "_recorded",
        "_room",
        "_settled",
        "_threads",
        "_watched",
        "abandoned_threads",
        "backends",
        "clock",
        "lock",
        "max_pending",
        "monotonic",
        "observers",
        "pool",
        "registry",
        "reject",
        "room_waiters",
        "runners",
        "sched",
        "service",
        "state",
        "store",
        "unrecovered",
        "unsettled",
    )

    def __init__(
        self,
        workers: int,
        executors: dict[str, Backend],
        clock: Clock,
        async_limit: int,
        async_factory: Any,
        max_pending: int | None = None,
        reject: bool = False,
        dead_letters: int = 1000,
    ) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        #: The clock's monotonic function itself (the hot paths call it per task).
        self.monotonic = clock.monotonic
        # ---- guarded by lock ----
        self.sched = Scheduler()
        self.state = NEW
        self.unsettled = 0  # accepted tasks whose Result is not yet delivered
        self.abandoned_threads = 0  # threads still inside an abandoned attempt
        self._threads = 0  # serial number for thread names
        self.runners = Runners(self)
        self.service = Service(self)
        self._settled = threading.Condition(self.lock)  # stop() waits for unsettled == 0
        self.sched.dead_limit = dead_letters
        #: The durable journal (SPEC §14), or None; its rows are handed over under the
        #: lock by ``leftovers_locked``, and waited for outside it.
        self.store: SQLiteStore | None = None
        #: Results of durable runs, each [ticket of its commit, task, Result], in the
        #: order the runs ended: a queue gets one once its commit is done (lock).
        self._outbox: deque[list[Any]] = deque()
        # Callers that wait for a durable end to be committed (_await_recorded_locked).
        self._recorded = threading.Condition(self.lock)
        self._record_waiters = 0
        self._listed = threading.Condition(self.lock)  # a bulk index is installed
        #: Sinks added to a durable task that ended but whose end is not committed.
        self._late: dict[Task, list[Sink]] = {}
        self.registry: dict[str, Callable[..., Any]] = {}  #: registered task types
        #: Who hears of every attempt (``Cluster.observe``); replaced, never mutated, so
        #: that the threads that call them read it without the lock.
        self.observers: tuple[Observer, ...] = ()
        #: Stored rows that could not become tasks at recovery (kept in the file).
        self.unrecovered: list[BadRow] = []
        #: Stored rows of types not registered yet, by type (see ``register``).
        self._awaiting: dict[str, list[Row]] = {}
        # Admission control (SPEC §12): submit() waits on _room while max_pending tasks
        # have not started; room_waiters tells the paths that free room to notify.
        self.max_pending = max_pending
        self.reject = reject
        self.room_waiters = 0
        self._room = threading.Condition(self.lock)
        # ---- fixed after __init__ ----
        self.pool = ThreadPool(workers)
        self.backends: dict[str, Backend] = {}
        self._bind(THREADS, self.pool, self.sched.lanes[0])
        for name, backend in executors.items():
            self._bind(name, backend, self.sched.add_lane(name))
        self._async_limit = async_limit
        self._async_factory = async_factory  # makes the "async" backend on first use
        self._watched: list[Backend] = []  # backends with a watch_locked (guarded by lock)
        clock.listen(self._clock_jumped)
        _LIVE.add(self)

    def _bind(self, name: str, backend: Backend, lane: Lane) -> None:
        backend.bind(self, lane)
        self.backends[name] = backend

    def thread_name(self, role: str) -> str:
        """A name for a new cluster thread (caller holds the lock or is __init__)."""
        self._threads += 1
        return f"cluster-{role}-{self._threads}"

    def enter_thread(self) -> None:
        """Mark the calling thread as one of this cluster's own."""
        _LOCAL.runtime = self

    # ------------------------------------------------------------------ lanes (TaskHost)

    def _lane(self, name: str) -> Lane:
        backend = self.backends.get(name)
        if backend is None:
            if name == ASYNC:
                return self._async_lane()
            if not isinstance(name, str):
                raise TypeError(f"name must be a str, got {type(name).__name__}")
            known = ", ".join(repr(n) for n in sorted({*self.backends, ASYNC}))
            raise ValueError(f"no executor named {name!r}; this cluster has {known}")
        return backend.lane

    def _async_lane(self) -> Lane:
        backend = self.backends.get(ASYNC)
        if backend is None:
            with self.lock:
                backend = self.backends.get(ASYNC)
                if backend is None:
                    backend = self._async_factory(self._async_limit)
                    lane = self.sched.add_lane(ASYNC)
                    backend.bind(self, lane)
                    # A new dict, not an update: readers look it up without the lock.
                    self.backends = {**self.backends, ASYNC: backend}
                    if self.state == RUNNING:
                        backend.start_locked()
        return backend.lane

    def watch_locked(self, backend: Backend) -> None:
        """``backend`` wants ``watch_locked(now)`` calls from the service thread."""
        if backend not in self._watched:
            self._watched.append(backend)
        self.service.arm_locked(self.monotonic())

    def watch_backends_locked(self, now: float) -> float | None:
        """The service thread's look at the watched backends; when to look again."""
        soonest = None
        for backend in self._watched:
            when = backend.watch_locked(now)
            if when is not None and (soonest is None or when < soonest):
                soonest = when
        return soonest

    # ------------------------------------------------------------------ life cycle

    def terminated_locked(self) -> bool:
        """True once the cluster reached its final state."""
        return self.state == TERMINATED

    def exiting_locked(self) -> bool:
        """Should an idle slot leave? (terminated, or stopping with nothing unsettled)"""
        state = self.state
        return state == TERMINATED or (state == STOPPING and not self.unsettled)

    def lingering_locked(self) -> bool:
        """May an idle runner linger for more work? (only while running)"""
        return self.state == RUNNING

    def run(self) -> None:
        """Start the executors (see ``Cluster.run``); a store's tasks come back first."""
        self.recover()
        with self.lock:
            if self.state >= STOPPING:
                raise ClusterStoppedError("the cluster was stopped; it cannot run again")
            if self.state == RUNNING:
                return
            self._start_locked()

    # ------------------------------------------------------------------ durable tasks (§14)

    def attach_store(self, store: SQLiteStore) -> None:
        """Open ``store`` (ValueError naming the path for a file that is not a store of
        this format or is newer; StoreLockedError if another owner has it) and read its
        rows; they become tasks again at ``run()``, once the task types are registered."""

        store.open()
        try:
            loaded = store.load()
        except BaseException:
            store.close()
            raise
        self.store = store
        self._loaded: Loaded | None = loaded
        rows = loaded.rows
        newest = rows[-1].seq if rows else 0  # (rows are in (seq, id) order)
        newest = max([newest, *(b.seq for b in loaded.bad if b.seq is not None)])
        self.sched.start_seq_after(newest)  # new submissions come after every stored one
        from ._durable_ids import DEAD_PREFIX

        # Until run() brings them back, the stored tasks' ids are taken (a submit with
        # one of them is a DuplicateTaskError), and generated ids start past theirs.
        ids = [row.id for row in rows if not row.id.startswith(DEAD_PREFIX)]
        self.sched.reserved.update(dict.fromkeys(ids, _STORED))
        numbered = max([int(i[1:]) for i in ids if i[:1] == "t" and i[1:].isdigit()], default=0)
        self.sched.start_ids_after(numbered)
        clock = self.clock
        self.sched.encode = lambda task, state: encode(task, clock, state)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """See ``Cluster.register``. Stored tasks of a type registered after the
        cluster ran (and recovered the others) come back now."""
        with self.lock:
            if name in self.registry:
                raise ValueError(f"task type {name!r} is already registered")
            self.registry[name] = fn
            rows = self._awaiting.pop(name, None)
        if rows:
            ids = {row.id for row in rows}
            self.unrecovered = [bad for bad in self.unrecovered if bad.id not in ids]
            self._recover_rows(rows, [])

    def recover(self) -> None:
        """Bring the store's tasks back (once, at the first ``run()``): see SPEC §14.

        Running ones were interrupted: retried if their budget allows (the interrupted
        attempt counts), else (or after ``MAX_INTERRUPTS``) failed with
        TaskInterruptedError. Queued, delayed and retrying ones wait again with their
        priority, start time and submission order; cached Results within their TTL and
        dead letters come back. A row that cannot become a task is kept in the file,
        set aside (``unrecovered``) and logged; one of a type not registered yet comes
        back when it is (its id stays taken meanwhile).
        """
        loaded = getattr(self, "_loaded", None)
        if loaded is None:
            return
        self._loaded = None
        self._recover_rows(loaded.rows, list(loaded.bad))

    def _recover_rows(self, rows: list[Row], bad: list[BadRow]) -> None:
        """Make tasks of ``rows`` again (see ``recover``), with the collector paused:
        100k of them made with it on cost three full collections (1.7 s of 2.9 s)."""
        with collector_paused():
            self._recover_rows_unpaused(rows, bad)

    def _recover_rows_unpaused(self, rows: list[Row], bad: list[BadRow]) -> None:
        from ._store import BadRow

        sched = self.sched
        clock = self.clock
        lanes = {name: backend.lane for name, backend in self.backends.items()}
        now = clock.monotonic()
        changes: list[Row | str] = []
        restored: list[Task] = []
        dead: list[DeadRecord] = []
        waiting: list[Row] = []
        terminal = {s.value: s for s in TERMINAL}
        cache: OptionsCache = {}  # the options of each shared part, decoded once
        registry = self.registry
        running_state = TaskState.RUNNING.value
        retrying, pending = TaskState.RETRYING, TaskState.PENDING
        for row in rows:
            doc = row.doc
            kind = doc.get("type")
            if isinstance(kind, str) and kind not in registry:
                waiting.append(row)
                reason = f"task type {kind!r} is not registered (it comes back when it is)"
                bad.append(BadRow(row.id, row.seq, row.state, reason))
                continue
            try:
                if ASYNC not in lanes and doc.get("executor") == ASYNC:
                    lanes[ASYNC] = self._async_lane()
                task = decode_doc(row, registry, clock, lanes, cache)
                backend: Backend = task.lane.backend  # type: ignore[union-attr,assignment]
                if backend.prepares and row.state not in terminal and row.state != "dead":
                    try:
                        backend.prepare(task)  # pickled for a process, as at submit
                    except Exception as exc:
                        raise BadDoc(f"{type(exc).__name__}: {exc}") from None
            except BadDoc as exc:
                bad.append(BadRow(row.id, row.seq, row.state, str(exc)))
                continue
            state = row.state
            if state == "dead":
                task.state = (
                    TaskState.TIMED_OUT
                    if "TaskTimeoutError" in str((row.doc.get("error") or {}).get("type", ""))
                    else TaskState.FAILED
                )
                name = task.opts.name or str(row.doc.get("type"))
                dead.append(DeadRecord(task, task.finished_at or now, name))
            elif state in terminal:
                expires = expires_at(row, clock)
                if expires is None or expires <= now:
                    changes.append(row.id)  # expired while we were away
                    continue
                task.state = terminal[state]
                restored.append(task)
            elif state == running_state:
                self._interrupted(task, now, restored, dead, changes)
            else:
                task.state = retrying if state == "retrying" else pending
                restored.append(task)
        if changes:  # persist, then act: committed before any of them can run
            self.store.write(  # type: ignore[union-attr]
                puts=[c for c in changes if not isinstance(c, str)],
                deletes=[c for c in changes if isinstance(c, str)],
            )
        with self.lock:
            for row in waiting:
                self._awaiting.setdefault(row.doc["type"], []).append(row)
            for record in dead:
                sched.restore_dead(record)
            held = {row.id for row in waiting}
            reserved = sched.reserved
            for row in rows:
                if reserved.get(row.id) is _STORED and row.id not in held:
                    del reserved[row.id]
            running = self.state == RUNNING
            ended = tuple(TERMINAL)  # (compared by identity: no enum __hash__ per task)
            for task in restored:
                sched.restore(task, now)
                if task.state not in ended:
                    self.unsettled += 1
                    sched.submitted += 1  # (accepted anew: the counters balance)
                    if running:  # (a type registered late)
                        task.lane.backend.queued_locked(task, task.state is TaskState.PENDING)  # type: ignore[union-attr]
            if sched.expiry_armed:
                self.arm_expiry_locked()
        self.unrecovered = self.unrecovered + bad
        for problem in bad:
            log.warning(
                "stored task %r could not be recovered and was kept aside in the store: %s",
                problem.id,
                problem.reason,
            )

    def _interrupted(
        self,
        task: Task,
        now: float,
        restored: list[Task],
        dead: list[DeadRecord],
        changes: list[Row | str],
    ) -> None:
        """A task that was running when its process ended."""

        spec: Durable = task.opts.durable  # type: ignore[assignment]
        spec.interrupts += 1
        error = TaskInterruptedError(
            f"task {task.id!r} was running (attempt {task.attempts}) when its process ended"
        )
        decision = None
        if spec.interrupts <= MAX_INTERRUPTS:
            policy = task.opts.retry_policy()
            if policy is not None:
                decision = policy.decide(error, task.opts.counts, self.sched.rng, task_id=task.id)
        opts = task.opts
        opts.last_error = error
        if decision is not None and decision.delay is not None:
            opts.counts = applied(opts.counts, decision, len(opts.rules), reset=False)
            task.state = TaskState.RETRYING
            task._error = error
            task.start = now + decision.delay
            restored.append(task)
            changes.append(self.sched.encode(task, None))  # type: ignore[misc]
            return
        series = opts.series
        repeat = opts.repeat
        if series is not None and repeat is not None and not repeat.stop_on_error:
            # The run ends with this error and the series goes on (SPEC §11).
            rearm = repeat.next_due(
                series.first,
                series.last_due,
                now,
                runs=series.run + 1,
                now_wall=self.clock.to_date,
                from_wall=self.clock.from_date,
            )
            if rearm is not None:
                series.run += 1
                series.last_due = rearm
                opts.counts = None
                task.attempts = 0
                spec.interrupts = 0
                task.start = rearm
                task.state = TaskState.PENDING if rearm <= now else TaskState.DELAYED
                restored.append(task)
                changes.append(self.sched.encode(task, None))  # type: ignore[misc]
                return
        task.state = TaskState.FAILED
        task._error = error
        task.finished_at = now
        spec.recorded = True  # (in the file by the time anyone can look)
        if opts.ttl is not None:
            restored.append(task)  # cached, as any failure
            changes.append(self.sched.encode(task, None))  # type: ignore[misc]
        else:
            changes.append(task.id)  # type: ignore[arg-type]
        if self.sched.dead_limit:
            record = DeadRecord(task, now, opts.name or spec.kind)
            dead.append(record)
            changes.append(self.sched.encode(task, "dead"))  # type: ignore[misc]

    def _start_locked(self) -> None:
        self.state = RUNNING
        for backend in self.backends.values():
            backend.start_locked()

    def stop(self, limit: float | None, cancel_pending: bool) -> None:
        """Graceful shutdown (see ``Cluster.stop``); ``limit`` in real seconds."""
        import time

        deadline = None if limit is None else time.monotonic() + limit
        own = current_runtime() is self
        cancelled: list[Task] = []
        with self.lock:
            state = self.state
            if state == NEW:  # graceful means the queued tasks still run
                self._start_locked()
            if self.state == RUNNING:
                self.state = STOPPING
                # No series starts another run; UNLIMITED retries stop (SPEC §10, §11).
                cancelled = self.sched.stop_series(self.monotonic())
            if cancel_pending and self.state == STOPPING:
                self.sched.retries_allowed = False
                cancelled += self.sched.cancel_all("shutdown", self.monotonic(), False)
            if self.state == STOPPING:
                self._wake_all_locked()
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        if state == TERMINATED:  # stopped, cancelled, or inherited by a forked child
            if not own:
                self._join_or_raise(deadline, limit)
            return
        self.deliver_all(cancelled)
        if own and limit is None:
            return  # a cluster thread cannot wait for itself: the shutdown goes on
        with self.lock:
            while self.unsettled or self._owed_locked():
                if deadline is None:
                    self._settled.wait(MAX_WAIT)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._settled.wait(min(remaining, MAX_WAIT))
            unfinished = self.unsettled
        if unfinished:
            count = self.terminate()
            raise StopTimeoutError(
                f"stop() timed out after {limit}s; {count} unfinished tasks were cancelled"
            )
        self.terminate()
        if not own:  # a cluster thread never joins the others (they may be joining it)
            self._join_or_raise(deadline, limit)

    def _join_or_raise(self, deadline: float | None, limit: float | None) -> None:
        # Idle threads exit within milliseconds of being woken: give them that much
        # past the deadline, so that only a thread stuck in user code counts.
        import time

        if deadline is not None:
            deadline = max(deadline, time.monotonic() + JOIN_GRACE)
        stuck = self.join(deadline)
        if stuck:
            raise StopTimeoutError(
                f"stop() timed out after {limit}s: every task has its Result, but "
                f"{stuck} cluster threads are still inside callbacks; they were abandoned"
            )

    def cancel(self) -> None:
        """Immediate shutdown (see ``Cluster.cancel``)."""
        self.terminate(bounded=True)

    def terminate(self, bounded: bool = False) -> int:
        """Enter the final state, cancelling whatever is not terminal; return that count.

        ``bounded``: give up (and log) if the lock cannot be had within ``LOCK_GIVE_UP``
        seconds, rather than hang (a lock left held by an interrupted thread).
        """
        lock = self.lock
        if bounded:
            if not acquire_bounded(lock, LOCK_GIVE_UP):
                log.error(
                    "cluster lock still held after %.0f s (a thread was interrupted while "
                    "holding it?); giving up on cancelling %r",
                    LOCK_GIVE_UP,
                    self,
                )
                raise ClusterError("the cluster lock is held by a thread that never released it")
        else:
            lock.acquire()
        fresh: list[threading.Thread] = []
        try:
            self.state = TERMINATED
            self.sched.retries_allowed = False
            done = self.sched.cancel_all("shutdown", self.monotonic(), True)
            self.abandon_locked(fresh)
            self._wake_all_locked()
            self.service.wake_locked()
            left = self.leftovers_locked()
        finally:
            lock.release()
        try:
            for thread in fresh:
                thread.start()
        finally:  # (a thread that cannot start: the commit is still waited for)
            if left is not None:
                self.after_lock(left)
        self.deliver_all(done)
        return len(done)

    def join(self, deadline: float | None) -> int:
        """Wait for the cluster's threads (not abandoned ones) until ``deadline``;
        return how many did not exit in time. Then the store, if any, is closed."""
        with self.lock:
            service = self.service.thread
        stuck = join_threads([service] if service is not None else [], deadline)
        for backend in list(self.backends.values()):
            stuck += backend.join(deadline)
        with self.lock:
            runners = self.runners.threads_locked()
        stuck += join_threads(runners, deadline)
        self.close_store()
        return stuck

    def close_store(self) -> None:
        """Once terminated: commit what is left and release the store file."""
        store = self.store
        if store is not None and self.state == TERMINATED:
            store.close()

    def collected(self) -> None:
        """The ``Cluster`` was garbage collected: stop gracefully, without waiting.

        The cyclic collector may call this on any thread at any allocation, also
        one of ours inside a critical section: never block on the lock here.
        """
        if not self.lock.acquire(False):
            threading.Thread(target=self._collected, name="cluster-collected", daemon=True).start()
            return
        self.lock.release()
        self._collected()

    def _collected(self) -> None:
        with self.lock:
            if self.state == NEW:
                if not self.sched.tasks:
                    self.state = TERMINATED  # never run, nothing to do
                    return
                self._start_locked()
            if self.state != RUNNING:
                return
            self.state = STOPPING
            done = self.sched.stop_series(self.monotonic())
            if not self.unsettled - len(done):
                self.state = TERMINATED
            self._wake_all_locked()
            self.service.wake_locked()
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        self.deliver_all(done)

    def _wake_all_locked(self) -> None:
        for backend in self.backends.values():
            backend.stopping_locked()
        self.runners.wake_all_locked()
        if self.room_waiters and self.state >= STOPPING:
            self._room.notify_all()  # blocked submits raise ClusterStoppedError

    def _owed_locked(self) -> bool:
        return any(backend.owed_locked() for backend in self.backends.values())

    def settle_locked(self, count: int) -> None:
        """``count`` tasks have their Result delivered (or nothing to deliver)."""
        self.unsettled -= count
        if not self.unsettled and self.state >= STOPPING:
            self._settled.notify_all()
            self._wake_all_locked()  # idle slots may exit now

    def _clock_jumped(self) -> None:
        """A fake clock moved: every thread that waits for a moment of it looks again."""
        with self.lock:
            for backend in self.backends.values():
                backend.clock_jumped_locked()
            self.service.wake_locked()

    # ------------------------------------------------------------------ submission

    def _submit(self, task: Task) -> None:
        lane = task.lane  # None: the thread pool (the common case)
        if lane is not None:  # (a durable task has one: see Cluster._registered)
            opts = task.opts
            if opts is not DEFAULT_OPTIONS and opts.durable is not None:
                self.submit_many([task])  # committed before it is queued
                return
            backend: Backend = lane.backend  # type: ignore[assignment]
            if backend.prepares:
                backend.prepare(task)  # outside the lock: may pickle, may raise
            if backend is self.pool:
                lane = None
        lock = self.lock
        if not lock.acquire(False):
            acquire_contended(lock)
        try:
            state = self.state
            if state >= STOPPING:
                raise ClusterStoppedError("the cluster is stopped; submit() is refused")
            if self.max_pending is not None:
                self._wait_for_room_locked()
                state = self.state  # (the wait released the lock)
            sched = self.sched
            monotonic = self.monotonic  # (loaded, then called: a slot is not a method)
            ready = sched.submit(task, monotonic())
            self.unsettled += 1
            if state == RUNNING:
                if lane is None:
                    # The thread pool's queued_locked, inlined: once per task.
                    pool = self.pool
                    if ready:
                        if pool._idle:
                            slot = pool._idle.pop()
                            slot.idle = False
                            slot.wake.put(None)
                    elif task.start < pool._timer_target:  # type: ignore[operator]
                        pool._wake_timekeeper_locked()
                else:
                    lane.backend.queued_locked(task, ready)  # type: ignore[attr-defined]
            # A purge of expired results left something to free (and, for a durable
            # one, its row's delete in the journal: never without the former)?
            if not sched.graveyard:
                return  # (the common case; the lock is released on the way out)
            left = self.leftovers_locked()
        finally:
            lock.release()
        if left is not None:
            self.after_lock(left)

    def submit_many(self, tasks: list[Task]) -> None:
        """Accept ``tasks`` all or none (``Cluster.submit_all``; a durable submit).

        Phase one, under the lock: every id and submission order is reserved (a
        refused one refuses them all) and the durable rows are handed to the store.
        Then, outside it, the commit (one transaction for the batch) is waited for; a
        failed commit undoes the reservations. Phase two, under the lock: the tasks
        are queued. A task whose row is committed is queued even if a stop began in
        between (the stop carries it to its Result, or cancels it).

        A large batch on a cluster with a store is submitted with the collector
        paused (``collector_paused``): its tasks, rows and handles, all long-lived,
        would otherwise be walked by young collections again and again (a quarter of
        a 10k ``submit_all``), and then promoted anyway. Not with ``max_pending``: the
        wait for room may be long, and the collector must not stay off meanwhile.
        """
        if self.store is not None and len(tasks) >= _PAUSED_BATCH and self.max_pending is None:
            with collector_paused():
                self._submit_many(tasks)
        else:
            self._submit_many(tasks)

    def _submit_many(self, tasks: list[Task]) -> None:
        for task in tasks:
            lane = task.lane
            if lane is not None:
                backend: Backend = lane.backend  # type: ignore[assignment]
                if backend.prepares:
                    backend.prepare(task)
        given = [task.id for task in tasks]  # None: generated by reserve (undone on failure)

        def undo() -> None:
            for task, tid in zip(tasks, given, strict=True):
                task.id = tid

        with self.lock:
            if self.state >= STOPPING:
                raise ClusterStoppedError("the cluster is stopped; submit() is refused")
            if self.max_pending is not None:
                self._wait_for_room_locked(len(tasks))
            left = self._reserve_locked(tasks, undo)
        self._commit_then_queue(tasks, left, undo)

    def _reserve_locked(self, tasks: list[Task], undo: Callable[[], None]) -> Leftovers | None:
        """Phase one (see ``submit_many``): ids and order taken, durable rows enqueued."""
        sched = self.sched
        now = self.monotonic()
        try:
            for task in tasks:
                sched.reserve(task, now)
        except BaseException:
            self._unreserve_locked(tasks)
            undo()
            raise
        if sched.encode is not None:
            durable = [task for task in tasks if task.opts.durable is not None]
            for task in durable:
                if task.start is None:
                    task.start = now
                if task.start > now:
                    task.state = TaskState.DELAYED
            if durable:  # their rows, encoded in one pass (as sched._journal would)
                sched.journal.extend(encode_submitted(durable, self.clock))
        return self.leftovers_locked()

    def _unreserve_locked(self, tasks: list[Task]) -> None:
        for task in tasks:
            self.sched.unreserve(task)
            task.state = TaskState.PENDING

    def _commit_then_queue(
        self, tasks: list[Task], left: Leftovers | None, undo: Callable[[], None]
    ) -> None:
        """Phase two (see ``submit_many``): once committed, the tasks are queued."""
        sched = self.sched
        try:
            if left is not None:
                self.after_lock(left, raising=True)
        except BaseException:
            with self.lock:
                self._unreserve_locked(tasks)
                undo()
            raise
        with self.lock:
            now = self.monotonic()
            for task in tasks:
                task.state = TaskState.PENDING
                ready = sched.submit(task, now)
                self.unsettled += 1
                if self.state == RUNNING:
                    task.lane.backend.queued_locked(task, ready)  # type: ignore[union-attr]
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)

    def _wait_for_room_locked(self, n: int = 1) -> None:
        """max_pending: block (or raise QueueFullError) while the cluster is full."""
        limit: int = self.max_pending  # type: ignore[assignment]
        while self.sched.pending() + n > max(limit, n):
            if self.reject:
                raise QueueFullError(
                    f"{limit} tasks wait to start (max_pending); submit() is refused"
                )
            self.room_waiters += 1
            try:
                self._room.wait(MAX_WAIT)
            finally:
                self.room_waiters -= 1
            if self.state >= STOPPING:
                raise ClusterStoppedError("the cluster stopped while submit() waited for room")

    def room_locked(self) -> None:
        """A task started or left the queue: a blocked submit may go on."""
        self._room.notify()

    def wake_lanes_locked(self) -> None:
        """Lanes that got tasks back from a gate (``Scheduler.woken``): wake their
        executors."""
        sched = self.sched
        woken = sched.woken
        if self.state in (RUNNING, STOPPING):  # a graceful stop runs them too
            for lane in woken:
                lane.backend.wake_locked()  # type: ignore[attr-defined]
        woken.clear()
        if sched.gate_armed:  # a task waits for a token: the service thread keeps time
            sched.gate_armed = False
            when = sched.next_gate_timer()
            if when is not None:
                self.service.arm_locked(when)

    # ------------------------------------------------------------------ queries and control

    def subscribe(self, task_id: str) -> SimpleQueue[Result[Any]]:
        """See ``Cluster.subscribe``."""
        return self._subscribe_to(None, task_id)

    def _subscribe(self, task: Task) -> SimpleQueue[Result[Any]]:
        return self._subscribe_to(task, "")

    def _subscribe_to(self, task: Task | None, task_id: str) -> SimpleQueue[Result[Any]]:
        queue: SimpleQueue[Result[Any]] = SimpleQueue()
        lock = self.lock
        if not lock.acquire(False):
            acquire_contended(lock)
        try:
            if task is None:
                monotonic = self.monotonic  # (as in _submit)
                task = self.sched.lookup(task_id, monotonic())
            if task.state not in TERMINAL:
                sinks = task.sinks
                if sinks is None:
                    task.sinks = [queue]
                else:
                    sinks.append(queue)
                return queue
            if not ended(task):
                self._add_sink_locked(task, queue)
                return queue
            left = self.leftovers_locked()
        finally:
            lock.release()
        if left is not None:
            self.after_lock(left)
        queue.put(task.result())  # terminal: the Result no longer changes
        return queue

    def cancel_task(self, task_id: str) -> bool:
        """See ``Cluster.cancel_task``."""
        try:
            # A lock-free read (atomic dict access) is enough to find a live task: only
            # terminal ones are purged, and _cancel re-checks the state under the lock.
            task = self.sched.tasks.get(task_id)
        except TypeError:  # unhashable: lookup() names the error
            task = None
        if task is None or task.state in TERMINAL:
            with self.lock:
                task = self.sched.lookup(task_id, self.monotonic())  # or TaskNotFoundError
                left = self.leftovers_locked()
            if left is not None:
                self.after_lock(left)
        return self._cancel(task)

    def _cancel(self, task: Task) -> bool:
        """Cancel ``task`` in one critical section; deliver its Result if anyone listens."""
        lock = self.lock
        if not lock.acquire(False):
            acquire_contended(lock)
        try:
            sched = self.sched
            monotonic = self.monotonic  # (as in _submit)
            if not sched.cancel(task, "cancelled", monotonic()):
                return False
            if sched.abandoned:  # it was running: its slot is stuck in it
                self.abandon_locked(None)
            opts = task.opts
            if opts is DEFAULT_OPTIONS:  # a plain task: no key to free, no callbacks
                quiet = task.sinks is None
            else:
                quiet = task.sinks is None and opts.on_complete is None and opts.on_failure is None
                if sched.woken:  # its key let others in
                    self.wake_lanes_locked()
            if self.room_waiters:
                self._room.notify()
            if quiet:
                self.unsettled -= 1  # nothing to deliver: settled already
                if not self.unsettled:
                    self.settle_locked(0)
            left = self.leftovers_locked() if sched.graveyard or sched.journal else None
        finally:
            lock.release()
        if left is not None:
            self.after_lock(left)
        if quiet:  # Task.release, inlined: a cancel is often one of thousands
            task.fn = None
            task.args = ()
            task.kwargs = _NO_KWARGS
        else:
            self.deliver_all([task])
        return True

    def info(self, task_id: str) -> TaskInfo:
        """See ``Cluster.info``."""
        with self.lock:
            task = self.sched.lookup(task_id, self.monotonic())
            info = self._info_locked(task)
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        return info

    def _info_locked(self, task: Task) -> TaskInfo:
        to_date = self.clock.to_date
        state = task.state
        opts = task.opts
        series = opts.series
        if opts is not DEFAULT_OPTIONS:
            last_error = opts.last_error
        else:
            last_error = task.error if state in (TaskState.FAILED, TaskState.TIMED_OUT) else None
        started = 1 if task.attempts else 0
        waiting = state is TaskState.DELAYED or state is TaskState.PENDING
        return TaskInfo(
            id=task.id,  # type: ignore[arg-type]
            state=state,
            priority=task.priority,
            attempts=task.attempts,
            submitted_at=to_date(task.submitted_at),
            started_at=None if task.started_at is None else to_date(task.started_at),
            finished_at=None if task.finished_at is None else to_date(task.finished_at),
            error=task.error,
            progress=task.progress,
            start_at=to_date(task.start),  # type: ignore[arg-type]
            retries=opts.retries,
            value=task.value,
            last_error=last_error,
            next_attempt_at=to_date(task.start) if state is TaskState.RETRYING else None,  # type: ignore[arg-type]
            runs=started if series is None else series.run + started,
            next_run_at=to_date(task.start) if series is not None and waiting else None,  # type: ignore[arg-type]
            name=opts.name or fn_name(task.fn),
            tags=opts.tags,
            key=opts.key,
        )

    def stats(self) -> ClusterStats:
        """See ``Cluster.stats``."""
        with self.lock:
            s = self.sched
            executors = {
                name: ExecutorStats(
                    capacity=backend.capacity,
                    running=backend.lane.running,
                    queued=backend.lane.queued,
                )
                for name, backend in self.backends.items()
            }
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
                workers=self.pool.alive_locked(),
                abandoned=self.abandoned_threads,
                executors=executors,
                waiting=s.parked
                + sum(b.waiting_locked(self.monotonic()) for b in self.backends.values()),
                dead_letters=len(s.dead),
                dead_letters_evicted=s.dead_evicted,
            )

    def __repr__(self) -> str:
        state = ("new", "running", "stopping", "stopped")[self.state]
        return f"<cluster runtime {state} live={self.sched.live}>"

    # ------------------------------------------------------------------ observers

    def observe(self, observer: Observer) -> None:
        """See ``Cluster.observe``."""
        with self.lock:
            if observer not in self.observers:
                self.observers = (*self.observers, observer)

    def unobserve(self, observer: Observer) -> None:
        """See ``Cluster.unobserve``."""
        with self.lock:
            self.observers = tuple(o for o in self.observers if o is not observer)

    def report_attempt(self, task: Task, ended: float, error: BaseException | None) -> None:
        """Tell the observers an attempt of ``task`` ended (on its thread, no lock held)."""
        started = task.started_at or ended
        due: float = task.start if task.start is not None else started
        name = task.opts.name or fn_name(task.fn)
        executor = task.lane.name if task.lane is not None else THREADS
        waited = max(0.0, started - due)
        ran = max(0.0, ended - started)
        for observer in self.observers:
            try:
                observer.attempt_ended(name, executor, waited, ran, error)
            except Exception:
                log.exception("observer %r raised", observer)

    # ------------------------------------------------------------------ keys, listing (§12)

    def limit(self, key: str, concurrency: int, rate: float | None, burst: int) -> None:
        """See ``Cluster.limit``."""
        with self.lock:
            self.sched.limit(key, concurrency, rate, burst, self.monotonic())
            self.wake_lanes_locked()

    def tasks(
        self,
        states: frozenset[TaskState] | None,
        name: str | None,
        tag: str | None,
        key: str | None,
        limit: int,
        offset: int,
    ) -> tuple[int, list[TaskInfo]]:
        """(total, a page of TaskInfo), newest submission first (see ``Cluster.tasks``)."""
        self._index_in_bulk()
        with self.lock:
            while self.sched.listing.building:  # another reader indexes: it will not be long
                self._listed.wait(MAX_WAIT)
            now = self.monotonic()
            if self.sched.next_expiry() is not None and self.sched.next_expiry() <= now:  # type: ignore[operator]
                self.sched.purge(now)  # an expired cached result is not listed
            listing = self.sched.catch_up_listing()
            accept = None
            if states is not None:
                dead_state = {TaskState.FAILED, TaskState.TIMED_OUT} & states

                def accept(entry: Entry) -> bool:
                    item = entry.item
                    if type(item) is DeadRecord:
                        return bool(dead_state) and item.error_state in states
                    return item.state in states

            total, entries = listing.page(
                name=name, tag=tag, key=key, accept=accept, limit=limit, offset=offset
            )
            page = [self._entry_info_locked(e) for e in entries]
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        return total, page

    def _index_in_bulk(self) -> None:
        """The first listing of a big cluster: index its tasks outside the lock (a
        million take seconds, and nothing could start or be submitted meanwhile)."""
        with self.lock:
            taken = self.sched.listing_snapshot(LIST_BULK)
        if taken is None:
            return
        snapshot, since, generation = taken
        part = None
        try:
            part = index_snapshot(snapshot, since)
        finally:
            del snapshot
            with self.lock:
                if part is None:  # (a MemoryError, say): start afresh at the next read
                    self.sched.listing.reset()
                    self.sched.listing.building = False
                else:
                    self.sched.install_listing(part, since, generation)
                self._listed.notify_all()

    def _entry_info_locked(self, entry: Entry) -> TaskInfo:
        item = entry.item
        if type(item) is not DeadRecord:
            return self._info_locked(item)
        to_date = self.clock.to_date
        return TaskInfo(
            id=item.id,
            state=item.error_state,
            priority=item.priority,
            attempts=item.attempts,
            submitted_at=to_date(item.submitted_at),
            started_at=None,
            finished_at=to_date(item.failed_at),
            error=item.error,
            progress=None,
            start_at=to_date(item.failed_at),
            retries=item.opts.retries,
            last_error=item.error,
            runs=1,
            name=item.name,
            tags=item.tags,
            key=item.key,
        )

    def reprioritize(self, task_id: str, priority: int) -> bool:
        """See ``Cluster.reprioritize``."""
        with self.lock:
            task = self.sched.lookup(task_id, self.monotonic())
            done = self.sched.reprioritize(task, priority, self.monotonic())
            self.wake_lanes_locked()
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        return done

    def reschedule(self, task_id: str, start: float) -> bool:
        """See ``Cluster.reschedule``."""
        with self.lock:
            task = self.sched.lookup(task_id, self.monotonic())
            done = self.sched.reschedule(task, start, self.monotonic())
            if done and self.state == RUNNING and task.state is TaskState.DELAYED:
                task.lane.backend.queued_locked(task, False)  # type: ignore[union-attr]
            self.wake_lanes_locked()
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        return done

    # ------------------------------------------------------------------ dead letters (§13)

    def dead_letters(self, name: str | None, limit: int, offset: int) -> list[DeadLetter]:
        """See ``Cluster.dead_letters``: newest first."""
        with self.lock:
            records = list(reversed(self.sched.dead.values()))
        if name is not None:
            records = [r for r in records if r.name == name]
        page = records[offset : offset + limit]
        to_date = self.clock.to_date
        out = []
        for r in page:
            if r.text is None:  # formatted here, outside the lock (it runs __str__s)
                r.text = error_text(r.error)
            out.append(
                DeadLetter(
                    id=r.id,
                    name=r.name,
                    tags=r.tags,
                    error=r.error,
                    error_text=r.text,
                    attempts=r.attempts,
                    submitted_at=to_date(r.submitted_at),
                    failed_at=to_date(r.failed_at),
                )
            )
        return out

    def dead_letter_count(self, name: str | None) -> int:
        """How many dead letters (of ``name``) there are."""
        with self.lock:
            if name is None:
                return len(self.sched.dead)
            return sum(1 for r in self.sched.dead.values() if r.name == name)

    def resurrect(self, task_ids: tuple[str, ...]) -> list[Task]:
        """See ``Cluster.resurrect``: all or none. Returns the new tasks."""
        fresh: list[Task] = []
        for tid in task_ids:
            if not isinstance(tid, str):
                raise TypeError(f"task ids must be str, got {type(tid).__name__}")
        with self.lock:
            sched = self.sched
            if self.state >= STOPPING:
                raise ClusterStoppedError("the cluster is stopped; resurrect() is refused")
            now = self.monotonic()
            if sched.next_expiry() is not None and sched.next_expiry() <= now:  # type: ignore[operator]
                sched.purge(now)  # an id whose cached result expired is free again
            records = []
            for tid in task_ids:
                record = sched.dead.get(tid)
                if record is None:
                    raise TaskNotFoundError(f"no dead letter with id {tid!r}")
                if tid in sched.tasks or tid in sched.reserved:
                    raise DuplicateTaskError(
                        f"task id {tid!r} is taken again (queued, running or cached); "
                        "its dead letter cannot be resurrected while it is"
                    )
                records.append(record)
            if len(set(task_ids)) != len(task_ids):
                raise ValueError("resurrect() got the same id twice")
            if self.max_pending is not None:
                self._wait_for_room_locked(len(records))
                for record in records:  # (a stop or a cancel may have come meanwhile)
                    if sched.dead.get(record.id) is not record or record.id in sched.tasks:
                        raise TaskNotFoundError(f"dead letter {record.id!r} is gone")
            now = self.monotonic()
            for record in records:
                task = Task(record.fn, record.args, record.kwargs)  # type: ignore[arg-type]
                task.id = record.id
                task.priority = record.priority
                task.lane = record.lane
                task.opts = (
                    record.opts.copy() if record.opts is not DEFAULT_OPTIONS else record.opts
                )
                opts = task.opts
                if record.opts.durable is not None:
                    opts.durable = record.opts.durable.again()  # durable again
                task.start = now
                if opts.repeat is not None:
                    first = opts.repeat.first_due(
                        now, now_wall=self.clock.to_date, from_wall=self.clock.from_date
                    )
                    task.start = now if first is None else first
                    opts.series = Series(task.start)
                fresh.append(task)

            def undo() -> None:  # the commit failed: the dead letters stay
                for record in records:
                    if sched.dead.get(record.id) is None:
                        sched.restore_dead(record)

            for record in records:
                sched.take_dead(record.id)  # its row goes in the commit of the new one
            left = self._reserve_locked(fresh, undo)  # (cannot fail: the ids are free)
        # Persist, then queue: a crash before the commit leaves the dead letters.
        self._commit_then_queue(fresh, left, undo)
        return fresh

    def clear_dead_letters(self, task_ids: tuple[str, ...]) -> int:
        """See ``Cluster.clear_dead_letters``."""
        with self.lock:
            count = self.sched.clear_dead(task_ids)
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)
        return count

    def stats_by_name(self) -> dict[str, NameStats]:
        """See ``Cluster.stats_by_name``."""
        with self.lock:
            sched = self.sched
            counts = {name: c.values() for name, c in sched.by_name.items()}
            active: dict[str, int] = {}
            for task in sched.tasks.values():
                if task.state not in TERMINAL:
                    name = task.opts.name or fn_name(task.fn)
                    active[name] = active.get(name, 0) + 1
            dead: dict[str, int] = {}
            for record in sched.dead.values():
                dead[record.name] = dead.get(record.name, 0) + 1
        out = {}
        for name in sorted({*counts, *active, *dead}):
            s_, f_, c_, t_ = counts.get(name, (0, 0, 0, 0))
            out[name] = NameStats(
                active=active.get(name, 0),
                dead=dead.get(name, 0),
                succeeded=s_,
                failed=f_,
                cancelled=c_,
                timed_out=t_,
            )
        return out

    # ------------------------------------------------------------------ handle support

    def _wait(self, task: Task, timeout: float | None) -> Result[Any] | None:
        if task.state not in TERMINAL or not ended(task):
            with self.lock:
                if task.state in TERMINAL:
                    if not self._await_recorded_locked(task, timeout):
                        return None
                    return task.result()
                # One shared event per task, so that polling wait(0.01) adds nothing.
                for sink in task.sinks or ():
                    if isinstance(sink, Signal):
                        break
                else:
                    sink = Signal()
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

        with self.lock:
            terminal = ended(task)
            if not terminal:
                self._add_sink_locked(task, settle)
        if terminal:
            settle(task.result())
        future.add_done_callback(lambda f: self._cancel(task) if f.cancelled() else None)
        return future

    def _results(self, task: Task, timeout: float | None) -> Iterator[Result[Any]]:
        sink = SeriesSink()
        with self.lock:  # subscribed now, at the call: no run that ends later is missed
            terminal = ended(task)
            if not terminal:
                self._add_sink_locked(task, sink)
        if terminal:
            return iter((task.result(),))
        return _series_results(task, sink, timeout)

    def _await_recorded_locked(self, task: Task, timeout: float | None) -> bool:
        """A terminal durable task whose end is not yet committed: wait until it is
        (persist, then deliver: a Result is never seen before it is durable); False
        if ``timeout`` passed first."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not ended(task):
            wait = MAX_WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            self._record_waiters += 1
            try:
                self._recorded.wait(wait)
            finally:
                self._record_waiters -= 1
        return True

    def _add_sink_locked(self, task: Task, sink: Sink) -> None:
        if task.state in TERMINAL:
            # Ended, its end not yet committed (else the caller would not add one):
            # served by the thread that sees the commit (after_lock), not by the
            # one that ended the task (it may have looked at task.sinks already).
            self._late.setdefault(task, []).append(sink)
        elif task.sinks is None:
            task.sinks = [sink]
        else:
            task.sinks.append(sink)

    # ------------------------------------------------------------------ abandonment, timeouts

    def abandon_locked(self, fresh: list[threading.Thread] | None) -> None:
        """Hand each slot stuck in a detached attempt (``Scheduler.abandoned``) to its
        backend, which replaces or kills it."""
        abandoned = self.sched.abandoned
        for slot in abandoned:
            backend = getattr(slot, "backend", None)
            if backend is not None:
                backend.abandon_locked(slot, fresh)
        abandoned.clear()

    def arm_service_locked(self, when: float) -> None:
        """Something is due at ``when`` (an attempt's deadline, a runner check)."""
        self.service.arm_locked(when)

    def arm_expiry_locked(self) -> None:
        """The first cached result now waits for its purge: the service thread keeps time."""
        self.sched.expiry_armed = False
        when = self.sched.next_expiry()
        if when is not None:
            self.service.arm_locked(when)

    def settle_timeout(self, ctx: TaskContext) -> None:
        """A runner job: decide the retry of an attempt that timed out, then settle it."""
        task = ctx._task
        if task is None:
            return
        error = TaskTimeoutError(
            f"task {task.id!r} attempt {ctx.attempt} timed out after {task.opts.timeout}s"
        )
        sched = self.sched
        # User code (retry predicate, backoff): no lock held.
        decision, rearm = plan(
            task, ctx, error, sched.rng, not sched.runs_allowed, self.monotonic(), self.clock
        )
        run_ended = None
        with self.lock:
            code = sched.fail_detached(ctx, error, decision, self.monotonic(), rearm)
            if code in (REQUEUED, RUN_ENDED):
                if code == RUN_ENDED:
                    run_ended = self.deliver_run_locked(task)
                if self.state == RUNNING:
                    task.lane.backend.queued_locked(task, task.state is TaskState.PENDING)  # type: ignore[union-attr]
            elif code == DONE and sched.expiry_armed:
                self.arm_expiry_locked()
            if sched.woken:
                self.wake_lanes_locked()
            left = self.leftovers_locked()
        if left is not None:
            self.after_lock(left)  # persist, then deliver
        if code == DONE:
            deliver_sinks(task)
            with self.lock:
                self.settle_locked(1)
            run_callbacks(task)
            self.seal_dead(task)
            task.release()
        elif run_ended is not None:
            run_callbacks(task, run_ended)

    # ------------------------------------------------------------------ delivery

    def deliver(self, task: Task, slot: Slot) -> None:
        """A slot delivers the task it ended: sinks, then its callbacks inline."""
        if task.sinks is not None:
            deliver_sinks(task)
            # Clear owed before reading the state: see stop(). Only the last owed
            # slot of a stop needs to wake it: while tasks are unsettled, the last
            # settle does (stop() never sees unsettled grow again).
            slot.owed = False
            if self.state >= STOPPING and not self.unsettled:
                with self.lock:
                    self._settled.notify_all()
        try:
            opts = task.opts  # has_callbacks(task), inlined
            if opts.on_complete is not None or opts.on_failure is not None:
                run_callbacks(task)
        finally:
            slot.calling = False  # set under the lock by the slot when it settled the task

    # ------------------------------------------------------------------ idleness

    def wait_idle(self, timeout: float | None) -> bool:
        """See ``Cluster.wait_idle``: False if ``timeout`` (real seconds) passed first."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        pause = IDLE_POLL_MIN
        with self.lock:
            while self._busy_locked():
                wait = pause
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                # Looked at again and again (50 µs, doubling to 5 ms) rather than
                # notified on every transition: only a waiting test pays for it.
                self._settled.wait(wait)
                pause = min(pause * 2, IDLE_POLL_MAX)
            return True

    def _busy_locked(self) -> bool:
        """Is anything running, due, being settled or delivered, or calling back?"""
        sched = self.sched
        now = self.monotonic()
        if sched.parked:  # waiting only for a key or its rate: still work to do (SPEC §12)
            return True
        for lane in sched.lanes:
            if lane.running or lane.queued:
                return True
            due = sched.next_due(lane)
            if due is not None and due <= now:
                return True
        for backend in self.backends.values():
            if backend.owed_locked() or backend.busy_locked(now):
                return True
        return self.runners.busy_locked()

    def deliver_run_locked(self, task: Task) -> Result[Any] | None:
        """A run of a repeating task ended (RUN_ENDED): hand its Result to the subscriber
        queues now, under the lock (a queue's put runs no user code, and the next run
        cannot start before the lock is released, so runs reach each queue in order).
        Returns the Result if the task has callbacks to run with it, outside the lock."""
        result: Result[Any] = self.sched.run_result  # type: ignore[assignment]
        self.sched.run_result = None
        if task.sinks is not None:
            opts = task.opts
            if opts.durable is not None and self.sched.encode is not None:
                # Persist, then deliver: queued until the run's end is committed (its
                # commit is enqueued by this critical section's leftovers_locked).
                self._outbox.append([None, task, result])
            else:
                _put_run(task, result)
        return result if has_callbacks(task) else None

    def deliver_all(self, tasks: list[Task]) -> None:
        """Deliver tasks ended by a thread that must not run callbacks (the caller of
        cancel, a shutdown): sinks here, callbacks on a runner; then settle them."""
        if not tasks:
            return
        for task in tasks:
            deliver_sinks(task)
        with self.lock:
            for task in tasks:
                if has_callbacks(task):
                    self.runners.submit_locked(self.callbacks_then_release, task, None)
            self.settle_locked(len(tasks))
            if self.sched.woken:
                self.wake_lanes_locked()
        for task in tasks:
            if not has_callbacks(task):
                self.seal_dead(task)
                task.release()

    def seal_dead(self, task: Task) -> None:
        """``task``'s Result is delivered (outside every lock). If it is a dead letter,
        its traceback text is formatted now, once, for ``dead_letters()``, and its
        frames' locals go (SPEC §13 keeps the text, not the locals)."""
        state = task.state
        if state is not TaskState.FAILED and state is not TaskState.TIMED_OUT:
            return
        error = task.error
        record = self.sched.dead.get(task.id)  # type: ignore[arg-type]  # (a dict read)
        if record is not None and record.error is error and record.text is None:
            record.text = error_text(error)
        clear_frames(error)

    def callbacks_then_release(self, task: Task) -> None:
        """On a callback runner: ``task``'s callbacks, then its dead letter sealed and its
        work released (every executor hands a task with callbacks over this way)."""
        run_callbacks(task)
        self.seal_dead(task)
        task.release()

    def leftovers_locked(self) -> Leftovers | None:
        """What a critical section leaves to do once the lock is released: the objects
        the scheduler dropped (to free), and the rows of durable transitions (handed to
        the store here, under the lock, so that they reach it in transition order; to
        wait for, before anything is delivered or run). None: nothing."""
        sched = self.sched
        dead = sched.graveyard
        journal = sched.journal
        if not dead and not journal:
            return None
        if dead:
            sched.graveyard = []
        ticket = None
        settled = None
        if journal:
            sched.journal = []
            store = self.store
            try:
                ticket = store.enqueue(journal)  # type: ignore[union-attr]
            except RuntimeError:  # closed (after a bounded stop, say): nothing to record
                log.error("the store is closed; %d task changes were not recorded", len(journal))
            if sched.settling:
                settled = sched.settling
                sched.settling = []
            if self._outbox:
                for entry in self._outbox:
                    if entry[0] is None:
                        entry[0] = ticket or _DONE  # the run ends this commit holds
        return Leftovers(dead or None, ticket, settled)

    def after_lock(self, left: Leftovers, *, raising: bool = False) -> None:
        """Outside the lock: wait until the store has the transitions (persist, then
        deliver), then free what was dropped. A failed commit is logged (the work goes
        on: at worst a restart repeats it), or raised with ``raising`` (a submit)."""
        try:
            if left.ticket is not None:
                try:
                    self.store.wait(left.ticket)  # type: ignore[union-attr]
                except StoreWriteError:
                    if raising:
                        raise
                    log.exception("the store could not record a task's progress")
            if left.settled is not None or self._outbox:
                late = None
                with self.lock:  # (under it: see _wait, _add_sink_locked)
                    if left.settled is not None:
                        _recorded(left.settled)
                        if self._record_waiters:
                            self._recorded.notify_all()
                        if self._late:
                            late = [
                                (task, self._late.pop(task))
                                for task in left.settled
                                if task in self._late
                            ]
                    self._flush_outbox_locked()
                for task, sinks in late or ():
                    deliver_sinks(task, sinks)
        finally:
            if left.dead:
                self.bury(left.dead)

    def _flush_outbox_locked(self) -> None:
        """Hand the Results of durable runs whose ends are committed to their queues,
        in the order the runs ended (see ``deliver_run_locked``)."""
        outbox = self._outbox
        while outbox:
            ticket, task, result = outbox[0]
            if ticket is None or not (ticket is _DONE or SQLiteStore.settled(ticket)):
                return  # not yet committed: the thread that waits for it flushes it
            outbox.popleft()
            _put_run(task, result)

    def bury(self, dead: list[object]) -> None:
        """Free what the scheduler dropped under the lock (the lock is not held here)."""
        for item in dead:
            if type(item) is Task:
                if item.fn is not None and item.state in TERMINAL:  # (not yet released)
                    item.release()
            elif type(item) is DeadRecord and item.evicted:
                log.warning(
                    "dead letter %r (%s) was evicted: more than %d dead letters",
                    item.id,
                    item.name,
                    self.sched.dead_limit,
                )
        dead.clear()

    # ------------------------------------------------------------------ process events

    def at_exit(self) -> None:
        """Interpreter exit: cancel what is left; give the cancellation callbacks a moment."""
        import time

        if not acquire_bounded(self.lock, 1.0):
            log.error("cluster lock held at exit; %r left as it is", self)
            return
        try:
            terminated = self.state == TERMINATED
        finally:
            self.lock.release()
        if not terminated:
            try:
                self.terminate(bounded=True)
            except ClusterError:
                return
        deadline = time.monotonic() + 5.0  # the callbacks of the cancellation, within reason
        with self.lock:
            runners = self.runners.threads_locked()
        join_threads(runners, deadline)
        try:
            self.close_store()
        except Exception:  # never let a store keep the interpreter from exiting
            log.exception("closing the store of %r at exit failed", self)

    def reset_in_child(self) -> None:
        """After fork: the child has none of our threads; leave a stopped, unlocked cluster
        whose inherited unfinished tasks read as cancelled (they can never finish here)."""
        self.lock = threading.Lock()
        self._settled = threading.Condition(self.lock)
        self._recorded = threading.Condition(self.lock)
        self._record_waiters = 0
        self._listed = threading.Condition(self.lock)
        if self.sched.listing.building:  # a reader of the parent's was building it
            self.sched.listing.reset()
            self.sched.listing.building = False
        self.state = TERMINATED
        self.unsettled = 0  # the parent delivers these; the child never will
        self.runners.reset_in_child(self.lock)
        self.service.reset_in_child(self.lock)
        for backend in self.backends.values():
            backend.reset_in_child()
        now = self.monotonic()
        sched = self.sched
        sched.encode = None  # the store belongs to the parent: the child records nothing
        sched.journal = []
        for task in list(sched.tasks.values()):
            if task.state not in TERMINAL:
                ctx = task.ctx
                if ctx is not None:
                    ctx._task = None
                    task.ctx = None
                # Only the state, the Result and the counters: no sink or callback is
                # served in the child (they belong to the parent, and locks inherited
                # from the parent's other threads may be held forever here).
                sched._finalize(task, _task.TaskState.CANCELLED, None, "fork", now)
        for lane in sched.lanes:
            lane.queued = lane.delayed = lane.running = 0
        sched.abandoned.clear()
        sched.graveyard = []


def _put_run(task: Task, result: Result[Any]) -> None:
    """A run's Result into the task's queues (no user code runs)."""
    for sink in task.sinks or ():
        if type(sink) is SimpleQueue:
            sink.put(result)
        elif type(sink) is SeriesSink:
            sink.queue.put((result, False))


def _recorded(tasks: list[Task]) -> None:
    for task in tasks:
        task.opts.durable.recorded = True  # type: ignore[union-attr]


#: An outbox entry's ticket when nothing needed committing (the store was closed).
_DONE: Any = object()


def _series_results(task: Task, sink: SeriesSink, timeout: float | None) -> Iterator[Result[Any]]:
    while True:
        try:
            result, last = sink.queue.get(timeout=timeout)
        except Empty:
            raise TimeoutError(f"no Result of task {task.id!r} within {timeout}s") from None
        yield result
        if last:
            return


def _shutdown_all() -> None:
    """At interpreter exit: cancel what every unstopped cluster still holds."""
    for rt in list(_LIVE):
        try:
            rt.at_exit()
        except Exception:  # never let one cluster keep the others from shutting down
            log.exception("shutting down %r at exit failed", rt)


def _after_fork_in_child() -> None:
    _task.reset_after_fork()
    for rt in list(_LIVE):
        rt.reset_in_child()


# threading's exit hook runs before atexit hooks and before daemon threads are
# frozen, so a submit() from any atexit hook already sees a stopped cluster.
try:
    threading._register_atexit(_shutdown_all)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - other interpreters
    import atexit

    atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def error_text(error: BaseException) -> str:
    """A dead letter's ``error_text``: its formatted traceback (user ``__str__`` runs:
    never under a lock)."""
    if isinstance(error, StoredError) and error.text:
        return error.text  # read back after a restart: the original traceback
    return "".join(traceback.format_exception(error))
