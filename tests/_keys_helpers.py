"""Shared pieces of the SPEC §12/§13 integration tests (keys, limits, listing, groups,
admission, dead letters).

``Tracker`` records which task bodies run at the same time (per key, or per any
label of the test's choosing) and the order in which they began; ``Clusters`` makes
clusters (on a ``FakeClock`` or the real one) that a fixture always shuts down.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from queue import Empty, SimpleQueue
from typing import Any

from _semantics_tasks import START, WAIT

from cluster import Cluster, ClusterStoppedError, StopTimeoutError
from cluster.testing import FakeClock

__all__ = ["START", "WAIT", "WORK", "Clusters", "Tracker", "pending", "take", "takes"]

#: A task body's "work" when overlap must be observable: long enough for a second
#: body to begin meanwhile if the cluster let it, irrelevant to a correct one.
WORK = 0.002


class Tracker:
    """Counts the task bodies inside at once, per group, and logs their starts.

    ``started`` receives each label when its body begins (block on it with
    ``take``); ``order`` is the labels in the order their bodies began.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self._lock = threading.Lock()  # guards every field below
        self._clock = clock
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.order: list[str] = []
        self.times: list[float] = []  # the fake clock at each start (with a clock)
        self.started: SimpleQueue[str] = SimpleQueue()

    @contextlib.contextmanager
    def inside(self, label: str, group: str = "k") -> Iterator[None]:
        """The body of task ``label``, one of ``group``."""
        with self._lock:
            now = self.active.get(group, 0) + 1
            self.active[group] = now
            self.peak[group] = max(self.peak.get(group, 0), now)
            self.order.append(label)
            if self._clock is not None:
                self.times.append(self._clock.monotonic())
        self.started.put(label)
        try:
            yield
        finally:
            with self._lock:
                self.active[group] -= 1

    def body(
        self, label: str, group: str = "k", gate: threading.Event | None = None
    ) -> Callable[[], str]:
        """A task function: enter ``group``, wait for ``gate`` (or work briefly), return
        ``label``."""

        def run() -> str:
            with self.inside(label, group):
                if gate is not None:
                    if not gate.wait(WAIT):
                        raise TimeoutError(f"{label}: its gate was never opened")
                else:
                    time.sleep(WORK)
            return label

        run.__qualname__ = f"body_{label}"
        return run

    def max(self, group: str = "k") -> int:
        """The most bodies of ``group`` that were inside at once."""
        with self._lock:
            return self.peak.get(group, 0)


def take(q: SimpleQueue[Any], timeout: float = WAIT) -> Any:
    """The next item of ``q``; fails the test if none comes within ``timeout``."""
    try:
        return q.get(timeout=timeout)
    except Empty:
        raise AssertionError(f"nothing arrived within {timeout}s") from None


def takes(q: SimpleQueue[Any], n: int, timeout: float = WAIT) -> list[Any]:
    """The next ``n`` items of ``q`` (see ``take``)."""
    return [take(q, timeout) for _ in range(n)]


def pending(c: Cluster) -> int:
    """Tasks not yet started, as ``stats()`` shows them (queued, delayed, waiting)."""
    s = c.stats()
    return s.queued + s.delayed + s.waiting


class Clusters:
    """Makes clusters for one test and shuts every one of them down at the end."""

    def __init__(self) -> None:
        self._made: list[Cluster] = []

    def make(self, workers: int = 2, *, run: bool = True, **options: Any) -> Cluster:
        """A cluster (``options`` go to ``Cluster``), running unless ``run=False``."""
        c = Cluster(workers=workers, **options)
        self._made.append(c)
        if run:
            c.run()
        return c

    def fake(self, workers: int = 2, **options: Any) -> tuple[Cluster, FakeClock]:
        """A running cluster on a new ``FakeClock`` (at ``START``), and the clock."""
        clock = FakeClock(start=START)
        return self.make(workers, clock=clock, **options), clock

    def close(self) -> None:
        """Cancel and stop every cluster made (the test's gates are open by now)."""
        for c in self._made:
            with contextlib.suppress(ClusterStoppedError, StopTimeoutError):
                c.cancel()
                c.stop(timeout=WAIT)
