"""``as_completed`` over task handles (SPEC §16): one shared queue, no thread."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from datetime import timedelta
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, TypeVar

from ._validate import deadline

if TYPE_CHECKING:
    from ._builder import TaskHandle

__all__ = ["as_completed"]

T = TypeVar("T")

#: The longest single wait of ``as_completed`` (longer waits loop), so that a huge
#: timeout never overflows a lock's timeout.
_MAX_WAIT = 3600.0


def as_completed(
    handles: Iterable[TaskHandle[T]], timeout: float | timedelta | None = None
) -> Iterator[TaskHandle[T]]:
    """Yield the handles as their tasks end: those already finished first.

    Like ``concurrent.futures.as_completed``: a handle given twice is yielded once,
    and if ``timeout`` seconds (counted from this call) pass before the last one
    ends, the iterator raises TimeoutError. One queue is shared by all the handles;
    no thread is started.
    """
    from ._builder import TaskHandle

    end = deadline(timeout)
    unique: dict[TaskHandle[T], None] = {}
    for handle in handles:
        if not isinstance(handle, TaskHandle):
            raise TypeError(f"handles must be TaskHandles, got {type(handle).__name__}")
        unique[handle] = None
    finished: list[TaskHandle[T]] = []
    arrivals: SimpleQueue[TaskHandle[T]] = SimpleQueue()
    waiting = 0
    for handle in unique:
        if handle.done():
            finished.append(handle)
        else:
            # A done-callback on the task's future puts the handle in the queue when
            # the task ends (at once, if it ended since done() was asked).
            handle.future().add_done_callback(_Arrival(arrivals, handle))
            waiting += 1
    return _completed(finished, arrivals, waiting, len(unique), end)


class _Arrival:
    """A done-callback that reports its handle on a shared queue."""

    __slots__ = ("handle", "queue")

    def __init__(self, queue: SimpleQueue[TaskHandle[Any]], handle: TaskHandle[Any]) -> None:
        self.queue = queue
        self.handle = handle

    def __call__(self, _future: Future[Any]) -> None:
        handle = self.handle
        self.handle = None  # type: ignore[assignment]  # the future may outlive the wait
        self.queue.put(handle)


def _completed(
    finished: list[TaskHandle[T]],
    arrivals: SimpleQueue[TaskHandle[T]],
    waiting: int,
    total: int,
    end: float | None,
) -> Iterator[TaskHandle[T]]:
    finished.reverse()
    while finished:
        yield finished.pop()
    while waiting:
        if end is None:
            remaining = _MAX_WAIT
        else:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{waiting} (of {total}) tasks unfinished")
        try:
            handle = arrivals.get(timeout=min(remaining, _MAX_WAIT))
        except Empty:
            continue  # the loop decides: a longer wait, or the TimeoutError
        waiting -= 1
        yield handle
        del handle


# ---------------------------------------------------------------------- await
