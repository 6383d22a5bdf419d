"""The parent-side handle of one child process, and the child's side of its protocol.

A :class:`Child` owns one process and one duplex ``multiprocessing.Pipe``; nothing
(no queue, no lock, no pipe) is shared with any other child, so a child killed at
any instant can wedge neither the parent nor its siblings (the pebble#163 /
celery#4185 class of bug). The parent drives it from one thread: ``begin()`` sends
one attempt, ``wait()`` blocks on the pipe, the process and a caller's ``wake``
connection at once, and ``kill()`` ends the child's whole process group.

The protocol: every message is one ``send_bytes`` frame whose first byte is its
kind, the rest a stdlib pickle (highest protocol).

parent -> child
    ``R`` ``(task_id, attempt, deadline, payload | None)`` run an attempt; a payload
    over ``_INLINE`` bytes follows as its own frame (not copied into the header).
    ``S`` stop: the child leaves its loop and exits. EOF means the same.
child -> parent (only while an attempt runs; nothing while idle)
    ``P`` value: ``current().progress(value)``.  ``B``: ``current().reset_backoff()``.
    ``V`` value: the attempt returned.  ``E`` records: the attempt raised (see
    ``_error_records``); the attempt's last frame is always ``V`` or ``E``.

Neither side ever writes while the other may be blocked writing to it: the parent
writes only to an idle child (which is always reading), and the child writes only
during an attempt (when the parent writes nothing), so a 50 MB frame either way
cannot deadlock on a full pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.util  # registers its atexit hook before ours (ours runs first)
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ._errors import ClusterError, WorkerCrashedError
from ._task import _CURRENT, TaskContext
from ._validate import seconds

__all__ = ["Attempt", "Child", "Outcome", "dump_call", "kill_all", "mp_context"]

_log = logging.getLogger("cluster")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_INLINE = 64 * 1024  #: payloads up to this size travel inside the ``R`` header frame
_REAP_TIMEOUT = 5.0  #: how long to wait for a SIGKILLed child's exit status
_MAX_CHAIN = 64  #: exceptions of a __cause__/__context__ chain sent at most
_HAVE_PIDFD = sys.platform == "linux" and hasattr(os, "pidfd_open")

_RUN, _STOP = b"R", b"S"
_PROGRESS, _RESET, _VALUE, _ERROR = ord("P"), ord("B"), ord("V"), ord("E")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the child needs to build ``current()`` for one attempt."""

    task_id: str
    attempt: int  #: 0-based
    deadline: float | None  #: ``time.monotonic()`` seconds (system-wide on Linux), or None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: its value, or its error.

    ``error`` is the task's exception (with its ``__cause__``/``__context__`` chain
    re-linked and the child's traceback attached as a note), or a
    ``WorkerCrashedError`` when the child died. ``traceback`` is the child's
    formatted traceback of the whole chain (for dead letters and logs), or None.
    """

    value: Any = None
    error: BaseException | None = None
    traceback: str | None = None


# ----------------------------------------------------------------- start method, pickling


def mp_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ``start_method``.

    ``None`` means ``"forkserver"`` where the platform has it, else ``"spawn"``.
    ``"fork"`` is refused (forking a multithreaded process copies locks held by
    other threads). Under forkserver, this module is added to the server's preload
    list (if the server is not running yet) so each child starts as a bare fork.
    """
    available = multiprocessing.get_all_start_methods()
    if start_method is None:
        start_method = "forkserver" if "forkserver" in available else "spawn"
    elif not isinstance(start_method, str):
        raise TypeError(f"start_method must be a str or None, got {type(start_method).__name__}")
    if start_method == "fork":
        raise ValueError(
            "start_method 'fork' is not supported: forking a multithreaded process is unsafe; "
            "use 'forkserver' or 'spawn'"
        )
    if start_method not in ("forkserver", "spawn") or start_method not in available:
        usable = [m for m in ("forkserver", "spawn") if m in available]
        raise ValueError(f"start_method must be one of {usable} or None, got {start_method!r}")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        _preload_in_forkserver(ctx)
    return ctx


def _preload_in_forkserver(ctx: multiprocessing.context.BaseContext) -> None:
    # The preload list has a setter but no getter; read the stdlib's private
    # attribute so that a list the program set itself is extended, not replaced.
    # Only effective before the server starts (it reads the list once).
    from multiprocessing import forkserver

    modules = getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", None)
    if isinstance(modules, list) and __name__ not in modules:
        ctx.set_forkserver_preload([*modules, __name__])


def dump_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """``pickle.dumps((fn, args, kwargs))`` (stdlib pickle, highest protocol).

    Raises ``TypeError`` naming the culprit when it does not pickle: ``fn``,
    ``argument N`` (1-based position) or ``keyword argument 'name'``. The culprit
    is looked for only on failure; the happy path is one ``dumps``.
    """
    if type(args) is not tuple:
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    if type(kwargs) is not dict:
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    try:
        return pickle.dumps((fn, args, kwargs), _PROTOCOL)
    except Exception as exc:
        raise _call_error(fn, args, kwargs, exc) from exc


def _call_error(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
) -> TypeError:
    def fails(obj: object) -> str | None:
        try:
            pickle.dumps(obj, _PROTOCOL)
        except Exception as err:
            return _describe(err)
        return None

    if (why := fails(fn)) is not None:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        return TypeError(f"fn {name} does not pickle: {why}")
    for i, arg in enumerate(args, 1):
        if (why := fails(arg)) is not None:
            return TypeError(f"argument {i} (a {_type_name(arg)}) does not pickle: {why}")
    for key, arg in kwargs.items():
        if (why := fails(arg)) is not None:
            return TypeError(
                f"keyword argument {key!r} (a {_type_name(arg)}) does not pickle: {why}"
            )
    return TypeError(f"the call does not pickle: {_describe(exc)}")


def _type_name(obj: object) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__} object>"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_safe_str(exc)}"


# ------------------------------------------------------------- exceptions across the pipe
#
# pickle keeps an exception's ``args`` and ``__dict__`` but drops ``__cause__``,
# ``__context__``, ``__suppress_context__`` and ``__traceback__``. The child therefore
# pickles each exception of the chain on its own and sends how they link; the parent
# unpickles each (one that fails becomes a ClusterError naming it) and re-links them.


class _ErrorPickler(pickle.Pickler):
    """Pickles exceptions that use ``BaseException.__reduce__`` so that their state is
    restored into ``__dict__`` directly: the default restores it through
    ``setattr``, which a frozen dataclass refuses."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            kind = type(obj)
            if (
                kind.__reduce__ is BaseException.__reduce__
                and kind.__reduce_ex__ is BaseException.__reduce_ex__
                and kind.__setstate__ is BaseException.__setstate__
            ):
                return (_rebuild_error, (kind, obj.args, dict(obj.__dict__) or None))
        return NotImplemented


def _rebuild_error(
    kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None
) -> BaseException:
    """Unpickle an exception pickled by ``_ErrorPickler`` (runs in the parent)."""
    try:
        exc = kind(*args)
    except Exception:  # e.g. a dataclass built with keywords: args holds none of them
        exc = kind.__new__(kind, *args)
    if state:
        exc.__dict__.update(state)
    return exc


#: One exception of a chain: (pickle or None, type name, message, traceback text,
#: problem pickling it or None, index of __cause__, index of __context__,
#: __suppress_context__).
_Record = tuple[bytes | None, str, str, str, str | None, int | None, int | None, bool]

_SET_CAUSE = BaseException.__dict__["__cause__"].__set__
_SET_CONTEXT = BaseException.__dict__["__context__"].__set__
_SET_SUPPRESS = BaseException.__dict__["__suppress_context__"].__set__


def _error_records(exc: BaseException, first_note: str = "") -> tuple[list[_Record], str]:
    """The chain of ``exc`` as records, and the formatted traceback of the whole chain."""
    chain: list[BaseException] = []
    index: dict[int, int] = {}
    todo = [exc]
    while todo and len(chain) < _MAX_CHAIN:
        e = todo.pop()
        if id(e) in index:
            continue
        index[id(e)] = len(chain)
        chain.append(e)
        todo.extend(x for x in (e.__context__, e.__cause__) if x is not None)
    pid = os.getpid()
    records: list[_Record] = []
    for i, e in enumerate(chain):
        buf = io.BytesIO()
        data: bytes | None
        try:
            _ErrorPickler(buf, _PROTOCOL).dump(e)
            data, problem = buf.getvalue(), None
        except Exception as err:
            data, problem = None, f"it does not pickle in the child: {_describe(err)}"
        try:
            frames = "".join(traceback.format_tb(e.__traceback__))
        except Exception:
            frames = ""
        note = f"Traceback in child process {pid} (most recent call last):\n{frames}".rstrip()
        if i == 0 and first_note:
            note = f"{note}\n{first_note}"
        cause = e.__cause__
        context = e.__context__
        records.append(
            (
                data,
                _type_name(e),
                _safe_str(e),
                note,
                problem,
                None if cause is None else index.get(id(cause)),
                None if context is None else index.get(id(context)),
                e.__suppress_context__,
            )
        )
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = records[0][3]
    return records, text


def _load_error(records: list[_Record]) -> BaseException:
    """Rebuild the chain sent by ``_error_records``; returns its head."""
    errors: list[BaseException] = []
    for data, type_name, message, note, problem, _, _, _ in records:
        exc: object = None
        if data is not None:
            try:
                exc = pickle.loads(data)
            except Exception as err:
                problem = f"it does not unpickle in the parent: {_describe(err)}"
            else:
                if not isinstance(exc, BaseException):
                    problem = f"it unpickled as a {_type_name(exc)}"
        if not isinstance(exc, BaseException):
            exc = ClusterError(f"{type_name}: {message} ({problem})")
        _add_note(exc, note)
        errors.append(exc)
    for exc, (*_, cause, context, suppress) in zip(errors, records, strict=True):
        # The descriptors themselves: a frozen dataclass's __setattr__ refuses these.
        with contextlib.suppress(Exception):
            if cause is not None:
                _SET_CAUSE(exc, errors[cause])
            if context is not None:
                _SET_CONTEXT(exc, errors[context])
            _SET_SUPPRESS(exc, suppress)
    return errors[0]


def _add_note(exc: BaseException, note: str) -> None:
    try:
        exc.add_note(note)
    except Exception:  # its __setattr__ refuses (a frozen dataclass): write its __dict__
        with contextlib.suppress(Exception):
            notes = exc.__dict__.setdefault("__notes__", [])
            if isinstance(notes, list):
                notes.append(note)


def _frame(tag: int, obj: object) -> memoryview:
    """One message: the tag byte, then ``obj`` pickled (written once, not concatenated)."""
    buf = io.BytesIO()
    buf.write(bytes((tag,)))
    pickle.Pickler(buf, _PROTOCOL).dump(obj)
    return buf.getbuffer()


# --------------------------------------------------------------------------- child side


class ChildTaskContext(TaskContext):
    """``current()`` inside a child process.

    ``cancelled`` is never set and ``reason`` stays None: on timeout or cancel the
    parent kills the child instead. ``progress`` and ``reset_backoff`` send events to
    the parent; after the attempt has ended they do nothing.
    """

    __slots__ = ("_conn", "_open", "_send_lock")

    def __init__(
        self, conn: multiprocessing.connection.Connection, lock: threading.Lock, attempt: Attempt
    ) -> None:
        self.task_id = attempt.task_id
        self.attempt = attempt.attempt
        self.deadline = attempt.deadline
        self._task = None
        self._reason = None
        self._event = None
        self._worker = None
        self._conn = conn
        # The child's own send lock (never shared with the parent): task threads may
        # send events while the main thread sends the outcome. Guards ``_open``.
        self._send_lock = lock
        self._open = True

    def progress(self, value: Any) -> None:
        """Send ``value`` to the parent's ``info().progress``; TypeError if it does not pickle."""
        try:
            frame = _frame(_PROGRESS, value)
        except Exception as exc:
            raise TypeError(
                f"progress value (a {_type_name(value)}) does not pickle: {_describe(exc)}"
            ) from exc
        self._send(frame)

    def reset_backoff(self) -> None:
        """Restart the task's backoff and retry-rule counts (see SPEC §10)."""
        self._send(b"B")

    def _send(self, frame: bytes | memoryview) -> None:
        with self._send_lock:
            if self._open:
                self._conn.send_bytes(frame)

    def _finish(self, frame: bytes | memoryview) -> None:
        """Send the attempt's outcome; later events from stray task threads are dropped."""
        with self._send_lock:
            self._open = False
            self._conn.send_bytes(frame)


def _child_main(conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    """The child process: run attempts from ``conn`` until told to stop or EOF."""
    os.setsid()  # its own process group: kill() signals grandchildren too
    # Ctrl-C is the parent's to handle (and after setsid the terminal no longer sends
    # it here). A no-op handler rather than SIG_IGN: an ignored disposition would be
    # inherited through exec by every process a task starts.
    signal.signal(signal.SIGINT, _ignore_signal)
    _watch_parent(parent_pid)
    send_lock = threading.Lock()
    while True:
        try:
            data = conn.recv_bytes()
            if data[:1] != _RUN:
                return  # stop
            task_id, number, deadline, payload = pickle.loads(memoryview(data)[1:])
            if payload is None:
                payload = conn.recv_bytes()
            del data
        except (EOFError, OSError):
            return  # the parent closed its end, or died
        ctx = ChildTaskContext(conn, send_lock, Attempt(task_id, number, deadline))
        frame = _run(payload, ctx)
        del payload
        try:
            ctx._finish(frame)
        except OSError:
            return
        del frame, ctx


def _ignore_signal(signum: int, frame: object) -> None:
    """The child's SIGINT handler: nothing (see ``_child_main``)."""


def _run(payload: bytes, ctx: ChildTaskContext) -> bytes | memoryview:
    """Run one attempt; always returns the outcome frame (never raises)."""
    try:
        try:
            fn, args, kwargs = pickle.loads(payload)
        except BaseException as exc:
            return _error_frame(
                exc, "(raised while unpickling the task's function and arguments in the child)"
            )
        token = _CURRENT.set(ctx)
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: fail the task
            return _error_frame(exc)
        finally:
            _CURRENT.reset(token)
            del fn, args, kwargs
        try:
            return _frame(_VALUE, value)
        except Exception as exc:
            error = TypeError(
                f"the return value (a {_type_name(value)}) does not pickle: {_describe(exc)}"
            )
            error.__cause__ = exc
            return _error_frame(error)
    except BaseException as exc:  # pragma: no cover - a failure in the code above
        with contextlib.suppress(BaseException):
            return _error_frame(exc)
        return _frame(_ERROR, ([(None, "BaseException", "", "", "unknown", None, None, False)], ""))


def _error_frame(exc: BaseException, note: str = "") -> memoryview:
    records, text = _error_records(exc, note)
    return _frame(_ERROR, (records, text))


def _watch_parent(parent_pid: int) -> None:
    """Kill this child's group when the parent process dies, even mid-attempt.

    A pidfd of the parent becomes readable when it exits (the whole process, unlike
    ``PR_SET_PDEATHSIG``, which fires when the *thread* that forked exits, and under
    forkserver names the server, which outlives the parent while children live).
    Between attempts, EOF on the pipe does the same job.
    """
    if not _HAVE_PIDFD:
        return
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(1)  # the parent is already gone
    except OSError:
        return  # no pidfd on this kernel: rely on EOF
    threading.Thread(
        target=_await_parent_exit, args=(fd,), name="cluster-parent-watch", daemon=True
    ).start()


def _await_parent_exit(fd: int) -> None:
    try:
        select.select([fd], [], [])
    except OSError:
        return  # cannot watch after all; EOF on the pipe still ends an idle child
    with contextlib.suppress(OSError):
        os.killpg(os.getpid(), signal.SIGKILL)  # the child leads its group (setsid)
    os._exit(1)


# -------------------------------------------------------------------------- parent side

_NEW, _IDLE, _RUNNING, _DEAD = "new", "idle", "running", "dead"

#: Started, not yet dead children, killed at interpreter exit: their processes are
#: not daemonic (so that tasks may start processes), and multiprocessing would
#: otherwise join them at exit, forever if one is busy. A strong set: a Child
#: dropped unclosed stays reachable until its process is dead.
_LIVE: set[Child] = set()


class Child:
    """One child process; one duplex Pipe of its own; no lock or queue shared with others.

    Driven by one thread (the executor's slot): ``start``, then ``begin``/``wait``
    per attempt. ``kill`` and ``close`` may also come from another thread (e.g. at
    exit); a ``wait`` in progress then returns a ``WorkerCrashedError`` outcome.
    A Child is used once: after it is dead, start a new one.
    """

    def __init__(self, ctx: multiprocessing.context.BaseContext, *, name: str) -> None:
        if not isinstance(ctx, multiprocessing.context.BaseContext):
            raise TypeError(f"ctx must be a multiprocessing context, got {type(ctx).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.name = name
        self.pid: int | None = None
        self.tasks = 0  #: attempts begun on this child
        self._ctx = ctx
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._pidfd: int | None = None  # the child's pidfd (Linux), else None
        self._dead_fd = -1  # readable once the child has exited: the pidfd, else sentinel
        self._attempt: Attempt | None = None
        self._exitcode: int | None = None
        # Serialises whole kills (held through the grace wait); taken before _lock.
        self._kill_lock = threading.Lock()
        # Guards _state, _waiting, _released and every use of _process (join, exitcode).
        self._lock = threading.Lock()
        self._state = _NEW
        self._waiting = False  # a wait() is using the handles: close them when it leaves
        self._released = False

    def __repr__(self) -> str:
        return f"<Child {self.name!r} pid={self.pid} {self._state} tasks={self.tasks}>"

    # ---- life

    def start(self) -> None:
        """Start the process. Returns once it is forked (it imports nothing more than
        this module under forkserver); the first attempt waits for it to be ready."""
        with self._lock:
            if self._state is not _NEW:
                raise RuntimeError(f"child {self.name!r} was already started")
            parent_end, child_end = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=_child_main, args=(child_end, os.getpid()), name=self.name, daemon=False
            )
            try:
                process.start()
            except BaseException:
                parent_end.close()
                self._state = _DEAD
                self._released = True
                raise
            finally:
                child_end.close()  # else the parent would never see EOF when the child dies
            self._process = process
            self._conn = parent_end
            self.pid = process.pid
            if _HAVE_PIDFD:
                with contextlib.suppress(OSError):
                    self._pidfd = os.pidfd_open(process.pid)
            self._dead_fd = self._pidfd if self._pidfd is not None else process.sentinel
            self._state = _IDLE
            _LIVE.add(self)

    @property
    def alive(self) -> bool:
        """True while the process runs (started, not killed, not exited)."""
        with self._lock:
            if self._state is _NEW or self._state is _DEAD:
                return False
            if self._pidfd is not None:
                try:
                    return not select.select([self._pidfd], [], [], 0)[0]
                except (OSError, ValueError):
                    return False
            assert self._process is not None
            return self._process.is_alive()

    # ---- attempts

    def begin(self, payload: bytes, attempt: Attempt) -> None:
        """Send one attempt (``payload`` from ``dump_call``) to the idle child.

        A child that died while idle is not reported here: the next ``wait()``
        returns its ``WorkerCrashedError``.
        """
        with self._lock:
            if self._state is not _IDLE:
                raise RuntimeError(f"child {self.name!r} is {self._state}, not idle")
            self._state = _RUNNING
            self._attempt = attempt
            self.tasks += 1
            conn = self._conn
        assert conn is not None
        inline = payload if len(payload) <= _INLINE else None
        header = (attempt.task_id, attempt.attempt, attempt.deadline, inline)
        try:
            conn.send_bytes(_RUN + pickle.dumps(header, _PROTOCOL))
            if inline is None:
                conn.send_bytes(payload)
        except (OSError, ValueError):
            pass  # the child is dead (or being killed): wait() reports it

    def wait(
        self,
        wake: multiprocessing.connection.Connection,
        on_event: Callable[[str, Any], None],
    ) -> Outcome | None:
        """Block until the running attempt ends (its Outcome) or ``wake`` is readable
        (drained; returns None: kill, or call ``wait()`` again).

        Events arrive through ``on_event`` on this thread, in order:
        ``("progress", value)`` and ``("reset_backoff", None)``. If ``on_event``
        raises, the error propagates and the attempt is still running. An outcome
        already received is returned even when ``wake`` is readable too (``wake`` is
        then left set: it is a doorbell, check your own state). A child that dies
        mid-attempt gives ``Outcome(error=WorkerCrashedError(...))``; its process group
        has then been killed and the process reaped.
        """
        with self._lock:
            if self._state is not _RUNNING:
                raise RuntimeError(f"child {self.name!r} is {self._state}: no attempt is running")
            self._waiting = True
            conn, dead = self._conn, self._dead_fd
        assert conn is not None
        try:
            return self._wait(conn, dead, wake, on_event)
        finally:
            with self._lock:
                self._waiting = False
                if self._state is _DEAD:
                    self._release()  # deferred by a kill() from another thread

    def _wait(
        self,
        conn: multiprocessing.connection.Connection,
        dead: int,
        wake: multiprocessing.connection.Connection,
        on_event: Callable[[str, Any], None],
    ) -> Outcome | None:
        watched: list[Any] = [conn, dead, wake]
        wait = multiprocessing.connection.wait
        while True:
            try:
                ready = wait(watched)
            except (OSError, ValueError):  # a handle closed under us by kill()
                return self._crashed()
            if conn in ready:
                try:
                    outcome = self._receive(conn, on_event)
                except (EOFError, OSError, ValueError):
                    return self._crashed()
                if outcome is not None:
                    return outcome
            if wake in ready:
                _drain(wake)
                return None
            if dead in ready and conn not in ready:
                # Frames the child wrote before it died are still in the pipe.
                try:
                    while conn.poll(0):
                        outcome = self._receive(conn, on_event)
                        if outcome is not None:
                            return outcome
                except (EOFError, OSError, ValueError):
                    pass
                return self._crashed()

    def _receive(
        self, conn: multiprocessing.connection.Connection, on_event: Callable[[str, Any], None]
    ) -> Outcome | None:
        data = conn.recv_bytes()
        tag = data[0]
        if tag == _PROGRESS:
            try:
                value = pickle.loads(memoryview(data)[1:])
            except Exception as exc:
                _log.warning(
                    "child %s: a progress value of task %r did not unpickle in the parent "
                    "and was dropped: %s",
                    self.name,
                    self._attempt.task_id if self._attempt else None,
                    _describe(exc),
                )
                return None
            on_event("progress", value)
            return None
        if tag == _RESET:
            on_event("reset_backoff", None)
            return None
        outcome: Outcome
        if tag == _VALUE:
            try:
                outcome = Outcome(value=pickle.loads(memoryview(data)[1:]))
            except Exception as exc:
                error = ClusterError(
                    f"the return value does not unpickle in the parent: {_describe(exc)}"
                )
                error.__cause__ = exc
                outcome = Outcome(error=error)
        elif tag == _ERROR:
            records, text = pickle.loads(memoryview(data)[1:])
            outcome = Outcome(error=_load_error(records), traceback=text)
        else:  # pragma: no cover - only a corrupted stream gets here
            raise OSError(f"child {self.name!r} sent an unknown frame {data[:16]!r}")
        with self._lock:
            if self._state is _RUNNING:
                self._state = _IDLE
        return outcome

    def _crashed(self) -> Outcome:
        """The child died (or lost its pipe) mid-attempt: make sure it is gone, report it."""
        with self._kill_lock, self._lock:
            if self._state is not _DEAD:
                self._signal(signal.SIGKILL)  # its leftover group; a broken live child too
                self._reap()
            code = self._exitcode
        attempt = self._attempt
        what = f"task {attempt.task_id!r} (attempt {attempt.attempt})" if attempt else "a task"
        exitcode: int | None = code
        signum: int | None = None
        if code is None:  # still unreaped after _REAP_TIMEOUT (stuck in the kernel)
            how = "died (exit status unknown)"
        elif code < 0:
            exitcode, signum = None, -code
            try:
                how = f"was killed by {signal.Signals(signum).name}"
            except ValueError:
                how = f"was killed by signal {signum}"
        else:
            how = f"exited with code {code}"
        message = f"child process {self.pid} ({self.name}) {how} while running {what}"
        return Outcome(error=WorkerCrashedError(message, exitcode=exitcode, signal=signum))

    # ---- ending

    def kill(self, grace: float = 0.5) -> None:
        """SIGTERM the child's process group, wait up to ``grace`` seconds for the child,
        SIGKILL the group, reap the child and release its handles. Idempotent."""
        grace = seconds(grace, "grace")
        with self._kill_lock:
            with self._lock:
                if self._state is _NEW:
                    self._state = _DEAD
                    self._released = True
                    return
                if self._state is _DEAD:
                    if not self._waiting:
                        self._release()
                    return
                self._signal(signal.SIGTERM)
                dead = self._dead_fd
            if grace:
                with contextlib.suppress(OSError, ValueError):
                    multiprocessing.connection.wait([dead], grace)
            with self._lock:
                if self._state is not _DEAD:
                    self._signal(signal.SIGKILL)
                    self._reap()
                if not self._waiting:
                    self._release()

    def close(self, timeout: float = 1.0) -> None:
        """Tell an idle child to exit, wait up to ``timeout`` seconds, then ``kill()``
        (what is left of its group). A running attempt is abandoned. Idempotent."""
        timeout = seconds(timeout, "timeout")
        with self._lock:
            idle = self._state is _IDLE
            conn, dead = self._conn, self._dead_fd
        if idle and conn is not None:
            try:
                conn.send_bytes(_STOP)
                multiprocessing.connection.wait([dead], timeout)
            except (OSError, ValueError):
                pass
        self.kill()

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the child's group and to the child itself. Holds ``_lock``.

        The group reaches grandchildren; the child itself is signalled too in case it
        has not yet called ``setsid()`` (a kill right after start). Races with exits
        (ESRCH) and foreign processes (EPERM) are ignored. The group id is the child's
        pid, which the kernel keeps while the child is unreaped or any member lives;
        only a forkserver child that already exited with no member left could see its
        number reused, and Linux hands out pids cyclically, so not within moments.
        """
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        if self._pidfd is not None:  # exact even if the pid were reused
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, sig)
        elif self._exitcode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        """Collect the SIGKILLed child's exit status; mark it dead. Holds ``_lock``."""
        process = self._process
        assert process is not None
        # Wait on our own handle first: Process.join(timeout) waits on the spawn
        # sentinel, which a grandchild forked by the task may still hold open.
        try:
            gone = bool(multiprocessing.connection.wait([self._dead_fd], _REAP_TIMEOUT))
        except (OSError, ValueError):
            gone = False
        process.join(None if gone else 0)  # a child stuck in the kernel stays unreaped
        self._exitcode = process.exitcode
        self._state = _DEAD
        _LIVE.discard(self)

    def _release(self) -> None:
        """Close the pipe, the pidfd and the process's own fds. Holds ``_lock``."""
        if self._released:
            return
        self._released = True
        if self._conn is not None:
            self._conn.close()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
        if self._process is not None and self._exitcode is not None:
            with contextlib.suppress(ValueError):
                self._process.close()  # its sentinel and the forkserver's data pipe


def _drain(conn: multiprocessing.connection.Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        while conn.poll(0):
            conn.recv_bytes()


def kill_all(children: Iterable[Child], grace: float = 0.5) -> None:
    """Kill many children at once: one grace period for all, not one each."""
    grace = seconds(grace, "grace")
    children = list(children)
    for child in children:
        with child._lock:
            if child._state is _IDLE or child._state is _RUNNING:
                child._signal(signal.SIGTERM)
    end = time.monotonic() + grace
    for child in children:
        child.kill(grace=max(0.0, end - time.monotonic()))


@atexit.register
def _kill_children_at_exit() -> None:
    kill_all(list(_LIVE), grace=0.2)
