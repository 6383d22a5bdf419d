"""The contract between the builder/handle and the cluster that runs their tasks.

``TaskBuilder`` and ``TaskHandle`` never see ``Cluster`` or the runtime class: they
talk to a ``TaskHost``, and only they may call its underscore methods (as only
executors may call a ``concurrent.futures.Future``'s ``set_result``). The runtime
(``_runtime.Runtime``) is the one implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._clock import Clock
    from ._core import Lane
    from ._task import Result, Task

__all__ = ["TaskHost"]


class TaskHost(Protocol):
    """What a builder and a handle need from the cluster behind them."""

    #: The clock the cluster schedules by (start times, delays).
    clock: Clock

    def _lane(self, name: str) -> Lane:
        """The lane of executor ``name``; ValueError if there is none."""
        ...

    def _async_lane(self) -> Lane:
        """The lane of the built-in ``"async"`` executor."""
        ...

    def _submit(self, task: Task) -> None:
        """Accept ``task`` (DuplicateTaskError, ClusterStoppedError, or a backend's check)."""
        ...

    def _cancel(self, task: Task) -> bool:
        """Cancel ``task``; False if it had already ended."""
        ...

    def _wait(self, task: Task, timeout: float | None) -> Result[Any] | None:
        """The Result once terminal, or None after ``timeout`` seconds (real time)."""
        ...

    def _subscribe(self, task: Task) -> SimpleQueue[Result[Any]]:
        """A new queue that receives the Result."""
        ...

    def _results(self, task: Task, timeout: float | None) -> Iterator[Result[Any]]:
        """The task's Results as they arrive (one per run), ending with the last."""
        ...

    def _future(self, task: Task) -> Future[Any]:
        """A Future of the value; cancelling it cancels the task."""
        ...
