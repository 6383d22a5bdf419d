"""Task types of the durable-task tests, importable by name in every process.

``tests/_durable_child.py`` registers them all (``TYPES``) in the child processes
that submit durable tasks and are killed; a ``ProcessExecutor`` child imports them
to unpickle a call. A task that must tell the test what it does calls ``report``,
which writes one JSON line on the process's stdout (the child script's pipe) with
``os.write``: a line is never split between threads, and nothing waits in a buffer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from cluster import current

#: Set by the child script: tasks report through its stdout. None: nothing is reported.
REPORT_FD: int | None = None


def report(**event: Any) -> None:
    """One JSON line on ``REPORT_FD`` (if set)."""
    if REPORT_FD is not None:
        os.write(REPORT_FD, (json.dumps(event, sort_keys=True) + "\n").encode())


def add(a: int, b: int = 0) -> int:
    """A JSON value."""
    return a + b


def echo(value: Any) -> Any:
    """Its argument back; reports that it ran (``ran``), with the attempt."""
    ctx = current()
    report(ev="ran", id=ctx.task_id, attempt=ctx.attempt, value=value)
    return value


def fail(message: str) -> None:
    """Always a ``ValueError``."""
    ctx = current()
    report(ev="ran", id=ctx.task_id, attempt=ctx.attempt)
    raise ValueError(message)


def flaky(failures: int) -> int:
    """Fails (``OSError``) its first ``failures`` attempts, then returns the attempt."""
    ctx = current()
    report(ev="ran", id=ctx.task_id, attempt=ctx.attempt)
    if ctx.attempt < failures:
        raise OSError(f"attempt {ctx.attempt} of {ctx.task_id} failed")
    return ctx.attempt


def sleep(seconds: float) -> float:
    """Sleeps ``seconds`` (honouring cancel), returns them."""
    ctx = current()
    report(ev="started", id=ctx.task_id, attempt=ctx.attempt)
    ctx.cancelled.wait(seconds)
    return seconds


def block() -> None:
    """Reports ``started`` and never returns (until its process is killed)."""
    ctx = current()
    report(ev="started", id=ctx.task_id, attempt=ctx.attempt)
    while not ctx.cancelled.wait(0.5):
        pass


def suicide() -> None:
    """Kills its own process with SIGKILL (a task that crashes the process every time)."""
    ctx = current()
    report(ev="started", id=ctx.task_id, attempt=ctx.attempt)
    os.kill(os.getpid(), signal.SIGKILL)


def opaque() -> object:
    """A value that is not JSON (a set)."""
    return {1, 2, 3}


def pid() -> int:
    """The pid of the process that runs it (a ``ProcessExecutor`` child)."""
    return os.getpid()


async def aecho(value: Any) -> Any:
    """``echo`` as an ``async def``."""
    await asyncio.sleep(0)
    return value


TYPES: dict[str, Callable[..., Any]] = {
    "add": add,
    "echo": echo,
    "fail": fail,
    "flaky": flaky,
    "sleep": sleep,
    "block": block,
    "suicide": suicide,
    "opaque": opaque,
    "pid": pid,
    "aecho": aecho,
}
