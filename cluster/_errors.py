"""Exception types raised by the cluster and carried in task results."""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "ClusterError",
    "ClusterStoppedError",
    "DuplicateTaskError",
    "StopTimeoutError",
    "TaskCancelledError",
    "TaskNotFoundError",
    "TaskTimeoutError",
]


class ClusterError(Exception):
    """Base class of every error the cluster raises itself."""


class TaskTimeoutError(ClusterError, TimeoutError):
    """An attempt ran past its ``with_timeout`` limit."""


class TaskCancelledError(ClusterError, concurrent.futures.CancelledError):
    """The task was cancelled (by ``cancel_task``, ``cancel()`` or a shutdown)."""


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
