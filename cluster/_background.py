"""Background operations (SPEC §19): intermittent work and config-driven drivers.

* ``Intermittent(cluster, start)``: reference counting for a background operation.
  The first ``attach()`` starts it, the last ``Attachment.detach()`` stops it (the
  stop callable runs on a cluster thread); ``start`` and stop never overlap.
* ``poll(cluster, action, every)``: an ``Intermittent`` whose operation is a
  repeating task (§11) calling ``action()`` every ``every`` seconds.
* ``Lifecycle(apply_config, *, read_config=json.loads)``: a driver run by its
  configuration, with the states ``"inactive"``, ``"active"``, ``"loading"`` and
  ``"error"``.

Only the cluster's public API is used: ``add_task(...).submit()``, handles and
their ``cancel()``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

from ._errors import ClusterError, TaskCancelledError
from ._validate import Duration, function, seconds

if TYPE_CHECKING:  # annotations only: this module uses the cluster's public API
    from ._builder import TaskBuilder, TaskHandle
    from ._cluster import Cluster

__all__ = ["Attachment", "Intermittent", "Lifecycle", "LifecycleContext", "poll"]

log = logging.getLogger("cluster")

C = TypeVar("C")

#: What ``start()`` returns: the callable that stops the operation it began, or None.
StopFn = Callable[[], object]
StartFn = Callable[[], StopFn | None]

#: The longest single condition wait; longer waits loop (a lock timeout overflows
#: somewhere past 2**31 milliseconds on some platforms).
_MAX_WAIT: Final = 3600.0


def _named(builder: TaskBuilder[Any], name: str) -> TaskBuilder[Any]:
    """``builder.with_name(name)`` once the builder has it (SPEC §12), else ``builder``."""
    with_name = getattr(builder, "with_name", None)
    return builder if with_name is None else with_name(name)


def _qualname(fn: object, default: str) -> str:
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) and name else default


# ====================================================================== Intermittent


class _PendingStop:
    """The stop callable of one run of an operation: run exactly once, wherever first.

    Three paths may try to run it: the cluster task submitted by the last detach
    (or its ``on_complete`` callback, if that task was cancelled before it ran, e.g.
    by ``stop(cancel_pending=True)`` or ``cancel()``), a fallback thread (if the
    cluster refused the task), and an ``attach()`` that needs it done and finds it
    not yet begun. Whichever claims it first runs it; the others do nothing.
    """

    __slots__ = ("claimed", "done", "handle", "op", "stolen", "stop", "thread")

    def __init__(self, op: Intermittent, stop: StopFn) -> None:
        self.op = op
        self.stop = stop
        # ---- guarded by op._lock ----
        self.claimed = False  # some thread has begun (or finished) running stop
        self.done = False  # stop has returned or raised
        self.stolen = False  # claimed by an attach() rather than by the cluster task
        self.thread: int | None = None  # ident of the thread that claimed it
        self.handle: TaskHandle[None] | None = None  # the cluster task, once submitted

    def run(self) -> None:
        """Run the stop callable unless another path already claimed it."""
        with self.op._lock:
            if self.claimed:
                return
            self.claimed = True
            self.thread = threading.get_ident()
        self.execute()

    def on_complete(self, task_id: str, value: object, error: BaseException | None) -> None:
        """The task's callback: runs the stop if the task ended without running it."""
        self.run()

    def execute(self) -> None:
        """Call the stop callable (the caller has claimed it) and record that it ran."""
        try:
            self.stop()
        except Exception:
            log.exception("stop callable of %r raised", self.op)
        finally:
            self.op._stopped(self)


class Attachment:
    """One hold on an ``Intermittent``; a context manager whose exit detaches it."""

    __slots__ = ("_held", "_op")

    def __init__(self, op: Intermittent) -> None:
        self._op = op
        self._held = True  # guarded by op._lock

    @property
    def attached(self) -> bool:
        """True until ``detach()`` is called."""
        return self._held

    def detach(self) -> None:
        """Release this hold (idempotent). The last release stops the operation.

        It does not wait for the stop callable, which runs on a cluster thread.
        """
        self._op._release(self)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"<Attachment {'held' if self._held else 'detached'} of {self._op!r}>"


class Intermittent:
    """A background operation that runs while at least one attachment holds it.

    ``start()`` begins the operation and returns a stop callable (or None). The first
    ``attach()`` calls ``start()`` on the caller's thread; later ones only count.
    When the last ``Attachment`` is released, the stop callable is submitted to
    ``cluster`` as a task: it runs on a cluster thread (or on an ``attach()`` that
    needs it done, see below), never under a lock and never on the detaching thread,
    and an exception in it is logged on the ``cluster`` logger. The next
    ``attach()`` after that starts the operation anew, but only once that stop has
    returned, so ``start`` and stop never overlap.

    Races, decided:

    * ``attach()`` calls arriving while another thread is inside ``start()`` wait
      for it. If it succeeds they count as attached; if it raises, only that
      thread's ``attach()`` raises, and each waiter tries ``start()`` itself (one at
      a time). So every ``attach()`` that does not find the operation running calls
      ``start()`` at most once, and an error is only ever seen by the caller whose
      own ``start()`` raised it.
    * An ``attach()`` that must wait for a pending stop, and finds that the cluster
      has not begun running it yet (all workers busy, or ``run()`` not called),
      runs it itself rather than wait for a worker: it would block until then in
      any case, and this way a task on a one-worker cluster can detach and attach
      again without deadlock. The queued task is then cancelled (or finds the stop
      done and does nothing).
    * ``attach()`` from inside this operation's own ``start()`` or stop callable
      would wait for itself: it raises ``RuntimeError`` instead.

    If the cluster is stopped: ``attach()`` works as usual (``start()`` runs on the
    caller's thread; a ``poll`` start submits a task, so there ``attach()`` raises
    the ``ClusterStoppedError``). A stop the cluster refuses to queue (stopped, or
    ``QueueFullError``) runs on a fresh non-daemon thread; one the cluster accepted
    but cancelled before it ran (``stop(cancel_pending=True)``, ``cancel()``, the
    exit hook) runs on the cluster's callback thread. Either way each successful
    ``start()`` is followed by exactly one call of its stop callable. (A cluster
    built with ``max_pending`` and ``on_full="block"`` makes a detach wait for room
    in the queue, as any submit does.)

    A stop callable that blocks delays only the next start of this operation; it
    holds one worker of the cluster while it blocks.
    """

    def __init__(self, cluster: Cluster, start: StartFn, *, name: str | None = None) -> None:
        """``start()`` begins the operation and returns its stop callable or None.

        ``name`` labels the stop tasks (``"<name>.stop"``) and the repr; default:
        ``start``'s qualified name.
        """
        if not callable(getattr(cluster, "add_task", None)):
            raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
        self._cluster = cluster
        self._start: StartFn = function(start, "start")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self._name = name or _qualname(start, "intermittent")
        self._lock = threading.Lock()
        # ---- guarded by _lock (also every Attachment._held and _PendingStop field) ----
        self._count = 0  # attachments held on the current run (> 0 only while running)
        self._stop: StopFn | None = None  # the current run's stop callable
        self._starter: int | None = None  # ident of the thread inside start(), if any
        self._pending: _PendingStop | None = None  # the last run's stop, until it returns
        self._running = False  # from a successful start() until its stop has run
        # Notified when a start() ends (either way) and when a pending stop returns.
        self._changed = threading.Condition(self._lock)

    @property
    def running(self) -> bool:
        """True from a successful ``start()`` until its stop callable has run."""
        return self._running

    @property
    def attachments(self) -> int:
        """How many attachments hold the operation now."""
        return self._count

    def attach(self) -> Attachment:
        """Hold the operation, starting it if nobody does; returns the ``Attachment``.

        If this call starts the operation and ``start()`` raises, the error
        propagates from here and nothing is held. If a stop of an earlier run is
        still pending, this waits until it has returned.
        """
        me = threading.get_ident()
        while True:
            steal: _PendingStop | None = None
            with self._lock:
                while True:
                    if self._count:
                        self._count += 1
                        return Attachment(self)
                    if self._starter is not None:
                        if self._starter == me:
                            raise RuntimeError(
                                f"attach() called from inside start() of {self!r} "
                                "would wait for itself"
                            )
                        self._changed.wait(_MAX_WAIT)
                        continue
                    pending = self._pending
                    if pending is None:
                        self._starter = me  # we start it, below
                        break
                    if not pending.claimed:
                        pending.claimed = pending.stolen = True
                        pending.thread = me
                        steal = pending
                        break
                    if pending.thread == me:
                        raise RuntimeError(
                            f"attach() called from inside the stop callable of {self!r} "
                            "would wait for itself"
                        )
                    self._changed.wait(_MAX_WAIT)
                handle = None if steal is None else steal.handle
            if steal is None:
                return self._first_attach()
            if handle is not None:
                handle.cancel()  # its run() would find the stop claimed and return
            steal.execute()

    def _first_attach(self) -> Attachment:
        """Call ``start()`` (this thread is ``_starter``) and take the first hold."""
        try:
            stop = self._start()
            if stop is not None and not callable(stop):
                raise TypeError(
                    f"start() must return a callable or None, got {type(stop).__name__}"
                )
        except BaseException:
            with self._lock:
                self._starter = None
                self._changed.notify_all()  # a waiter may now try start() itself
            raise
        with self._lock:
            self._starter = None
            self._stop = stop
            self._count = 1
            self._running = True
            self._changed.notify_all()
            return Attachment(self)

    def _release(self, attachment: Attachment) -> None:
        with self._lock:
            if not attachment._held:
                return
            attachment._held = False
            self._count -= 1
            if self._count:
                return
            stop, self._stop = self._stop, None
            if stop is None:  # start() returned None: nothing to run
                self._running = False
                return
            pending = self._pending = _PendingStop(self, stop)
        self._submit_stop(pending)

    def _submit_stop(self, pending: _PendingStop) -> None:
        """Queue ``pending`` on the cluster; on a fresh thread if the cluster refuses."""
        try:
            builder = self._cluster.add_task(pending.run).on_complete(pending.on_complete)
            handle = _named(builder, f"{self._name}.stop").submit()
        except BaseException as exc:
            threading.Thread(
                target=pending.run, name=f"cluster-intermittent-stop ({self._name})"
            ).start()
            if isinstance(exc, ClusterError):  # stopped, or a full queue that rejects
                return
            raise
        with self._lock:
            pending.handle = handle
            stolen = pending.stolen
        if stolen:  # an attach() ran it meanwhile: the task is now pointless
            handle.cancel()

    def _stopped(self, pending: _PendingStop) -> None:
        """Record that ``pending``'s stop callable has run; wake waiting attaches."""
        with self._lock:
            pending.done = True
            if self._pending is pending:  # always: no start happens while it is pending
                self._pending = None
                self._running = False
            self._changed.notify_all()

    def __repr__(self) -> str:
        state = "running" if self._running else "idle"
        return f"<Intermittent {self._name!r} {state} attachments={self._count}>"


def poll(cluster: Cluster, action: Callable[[], object], every: Duration) -> Intermittent:
    """An ``Intermittent`` whose operation calls ``action()`` every ``every`` seconds.

    The first attachment submits a repeating task (SPEC §11, first run at once); the
    release of the last one cancels its series, and its stop returns only once no
    call of ``action`` is still going (a cancelled run is abandoned by the cluster,
    but its call may still be inside ``action``): so a re-attach never makes two
    calls of ``action`` overlap. Inside ``action``, ``cluster.current()`` is the
    run's context; an action that honours ``cancelled``/``check()`` lets a stop
    finish promptly.
    """
    if not callable(getattr(cluster, "add_task", None)):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    function(action, "action")
    period = seconds(every, "every", positive=True)
    name = _qualname(action, "poll")

    def start() -> StopFn:
        gate = _PollGate(action)
        builder = _named(cluster.add_task(gate), name)
        repeat = getattr(builder, "repeat", None)
        if repeat is None:
            raise NotImplementedError("poll() needs TaskBuilder.repeat() (SPEC §11)")
        handle: TaskHandle[object] = repeat(every=period).submit()

        def stop() -> None:
            gate.close()  # first: no new call of action begins ...
            handle.cancel()  # ... the series ends ...
            gate.wait_idle()  # ... and the call in progress, if any, has returned

        return stop

    return Intermittent(cluster, start, name=name)


class _PollGate:
    """Calls ``action`` for each run of a poll series until closed; tracks calls in flight."""

    __slots__ = ("_action", "_closed", "_idle", "_inside", "_lock")

    def __init__(self, action: Callable[[], object]) -> None:
        self._action = action
        self._lock = threading.Lock()
        # ---- guarded by _lock ----
        self._closed = False  # the series is being stopped: call action no more
        self._inside = 0  # calls of action in progress (runs never overlap: 0 or 1)
        self._idle = threading.Condition(self._lock)  # notified when _inside drops to 0

    def __call__(self) -> object:
        with self._lock:
            if self._closed:
                return None
            self._inside += 1
        try:
            return self._action()
        finally:
            with self._lock:
                self._inside -= 1
                if not self._inside:
                    self._idle.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def wait_idle(self) -> None:
        with self._lock:
            while self._inside:
                self._idle.wait(_MAX_WAIT)


# ====================================================================== Lifecycle

State = Literal["inactive", "active", "loading", "error"]
_STATES: Final[frozenset[str]] = frozenset({"inactive", "active", "loading", "error"})

#: How many recent transitions a Lifecycle remembers for ``wait_for_state_change``.
_HISTORY: Final = 32


class LifecycleContext:
    """The token ``apply_config(ctx, config)`` receives, like a task's context.

    ``cancelled`` is set, and ``check()`` raises ``TaskCancelledError``, once a later
    ``configure()`` is called (``reason == "superseded"``) or ``stop()`` is
    (``"stopped"``). It stays uncancelled after ``apply_config`` returns until then,
    so work that ``apply_config`` left running in the background can watch it.
    """

    __slots__ = ("_reason", "cancelled")

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._reason: str | None = None  # written once, before cancelled is set

    @property
    def reason(self) -> str | None:
        """``None``, ``"superseded"`` or ``"stopped"``."""
        return self._reason

    def check(self) -> None:
        """Raise ``TaskCancelledError`` if this configuration was cancelled."""
        reason = self._reason
        if reason is not None:
            what = "a later configure()" if reason == "superseded" else "stop()"
            raise TaskCancelledError(f"this configuration was cancelled by {what}")

    def _cancel(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
            self.cancelled.set()

    def __repr__(self) -> str:
        return f"<LifecycleContext reason={self._reason}>"


class _Turn:
    """One ``configure()`` call waiting for, or holding, its turn to apply."""

    __slots__ = ("ctx", "dropped", "session", "thread")

    def __init__(self, session: int, thread: int) -> None:
        self.ctx = LifecycleContext()
        self.session = session  # the start() it was called under
        self.thread = thread  # ident of the calling thread, which applies it
        self.dropped = False  # removed by stop() before its turn came (guarded by _lock)


class Lifecycle(Generic[C]):
    """A driver run by its configuration (SPEC §19).

    ``start()`` makes it ready (``"inactive"`` → ``"active"``). ``configure(data)``
    decodes ``data`` with ``read_config`` and calls ``apply_config(ctx, config)`` on
    the caller's thread (so that its error is raised from ``configure``): the state
    is ``"loading"`` meanwhile, then ``"active"``, or ``"error"`` if decoding or
    applying raised. ``stop()`` → ``"inactive"``.

    Decided:

    * Configure calls are applied one at a time, in call order (a FIFO queue of
      turns, not just a lock: Python's locks are not fair). A later call cancels
      the ``ctx`` of every earlier one at once, then waits for its turn. An earlier
      call whose turn comes after it was superseded is still applied, with its
      ``ctx`` already cancelled; if ``apply_config`` then raises the
      ``TaskCancelledError`` of ``ctx.check()``, ``configure`` raises it but the
      state stays ``"loading"`` for the later call (being superseded is not a
      configuration error).
    * ``stop()`` does not wait for a running ``apply_config``: it cancels its ``ctx``
      and the state becomes ``"inactive"`` at once; what that apply later returns
      or raises goes to its ``configure`` caller and changes no state. Calls still
      waiting for their turn raise ``TaskCancelledError`` at once. A later
      ``start()`` and ``configure()`` wait for the abandoned apply to return, so
      applies never overlap, across ``stop()``/``start()`` too. (So ``stop()`` may be
      called from inside ``apply_config``, or from a thread it waits for.)
    * ``start()`` while started and ``stop()`` while stopped are no-ops.
    * ``configure()`` from inside ``apply_config`` would wait for itself: it raises
      ``RuntimeError``, as ``configure()`` while not started does.
    """

    def __init__(
        self,
        apply_config: Callable[[LifecycleContext, C], object],
        *,
        read_config: Callable[[bytes | str], C] = json.loads,
    ) -> None:
        self._apply = function(apply_config, "apply_config")
        self._read: Callable[[bytes | str], C] = function(read_config, "read_config")
        self._lock = threading.Lock()
        # ---- guarded by _lock ----
        self._state: State = "inactive"
        self._version = 0  # transitions so far: a waiter cannot miss A -> B -> A
        self._recent: deque[State] = deque(maxlen=_HISTORY)  # state after each transition
        self._started = False
        self._session = 0  # incremented by each start(): tells stale turns apart
        self._turns: deque[_Turn] = deque()  # configure calls in call order; [0] applies
        self._latest: LifecycleContext | None = None  # newest configure's ctx, this session
        # Notified on every transition and whenever the head of _turns changes.
        self._changed = threading.Condition(self._lock)

    @property
    def state(self) -> str:
        """``"inactive"``, ``"active"``, ``"loading"`` or ``"error"``.

        (Typed ``str``, not a ``Literal``: a type checker would otherwise narrow it
        after one comparison and reject the next, though another thread changes it.)
        """
        return self._state

    def _set_state_locked(self, state: State) -> None:
        if state != self._state:
            self._state = state
            self._version += 1
            self._recent.append(state)
            self._changed.notify_all()

    def start(self) -> None:
        """Make the driver ready to be configured: ``"inactive"`` → ``"active"``."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._session += 1
            self._set_state_locked("active")

    def stop(self) -> None:
        """Cancel the current configuration and go ``"inactive"``; does not wait."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            if self._latest is not None:
                self._latest._cancel("stopped")
                self._latest = None
            turns = self._turns
            while len(turns) > 1:  # all but the one applying now, if any
                turn = turns.pop()
                turn.dropped = True
                turn.ctx._cancel("stopped")
            self._set_state_locked("inactive")
            self._changed.notify_all()  # the dropped turns leave

    def configure(self, data: bytes | str) -> None:
        """Decode ``data`` with ``read_config`` and apply it with ``apply_config``.

        Waits for the earlier calls to be applied first. Raises what decoding or
        applying raised (state ``"error"``), ``RuntimeError`` if not started, and
        ``TaskCancelledError`` if ``stop()`` came before this call's turn.
        """
        if not isinstance(data, (bytes, bytearray, str)):
            raise TypeError(f"data must be bytes or str, got {type(data).__name__}")
        me = threading.get_ident()
        with self._lock:
            if not self._started:
                raise RuntimeError("configure() called on a Lifecycle that is not started")
            turns = self._turns
            if turns and turns[0].thread == me:
                raise RuntimeError(
                    "configure() called from inside apply_config would wait for itself"
                )
            turn = _Turn(self._session, me)
            if self._latest is not None:
                self._latest._cancel("superseded")
            self._latest = turn.ctx
            turns.append(turn)
            while turns[0] is not turn:
                self._changed.wait(_MAX_WAIT)
                if turn.dropped:
                    raise TaskCancelledError(
                        "the Lifecycle was stopped before this configuration was applied"
                    )
            if self._session == turn.session:
                self._set_state_locked("loading")
        outcome: State | None = "active"
        try:
            config = self._read(data)
            self._apply(turn.ctx, config)
        except TaskCancelledError:
            outcome = None if turn.ctx.reason == "superseded" else "error"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            with self._lock:
                turns.popleft()
                if outcome is not None and self._started and self._session == turn.session:
                    self._set_state_locked(outcome)
                self._changed.notify_all()  # the next turn begins

    def wait_for_state_change(self, source: str, timeout: Duration | None = None) -> str:
        """Block while the state is ``source``; return the state it changed to.

        Returns at once if the state is not ``source``. Otherwise wakes on the next
        transition, even one that leaves ``source`` and comes back before this
        thread runs again, and returns the state of that first transition (which
        may differ from ``state`` by then). ``TimeoutError`` if ``timeout`` passes.
        """
        if source not in _STATES:
            raise ValueError(f"source must be one of {sorted(_STATES)}, got {source!r}")
        limit = None if timeout is None else seconds(timeout, "timeout")
        with self._lock:
            if self._state != source:
                return self._state
            seen = self._version
            deadline = None if limit is None else time.monotonic() + limit
            while self._version == seen:
                if deadline is None:
                    self._changed.wait(_MAX_WAIT)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the Lifecycle state stayed {source!r} for {limit}s")
                self._changed.wait(min(remaining, _MAX_WAIT))
            # The state right after transition seen + 1, if still remembered.
            first = self._version - len(self._recent) + 1  # transition of _recent[0]
            if seen + 1 >= first:
                return self._recent[seen + 1 - first]
            return self._state

    def __repr__(self) -> str:
        return f"<Lifecycle {self._state}>"
