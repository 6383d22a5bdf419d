"""The due queue: tasks ordered by (-priority, start, seq), O(1) in the common case."""

from __future__ import annotations

from collections import deque
from heapq import heapify, heappop, heappush

from ._task import Task, TaskState

__all__ = ["ReadyQueue"]

PENDING = TaskState.PENDING


def _discard(item: object) -> None:
    """Where dropped entries go when the caller keeps no graveyard (tests)."""


class _Bucket:
    """The due tasks of one priority, in (start, seq) order.

    Tasks almost always arrive in order (a task due now has the latest start), so
    they go to ``fifo`` in O(1); the rare out-of-order task (a past start time, a
    promoted timer) goes to the small ``heap`` (ordered by ``Task.__lt__``). The
    next task is the lesser of the two heads. Both hold the tasks themselves: no
    tuple per queued task.
    """

    __slots__ = ("fifo", "heap")

    def __init__(self) -> None:
        self.fifo: deque[Task] = deque()
        self.heap: list[Task] = []


class ReadyQueue:
    """Due tasks by (-priority, start, seq): O(1) push and pop in the FIFO case.

    Holds dead entries (tasks no longer PENDING) until they are popped or
    ``compact`` drops them; ``len()`` counts entries, dead ones included (it sums
    the buckets: push and pop keep no count, they run once per task).
    """

    __slots__ = ("_buckets", "_priorities", "_top")

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._priorities: list[int] = []  # heap of -priority, one per bucket
        # The bucket of the highest priority, or None when there is none: what pop
        # looks at first. An emptied bucket stays until pop finds it empty.
        self._top: _Bucket | None = None

    def __len__(self) -> int:
        return sum(len(b.fifo) + len(b.heap) for b in self._buckets.values())

    def push(self, task: Task) -> None:
        """Add ``task`` (its priority, start and seq are set) to its priority's bucket."""
        priority = task.priority
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._add_bucket(priority)
        fifo = bucket.fifo
        if fifo:
            last = fifo[-1]
            start = task.start
            # Inlined ``last < task``: this runs once per submitted task.
            if last.start < start or (last.start == start and last.seq < task.seq):  # type: ignore[operator]
                fifo.append(task)
            else:
                heappush(bucket.heap, task)
        else:
            fifo.append(task)

    def _add_bucket(self, priority: int) -> _Bucket:
        bucket = self._buckets[priority] = _Bucket()
        priorities = self._priorities
        heappush(priorities, -priority)
        if priorities[0] == -priority:  # the highest priority now
            self._top = bucket
        return bucket

    def pop(self) -> Task | None:
        """Remove and return the first task (dead or alive), or None if empty."""
        bucket = self._top
        while bucket is not None:
            fifo = bucket.fifo
            heap = bucket.heap
            if fifo:
                return heappop(heap) if heap and heap[0] < fifo[0] else fifo.popleft()
            if heap:
                return heappop(heap)
            # An emptied bucket: drop it; the next priority's comes to the top.
            priorities = self._priorities
            del self._buckets[-heappop(priorities)]
            bucket = self._top = self._buckets[-priorities[0]] if priorities else None
        return None

    def remove(self, task: Task) -> None:
        """Take ``task`` out (it must be in): O(n) in its priority's bucket (rare:
        reprioritize and reschedule)."""
        bucket = self._buckets[task.priority]
        try:
            bucket.fifo.remove(task)
        except ValueError:
            bucket.heap.remove(task)
            heapify(bucket.heap)

    def compact(self, live: int, graveyard: list[object] | None = None) -> None:
        """Drop every dead entry, given the number of ``live`` (PENDING) ones.

        Dead entries at either end of a FIFO go one by one, without touching the
        live ones: cancelling in submission order, or the latest submissions, leaves
        them there. Only if some remain is the queue rebuilt. What is dropped goes
        to ``graveyard`` (see ``Scheduler.graveyard``) rather than being freed here.
        """
        bury = graveyard.append if graveyard is not None else _discard
        if not live:
            bury(self._buckets)
            self._buckets = {}
            self._priorities.clear()
            self._top = None
            return
        # The ends go into one list, buried once (whoever ended a dead task releases
        # it: the graveyard only has to keep it alive until the lock is released).
        dropped: list[Task] = []
        keep = dropped.append
        count = 0
        for bucket in self._buckets.values():
            fifo = bucket.fifo
            while fifo and fifo[0].state is not PENDING:
                keep(fifo.popleft())
            while fifo and fifo[-1].state is not PENDING:
                keep(fifo.pop())
            count += len(fifo) + len(bucket.heap)
        if dropped:
            bury(dropped)
        if count == live:
            return
        for priority, bucket in list(self._buckets.items()):
            bury(bucket.fifo)
            bury(bucket.heap)
            bucket.fifo = deque([t for t in bucket.fifo if t.state is PENDING])
            bucket.heap = [t for t in bucket.heap if t.state is PENDING]
            heapify(bucket.heap)
            if not bucket.fifo and not bucket.heap:
                del self._buckets[priority]
        self._priorities = [-p for p in self._buckets]
        heapify(self._priorities)
        self._top = self._buckets[-self._priorities[0]] if self._priorities else None
