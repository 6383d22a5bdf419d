"""SPEC §9's built-in "async" executor: ``async def`` tasks on one event-loop thread.

Cancellation and timeout reach the coroutine (it sees CancelledError at its next
await) while the Result arrives at once; a coroutine that swallows the cancellation
is abandoned; a coroutine that blocks the loop stalls only the loop, and is logged;
thousands run at once, never more than ``async_limit``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import _contract_tasks as tasks
import pytest
from _helpers import WAIT, MakeCluster, wait_until

from cluster import (
    Cluster,
    FixedBackoff,
    RetryMode,
    TaskCancelledError,
    TaskTimeoutError,
    current,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def log(tmp_path: Path) -> str:
    path = tmp_path / "log"
    path.touch()
    return str(path)


@pytest.fixture
def gate(tmp_path: Path) -> Any:
    import os

    path = tmp_path / "gate"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)

    class Gate:
        name = str(path)

        def release(self, n: int = 1) -> None:
            os.write(fd, b"x" * n)

    yield Gate()
    os.close(fd)


def lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def whoami() -> tuple[str, int, str]:
    ctx = current()
    return ctx.task_id, ctx.attempt, threading.current_thread().name


def test_async_def_runs_on_the_event_loop_by_default(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    assert c.add_task(double, 21).submit().result(WAIT) == 42
    assert c.add_task(functools.partial(double, 4)).submit().result(WAIT) == 8
    task_id, attempt, thread = c.add_task(whoami).with_id("me").submit().result(WAIT)
    assert (task_id, attempt) == ("me", 0)
    assert thread.startswith("cluster-loop")
    assert c.stats().executors["async"].capacity == 1000


def test_an_async_def_cannot_be_sent_to_the_threads(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    with pytest.raises(ValueError, match="async def"):
        c.add_task(double, 1).with_executor("threads")


def test_a_timeout_cancels_the_coroutine_and_delivers_at_once(
    make_cluster: MakeCluster, log: str, gate: Any
) -> None:
    c = make_cluster(1)
    t0 = time.monotonic()
    h = c.add_task(tasks.agated, log, "slow", gate.name).with_timeout(0.2).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    assert time.monotonic() - t0 < 2.0
    assert wait_until(lambda: "cancelled slow" in lines(log))  # it saw CancelledError


def test_cancel_reaches_the_coroutine(make_cluster: MakeCluster, log: str, gate: Any) -> None:
    c = make_cluster(1)
    h = c.add_task(tasks.agated, log, "victim", gate.name).submit()
    assert wait_until(lambda: "start victim" in lines(log))
    assert h.cancel() is True
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    assert wait_until(lambda: "cancelled victim" in lines(log))


def test_a_coroutine_that_swallows_the_cancel_is_abandoned(
    make_cluster: MakeCluster, log: str, gate: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cluster")
    c = make_cluster(1)
    h = c.add_task(tasks.aswallow, log, gate.name).with_timeout(0.2).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    assert wait_until(lambda: "swallowed" in lines(log))
    assert c.add_task(double, 5).submit().result(WAIT) == 10  # the loop serves on
    gate.release()
    assert wait_until(lambda: "ignored its cancellation" in caplog.text)
    again = h.wait(0)
    assert again is not None and again.error is result.error  # the late value changed nothing


def test_a_blocked_loop_stalls_only_the_loop_and_is_logged(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cluster")
    c = make_cluster(1)
    started = threading.Event()

    async def blocker() -> str:
        started.set()
        time.sleep(1.2)  # blocks the event loop: what not to do
        return "unblocked"

    h = c.add_task(blocker).submit()
    assert started.wait(WAIT)
    t0 = time.monotonic()
    assert c.add_task(lambda: "thread").submit().result(WAIT) == "thread"
    assert time.monotonic() - t0 < 0.5  # the thread pool did not wait for the loop
    assert h.result(WAIT) == "unblocked"
    assert "event loop has been blocked" in caplog.text
    assert "time.sleep(1.2)" in caplog.text  # the loop thread's stack names the culprit


def test_thousands_of_coroutines_run_at_once(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    t0 = time.monotonic()
    hs = [c.add_task(asyncio.sleep, 0.3, i).submit() for i in range(2000)]
    assert [h.result(WAIT) for h in hs] == list(range(2000))
    assert time.monotonic() - t0 < 5.0  # 2000 x 0.3 s one at a time would be 600 s


def test_async_limit_bounds_the_running_coroutines() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    async def tracked() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        await asyncio.sleep(0.01)
        with lock:
            running -= 1

    with Cluster(workers=1, async_limit=5) as c:
        hs = [c.add_task(tracked).submit() for _ in range(60)]
        for h in hs:
            h.result(WAIT)
        assert c.stats().executors["async"].capacity == 5
    assert 1 <= peak <= 5


def test_immediate_retries_sleep_without_blocking_the_loop(
    make_cluster: MakeCluster, log: str
) -> None:
    c = make_cluster(1)
    h = (
        c.add_task(tasks.aflaky, log, "f", 1)
        .with_retry(1)
        .with_retry_mode(RetryMode.IMMEDIATE)
        .with_backoff(FixedBackoff(0.5))
        .submit()
    )
    assert wait_until(lambda: "f attempt 0" in lines(log))
    t0 = time.monotonic()
    assert c.add_task(double, 3).submit().result(WAIT) == 6  # during the backoff
    assert time.monotonic() - t0 < 0.4
    assert h.result(WAIT) == "f ok"


def test_cancel_cuts_an_immediate_backoff_short(make_cluster: MakeCluster, log: str) -> None:
    c = make_cluster(1)
    h = (
        c.add_task(tasks.aflaky, log, "f", 1)
        .with_retry(1)
        .with_retry_mode(RetryMode.IMMEDIATE)
        .with_backoff(FixedBackoff(60))
        .submit()
    )
    assert wait_until(lambda: "f attempt 0" in lines(log))
    assert wait_until(lambda: c.stats().delayed == 1)
    assert h.cancel() is True
    assert isinstance(h.wait(WAIT).error, TaskCancelledError)  # type: ignore[union-attr]
    c.stop(timeout=WAIT)  # nothing left asleep on the loop


def test_the_loop_thread_is_joined_at_stop() -> None:
    with Cluster(workers=1) as c:
        assert c.add_task(double, 1).submit().result(WAIT) == 2
        assert any(t.name.startswith("cluster-loop") for t in threading.enumerate())
    assert not any(t.name.startswith("cluster-loop") for t in threading.enumerate())


def test_bad_async_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="async_limit"):
        Cluster(async_limit=0)
    with pytest.raises(TypeError, match="async_limit"):
        Cluster(async_limit=1.5)  # type: ignore[arg-type]
