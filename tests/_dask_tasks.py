"""Task functions for the Dask executor tests, importable by Dask worker processes.

Dask pickles every call, even for workers in this process, so a task cannot be
handed a ``threading.Event``. Tasks on in-process workers (``processes=False``)
meet the test through this module's globals instead (the worker unpickles the
function by reference: the same module, the same dict); tasks in worker processes
use the file gates and logs of ``_contract_tasks``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import distributed
from _contract_tasks import note, wait_gate

from cluster import RetryAfter, current

#: Named events, made by the test (``event(name)``) and awaited by tasks.
EVENTS: dict[str, threading.Event] = {}
_LOCK = threading.Lock()
#: name -> [running now, most at once] (guarded by _LOCK).
_CONCURRENCY: dict[str, list[int]] = {}
#: name -> what tasks noted, in order (guarded by _LOCK).
NOTES: dict[str, list[Any]] = {}


def event(name: str) -> threading.Event:
    """The event ``name`` (made on first use)."""
    with _LOCK:
        return EVENTS.setdefault(name, threading.Event())


def add_note(name: str, value: Any) -> None:
    with _LOCK:
        NOTES.setdefault(name, []).append(value)


def notes(name: str) -> list[Any]:
    with _LOCK:
        return list(NOTES.get(name, ()))


def echo(value: Any) -> Any:
    return value


def count(name: str) -> int:
    """Note one run under ``name``; return how many ran so far."""
    add_note(name, 1)
    return len(notes(name))


def wait_for(name: str, log: str = "") -> str:
    """Note the start (``log`` names a NOTES list), then block until event ``name`` is set."""
    if log:
        add_note(log, f"start {name}")
    event(name).wait(30)
    return name


def record(log: str, name: str) -> str:
    add_note(log, name)
    return name


def dask_key() -> str:
    """The Dask key this attempt runs under."""
    key = distributed.get_worker().get_current_task()
    return str(key)


def failing_keys(log: str, failures: int) -> str:
    """Note (attempt, Dask key); fail the first ``failures`` attempts."""
    attempt = current().attempt
    add_note(log, (attempt, dask_key()))
    if attempt < failures:
        raise RuntimeError(f"attempt {attempt} fails")
    return "ok"


def busy(name: str, seconds: float) -> None:
    """Count how many run at once under ``name`` for ``seconds``."""
    with _LOCK:
        now_max = _CONCURRENCY.setdefault(name, [0, 0])
        now_max[0] += 1
        now_max[1] = max(now_max[1], now_max[0])
    time.sleep(seconds)
    with _LOCK:
        _CONCURRENCY[name][0] -= 1


def most_at_once(name: str) -> int:
    with _LOCK:
        return _CONCURRENCY.get(name, [0, 0])[1]


def chained() -> None:
    """A ValueError whose cause is a KeyError."""
    try:
        raise KeyError("inner")
    except KeyError as exc:
        raise ValueError("outer") from exc


def retry_after_keyerror(log: str, delay: float) -> str:
    """``RetryAfter(delay) from KeyError`` on every attempt; notes the attempt number."""
    attempt = current().attempt
    note(log, f"attempt {attempt} {time.monotonic():.6f}")
    try:
        raise KeyError(f"attempt {attempt}")
    except KeyError as exc:
        raise RetryAfter(delay) from exc


def context() -> tuple[str, int, float | None, str]:
    """What ``current()`` says on the worker."""
    ctx = current()
    return ctx.task_id, ctx.attempt, ctx.deadline, type(ctx).__name__


def progress_then_wait(value: Any, name: str) -> str:
    """Report progress, then block until event ``name``."""
    current().progress(value)
    event(name).wait(30)
    return "done"


def progress_then_gate(value: Any, log: str, gate: str) -> str:
    """Report progress, note it, then wait at the file gate (for worker processes)."""
    current().progress(value)
    note(log, "reported")
    wait_gate(gate)
    return "done"


def honour_cancel(log: str = "") -> str | None:
    """Wait until signalled (timeout or cancel); return the reason."""
    ctx = current()
    if log:
        add_note(log, "started")
    ctx.cancelled.wait(30)
    return ctx.reason


def honour_cancel_logged(log: str) -> str:
    """The same in a worker process: note the start, wait, note the reason."""
    ctx = current()
    note(log, "started")
    signalled = ctx.cancelled.wait(30)
    note(log, f"reason {ctx.reason} {signalled}")
    return str(ctx.reason)


def pid_then_gate(log: str, name: str, gate: str) -> str:
    """Note ``name``, the attempt and this process's pid, then wait at the file gate."""
    note(log, f"{name} {current().attempt} {os.getpid()} {dask_key()}")
    wait_gate(gate)
    return f"{name} ok"


def sleep_then(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


def with_reset(log: str) -> str:
    """Fail twice, calling ``reset_backoff()`` on attempt 1 (for worker processes)."""
    ctx = current()
    note(log, f"attempt {ctx.attempt}")
    if ctx.attempt == 1:
        ctx.reset_backoff()
    if ctx.attempt < 2:
        raise RuntimeError(f"attempt {ctx.attempt}")
    return "ok"
