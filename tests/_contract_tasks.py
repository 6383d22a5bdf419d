"""Task functions for the executor contract suite, importable by child processes.

Synchronisation crosses processes through the file system: a *gate* is a FIFO that
the test holds open read-write (so readers never block on ``open``); a task waits
at the gate by reading one byte, and the test releases waiters by writing bytes
(closing it releases everyone with EOF). A *log* is a file every task appends one
line to (``O_APPEND`` writes of a line are atomic), so the test reads what ran, in
which order and at which attempt, whatever process or loop ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from cluster import current

# ---------------------------------------------------------------- helpers in the task


def note(log: str, text: str) -> None:
    """Append one line to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def wait_gate(gate: str) -> None:
    """Block until the test writes a byte to the FIFO ``gate`` (or closes it)."""
    fd = os.open(gate, os.O_RDONLY)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)


async def await_gate(gate: str) -> None:
    """``wait_gate`` without blocking the event loop (and cancellable)."""
    fd = os.open(gate, os.O_RDONLY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    try:
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                os.read(fd, 1)
                return
            except BlockingIOError:  # another waiter took the byte
                continue
    finally:
        os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ---------------------------------------------------------------- sync tasks (threads, processes)


def record(log: str, name: str) -> str:
    """Note ``name`` and return it."""
    note(log, name)
    return name


def gated(log: str, name: str, gate: str) -> str:
    """Note the start, wait at the gate, note the end."""
    note(log, f"start {name}")
    wait_gate(gate)
    note(log, f"end {name}")
    return name


def flaky(log: str, name: str, failures: int) -> str:
    """Fail the first ``failures`` attempts, then succeed."""
    attempt = current().attempt
    note(log, f"{name} attempt {attempt}")
    if attempt < failures:
        raise RuntimeError(f"{name} fails attempt {attempt}")
    return f"{name} ok"


def gated_first(log: str, name: str, gate: str) -> str:
    """Attempt 0 waits at the gate (to time out); later attempts succeed at once."""
    attempt = current().attempt
    note(log, f"{name} attempt {attempt}")
    if attempt == 0:
        wait_gate(gate)
    return f"{name} ok"


def failing(log: str, name: str) -> str:
    """Always fail."""
    note(log, name)
    raise ValueError(f"{name} fails")


def ignore_term_and_spin(log: str, pid_log: str) -> None:
    """Ignore SIGTERM, start a grandchild, note both pids, then spin forever."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "1000"])
    note(pid_log, f"{os.getpid()} {grandchild.pid}")
    note(log, "spinning")
    while True:
        pass


def my_pid(log: str) -> int:
    """Note and return the pid of the process running the attempt."""
    note(log, str(os.getpid()))
    return os.getpid()


def crash(how: str) -> None:
    """Die by ``how``: "exit" (os._exit(3)), "segv" or "kill"."""
    if how == "exit":
        os._exit(3)
    if how == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def crash_first(log: str, how: str) -> str:
    """Crash on attempt 0, succeed on the retry."""
    note(log, f"attempt {current().attempt} in {os.getpid()}")
    if current().attempt == 0:
        crash(how)
    return "survived"


def report_progress(values: list[int], gate: str) -> str:
    """Report each progress value, then wait at the gate."""
    for v in values:
        current().progress(v)
    wait_gate(gate)
    return "done"


def echo(data: bytes) -> bytes:
    """Return ``data`` as it came."""
    return data


def big(n: int) -> bytes:
    """``n`` bytes."""
    return b"x" * n


def unpicklable_result() -> object:
    """A value the parent cannot receive."""
    return lambda: None


def context_of() -> tuple[str, int, float | None]:
    """The attempt's context as the child sees it."""
    ctx = current()
    return ctx.task_id, ctx.attempt, ctx.deadline


def burn(n: int) -> int:
    """CPU work."""
    total = 0
    for i in range(n):
        total += i * i
    return total


# ---------------------------------------------------------------- async tasks


async def arecord(log: str, name: str) -> str:
    note(log, name)
    await asyncio.sleep(0)
    return name


async def agated(log: str, name: str, gate: str) -> str:
    note(log, f"start {name}")
    try:
        await await_gate(gate)
    except asyncio.CancelledError:
        note(log, f"cancelled {name}")
        raise
    note(log, f"end {name}")
    return name


async def aflaky(log: str, name: str, failures: int) -> str:
    attempt = current().attempt
    note(log, f"{name} attempt {attempt}")
    await asyncio.sleep(0)
    if attempt < failures:
        raise RuntimeError(f"{name} fails attempt {attempt}")
    return f"{name} ok"


async def agated_first(log: str, name: str, gate: str) -> str:
    attempt = current().attempt
    note(log, f"{name} attempt {attempt}")
    if attempt == 0:
        await await_gate(gate)
    return f"{name} ok"


async def afailing(log: str, name: str) -> str:
    note(log, name)
    raise ValueError(f"{name} fails")


async def aswallow(log: str, gate: str) -> str:
    """Swallow the first cancellation, note it, then keep waiting at the gate."""
    with contextlib.suppress(asyncio.CancelledError):
        await await_gate(gate)
    note(log, "swallowed")
    await await_gate(gate)
    return "late"


#: The contract's tasks by name: plain functions for threads and processes ...
SYNC: dict[str, Callable[..., Any]] = {
    "record": record,
    "gated": gated,
    "flaky": flaky,
    "gated_first": gated_first,
    "failing": failing,
}
#: ... and their ``async def`` twins for the event loop.
ASYNC: dict[str, Callable[..., Any]] = {
    "record": arecord,
    "gated": agated,
    "flaky": aflaky,
    "gated_first": agated_first,
    "failing": afailing,
}
