"""Exception types raised by the cluster and carried in task results."""

from __future__ import annotations

import concurrent.futures
import signal as _signal
from datetime import timedelta

__all__ = [
    "ClusterError",
    "ClusterStoppedError",
    "DuplicateTaskError",
    "QueueFullError",
    "RetryAfter",
    "StopRetrying",
    "StopTimeoutError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "TaskCancelledError",
    "TaskInterruptedError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "UnknownTaskTypeError",
    "WorkerCrashedError",
]


class ClusterError(Exception):
    """Base class of every error the cluster raises itself."""


class TaskTimeoutError(ClusterError, TimeoutError):
    """An attempt ran past its ``with_timeout`` limit."""


class TaskCancelledError(ClusterError, concurrent.futures.CancelledError):
    """The task was cancelled (by ``cancel_task``, ``cancel()`` or a shutdown).

    ``reason`` says which: ``"cancelled"``, ``"shutdown"``, or ``"fork"`` (inherited by a
    forked child process), or None when raised by other code.
    """

    def __init__(self, *args: object, reason: str | None = None) -> None:
        super().__init__(*args)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_cancelled, (self.args, self.reason))


def _cancelled(args: tuple[object, ...], reason: str | None) -> TaskCancelledError:
    return TaskCancelledError(*args, reason=reason)


class DuplicateTaskError(ClusterError):
    """A task with this id is already queued, running or cached."""


class TaskNotFoundError(ClusterError, KeyError):
    """No task with this id is known (never submitted, or already purged)."""

    def __str__(self) -> str:
        # KeyError's __str__ shows repr(args[0]); a sentence reads better.
        return str(self.args[0]) if self.args else "task not found"


class ClusterStoppedError(ClusterError):
    """The cluster is stopping or stopped and accepts no more work."""


class StopTimeoutError(ClusterError, TimeoutError):
    """``stop(timeout)`` ran out of time; the remaining tasks were cancelled."""


class WorkerCrashedError(ClusterError):
    """The process running an attempt died by itself (a crash, ``os._exit``, the OOM killer).

    ``exitcode`` is the child's exit status, or ``None`` if a signal ended it;
    ``signal`` is that signal's number, or ``None``. Retried like any ``Exception``.
    """

    def __init__(
        self, message: str, *, exitcode: int | None = None, signal: int | None = None
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal

    @property
    def signal_name(self) -> str | None:
        """``"SIGSEGV"``, ``"SIGKILL"``, ... or ``None``."""
        if self.signal is None:
            return None
        try:
            return _signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields survive pickling (Exception pickles ``args`` only).
        return (_crashed, (str(self), self.exitcode, self.signal))


def _crashed(message: str, exitcode: int | None, signal: int | None) -> WorkerCrashedError:
    return WorkerCrashedError(message, exitcode=exitcode, signal=signal)


class UnknownTaskTypeError(ClusterError, ValueError, TypeError):
    """``add_task(name)`` with a ``str`` that names no registered task type.

    A ``ValueError`` (SPEC §14: an unknown type), and a ``TypeError`` too: the ``str``
    is not callable either (SPEC §2)."""


class QueueFullError(ClusterError):
    """``submit()`` found ``max_pending`` tasks waiting and the cluster rejects, not blocks."""


class TaskInterruptedError(ClusterError):
    """A durable task was running when its process ended, and has no retry left."""


class RetryAfter(ClusterError):
    """Raised by a task: retry after exactly ``delay`` seconds (no backoff, no jitter).

    ``raise RetryAfter(30) from err`` uses the budget of the rule that matches ``err``;
    when no retry happens the task fails with ``err`` (or with this error if it has no
    cause). Outside a task it is an ordinary exception.
    """

    def __init__(self, delay: float | timedelta) -> None:
        from ._validate import seconds  # _validate imports nothing of ours; no cycle

        self.delay: float = seconds(delay, "delay")
        super().__init__(self.delay)

    def __str__(self) -> str:
        return f"retry after {self.delay:g} s"


class StopRetrying(ClusterError):
    """Raised by a task (``raise StopRetrying() from err``): fail now, whatever the budget.

    The task fails with the cause (or with this error if it has none).
    """


class StoreError(ClusterError):
    """The durable store at ``path`` cannot be opened or written (an OS or SQLite failure).

    A file that is not a store of this format raises ``ValueError`` instead.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), str(self), {"path": self.path}))


class StoreLockedError(StoreError):
    """Another owner holds the store: another process, or another store object in this one.

    ``pid`` is the owner's process id when it could be read from the lock file, else ``None``.
    """

    def __init__(self, message: str, *, path: str, pid: int | None = None) -> None:
        super().__init__(message, path=path)
        self.pid = pid

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), str(self), {"path": self.path, "pid": self.pid}))


class StoreWriteError(StoreError):
    """A commit failed (disk full, I/O error, read-only file); none of its changes were applied.

    The SQLite error is the ``__cause__``. Later writes may succeed once the cause is gone.
    """


def _rebuild(cls: type[StoreError], message: str, fields: dict[str, object]) -> StoreError:
    return cls(message, **fields)  # type: ignore[arg-type]
