"""``TaskGroup``: a thin layer over handles (SPEC §12), shaped like ``asyncio.TaskGroup``.

``g.add_task(...)`` builds like ``Cluster.add_task`` and its ``submit()`` joins the
group. ``fail_fast`` cancels the rest (the ordinary cancel) when the first task ends
in an error. As a context manager, leaving the block waits for every task; then
the errors of the tasks that failed are raised together as an ``ExceptionGroup``.
Cancellations are not errors (the ones ``fail_fast`` causes included, as
``asyncio.TaskGroup`` does not count its children's cancellations); an exception
raised by the block itself cancels the unfinished tasks, joins the group, and is
raised inside the group (a ``BaseException`` that is not an ``Exception``, such as
``KeyboardInterrupt``, is re-raised as itself).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._builder import TaskBuilder, TaskHandle
from ._completion import as_completed
from ._errors import TaskCancelledError
from ._task import Result
from ._validate import Duration, seconds

if TYPE_CHECKING:
    from ._cluster import Cluster

__all__ = ["TaskGroup"]

P = ParamSpec("P")
T = TypeVar("T")


class _GroupBuilder(TaskBuilder[T]):
    """A builder whose ``submit()`` adds the handle to its group."""

    __slots__ = ("_group",)
    _group: TaskGroup

    def submit(self) -> TaskHandle[T]:
        """Queue the task and add it to the group (see ``TaskBuilder.submit``)."""
        group: TaskGroup = self._group
        with group._order:  # handles are kept in submission order, also across threads
            group._check_open()
            handle = super().submit()
            group._joined(handle)
        return handle


class TaskGroup:
    """Tasks submitted together: wait for them, cancel them, or see them end one by one.

    Thread-safe. ``handles`` lists the handles in submission order.
    """

    def __init__(self, cluster: Cluster, *, fail_fast: bool = False) -> None:
        if not isinstance(fail_fast, bool):
            raise TypeError(f"fail_fast must be a bool, got {type(fail_fast).__name__}")
        self._cluster = cluster
        self._fail_fast = fail_fast
        self._lock = threading.Lock()  # guards _handles, _tripped, _closed
        self._order = threading.Lock()  # serialises submits (taken before _lock)
        self._handles: list[TaskHandle[Any]] = []
        self._tripped = False  # fail_fast fired
        self._closed = False  # the with block was left: no more tasks
        self._futures: list[Future[Any]] = []  # one per handle, to hear its end

    @property
    def handles(self) -> list[TaskHandle[Any]]:
        """The group's handles, in submission order."""
        with self._lock:
            return list(self._handles)

    def add_task(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> TaskBuilder[T]:
        """Build a task as ``Cluster.add_task`` does; its ``submit()`` adds it here."""
        plain = self._cluster.add_task(fn, *args, **kwargs)
        builder: _GroupBuilder[T] = _GroupBuilder(plain._host, plain._task)  # type: ignore[arg-type]
        builder._group = self
        plain._task = None  # the plain builder is spent: its task is the group's now
        return builder

    def _check_open(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this TaskGroup's block has ended; it takes no more tasks")

    def _joined(self, handle: TaskHandle[Any]) -> None:
        future = handle.future()
        with self._lock:
            self._handles.append(handle)
            self._futures.append(future)
            tripped = self._tripped
        if tripped:  # fail_fast already fired: the newcomer is cancelled too
            handle.cancel()
        elif self._fail_fast:
            future.add_done_callback(self._ended)

    def _ended(self, future: Future[Any]) -> None:
        """fail_fast: the first error cancels the others (runs on a cluster thread)."""
        if future.cancelled() or isinstance(future.exception(), TaskCancelledError):
            return
        if future.exception() is None:
            return
        with self._lock:
            if self._tripped:
                return
            self._tripped = True
            handles = list(self._handles)
        for handle in handles:
            if not handle.done():
                handle.cancel()

    def wait(self, timeout: Duration | None = None) -> list[Result[Any]]:
        """Every task's Result, in submission order; TimeoutError if ``timeout`` passes."""
        limit = None if timeout is None else seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        results: list[Result[Any]] = []
        for handle in self.handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = handle.wait(left)
            if result is None:
                raise TimeoutError(f"the group's tasks did not all finish within {timeout}s")
            results.append(result)
        return results

    def cancel(self) -> int:
        """Cancel every unfinished task; how many this call cancelled."""
        return sum(1 for handle in self.handles if handle.cancel())

    def as_completed(self, timeout: Duration | None = None) -> Iterator[TaskHandle[Any]]:
        """The handles as their tasks end (those already ended first); TimeoutError if
        ``timeout`` passes first."""
        return as_completed(self.handles, timeout)

    def __enter__(self) -> TaskGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._closed = True
        if exc is not None:
            self.cancel()
        results = self.wait()
        errors: list[BaseException] = []
        for result in results:
            error = result.error
            if error is None or isinstance(error, TaskCancelledError):
                continue
            errors.append(error)  # a task's BaseException too: the group is then a Base...
        if exc is not None and not isinstance(exc, Exception):
            return None  # KeyboardInterrupt, SystemExit: re-raised as themselves
        if exc is not None:
            errors.append(exc)
        if errors:
            # An ExceptionGroup when every error is an Exception (BaseExceptionGroup's
            # constructor picks it), else a BaseExceptionGroup.
            raise BaseExceptionGroup("tasks of the group failed", errors)
        return None

    def __repr__(self) -> str:
        handles = self.handles
        done = sum(1 for h in handles if h.done())
        return f"<TaskGroup {done}/{len(handles)} done fail_fast={self._fail_fast}>"
