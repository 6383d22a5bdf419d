"""A task function that ``tests/test_dead_letters.py`` runs in a child process.

It lives in its own module so that a child (forked from the forkserver, or
spawned) can import it by name, as it must to unpickle the call.
"""

from __future__ import annotations

import os


def fail_unless_exists(path: str, value: int) -> int:
    """Raise ``FileNotFoundError`` until ``path`` exists; then return ``value``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is not there yet")
    return value
