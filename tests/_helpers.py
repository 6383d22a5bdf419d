"""Small helpers shared by the SPEC integration tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cluster import Cluster, TaskNotFoundError

#: Generous bound for anything that must happen "at once" (a loaded machine can take
#: seconds to spawn a child): only a failing test waits this long.
WAIT = 20.0

#: The conftest fixtures: a cluster factory that stops what it made, and an Event
#: factory that sets every event at teardown (so no test thread outlives its test).
MakeCluster = Callable[..., Cluster]
NewEvent = Callable[[], threading.Event]


def wait_until(cond: Callable[[], bool], deadline: float = WAIT) -> bool:
    """Poll ``cond`` until true or ``deadline`` seconds pass (only for time-based outcomes)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def is_purged(c: Cluster, task_id: str) -> bool:
    """True if ``task_id`` is no longer known to ``c``."""
    try:
        c.subscribe(task_id)
    except TaskNotFoundError:
        return True
    return False
