"""concurrent.futures and asyncio on top of the cluster (SPEC §16).

* ``Executor``: a ``concurrent.futures.Executor`` that behaves like
  ``ThreadPoolExecutor`` and runs its calls on a private ``Cluster``.

How the executor runs calls. A call is not one cluster task each: that costs a
cluster task (builder, record, handle, two trips through the cluster lock) on top
of the ``Future`` the call needs anyway, and measured as slow as
``ThreadPoolExecutor`` itself. Instead ``submit`` appends ``(future, fn, args,
kwargs)`` to the executor's own deque, and up to ``max_workers`` *drainers* (cluster
tasks) pop and run calls until the deque is empty, then end. So in a burst the
submitter and the workers only touch the deque (atomic under the GIL), never a lock;
a drainer is started (one cluster ``submit``) only while fewer than ``max_workers``
are draining. A call that waits in the deque has not started: ``Future.cancel()``
succeeds, and the drainer that reaches it drops it
(``set_running_or_notify_cancel()``, exactly what ``ThreadPoolExecutor``'s workers do).

Two races are closed without a lock on the fast path, by ordering (the GIL makes
each deque operation and each attribute access atomic and sequentially consistent):

* a drainer that finds the deque empty first gives up its slot, *then* looks at the
  deque again; a submitter first appends, *then* counts the drainers. Either the
  drainer sees the new call, or the submitter sees the free slot and starts a drainer.
* ``shutdown`` first marks the executor closed, *then* cancels what waits in the
  deque and stops the cluster; ``submit`` first appends, *then* looks at the mark. A
  submit that sees the mark takes its call back out of the deque and raises
  ``RuntimeError``; if it is no longer there, a drainer ran it or ``shutdown``
  cancelled it, and the submit returns its future, as if it had come first.

``map`` makes no Future per call (a Future is ten objects for the cyclic GC to
traverse, and map keeps all of them until they are read): its calls share one
``_MapRun``, which stands in for their futures in the deque and keeps their
outcomes in a list, in order.

At interpreter exit, ``ThreadPoolExecutor`` joins its threads, so every queued call
still runs. The cluster's own exit hook cancels whatever is left, so this module
registers a hook of its own, when the first Executor is made, that stops each live
executor's cluster gracefully first (``threading`` runs these hooks last registered
first). This module imports ``_cluster`` and ``_builder`` only where it uses them,
so that ``_builder`` may import ``await_handle`` at its top.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, _base
from concurrent.futures import Executor as _BaseExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar

from ._errors import ClusterStoppedError
from ._validate import deadline as _deadline
from ._validate import integer

if TYPE_CHECKING:  # imported where used: _builder may import this module first
    from ._cluster import Cluster

__all__ = ["Executor"]

log = logging.getLogger("cluster")

P = ParamSpec("P")
T = TypeVar("T")

#: One queued call: its future (or, for map's calls, their ``_MapRun``), the function
#: and its arguments.
_Call: TypeAlias = (
    "tuple[Future[Any] | _MapRun, Callable[..., Any], tuple[Any, ...], dict[str, Any]]"
)

_NO_KWARGS: dict[str, Any] = {}  # shared by map's calls; ``fn(**kwargs)`` copies it
_SHUTDOWN = "cannot schedule new futures after shutdown"
_EXIT = "cannot schedule new futures after interpreter shutdown"
_FORKED = "cannot schedule new futures in a forked child process"

#: Pacing: each time the backlog reaches a multiple of ``_PACE + 1`` calls while every
#: drainer is busy, the submitter yields the GIL (``sleep(0)``) so that they catch up.
#: Left alone, a submitter runs a whole GIL switch interval (5 ms) at a time and queues
#: thousands of calls; each queued call is ten GC-tracked objects (mostly its Future),
#: which the cyclic GC traverses again at every collection they survive. Measured
#: (200,000 no-op submits, 4 workers): the backlog stays under ~500 instead of ~6,000
#: and the cost per call falls by about a third. When the drainers are all blocked
#: (long calls), it costs one ``sleep(0)`` per 256 submits.
_PACE = 255
_yield = functools.partial(time.sleep, 0)


def _fast_future() -> type[Future[Any]] | None:
    """``Future`` if its internals are those the drainer's fast path relies on, else None.

    The drainer settles plain Futures with their lock and fields directly, as their
    own ``set_running_or_notify_cancel()`` and ``set_result()`` do (the same code in
    CPython 3.11, 3.12 and 3.13): it saves the two method calls, their ``with``
    blocks and a ``notify_all()`` with nobody waiting, about 15 % of a no-op call end
    to end.
    Should a Python version change them, the check fails and the methods are used.
    """
    probe: Any = Future()
    try:
        ok = (
            isinstance(probe._condition, threading.Condition)
            and isinstance(getattr(probe._condition, "_waiters", None), deque)
            and probe._state == _PENDING_STATE
            and probe._waiters == []
            and probe._done_callbacks == []
            and callable(probe._invoke_callbacks)
            and probe.set_running_or_notify_cancel()
            and probe._state == _RUNNING_STATE
        )
        probe.set_result(None)
        ok = ok and probe._state == _FINISHED_STATE and probe._result is None
    except Exception:
        return None
    return Future if ok else None


_PENDING_STATE = getattr(_base, "PENDING", None)
_RUNNING_STATE = getattr(_base, "RUNNING", None)
_FINISHED_STATE = getattr(_base, "FINISHED", None)
_FAST_FUTURE = _fast_future()

#: The longest single wait of ``as_completed`` (longer waits loop), so that a huge
#: finite timeout never overflows ``SimpleQueue.get``.
_MAX_WAIT = 3600.0

#: The state of every executor not yet garbage collected, for the exit and fork hooks.
_LIVE: weakref.WeakSet[_State] = weakref.WeakSet()
_exiting = False  # set once by the exit hook, never cleared


def _default_workers() -> int:
    """ThreadPoolExecutor's default: ``min(32, CPUs + 4)`` (I/O-bound work mostly waits)."""
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return min(32, (count or 1) + 4)


class _State:
    """What an Executor shares with its drainers (so that they keep no reference to
    the Executor itself, which may be collected, as a ThreadPoolExecutor may).

    ``queue`` needs no lock (each deque operation is atomic). ``lock`` guards
    ``drainers`` and ``stopping``; it is never held while calling into the cluster or
    into user code. ``closed`` and ``cancelling`` are written only while ``lock`` is
    held, and read without it by ``submit`` (see the module docstring).
    """

    __slots__ = (
        "__weakref__",
        "cancelling",
        "closed",
        "cluster",
        "drainers",
        "lock",
        "queue",
        "size",
        "stopping",
    )

    def __init__(self, cluster: Cluster, size: int) -> None:
        self.cluster = cluster
        self.size = size  #: at most this many drainers (the cluster's workers)
        self.queue: deque[_Call] = deque()  # calls not yet started, oldest first
        self.lock = threading.Lock()
        # ---- guarded by lock ----
        self.drainers = 0  # drainer tasks submitted and not yet retired
        self.stopping = False  # the cluster was told to stop
        self.closed: str | None = None  # why submit() refuses work, once it does
        self.cancelling = False  # shutdown(cancel_futures=True) was called

    # -- submission -------------------------------------------------------------

    def admit(self, call: _Call) -> None:
        """The slow path of a submit, after ``call`` was appended: start a drainer if a
        slot is free, or, if the executor closed meanwhile, take the call back.

        Raises RuntimeError if the call was taken back because the executor closed
        (or its cluster stopped), and whatever starting a drainer raised otherwise; a
        call that is taken back never runs. If a drainer took the call first, it runs,
        and the submit succeeds.
        """
        error: BaseException | None = None
        if self.closed is None:
            try:
                self.spawn()
                return
            except ClusterStoppedError:  # stopped behind our back: the call would strand
                pass
            except BaseException as exc:  # e.g. a thread that could not start
                error = exc
        try:
            self.queue.remove(call)
        except ValueError:  # already taken: a drainer runs it, or shutdown cancelled it
            if self.cancelling:  # cancel_futures: unless it has started, it never will
                _cancel_taken(call)
            return
        if error is not None:
            raise error
        raise RuntimeError(self.closed or _SHUTDOWN)

    def spawn(self) -> None:
        """Start one more drainer, unless ``size`` of them run or nothing waits."""
        with self.lock:
            if self.drainers >= self.size or not self.queue:
                return
            self.drainers += 1
        try:
            self.cluster.add_task(self.drain).submit()
        except BaseException:
            with self.lock:
                self.drainers -= 1
            raise

    # -- the drainers -------------------------------------------------------------

    def drain(self) -> None:
        """A drainer (one cluster task): run queued calls until the queue is empty."""
        popleft = self.queue.popleft
        fast = _FAST_FUTURE
        while True:
            try:
                future, fn, args, kwargs = popleft()
            except IndexError:
                if self.retire():
                    return
                continue
            try:
                if type(future) is fast:
                    # set_running_or_notify_cancel() and set_result(), inlined: see
                    # _FAST_FUTURE. Anything unusual goes through the methods.
                    f: Any = future
                    cond = f._condition
                    cond.acquire()
                    if f._state == _PENDING_STATE:
                        f._state = _RUNNING_STATE
                        cond.release()
                        started = True
                    else:  # cancelled while queued (or misused): the method decides
                        cond.release()
                        started = f.set_running_or_notify_cancel()
                    if started:
                        try:
                            result = fn(*args, **kwargs)
                        except BaseException as exc:  # KeyboardInterrupt too, as in TPE
                            # Start the traceback at the user's frame, not this loop's.
                            exc.__traceback__ = exc.__traceback__.tb_next  # type: ignore[union-attr]
                            f.set_exception(exc)
                        else:
                            cond.acquire()
                            try:
                                settled = f._state == _RUNNING_STATE
                                if settled:
                                    f._result = result
                                    f._state = _FINISHED_STATE
                                    for waiter in f._waiters:  # wait() and as_completed()
                                        waiter.add_result(f)
                                    if cond._waiters:
                                        cond.notify_all()
                            finally:
                                cond.release()
                            if not settled:  # settled by someone else: the method raises
                                f.set_result(result)
                            elif f._done_callbacks:
                                f._invoke_callbacks()
                elif future.set_running_or_notify_cancel():  # False: cancelled while queued
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:
                        exc.__traceback__ = exc.__traceback__.tb_next  # type: ignore[union-attr]
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            except BaseException:
                # A done-callback raised a BaseException, or someone settled the future
                # behind our back: ThreadPoolExecutor loses the worker thread then; we
                # log it and go on with the next call.
                log.exception("Executor: settling the future of %r failed", fn)
            # Hold nothing of a finished call while the next one runs.
            future = fn = args = kwargs = result = f = cond = None  # type: ignore[assignment]

    def retire(self) -> bool:
        """The queue looked empty: give up this drainer's slot; False if it must go on."""
        with self.lock:
            self.drainers -= 1
        if not self.queue:  # looked at *after* giving up the slot: see the module docstring
            return True
        with self.lock:
            if self.drainers >= self.size:  # the others will see the new calls
                return True
            self.drainers += 1
        return False

    # -- shutdown -------------------------------------------------------------------

    def close(self, reason: str, *, cancel: bool = False) -> None:
        """Refuse new work from now on (the first reason given is the one reported);
        ``cancel``: what has not started is being cancelled."""
        with self.lock:
            if self.closed is None:
                self.closed = reason
            if cancel:
                self.cancelling = True

    def cancel_queued(self) -> None:
        """Cancel every call that has not started (``shutdown(cancel_futures=True)``)."""
        popleft = self.queue.popleft
        while True:
            try:
                future, _fn, args, _kwargs = popleft()
            except IndexError:
                return
            if isinstance(future, _MapRun):
                future.cancel(args[0])
            elif future.cancel():
                # Tell the waiters of wait() and as_completed() at once: they hear
                # only this call, which no drainer will now make (gh-109934).
                future.set_running_or_notify_cancel()

    def stop_soon(self) -> None:
        """Let the cluster stop once its drainers are done, without waiting here.

        A task calls ``cluster.stop()``: from a cluster thread, that starts the
        graceful stop and returns. Queued behind the running drainers, it runs when
        a worker is free; the drainers still running finish the queue first.
        """
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
        cluster = self.cluster
        with contextlib.suppress(ClusterStoppedError):  # stopped already
            cluster.add_task(cluster.stop).submit()

    def release(self) -> None:
        """The Executor was garbage collected without shutdown: ``shutdown(wait=False)``."""
        self.close(_SHUTDOWN)
        self.stop_soon()

    def reset_in_child(self) -> None:
        """After fork: the child has no drainers, and its cluster is stopped."""
        self.lock = threading.Lock()
        self.queue.clear()  # the parent runs these calls
        self.drainers = 0
        self.stopping = True
        if self.closed is None:
            self.closed = _FORKED


def _cancel_taken(call: _Call) -> None:
    """Cancel a call that a drainer may have taken but not started yet (the drainer's
    ``set_running_or_notify_cancel()`` then tells the waiters)."""
    future, _fn, args, _kwargs = call
    if isinstance(future, _MapRun):
        future.cancel(args[0])
    else:
        future.cancel()


class Executor(_BaseExecutor):
    """A ``concurrent.futures.Executor`` backed by a Cluster; a drop-in for
    ``ThreadPoolExecutor``.

    ``Executor(max_workers=None, **cluster_options)`` creates and runs
    ``Cluster(workers=max_workers, **cluster_options)``. ``max_workers`` defaults to
    ThreadPoolExecutor's ``min(32, CPUs + 4)``. ``submit`` returns real
    ``concurrent.futures.Future`` objects; ``map``, ``shutdown`` and the context
    manager behave as ThreadPoolExecutor's do. Unlike it, the worker threads all
    start at once, and ``shutdown(wait=True)`` called from one of them returns
    without waiting (it cannot wait for itself) instead of raising RuntimeError.
    """

    def __init__(self, max_workers: int | None = None, **cluster_options: Any) -> None:
        if max_workers is None:
            max_workers = _default_workers()
        else:
            integer(max_workers, "max_workers")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if "workers" in cluster_options:
            raise TypeError("Executor() takes max_workers, not workers")
        from . import Cluster

        _install_exit_hook()
        cluster = Cluster(workers=max_workers, **cluster_options)
        state = self._state = _State(cluster, max_workers)
        self._max_workers = max_workers
        if _exiting:
            state.closed = _EXIT
        else:
            cluster.run()
        _LIVE.add(state)
        # Like a ThreadPoolExecutor that is collected: its queued calls still run.
        finalizer = weakref.finalize(self, state.release)
        finalizer.atexit = False  # the exit hook stops the cluster itself

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return a Future of its value.

        RuntimeError after ``shutdown()``; TypeError at once if ``fn`` is not callable.
        """
        state = self._state
        if state.closed is not None:
            raise RuntimeError(state.closed)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        future: Future[T] = Future()
        call = (future, fn, args, kwargs)
        queue = state.queue
        queue.append(call)
        if state.closed is not None or state.drainers < state.size:  # after the append
            state.admit(call)
        elif not len(queue) & _PACE:
            _yield()
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | timedelta | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """``map(fn, *iterables)`` on the workers: results in order, errors where they occur.

        As in ThreadPoolExecutor, the iterables are consumed and every call is
        submitted before this returns; ``timeout`` counts from this call and raises
        TimeoutError from the iterator; closing the iterator early, or an error or
        timeout it raises, cancels the calls that have not started. ``chunksize``
        (an int >= 1) matters only to process pools and is ignored.
        """
        end = _deadline(timeout)
        integer(chunksize, "chunksize")
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        state = self._state
        run = _MapRun(fn)
        claims = run.unclaimed
        slots = run.values
        call_one = run.call
        queue = state.queue
        enqueue = queue.append
        size = state.size
        # submit()'s body, inlined: a method call per item is a good part of its cost.
        # zip: the shortest iterable ends it, as in map().
        for index, args in enumerate(zip(*iterables, strict=False)):
            if state.closed is not None:
                raise RuntimeError(state.closed)
            claims[index] = None
            slots.append(_PENDING)
            call = (run, call_one, (index, args), _NO_KWARGS)
            enqueue(call)
            if state.closed is not None or state.drainers < size:
                state.admit(call)
            elif not len(queue) & _PACE:
                _yield()
        return _map_results(run, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; ``cancel_futures`` cancels those not yet started; ``wait``
        blocks until the rest have run and the worker threads have exited.

        With ``wait=False`` it returns at once and the queued calls still run. Safe
        to call several times.
        """
        state = self._state
        state.close(_SHUTDOWN, cancel=cancel_futures)
        if cancel_futures:
            state.cancel_queued()
        if wait:
            state.cluster.stop()  # graceful: runs what is queued, joins the threads
        else:
            state.stop_soon()

    def __repr__(self) -> str:
        state = self._state
        status = "running" if state.closed is None else "shut down"
        return (
            f"<cluster.Executor {status} max_workers={self._max_workers} queued={len(state.queue)}>"
        )


class _Failure:
    """The outcome of a map call that raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_PENDING: Any = object()  # a map call that has not ended
_CANCELLED: Any = object()  # a map call cancelled by shutdown(cancel_futures=True)
_GONE = object()


class _MapRun:
    """One ``map()`` call: its function, the outcome of each call in order, its waiter.

    Its calls wait in the executor's deque as ``(run, run.call, (index, args), {})``:
    the run stands in for their futures (the drainer's ``set_*`` calls on it do
    nothing) and ``call`` runs one and records its outcome.

    * ``values[i]``: ``_PENDING`` until call ``i`` ends, then its value, a
      ``_Failure``, or ``_CANCELLED``; the iterator replaces it with None once read.
    * ``unclaimed``: the indices of calls not yet started. Starting a call and
      cancelling it both pop its index (one atomic dict operation), so exactly one
      of them wins, as ``set_running_or_notify_cancel`` and ``cancel`` do on a Future.
    * ``waiting``: the index the iterator sleeps on (-1: none), written under ``cond``.
      A call stores its outcome *then* reads ``waiting``; the iterator sets
      ``waiting`` *then* reads the outcome: one of them sees the other.
    """

    __slots__ = ("cond", "fn", "unclaimed", "values", "waiting")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.values: list[Any] = []
        self.unclaimed: dict[int, None] = {}
        self.cond = threading.Condition(threading.Lock())
        self.waiting = -1

    # -- the Future protocol of the drainer: ``call`` does the work --

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, result: object) -> None:
        pass

    def set_exception(self, exception: BaseException | None) -> None:
        pass

    # -- on a drainer --

    def call(self, index: int, args: tuple[Any, ...]) -> None:
        """Run call ``index`` unless it was cancelled, and record how it ended."""
        if self.unclaimed.pop(index, _GONE) is _GONE:
            return  # the iterator was closed, or shutdown cancelled it
        try:
            value = self.fn(*args)
        except BaseException as exc:
            exc.__traceback__ = exc.__traceback__.tb_next  # type: ignore[union-attr]
            value = _Failure(exc)
        self._settle(index, value)
        # A traceback may keep this frame: hold nothing in it.
        value = args = self = None  # type: ignore[assignment]

    def cancel(self, index: int) -> None:
        """Cancel call ``index`` if it has not started (shutdown's ``cancel_futures``)."""
        if self.unclaimed.pop(index, _GONE) is not _GONE:
            self._settle(index, _CANCELLED)

    def _settle(self, index: int, value: object) -> None:
        self.values[index] = value
        if self.waiting == index:
            with self.cond:
                self.cond.notify()

    # -- on the iterator --

    def take(self, index: int, end: float | None) -> Any:
        """The value of call ``index`` (waiting until ``end``), or raise its error."""
        values = self.values
        value = values[index]
        if value is _PENDING:
            value = self._wait(index, end)
        values[index] = None  # from here on, only the caller holds the value
        if type(value) is _Failure:
            error = value.error
            value = None
            try:
                raise error
            finally:
                del error  # no cycle through the traceback
        if value is _CANCELLED:
            raise CancelledError()
        return value

    def _wait(self, index: int, end: float | None) -> Any:
        values = self.values
        with self.cond:
            self.waiting = index
            try:
                while (value := values[index]) is _PENDING:
                    if end is None:
                        self.cond.wait()
                        continue
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError()
                    self.cond.wait(remaining)
            finally:
                self.waiting = -1
        return value


def _map_results(run: _MapRun, end: float | None) -> Iterator[Any]:
    """map's iterator: each call's value in order; cancels the rest if it stops early."""
    try:
        for index in range(len(run.values)):
            # Through a call, so that this frame never holds a value the caller dropped.
            yield run.take(index, end)
    finally:
        run.unclaimed.clear()  # the calls not yet started never will (as TPE cancels them)


# ---------------------------------------------------------------------- process events


def _at_exit() -> None:
    """At interpreter exit, as ThreadPoolExecutor: refuse new work, run what is queued."""
    global _exiting
    _exiting = True
    states = list(_LIVE)
    for state in states:
        state.close(_EXIT)
    for state in states:
        try:
            state.cluster.stop()
        except Exception:  # never let one executor keep the others from finishing
            log.exception("stopping an Executor's cluster at exit failed")


def _after_fork_in_child() -> None:
    for state in list(_LIVE):
        state.reset_in_child()


_hook_lock = threading.Lock()
_hook_installed = False  # guarded by _hook_lock


def _install_exit_hook() -> None:
    """Register ``_at_exit`` once, when the first Executor is made.

    By then ``_cluster`` has registered its own hook, whatever the import order, and
    ``threading`` runs these hooks last registered first: ours runs before the
    cluster's cancels what is left.
    """
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        _hook_installed = True
    try:
        threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
    except RuntimeError:  # the interpreter is already exiting
        pass
    except AttributeError:  # pragma: no cover - other interpreters
        import atexit

        atexit.register(_at_exit)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
