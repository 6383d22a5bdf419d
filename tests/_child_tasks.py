"""Task functions that ``tests/test_child.py`` runs in child processes.

They live in their own module so that a child (spawned, or forked from the
forkserver) can import them by name, as it must to unpickle a call.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

from cluster import RetryAfter, TaskContext, current


def add(a: int, b: int = 0) -> int:
    return a + b


def noop() -> None:
    return None


def size_and_sample(data: bytes) -> tuple[int, bytes]:
    """The length of ``data`` and every millionth byte (proves it all arrived)."""
    return len(data), data[:: 1 << 20]


def big(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def context_info() -> dict[str, Any]:
    ctx = current()
    ctx.check()  # never signalled in a child: must not raise
    return {
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        "cancelled": ctx.cancelled.is_set(),
        "reason": ctx.reason,
        "is_task_context": isinstance(ctx, TaskContext),
        "now": time.monotonic(),
    }


_saved: list[TaskContext] = []


def save_context() -> None:
    _saved.append(current())


def use_saved_context() -> bool:
    """Send progress through the previous attempt's context; is this attempt's another?"""
    old = _saved.pop()
    old.progress("stale")  # that attempt has ended: dropped, never reaches the parent
    return current() is not old


def events() -> str:
    ctx = current()
    ctx.progress(1)
    ctx.reset_backoff()  # the lead adds it to TaskContext
    ctx.progress({"step": 2})
    ctx.progress(3)
    return "done"


def unpicklable_progress() -> str:
    try:
        current().progress(threading.Lock())
    except TypeError as exc:
        return str(exc)
    return "no error"


def progress_then_exit(code: int) -> None:
    current().progress("about to exit")
    os._exit(code)


def raise_chain() -> None:
    try:
        try:
            raise KeyError("root")
        except KeyError as exc:
            raise OSError("middle") from exc
    except OSError as exc:
        raise ValueError("top") from exc


def raise_implicit() -> None:
    try:
        raise KeyError("first")
    except KeyError:
        raise RuntimeError("while handling")  # noqa: B904  # the implicit __context__ is the point


def raise_retry_after() -> None:
    raise RetryAfter(5) from ConnectionError("host down")


def raise_system_exit() -> None:
    sys.exit(4)


@dataclass(frozen=True)
class FrozenError(Exception):
    """An exception whose __setattr__ refuses every assignment."""

    code: int


def raise_frozen(by_keyword: bool) -> None:
    raise FrozenError(code=7) if by_keyword else FrozenError(7)


class LockedError(Exception):
    """An exception that does not pickle (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise LockedError("holding a lock")


def raise_unpicklable_cause() -> None:
    raise ValueError("picklable head") from LockedError("unpicklable cause")


def _child_only_module() -> types.ModuleType:
    """A module that exists only in this child (so the parent cannot unpickle its classes)."""
    name = "_only_in_child"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        exec(
            "class ChildOnlyError(Exception):\n    pass\nclass ChildOnlyValue:\n    pass\n",
            module.__dict__,
        )
        sys.modules[name] = module
    return module


def raise_child_only() -> None:
    raise _child_only_module().ChildOnlyError("made in the child")


def return_child_only() -> object:
    return _child_only_module().ChildOnlyValue()


def return_unpicklable() -> object:
    return threading.Lock()


def exit_now(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def report_pid_and_block() -> None:
    """Send this process's pid as progress, then block until killed."""
    current().progress(os.getpid())
    threading.Event().wait()


def stubborn() -> None:
    """Ignore SIGTERM, start a grandchild, report both pids, then spin forever."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "1000"])
    current().progress((os.getpid(), grandchild.pid))
    while True:
        pass


def block_on_fifo(path: str) -> str:
    """Report "started", then block until a line can be read from the fifo ``path``."""
    current().progress("started")
    with open(path) as fifo:
        return fifo.readline().strip()


def progress_from_threads(threads: int, each: int, size: int) -> int:
    """Send ``each`` progress values of ``size`` bytes from each of ``threads`` threads."""
    ctx = current()

    def send(n: int) -> None:
        for i in range(each):
            ctx.progress((n, i, bytes([n]) * size))

    workers = [threading.Thread(target=send, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return threads * each


def sigint_self_then_grandchild_sigign() -> int:
    """SIGINT this child mid-attempt, then return the ignored-signal mask of a grandchild."""
    os.kill(os.getpid(), signal.SIGINT)
    status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True)
    (line,) = [x for x in status.stdout.splitlines() if x.startswith("SigIgn:")]
    return int(line.split()[1], 16)
