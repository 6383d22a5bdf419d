"""Task functions for the executor benchmarks (importable by child processes)."""

from __future__ import annotations

import os
import signal
import time


def noop() -> None:
    """Nothing."""


def burn(n: int) -> int:
    """CPU work: ``n`` multiply-adds in pure Python."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def ignore_term_and_spin(pid_file: str) -> None:
    """Ignore SIGTERM, write this process's pid to ``pid_file``, spin forever."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(0)


async def anoop() -> None:
    """Nothing, as a coroutine."""


async def asleep(seconds: float) -> None:
    """``await asyncio.sleep(seconds)``."""
    import asyncio

    await asyncio.sleep(seconds)
