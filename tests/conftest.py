"""Shared fixtures: clusters that are always stopped, and gate events always released.

Teardown releases every gate first (so no task stays blocked), then stops every
cluster the test created, cancelling what has not started (e.g. far-off delayed tasks).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import pytest

from cluster import Cluster, ClusterStoppedError


class EventFactory:
    """``new_event()`` returns a fresh Event that is set when the test ends."""

    def __init__(self) -> None:
        self._events: list[threading.Event] = []

    def __call__(self) -> threading.Event:
        event = threading.Event()
        self._events.append(event)
        return event

    def release_all(self) -> None:
        for event in self._events:
            event.set()


@pytest.fixture
def new_event() -> Iterator[EventFactory]:
    factory = EventFactory()
    yield factory
    factory.release_all()


@pytest.fixture
def make_cluster(new_event: EventFactory) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(workers: int = 1, *, run: bool = True) -> Cluster:
        c = Cluster(workers=workers)
        clusters.append(c)
        if run:
            c.run()
        return c

    yield make
    new_event.release_all()
    for c in clusters:
        with contextlib.suppress(ClusterStoppedError):
            c.stop(timeout=10, cancel_pending=True)


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(2)
