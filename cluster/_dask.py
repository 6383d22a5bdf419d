"""``DaskExecutor``: attempts run on a ``dask.distributed`` cluster, scheduled by ours.

A push backend (like the event loop's, ``_asyncio``): one dispatcher thread of
ours takes due tasks from the lane, at most ``slots`` attempts on Dask at once, and
hands each to Dask as ``client.submit(run_attempt, call, fn, args, kwargs,
key=..., priority=..., pure=False)``. The cluster keeps everything that decides
*what* runs *when*: start times, §4's order among due tasks (Dask only ever sees the
next ``slots`` of them, each with its priority), keys and rates, retries, backoff,
timeouts, callbacks, subscribers. Dask only runs attempts:

* every attempt has its own key (``<name>-<n>-<token>-<id>~<attempt>``: unique per
  executor, so a retry or a reused id never meets a key Dask still knows, and
  Dask's dashboard groups them by the task's name), and ``pure=False``;
* ``run_attempt`` (on the Dask worker) never lets the task's exception reach Dask:
  it returns it, so Dask neither retries it (it would, at once, on any error) nor
  logs it; our scheduler decides.

How an attempt's outcome comes back. When the Dask worker runs in this process
(``LocalCluster(processes=False)``), ``run_attempt`` finds the attempt's own
``TaskContext`` (``current()`` is then the real one: ``cancelled`` is set on
timeout and cancel, ``progress`` and ``reset_backoff`` act at once) and puts the
value or error straight into the dispatcher's inbox: no gather round trip, and
values and exceptions are the very objects the task made. On a worker in another
process, ``current()`` is a ``DaskTaskContext`` (task id, attempt, deadline;
``cancelled``/``check()`` see the Dask worker cancelling the attempt or the
deadline passing; ``progress``/``reset_backoff`` travel as Dask events), the
worker returns ``("v", value)`` or the error's whole ``__cause__``/``__context__``
chain pickled link by link (as ``_child`` does for child processes), and the
dispatcher gathers it once Dask reports the future done.

Timeout and cancel. The context's hook (``_Attempt.abort``, under the cluster lock)
frees the slot, wakes the dispatcher and asks the client's event loop to cancel
the Dask future (``force=True``); the Result is delivered at once by the core, as
for a thread. A thread on a Dask worker cannot be killed (dask#2617): the call goes
on there, its outcome is dropped (``Scheduler.finish`` is the compare-and-set: only
the attempt that is still ``task.ctx`` moves the task on), and a well-behaved task
that polls ``current().cancelled``/``check()`` stops.

Lost workers. The dispatcher listens to the scheduler's ``"all"`` topic: a
``remove-worker`` event that names one of our attempts (running there, or holding
its not yet gathered result) fails that attempt with ``WorkerCrashedError``
(retried like any ``Exception``) and cancels its future, so that Dask does not
quietly run it again (its ``allowed-failures``). A future that Dask itself reports
lost, erred with ``KilledWorker``, or cancelled without our asking (a restart, a
lost scheduler) fails the attempt too.

A closed client (``client.close()`` under us, or a client closed before the
cluster starts): the dispatcher looks at ``client.status`` every ``POLL`` seconds
while attempts are out; from then on every attempt fails at once with a final
``ClusterError`` saying so (no retry can help), so nothing hangs and ``stop()``
returns.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import pickle
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, NamedTuple

try:
    import distributed
    from distributed import Client
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("DaskExecutor needs dask.distributed: pip install 'cluster[dask]'") from exc

from ._backend import Backend, join_threads
from ._child import _error_records, _load_error
from ._core import DONE, REQUEUED, RUN_ENDED, SLEEP, STALE, plan
from ._delivery import deliver_sinks, has_callbacks, run_callbacks
from ._errors import ClusterError, StopRetrying, WorkerCrashedError
from ._listing import fn_name
from ._slots import _drop_frame
from ._sync import MAX_WAIT
from ._task import _CURRENT, DEFAULT_OPTIONS, Result, Task, TaskContext, TaskState
from ._validate import integer

if TYPE_CHECKING:
    from ._core import Lane

__all__ = ["DaskExecutor", "DaskTaskContext", "run_attempt"]

log = logging.getLogger("cluster")

#: While attempts are out, the dispatcher looks at the client's status this often
#: (seconds): how soon a closed client fails them.
POLL = 0.2
#: How often ``DaskTaskContext.cancelled.wait()`` looks at the worker's state.
SIGNAL_POLL = 0.05

# What the dispatcher's inbox carries: (kind, ...).
_KICK = 0  #: (_KICK,) due tasks may wait: look
_DIRECT = 1  #: (_DIRECT, attempt, value, error) from run_attempt in this process
_FUTURE = 2  #: (_FUTURE, attempt) Dask reports the attempt's future done
_FETCHED = 3  #: (_FETCHED, attempt, envelope | None, error | None) gathered on the loop
_LOST = 4  #: (_LOST, event) a worker left the Dask cluster
_EVENT = 5  #: (_EVENT, message) progress / reset_backoff from a worker in another process

#: This process, as run_attempt tells it from another (a worker process of a
#: LocalCluster is spawned: it draws its own; a forked child draws a new one).
_ORIGIN = secrets.token_hex(8)
#: Executors of this process by token: how run_attempt finds its attempt here.
_LOCAL: weakref.WeakValueDictionary[str, DaskExecutor] = weakref.WeakValueDictionary()
#: Guards _FANOUTS and the installation of a client's "all" handler.
_FANOUT_LOCK = threading.Lock()
#: ``distributed.client.done_callback(future, callback)``: the coroutine behind
#: ``Future.add_done_callback``, awaited on the client's loop (None if it moved).
_DONE_CALLBACK: Callable[..., Any] | None = getattr(distributed.client, "done_callback", None)
#: One "all"-topic handler per client, shared by its executors.
_FANOUTS: weakref.WeakKeyDictionary[Client, _Fanout] = weakref.WeakKeyDictionary()


def _after_fork() -> None:
    global _ORIGIN
    _ORIGIN = secrets.token_hex(8)
    _LOCAL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# --------------------------------------------------------------------------- the worker side


class Call(NamedTuple):
    """What ``run_attempt`` needs besides the call itself (pickled with it: a tuple,
    the cheapest thing to pickle)."""

    task_id: str
    attempt: int  #: 0-based
    remaining: float | None  #: seconds left until the deadline when handed over, or None
    sent_at: float  #: ``time.time()`` when handed over (re-bases the deadline there)
    key: str  #: the attempt's Dask key
    topic: str  #: the executor's event topic (progress, reset_backoff)
    origin: str  #: the submitting process (``_ORIGIN``)
    executor: str  #: the executor's token (``_LOCAL``)


def run_attempt(call: Call, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
    """Run one attempt on a Dask worker; never raises (our scheduler decides retries).

    In the submitting process: hands the outcome to the dispatcher, returns None.
    Elsewhere: returns ``("v", value)`` or ``("r", records)`` (the error's chain).
    """
    executor = _LOCAL.get(call.executor) if call.origin == _ORIGIN else None
    attempt = executor._live.get(call.key) if executor is not None else None
    ctx = attempt.ctx if attempt is not None else None
    if ctx is None:
        attempt = None
        ctx = DaskTaskContext(call)
    token = _CURRENT.set(ctx)
    value: Any = None
    error: BaseException | None = None
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: they fail the task
        error = exc
        _drop_frame(exc)
    finally:
        _CURRENT.reset(token)
    if attempt is not None:
        executor._inbox.put((_DIRECT, attempt, value, error))  # type: ignore[union-attr]
        return None
    if error is None:
        return ("v", value)
    records, _text = _error_records(error)
    return ("r", records)


class _WorkerSignal(threading.Event):
    """``DaskTaskContext.cancelled``: set once the deadline passes or the Dask worker
    cancels the attempt (which it does when we cancel its future)."""

    def __init__(self, ctx: DaskTaskContext) -> None:
        super().__init__()
        self._ctx = ctx

    def is_set(self) -> bool:
        """True once the attempt was signalled (looked up now)."""
        if not super().is_set() and self._ctx._look() is not None:
            self.set()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until signalled (looking every ``SIGNAL_POLL`` seconds) or ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            step = SIGNAL_POLL if end is None else min(SIGNAL_POLL, end - time.monotonic())
            if step <= 0:
                return False
            super().wait(step)
        return True


class DaskTaskContext(TaskContext):
    """``current()`` inside an attempt on a Dask worker in another process.

    ``task_id``, ``attempt`` and ``deadline`` (this host's ``time.monotonic()``,
    re-based from the seconds left when the attempt was handed over, so hosts'
    clocks need only agree on the wall time). ``cancelled`` and ``check()`` see the
    deadline pass and the Dask worker cancel the attempt (on timeout or cancel we
    cancel its future); ``reason`` is then ``"timeout"`` if the deadline passed,
    else ``"cancelled"`` (a shutdown reads as ``"cancelled"`` here).
    ``progress(value)`` (a value that pickles) and ``reset_backoff()`` travel to the
    cluster as Dask events (``Worker.log_event`` on the executor's topic), in order
    and ahead of the attempt's outcome; the scheduler keeps a bounded log of them,
    so report progress at a human pace, not in a tight loop.
    """

    __slots__ = ("_key", "_topic")

    def __init__(self, call: Call) -> None:
        self.task_id = call.task_id
        self.attempt = call.attempt
        if call.remaining is None:
            self.deadline = None
        else:
            left = call.remaining - max(0.0, time.time() - call.sent_at)
            self.deadline = time.monotonic() + max(0.0, left)
        self._task = None
        self._reason = None
        self._event = None
        self._worker = None
        self._hook = None
        self._reset = False
        self._key = call.key
        self._topic = call.topic

    @property
    def cancelled(self) -> threading.Event:
        """Set once the deadline passed or the attempt was cancelled (looked up on use)."""
        event = self._event
        if event is None:
            event = self._event = _WorkerSignal(self)
        return event

    @property
    def reason(self) -> str | None:
        """``None``, ``"timeout"`` or ``"cancelled"``."""
        return self._look()

    def check(self) -> None:
        """Raise TaskTimeoutError or TaskCancelledError if this attempt was signalled."""
        self._look()
        super().check()

    def progress(self, value: Any) -> None:
        """Send ``value`` to the cluster's ``info().progress``; TypeError if it does not pickle."""
        try:
            data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"progress value (a {type(value).__name__}) does not pickle: {exc}"
            ) from exc
        self._send(["P", self._key, data])

    def reset_backoff(self) -> None:
        """Restart the task's backoff and retry-rule counts (see SPEC §10)."""
        self._send(["B", self._key])

    def _send(self, message: list[Any]) -> None:
        with contextlib.suppress(ValueError):  # not on a Dask worker (called by hand)
            distributed.get_worker().log_event(self._topic, message)

    def _look(self) -> str | None:
        """The reason this attempt was signalled, or None (looks at the worker's state)."""
        if self._reason is not None:
            return self._reason
        deadline = self.deadline
        if deadline is not None and time.monotonic() >= deadline:
            self._reason = "timeout"
        else:
            try:
                state = distributed.get_worker().state.tasks.get(self._key)
            except Exception:  # not on a Dask worker, or its state changed shape
                return None
            if state is None or state.state in ("cancelled", "released", "forgotten"):
                self._reason = "cancelled"
        return self._reason

    def __repr__(self) -> str:
        return f"<DaskTaskContext {self.task_id!r} attempt={self.attempt} key={self._key!r}>"


# --------------------------------------------------------------------------- our side


class _Attempt:
    """One attempt handed to Dask (what ``ctx._hook`` leads to)."""

    __slots__ = (
        "counted",
        "ctx",
        "executor",
        "future",
        "key",
        "settled",
        "sleeping",
        "task",
    )

    def __init__(self, executor: DaskExecutor, task: Task, ctx: TaskContext) -> None:
        self.executor = executor
        self.task: Task | None = task
        self.ctx: TaskContext | None = ctx
        self.key = ""
        # ---- guarded by the cluster lock ----
        self.future: distributed.Future[Any] | None = None  # set once handed to Dask
        self.counted = True  # holds one of the executor's slots
        self.sleeping: TaskContext | None = None  # an IMMEDIATE backoff's context
        # ---- dispatcher thread only ----
        self.settled = False  # its outcome was recorded (later ones are dropped)

    def abort(self) -> None:
        """The attempt's context was signalled (timeout, cancel, shutdown; the cluster
        lock is held): free the slot, cancel the Dask future."""
        executor = self.executor
        if self.counted:
            self.counted = False
            executor._inflight -= 1
            executor._kick_locked()
        future = self.future
        if future is not None:
            executor._cancel_soon([future])

    def __repr__(self) -> str:
        return f"<dask attempt {self.key!r}>"


class _Fanout:
    """A client's handler of the scheduler's ``"all"`` topic: hands ``remove-worker``
    events to every executor on that client, and calls the handler that was there."""

    def __init__(self, previous: Callable[[Any], Any] | None) -> None:
        self.previous = previous
        self.inboxes: list[SimpleQueue[tuple[Any, ...]]] = []  # guarded by _FANOUT_LOCK

    def __call__(self, event: Any) -> Any:
        try:
            message = event[1]
            if isinstance(message, dict) and message.get("action") == "remove-worker":
                with _FANOUT_LOCK:
                    inboxes = list(self.inboxes)
                for inbox in inboxes:
                    inbox.put((_LOST, message))
        except Exception:  # never let a malformed event break the client's loop
            log.exception("cluster could not read a Dask scheduler event")
        if self.previous is not None:
            return self.previous(event)
        return None


def _installed(client: Any) -> object:
    """The client's handler of the "all" topic, or None (a private dict of Client's,
    read defensively: without it, an earlier handler is simply not chained)."""
    handlers = getattr(client, "_event_handlers", None)
    return handlers.get("all") if isinstance(handlers, dict) else None


def _fanout_of(client: Any) -> _Fanout:
    """The client's ``_Fanout``, installed as its "all" handler (holds _FANOUT_LOCK)."""
    fanout = _FANOUTS.get(client)
    installed = _installed(client)
    if fanout is not None and installed is fanout:
        return fanout
    fresh = _Fanout(installed if callable(installed) else None)  # chains what was there
    _FANOUTS[client] = fresh
    client.subscribe_topic("all", fresh)
    return fresh


async def _cancel_on_loop(client: Client, futures: list[distributed.Future[Any]]) -> None:
    """On the client's event loop: cancel Dask futures (a closed client: nothing to do)."""
    cancel: Any = client.cancel  # (Dask's API is only partly typed)
    with contextlib.suppress(Exception):
        await cancel(
            futures, asynchronous=True, force=True, reason="cluster", msg="cancelled by cluster"
        )


class DaskExecutor(Backend):
    """Run attempts on a ``dask.distributed`` cluster through ``client`` (extra ``dask``).

    At most ``slots`` attempts are on Dask at once (default: the Dask cluster's
    total worker threads when this executor is made); the cluster's own scheduler
    decides which due task goes next. ``fn``, its arguments and its value travel
    the way Dask sends them (cloudpickle), and ``cluster`` must be importable on the
    workers. A call that Dask cannot serialize fails its task at once (no retry)
    with Dask's ``TypeError``. See the module documentation for timeouts, cancel,
    lost workers and a client closed under us.
    """

    def __init__(self, client: Client, *, slots: int | None = None) -> None:
        super().__init__()
        if not isinstance(client, Client):
            raise TypeError(
                f"client must be a dask.distributed.Client, got {type(client).__name__}"
            )
        if client.asynchronous:
            raise ValueError("client must be a synchronous Client (asynchronous=False)")
        if slots is None:
            nthreads: Any = client.nthreads  # (Dask's API is only partly typed)
            total = sum(nthreads().values())
            if total < 1:
                raise ValueError(
                    "slots: the Dask cluster has no worker threads yet; pass slots= explicitly"
                )
            slots = total
        else:
            slots = integer(slots, "slots", minimum=1)
        #: Dask's API is only partly typed: it is called through ``Any``.
        self._client: Any = client
        self._slots = slots
        self._token = secrets.token_hex(4)
        self._topic = f"cluster-{self._token}"
        self._inbox: SimpleQueue[tuple[Any, ...]] = SimpleQueue()
        # ---- guarded by the cluster lock ----
        self._thread: threading.Thread | None = None
        self._inflight = 0  # attempts holding a slot (on Dask, or in an IMMEDIATE backoff)
        self._kicked = False  # a _KICK is in the inbox, not yet taken
        self._timer_at = math.inf  # when the dispatcher wakes for the lane's next start
        self._owed = 0  # Results being delivered outside the lock
        self._sleepers: dict[_Attempt, Task] = {}  # IMMEDIATE backoffs in progress
        self._token_waits: set[_Attempt] = set()  # ... whose retry waits for a token
        # ---- dispatcher thread only (read by run_attempt in this process) ----
        self._live: dict[str, _Attempt] = {}  # attempts out on Dask, by key
        self._numbers = itertools.count(1).__next__
        self._broken: str | None = None  # why no attempt can run any more (closed client)
        # ---- the client's event loop only ----
        self._watchers: set[Any] = set()  # asyncio tasks waiting for futures (see _watch)

    def __repr__(self) -> str:
        return f"<DaskExecutor {self.name!r} slots={self._slots}>"

    @property
    def capacity(self) -> int:
        """``slots``."""
        return self._slots

    # ------------------------------------------------------------------ Backend

    def start_locked(self) -> None:
        """Tasks submitted before ``run()`` go now (the dispatcher starts on first use)."""
        lane = self.lane
        if lane.queued or lane.delayed:
            self._kick_locked()

    def queued_locked(self, task: Task, ready: bool) -> None:
        """A due task: dispatch; a later one: wake the dispatcher if it is earlier."""
        if ready or task.start < self._timer_at:  # type: ignore[operator]
            self._kick_locked()

    def wake_locked(self) -> None:
        """Due tasks came back from a gate: dispatch."""
        self._kick_locked()

    def stopping_locked(self) -> None:
        """Wake the dispatcher: it leaves once the cluster is terminated."""
        if self._thread is not None:
            self._inbox.put((_KICK,))

    def clock_jumped_locked(self) -> None:
        """A fake clock moved: look at start times and backoffs again."""
        if self._thread is not None:
            self._inbox.put((_KICK,))

    def owed_locked(self) -> bool:
        """The dispatcher is delivering a Result."""
        return self._owed > 0

    def waiting_locked(self, now: float) -> int:
        """IMMEDIATE retries whose backoff is over but whose key gives no token yet."""
        return len(self._token_waits)

    def busy_locked(self, now: float) -> bool:
        """An IMMEDIATE backoff is over and its retry has not been handed over yet."""
        return any(task.start <= now for task in self._sleepers.values())  # type: ignore[operator]

    def join(self, deadline: float | None) -> int:
        """Join the dispatcher thread."""
        with self.rt.lock:
            thread = self._thread
        return join_threads([thread] if thread is not None else [], deadline)

    def reset_in_child(self) -> None:
        """After fork: the dispatcher does not exist in the child."""
        self._thread = None
        self._inbox = SimpleQueue()
        self._inflight = 0
        self._kicked = False
        self._timer_at = math.inf
        self._owed = 0
        self._sleepers.clear()
        self._token_waits.clear()
        self._live.clear()

    # ------------------------------------------------------------------ under the lock

    def _kick_locked(self) -> None:
        if self.rt.terminated_locked():
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name=self.rt.thread_name(self.name), daemon=True
            )
            self._thread.start()
        if not self._kicked:
            self._kicked = True
            self._inbox.put((_KICK,))

    def _poke(self) -> None:
        """An IMMEDIATE backoff's context was signalled (cancel, stop): look again."""
        self._inbox.put((_KICK,))

    def _cancel_soon(self, futures: list[distributed.Future[Any]]) -> None:
        """Ask the client's loop to cancel ``futures`` (never blocks; may hold the lock)."""
        with contextlib.suppress(Exception):  # a closed client has no loop to ask
            self._client.loop.add_callback(_cancel_on_loop, self._client, futures)

    # ------------------------------------------------------------------ the dispatcher

    def _serve(self) -> None:
        rt = self.rt
        rt.enter_thread()
        _LOCAL[self._token] = self
        try:
            self._subscribe()
            self._loop()
        except BaseException:  # a bug of ours: say so, never hang the cluster silently
            log.critical("the dispatcher of %r crashed", self, exc_info=True)
            raise
        finally:
            _LOCAL.pop(self._token, None)
            self._unsubscribe()
            self._live.clear()

    def _subscribe(self) -> None:
        """Listen to lost workers (the "all" topic) and to our own topic (progress)."""
        client = self._client
        inbox = self._inbox
        try:
            client.subscribe_topic(self._topic, lambda event: inbox.put((_EVENT, event[1])))
            with _FANOUT_LOCK:
                _fanout_of(client).inboxes.append(inbox)
        except Exception as exc:  # a closed client: every attempt fails, see _loop
            log.debug("cluster could not subscribe to Dask events: %s", exc)

    def _unsubscribe(self) -> None:
        """Stop listening; the last executor of a client gives "all" back to the handler
        that was there (a client that keeps a subscription to "all" while it closes
        makes the scheduler log a CRITICAL traceback)."""
        client = self._client
        with contextlib.suppress(Exception):  # a closed client: nothing to undo
            client.unsubscribe_topic(self._topic)
        with _FANOUT_LOCK:
            fanout = _FANOUTS.get(client)
            if fanout is None or self._inbox not in fanout.inboxes:
                return
            fanout.inboxes.remove(self._inbox)
            if fanout.inboxes:
                return
            del _FANOUTS[client]
            if _installed(client) is not fanout:
                return  # someone subscribed "all" since: theirs stays
            previous = fanout.previous
            with contextlib.suppress(Exception):
                if previous is None:
                    client.unsubscribe_topic("all")
                else:
                    client.subscribe_topic("all", previous)

    def _loop(self) -> None:
        rt = self.rt
        sched = rt.sched
        lane: Lane = self.lane
        inbox = self._inbox
        outcomes: list[tuple[_Attempt, Any, BaseException | None]] = []  # to record
        wait: float | None = None
        last_look = time.monotonic()
        while True:
            # ---- collect what arrived (blocking only when nothing is left to do) ----
            items: list[tuple[Any, ...]] = []
            if not outcomes:
                with contextlib.suppress(Empty):
                    items.append(inbox.get(timeout=wait))
            while True:
                try:
                    items.append(inbox.get_nowait())
                except Empty:
                    break
            fetch: list[_Attempt] = []
            for item in items:
                self._take(item, outcomes, fetch)
            if self._live and time.monotonic() - last_look >= POLL:
                last_look = time.monotonic()
                self._look_at_client(outcomes)
            # ---- the retry decisions: user code, outside the lock ----
            plans = [self._plan(att, value, error) for att, value, error in outcomes]
            # ---- one critical section: record, resume, take new attempts ----
            done: list[Task] = []
            callbacks: list[tuple[Task, Result[Any]]] = []
            fresh: list[_Attempt] = []
            with rt.lock:
                now = rt.monotonic()
                for (att, value, error), planned in zip(outcomes, plans, strict=True):
                    self._record_locked(att, value, error, planned, now, done, callbacks)
                self._resume_locked(now, fresh)
                self._kicked = False
                if rt.terminated_locked():
                    exiting = True
                else:
                    exiting = False
                    while self._inflight < self._slots:
                        task = sched.pop(now, lane)
                        if task is None:
                            break
                        ctx: TaskContext = task.ctx  # type: ignore[assignment]
                        att = _Attempt(self, task, ctx)
                        ctx._hook = att.abort
                        self._inflight += 1
                        if ctx.deadline is not None:
                            rt.arm_service_locked(ctx.deadline)
                        fresh.append(att)
                    if rt.room_waiters and fresh:
                        rt.room_locked()
                if sched.woken:
                    rt.wake_lanes_locked()
                for task in done:
                    if has_callbacks(task):
                        rt.runners.submit_locked(rt.callbacks_then_release, task, None)
                for job in callbacks:
                    rt.runners.submit_locked(_run_callbacks, job, None)
                due = sched.next_due(lane)
                self._timer_at = math.inf if due is None else due
                soonest = due
                for task in self._sleepers.values():
                    if soonest is None or task.start < soonest:  # type: ignore[operator]
                        soonest = task.start
                wait = None if soonest is None else rt.clock.timeout(max(0.0, soonest - now))
                left = rt.leftovers_locked()
            for att, _value, _error in outcomes:
                att.future = None  # lets the Dask future go (outside the lock)
            outcomes = []
            del plans, items
            if left is not None:
                rt.after_lock(left)  # persist, then deliver
            if done:
                self._deliver(done)
            if exiting:
                self._cancel_soon([a.future for a in self._live.values() if a.future is not None])
                return
            if fresh:
                self._hand_over(fresh, outcomes)
            if fetch:
                with contextlib.suppress(Exception):  # a closed client: see _look_at_client
                    self._client.loop.add_callback(self._fetch, fetch)
            if self._live or self._sleepers:
                wait = POLL if wait is None else min(wait, POLL)
            elif wait is not None:
                wait = min(wait, MAX_WAIT)

    # ---- inbox items

    def _take(
        self,
        item: tuple[Any, ...],
        outcomes: list[tuple[_Attempt, Any, BaseException | None]],
        fetch: list[_Attempt],
    ) -> None:
        kind = item[0]
        if kind in (_DIRECT, _FETCHED):
            att: _Attempt = item[1]
            if att.settled:
                return
            if kind == _DIRECT:
                value, error = item[2], item[3]
            else:
                value, error = _open_envelope(att, item[2], item[3])
            self._settle(att)
            outcomes.append((att, value, error))
        elif kind == _FUTURE:
            att = item[1]
            if att.settled:
                return
            if _detached(att):  # we cancelled it (timeout, cancel): nothing to record
                self._settle(att)
                return
            future = att.future
            status = str(future.status) if future is not None else "cancelled"
            if status in ("finished", "error"):
                fetch.append(att)  # the envelope, or Dask's own error
            else:  # cancelled by Dask itself, or lost
                self._settle(att)
                outcomes.append((att, None, self._dask_dropped(att, status)))
        elif kind == _LOST:
            self._lost_worker(item[1], outcomes)
        elif kind == _EVENT:
            self._event(item[1])

    def _settle(self, att: _Attempt) -> None:
        """``att``'s outcome is in: it leaves ``_live`` (and lets its future go)."""
        att.settled = True
        if self._live.get(att.key) is att:
            del self._live[att.key]

    def _dask_dropped(self, att: _Attempt, status: str) -> BaseException:
        what = _what(att)
        if self._closed():
            return self._closed_error(what)
        if status == "lost":
            return WorkerCrashedError(f"Dask lost the result of {what} (its worker left)")
        return ClusterError(
            f"Dask cancelled {what} (the scheduler restarted or the client lost it)"
        )

    def _lost_worker(
        self, event: dict[str, Any], outcomes: list[tuple[_Attempt, Any, BaseException | None]]
    ) -> None:
        worker = event.get("worker", "?")
        how = "retired" if event.get("expected") else "lost"
        lost: list[distributed.Future[Any]] = []
        for field, doing in (
            ("processing-tasks", "running"),
            ("lost-computed-tasks", "holding the result of"),
        ):
            for key in event.get(field) or ():
                att = self._live.get(key) if isinstance(key, str) else None
                if att is None or att.settled:
                    continue
                self._settle(att)
                error = WorkerCrashedError(
                    f"Dask worker {worker} was {how} while {doing} {_what(att)}"
                )
                outcomes.append((att, None, error))
                if att.future is not None:
                    lost.append(att.future)
        if lost:
            self._cancel_soon(lost)  # so that Dask does not run them again elsewhere

    def _event(self, message: Any) -> None:
        """progress / reset_backoff from a worker in another process."""
        try:
            kind, key = message[0], message[1]
        except Exception:
            return
        att = self._live.get(key) if isinstance(key, str) else None
        if att is None or _detached(att):
            return  # the attempt ended or was abandoned meanwhile
        ctx: TaskContext = att.ctx  # type: ignore[assignment]
        if kind == "B":
            ctx.reset_backoff()
        elif kind == "P":
            try:
                value = pickle.loads(message[2])
            except Exception as exc:
                log.warning(
                    "a progress value of task %r did not unpickle here and was dropped: %s",
                    ctx.task_id,
                    exc,
                )
                return
            ctx.progress(value)

    # ---- a closed client

    def _closed(self) -> bool:
        return self._broken is not None or self._client.status in ("closing", "closed")

    def _closed_error(self, what: str) -> BaseException:
        if self._broken is None:
            self._broken = (
                f"the Dask client of executor {self.name!r} was closed (it is "
                f"{self._client.status}); its attempts cannot run"
            )
        error = StopRetrying()  # final: no retry can help
        error.__cause__ = ClusterError(f"{self._broken} ({what})")
        return error

    def _look_at_client(self, outcomes: list[tuple[_Attempt, Any, BaseException | None]]) -> None:
        """While attempts are out: a closed client fails them all at once."""
        if not self._closed():
            return
        for att in list(self._live.values()):
            if not att.settled:
                self._settle(att)
                outcomes.append((att, None, self._closed_error(_what(att))))

    # ---- recording outcomes

    def _plan(self, att: _Attempt, value: Any, error: BaseException | None) -> Any:
        """The retry decision and a series' next run (user code: no lock held)."""
        task, ctx = att.task, att.ctx
        rt = self.rt
        if task is None or ctx is None or _detached(att):
            return None  # abandoned (timeout, cancel): finish() will say STALE
        if rt.observers:
            rt.report_attempt(task, rt.monotonic(), error)
        opts = task.opts
        if error is None and (opts is DEFAULT_OPTIONS or opts.repeat is None):
            return None
        sched = rt.sched
        return plan(task, ctx, error, sched.rng, not sched.runs_allowed, rt.monotonic(), rt.clock)

    def _record_locked(
        self,
        att: _Attempt,
        value: Any,
        error: BaseException | None,
        planned: Any,
        now: float,
        done: list[Task],
        callbacks: list[tuple[Task, Result[Any]]],
    ) -> None:
        rt = self.rt
        sched = rt.sched
        task, ctx = att.task, att.ctx
        if task is None or ctx is None:
            return
        decision, rearm = planned if planned is not None else (None, None)
        code = sched.finish(task, ctx, value, error, decision, now, rearm)
        if code == SLEEP:
            sleeping: TaskContext = task.ctx  # type: ignore[assignment]
            sleeping._hook = self._poke
            att.sleeping = sleeping
            self._sleepers[att] = task  # it keeps its slot while it sleeps
            return
        att.task = att.ctx = None
        if att.counted:  # (STALE: the abort freed it already)
            att.counted = False
            self._inflight -= 1
        if code == DONE:
            rt.settle_locked(1)
            if task.sinks is not None or has_callbacks(task):
                self._owed += 1  # until delivered and its callbacks handed over
            if sched.expiry_armed:
                rt.arm_expiry_locked()
            done.append(task)
        elif code == REQUEUED:
            self.queued_locked(task, False)
        elif code == RUN_ENDED:
            result = rt.deliver_run_locked(task)
            if result is not None:
                callbacks.append((task, result))
            self.queued_locked(task, task.state is TaskState.PENDING)
        else:
            assert code == STALE

    def _resume_locked(self, now: float, fresh: list[_Attempt]) -> None:
        """IMMEDIATE retries whose backoff is over (or was cut short) go again."""
        sched = self.rt.sched
        for att, task in list(self._sleepers.items()):
            sleeping = att.sleeping
            assert sleeping is not None
            if task.ctx is sleeping and task.start > now and sleeping._reason is None:  # type: ignore[operator]
                continue  # still sleeping
            if sched.resume(task, sleeping, now):
                ctx: TaskContext = task.ctx  # type: ignore[assignment]
                again = _Attempt(self, task, ctx)  # the slot passes on to it
                ctx._hook = again.abort
                if ctx.deadline is not None:
                    self.rt.arm_service_locked(ctx.deadline)
                fresh.append(again)
            elif task.ctx is sleeping:  # its key's rate gives no token yet: sleep on
                self._token_waits.add(att)
                continue
            else:  # cancelled, or the cluster stops
                self._inflight -= 1
            att.counted = False
            att.sleeping = None
            del self._sleepers[att]
            self._token_waits.discard(att)

    def _deliver(self, done: list[Task]) -> None:
        """Sinks here; callbacks were handed to runners under the lock."""
        rt = self.rt
        owed = 0
        for task in done:
            if task.sinks is not None or has_callbacks(task):
                deliver_sinks(task)
                owed += 1
        if owed:
            with rt.lock:
                self._owed -= owed
                rt.settle_locked(0)  # a stop() may wait for these deliveries
        dead = rt.sched.dead_limit
        for task in done:
            if not has_callbacks(task):
                if task._error is not None and dead:
                    rt.seal_dead(task)  # a dead letter: its text made, its frames cleared
                task.release()

    # ---- handing attempts to Dask

    def _hand_over(
        self, fresh: list[_Attempt], outcomes: list[tuple[_Attempt, Any, BaseException | None]]
    ) -> None:
        """``client.submit`` each new attempt (outside the lock), in the order taken."""
        rt = self.rt
        client = self._client
        submitted: list[tuple[_Attempt, distributed.Future[Any]]] = []
        for att in fresh:
            task, ctx = att.task, att.ctx
            assert task is not None and ctx is not None
            number = self._numbers()
            att.key = f"{_prefix(task)}-{number}-{self._token}-{task.id}~{ctx.attempt}"
            if _detached(att):  # aborted before it was handed over
                att.settled = True
                continue
            if self._closed():
                att.settled = True
                outcomes.append((att, None, self._closed_error(_what(att))))
                continue
            deadline = ctx.deadline
            remaining = None if deadline is None else max(0.0, deadline - rt.monotonic())
            call = Call(
                task.id,  # type: ignore[arg-type]
                ctx.attempt,
                remaining,
                time.time(),
                att.key,
                self._topic,
                _ORIGIN,
                self._token,
            )
            self._live[att.key] = att
            try:
                future = client.submit(
                    run_attempt,
                    call,
                    task.fn,
                    task.args,
                    task.kwargs,
                    key=att.key,
                    priority=task.priority,
                    pure=False,
                )
            except Exception as exc:  # unserializable call, closed client: final
                self._settle(att)
                if self._closed():
                    error = self._closed_error(_what(att))
                else:
                    error = StopRetrying()
                    error.__cause__ = exc
                outcomes.append((att, None, error))
                continue
            submitted.append((att, future))
        if not submitted:
            return
        if _DONE_CALLBACK is None:  # (a distributed without it: one hop per future)
            for att, future in submitted:
                watch: Any = future.add_done_callback  # (Dask's API is only partly typed)
                watch(_DoneNote(self._inbox.put, att))
        else:
            with contextlib.suppress(Exception):  # a closed client: see _look_at_client
                client.loop.add_callback(self._watch, submitted)
        cancel: list[distributed.Future[Any]] = []
        with rt.lock:
            for att, future in submitted:
                if att.counted:
                    att.future = future
                else:  # aborted while being handed over
                    cancel.append(future)
        if cancel:
            self._cancel_soon(cancel)

    async def _watch(self, submitted: list[tuple[_Attempt, distributed.Future[Any]]]) -> None:
        """On the client's loop: note each attempt's future done in the inbox (one loop
        callback per batch, not a thread hop per future as ``add_done_callback``)."""
        import asyncio

        watchers = self._watchers
        put = self._inbox.put
        for att, future in submitted:
            watcher = asyncio.ensure_future(_DONE_CALLBACK(future, _DoneNote(put, att)))  # type: ignore[misc]
            watchers.add(watcher)  # (asyncio keeps only weak references to tasks)
            watcher.add_done_callback(watchers.discard)

    async def _fetch(self, fresh: list[_Attempt]) -> None:
        """On the client's loop: gather finished attempts' envelopes (Dask batches the
        requests of one loop iteration into one) and hand them to the dispatcher."""
        import asyncio

        await asyncio.gather(*(self._fetch_one(att) for att in fresh))

    async def _fetch_one(self, att: _Attempt) -> None:
        future = att.future
        envelope: Any = None
        error: BaseException | None = None
        try:
            if future is None:
                raise ClusterError(f"the Dask future of {_what(att)} is gone")
            envelope = await self._client.gather(future, asynchronous=True)
        except BaseException as exc:  # Dask's own error: the envelope never came
            error = exc
        self._inbox.put((_FETCHED, att, envelope, error))


# --------------------------------------------------------------------------- helpers


class _DoneNote:
    """``future.add_done_callback`` target: puts ``(_FUTURE, attempt)`` in the inbox."""

    __slots__ = ("att", "put")

    def __init__(self, put: Callable[[tuple[Any, ...]], None], att: _Attempt) -> None:
        self.put = put
        self.att = att

    def __call__(self, future: Any) -> None:
        self.put((_FUTURE, self.att))


def _open_envelope(
    att: _Attempt, envelope: Any, error: BaseException | None
) -> tuple[Any, BaseException | None]:
    """What a worker in another process returned (or why nothing came): value, error."""
    if error is not None:
        if isinstance(error, distributed.scheduler.KilledWorker):
            crashed = WorkerCrashedError(f"Dask workers kept dying while running {_what(att)}")
            crashed.__cause__ = error
            return None, crashed
        return None, error
    if type(envelope) is tuple and len(envelope) == 2:
        tag, body = envelope
        if tag == "v":
            return body, None
        if tag == "r":
            return None, _load_error(body)
    if envelope is None:  # run_attempt ran here but its attempt was gone: abandoned
        return None, ClusterError(f"{_what(att)} returned nothing")
    return None, ClusterError(f"{_what(att)} sent back an unknown reply {envelope!r:.80}")


def _detached(att: _Attempt) -> bool:
    """Was the attempt detached (timeout, cancel, shutdown) or has it ended? Read
    without the lock: once detached, an attempt is never attached again."""
    task, ctx = att.task, att.ctx
    return task is None or ctx is None or task.ctx is not ctx


def _what(att: _Attempt) -> str:
    ctx = att.ctx
    if ctx is None:
        return f"attempt {att.key!r}"
    return f"task {ctx.task_id!r} (attempt {ctx.attempt})"


def _prefix(task: Task) -> str:
    """The key's first word: the task's name (Dask groups keys by it)."""
    name = task.opts.name or fn_name(task.fn)
    return name.replace("-", "_") or "task"


def _run_callbacks(job: tuple[Task, Result[Any]]) -> None:
    run_callbacks(*job)
