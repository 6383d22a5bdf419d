"""One contract, every executor (SPEC §9): threads, child processes, the event loop, Dask.

Each test runs against each executor with the same expectations: §4's order among
due tasks, retries in both modes, timeouts, cancel of pending and running tasks,
stop in every state, exactly one Result per task and callbacks once. Tasks come
from ``_contract_tasks`` (importable by child processes) and synchronise through
a FIFO gate and a log file, so the same test drives a thread, a child process or a
coroutine. The Dask kind runs on one in-process LocalCluster for the whole module,
with more worker threads than any kit's slots (abandoned calls hold a thread until
the kit's gate closes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _contract_tasks as tasks
import pytest
from _helpers import WAIT, wait_until

from cluster import (
    Cluster,
    FixedBackoff,
    ProcessExecutor,
    Result,
    RetryMode,
    TaskBuilder,
    TaskCancelledError,
    TaskState,
    TaskTimeoutError,
)

pytestmark = pytest.mark.timeout(90)

HAVE_DASK = importlib.util.find_spec("distributed") is not None  # the dask extra

KINDS = [
    "threads",
    "process",
    "async",
    pytest.param(
        "dask",
        marks=pytest.mark.skipif(
            not HAVE_DASK,
            reason="dask[distributed] is not installed (pip install 'cluster[dask]')",
        ),
    ),
]


class Kit:
    """A cluster whose tasks all go to one executor kind, with a gate and a log."""

    def __init__(self, kind: str, tmp: Path, capacity: int, dask: Any = None) -> None:
        self.kind = kind
        self.log = str(tmp / "log")
        Path(self.log).touch()
        self.gate_path = str(tmp / "gate")
        os.mkfifo(self.gate_path)
        # Read-write: readers never block in open(), and closing it releases them all.
        self._gate_fd: int | None = os.open(self.gate_path, os.O_RDWR)
        if kind == "threads":
            self.c = Cluster(workers=capacity)
        elif kind == "process":
            self.c = Cluster(workers=1, executors={"cpu": ProcessExecutor(capacity)})
        elif kind == "dask":
            from cluster import DaskExecutor

            self.c = Cluster(workers=1, executors={"dask": DaskExecutor(dask, slots=capacity)})
        else:
            self.c = Cluster(workers=1, async_limit=capacity)
        self.name = {"threads": "threads", "process": "cpu", "async": "async", "dask": "dask"}[kind]
        self.table = tasks.ASYNC if kind == "async" else tasks.SYNC

    def add(self, fn: str, *args: Any) -> TaskBuilder[Any]:
        """A builder of task ``fn`` (by its name in _contract_tasks) on this executor."""
        target: Callable[..., Any] = self.table[fn]
        builder: TaskBuilder[Any] = self.c.add_task(target, *args)
        if self.kind in ("process", "dask"):
            builder.with_executor(self.name)
        return builder

    def release(self, n: int = 1) -> None:
        assert self._gate_fd is not None
        os.write(self._gate_fd, b"x" * n)

    def lines(self) -> list[str]:
        return Path(self.log).read_text().splitlines()

    def wait_line(self, line: str, timeout: float = WAIT) -> None:
        assert wait_until(lambda: line in self.lines(), timeout), (line, self.lines())

    def close(self) -> None:
        if self._gate_fd is not None:
            os.close(self._gate_fd)  # every waiter gets EOF
            self._gate_fd = None
        with contextlib.suppress(Exception):
            self.c.stop(timeout=WAIT, cancel_pending=True)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """One in-process Dask cluster for the module's "dask" kits (8 worker threads)."""
    import distributed

    local: Any = distributed.LocalCluster  # (Dask's API is only partly typed)
    connect: Any = distributed.Client
    lc = local(processes=False, n_workers=2, threads_per_worker=4, dashboard_address=":0")
    client = connect(lc)
    yield client
    client.close()
    lc.close()


@pytest.fixture
def make_kit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[int], Kit]]:
    kits: list[Kit] = []
    dask = request.getfixturevalue("dask_client") if kind == "dask" else None

    def make(capacity: int = 1) -> Kit:
        sub = tmp_path / f"kit{len(kits)}"
        sub.mkdir()
        kit = Kit(kind, sub, capacity, dask)
        kits.append(kit)
        kit.c.run()
        return kit

    yield make
    for kit in kits:
        kit.close()


def hold(kit: Kit, name: str = "holder") -> Any:
    """Occupy the executor's only slot with a task waiting at the gate."""
    h = kit.add("gated", kit.log, name, kit.gate_path).with_priority(10**6).submit()
    kit.wait_line(f"start {name}")
    return h


# ---------------------------------------------------------------- ordering


def test_due_tasks_run_by_priority_then_fifo(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    holder = hold(kit)
    plan = [("a", 0), ("b", 5), ("c", 0), ("d", 9), ("e", 5), ("f", -1)]
    handles = [kit.add("record", kit.log, n).with_priority(p).submit() for n, p in plan]
    kit.release()
    assert holder.result(WAIT) == "holder"
    for h in handles:
        h.wait(WAIT)
    ran = [line for line in kit.lines() if len(line) == 1]
    assert ran == ["d", "b", "e", "a", "c", "f"]


def test_a_task_not_yet_due_never_runs_early(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    t0 = time.monotonic()
    late = kit.add("record", kit.log, "late").with_delay(0.3).with_priority(100).submit()
    now = kit.add("record", kit.log, "now").submit()
    assert now.result(WAIT) == "now"
    assert late.result(WAIT) == "late"
    assert time.monotonic() - t0 >= 0.29
    assert [x for x in kit.lines()] == ["now", "late"]


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_retries_until_success(make_kit: Callable[[int], Kit], mode: RetryMode) -> None:
    kit = make_kit(1)
    h = (
        kit.add("flaky", kit.log, "f", 2)
        .with_retry(3)
        .with_retry_mode(mode)
        .with_backoff(FixedBackoff(0.01))
        .with_cache(60)
        .submit()
    )
    assert h.result(WAIT) == "f ok"
    assert kit.lines() == ["f attempt 0", "f attempt 1", "f attempt 2"]
    info = kit.c.info(h.id)
    assert (info.state, info.attempts) == (TaskState.SUCCEEDED, 3)
    assert kit.c.stats().retried == 2


def test_retries_exhausted_fail_with_the_last_error(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    h = kit.add("flaky", kit.log, "f", 5).with_retry(1).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, RuntimeError)
    assert "attempt 1" in str(result.error)


# ---------------------------------------------------------------- timeouts


def test_timeout_delivers_at_once_and_the_executor_goes_on(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    t0 = time.monotonic()
    h = kit.add("gated", kit.log, "slow", kit.gate_path).with_timeout(0.2).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    assert time.monotonic() - t0 < 3.0
    assert kit.add("record", kit.log, "next").submit().result(WAIT) == "next"
    assert kit.c.stats().timed_out == 1


def test_a_timed_out_attempt_is_retried(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    h = kit.add("gated_first", kit.log, "t", kit.gate_path).with_timeout(0.2).with_retry(1)
    assert h.submit().result(WAIT) == "t ok"
    assert kit.lines() == ["t attempt 0", "t attempt 1"]


# ---------------------------------------------------------------- cancel


def test_cancel_of_a_pending_task_means_it_never_runs(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    holder = hold(kit)
    h = kit.add("record", kit.log, "never").submit()
    assert h.cancel() is True
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    kit.release()
    holder.result(WAIT)
    assert kit.add("record", kit.log, "after").submit().result(WAIT) == "after"
    assert "never" not in kit.lines()


def test_cancel_of_a_running_task_delivers_at_once(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    h = hold(kit, "victim")
    t0 = time.monotonic()
    assert kit.c.cancel_task(h.id) is True
    assert isinstance(h.wait(0).error, TaskCancelledError)
    assert time.monotonic() - t0 < 1.0
    assert kit.add("record", kit.log, "next").submit().result(WAIT) == "next"
    assert h.cancel() is False


# ---------------------------------------------------------------- stop


def test_stop_carries_every_state_to_its_result(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    running = hold(kit, "running")
    queued = kit.add("record", kit.log, "queued").submit()
    delayed = kit.add("record", kit.log, "delayed").with_delay(0.2).submit()
    retrying = kit.add("flaky", kit.log, "r", 1).with_retry(1).with_backoff(FixedBackoff(0.2))
    retrying_h = retrying.submit()
    stopping = threading.Thread(target=kit.c.stop, kwargs={"timeout": WAIT})
    stopping.start()
    assert wait_until(lambda: _refuses(kit.c))
    kit.release()
    stopping.join(WAIT * 2)
    assert not stopping.is_alive()
    for h in (running, queued, delayed, retrying_h):
        result = h.wait(0)
        assert result is not None and result.ok, (h, result)


def test_stop_cancel_pending_cancels_what_has_not_started(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    running = hold(kit, "running")
    queued = kit.add("record", kit.log, "queued").submit()
    delayed = kit.add("record", kit.log, "delayed").with_delay(30).submit()
    releaser = threading.Timer(0.2, kit.release)
    releaser.start()
    try:
        kit.c.stop(timeout=WAIT, cancel_pending=True)
    finally:
        releaser.cancel()
    assert running.result(0) == "running"
    for h in (queued, delayed):
        assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]


def test_stop_timeout_cancels_a_stuck_task(make_kit: Callable[[int], Kit]) -> None:
    from cluster import StopTimeoutError

    kit = make_kit(1)
    stuck = hold(kit, "stuck")
    with pytest.raises(StopTimeoutError):
        kit.c.stop(timeout=0.3)
    assert isinstance(stuck.wait(0).error, TaskCancelledError)


def _refuses(c: Cluster) -> bool:
    from cluster import ClusterStoppedError

    try:
        c.add_task(int).with_delay(3600).submit().cancel()
    except ClusterStoppedError:
        return True
    return False


# ---------------------------------------------------------------- exactly once


def test_every_task_gets_exactly_one_result_and_its_callbacks_once(
    make_kit: Callable[[int], Kit],
) -> None:
    kit = make_kit(2)
    completes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    lock = threading.Lock()

    def on_complete(tid: str, value: Any, error: BaseException | None) -> None:
        with lock:
            completes[tid] += 1

    def on_failure(tid: str, error: BaseException) -> None:
        with lock:
            failures[tid] += 1

    subs: dict[str, list[queue.SimpleQueue[Result[Any]]]] = {}
    expect_error: dict[str, bool] = {}
    for i in range(30):
        kind = ("record", "failing", "flaky")[i % 3]
        args: tuple[Any, ...] = (kit.log, f"n{i}") if kind != "flaky" else (kit.log, f"n{i}", 1)
        b = kit.add(kind, *args).on_complete(on_complete).on_failure(on_failure)
        if kind == "flaky":
            b.with_retry(1)
        h = b.submit()
        subs[h.id] = [h.subscribe(), h.subscribe()]
        expect_error[h.id] = kind == "failing"
    cancelled = kit.add("record", kit.log, "c").with_delay(30).on_complete(on_complete).submit()
    subs[cancelled.id] = [cancelled.subscribe()]
    expect_error[cancelled.id] = True
    assert cancelled.cancel()
    for tid, queues in subs.items():
        for q in queues:
            result = q.get(timeout=WAIT)
            assert (result.error is not None) == expect_error[tid], (tid, result)
            with pytest.raises(queue.Empty):
                q.get(timeout=0.01)
    assert wait_until(lambda: sum(completes.values()) == len(subs))
    assert set(completes.values()) == {1}
    assert wait_until(lambda: sum(failures.values()) == 10)  # the "failing" tasks
    assert set(failures.values()) == {1}
    s = kit.c.stats()
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.timed_out


# ---------------------------------------------------------------- gauges


def test_stats_report_the_executor_gauges(make_kit: Callable[[int], Kit]) -> None:
    kit = make_kit(1)
    hold(kit)
    kit.add("record", kit.log, "q").submit()
    gauges = kit.c.stats().executors[kit.name]
    assert (gauges.capacity, gauges.running, gauges.queued) == (1, 1, 1)
    kit.release()
    assert wait_until(lambda: kit.c.stats().executors[kit.name].running == 0)
