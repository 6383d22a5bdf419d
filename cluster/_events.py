"""The observer seam: what extras (metrics, dashboards, progress bars) hear of a cluster.

An ``Observer`` is called on the thread where the event happens, outside every lock,
once per event; the defaults do nothing, and a cluster with no observer pays one
truthiness test per attempt. An observer that raises is logged and stays observed.
Observers see names and numbers, never task objects: they cannot change a task.
"""

from __future__ import annotations

import logging

__all__ = ["Observer"]

log = logging.getLogger("cluster")


class Observer:
    """Subclass and override what you need; register with ``Cluster.observe(observer)``."""

    def attempt_ended(
        self,
        name: str,
        executor: str,
        waited: float,
        ran: float,
        error: BaseException | None,
    ) -> None:
        """An attempt of a task named ``name`` ended on ``executor``: it waited ``waited``
        seconds from due to start and ran ``ran`` seconds; ``error`` is what it raised
        (None: it returned). Called for abandoned attempts too, when they return."""
