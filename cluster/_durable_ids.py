"""Row ids of the durable store that the pure core needs to know (no sqlite3 here)."""

from __future__ import annotations

__all__ = ["DEAD_PREFIX"]

#: Row ids of dead letters: a dead letter does not reserve its task id (SPEC §13), so
#: its row must not share the row of a new task that takes the id.
DEAD_PREFIX = "dead\x00"
