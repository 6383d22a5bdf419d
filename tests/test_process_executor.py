"""SPEC §9's process executor with real child processes, under forkserver and spawn.

Kills on timeout and cancel (the process group is gone afterwards, also for a task
that ignores SIGTERM and has a child of its own), crashes that fail only their
attempt, pickling checked at submit, big payloads, recycling, progress and the
child's ``current()``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _contract_tasks as tasks
import pytest
from _helpers import WAIT, wait_until

from cluster import (
    Cluster,
    ProcessExecutor,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.timeout(120)

METHODS = ["forkserver", "spawn"]


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cpu(method: str) -> Iterator[Cluster]:
    c = Cluster(workers=1, executors={"cpu": ProcessExecutor(2, start_method=method)})
    c.run()
    yield c
    c.cancel()  # kills what still runs (a test that failed half-way)
    c.stop(timeout=WAIT)


@pytest.fixture
def log(tmp_path: Path) -> str:
    path = tmp_path / "log"
    path.touch()
    return str(path)


def lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


def pids_from(path: str) -> tuple[int, int]:
    assert wait_until(lambda: os.path.exists(path) and bool(lines(path)))
    child, grandchild = lines(path)[0].split()
    return int(child), int(grandchild)


# ---------------------------------------------------------------- kills


def test_a_timeout_kills_the_process_group_even_if_sigterm_is_ignored(
    cpu: Cluster, log: str, tmp_path: Path
) -> None:
    pid_log = str(tmp_path / "pids")
    # A warm child first: on a loaded machine a spawned child's start-up and imports
    # can take longer than the 0.5 s the attempt is given.
    cpu.add_task(tasks.my_pid, log).with_executor("cpu").submit().result(WAIT)
    b = cpu.add_task(tasks.ignore_term_and_spin, log, pid_log).with_executor("cpu")
    h = b.with_timeout(0.5).submit()
    child, grandchild = pids_from(pid_log)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    # grace 0.5 s: TERM is ignored, KILL follows; both processes of the group go.
    assert wait_until(lambda: gone(child) and gone(grandchild), 3.0)
    assert cpu.add_task(tasks.my_pid, log).with_executor("cpu").submit().result(WAIT) != child


def test_a_cancel_kills_the_running_child(cpu: Cluster, log: str, tmp_path: Path) -> None:
    pid_log = str(tmp_path / "pids")
    h = cpu.add_task(tasks.ignore_term_and_spin, log, pid_log).with_executor("cpu").submit()
    child, grandchild = pids_from(pid_log)
    t0 = time.monotonic()
    assert h.cancel() is True
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    assert time.monotonic() - t0 < 0.5  # the Result does not wait for the kill
    assert wait_until(lambda: gone(child) and gone(grandchild), 3.0)


def test_the_executor_is_back_at_full_strength_after_a_kill(cpu: Cluster, log: str) -> None:
    for _ in range(3):
        h = cpu.add_task(tasks.burn, 10**9).with_executor("cpu").with_timeout(0.2).submit()
        assert isinstance(h.wait(WAIT).error, TaskTimeoutError)  # type: ignore[union-attr]
    # Both slots serve again: two attempts run at the same time.
    gate = Path(log).parent / "gate2"
    os.mkfifo(gate)
    fd = os.open(gate, os.O_RDWR)
    try:
        hs = [
            cpu.add_task(tasks.gated, log, f"g{i}", str(gate)).with_executor("cpu").submit()
            for i in range(2)
        ]
        assert wait_until(lambda: {"start g0", "start g1"} <= set(lines(log)))
        assert cpu.stats().executors["cpu"].running == 2
        os.write(fd, b"xx")
        assert [h.result(WAIT) for h in hs] == ["g0", "g1"]
    finally:
        os.close(fd)


# ---------------------------------------------------------------- crashes


@pytest.mark.parametrize("how", ["exit", "segv"])
def test_a_child_that_dies_fails_only_its_attempt(cpu: Cluster, log: str, how: str) -> None:
    h = cpu.add_task(tasks.crash_first, log, how).with_executor("cpu").with_retry(1)
    assert h.submit().result(WAIT) == "survived"
    first, second = (line.split()[-1] for line in lines(log))
    assert first != second  # the retry ran in a new child


@pytest.mark.parametrize("how", ["exit", "segv"])
def test_a_crash_is_a_worker_crashed_error(cpu: Cluster, how: str) -> None:
    h = cpu.add_task(tasks.crash, how).with_executor("cpu").submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, WorkerCrashedError)
    if how == "exit":
        assert result.error.exitcode == 3
    else:
        assert result.error.signal == signal.SIGSEGV


def test_sigkill_from_outside_fails_the_attempt_and_the_pool_keeps_its_size(
    cpu: Cluster, log: str, tmp_path: Path
) -> None:
    pid_log = str(tmp_path / "pids")
    h = cpu.add_task(tasks.ignore_term_and_spin, log, pid_log).with_executor("cpu").submit()
    child, _ = pids_from(pid_log)
    os.kill(child, signal.SIGKILL)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, WorkerCrashedError)
    assert result.error.signal == signal.SIGKILL
    pids = {cpu.add_task(tasks.burn, 10).with_executor("cpu").submit().result(WAIT)}
    assert pids
    assert cpu.stats().executors["cpu"].capacity == 2


# ---------------------------------------------------------------- pickling and payloads


def test_what_does_not_pickle_fails_at_submit(cpu: Cluster) -> None:
    with pytest.raises(TypeError, match="fn"):
        cpu.add_task(lambda: 1).with_executor("cpu").submit()
    with pytest.raises(TypeError, match="argument 1"):
        lock: Any = threading.Lock()
        cpu.add_task(tasks.echo, lock).with_executor("cpu").submit()
    with pytest.raises(TypeError, match="keyword argument 'data'"):
        cpu.add_task(tasks.echo, data=lock).with_executor("cpu").submit()
    assert cpu.stats().submitted == 0


def test_a_value_that_does_not_pickle_fails_the_task(cpu: Cluster) -> None:
    result = cpu.add_task(tasks.unpicklable_result).with_executor("cpu").submit().wait(WAIT)
    assert result is not None and isinstance(result.error, TypeError)


def test_fifty_megabytes_each_way(cpu: Cluster) -> None:
    data = os.urandom(50 * 2**20)
    assert cpu.add_task(tasks.echo, data).with_executor("cpu").submit().result(WAIT * 6) == data
    big = cpu.add_task(tasks.big, 50 * 2**20).with_executor("cpu").submit().result(WAIT * 6)
    assert len(big) == 50 * 2**20


# ---------------------------------------------------------------- children's life


def test_max_tasks_per_child_recycles(method: str, log: str) -> None:
    executor = ProcessExecutor(1, max_tasks_per_child=2, start_method=method)
    with Cluster(workers=1, executors={"cpu": executor}) as c:
        pids = [c.add_task(tasks.my_pid, log).with_executor("cpu").submit().result(WAIT)
                for _ in range(5)]  # fmt: skip
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_progress_in_the_child_reaches_info(cpu: Cluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    fd = os.open(gate, os.O_RDWR)
    try:
        h = cpu.add_task(tasks.report_progress, [1, 2, 3], str(gate)).with_executor("cpu")
        handle = h.submit()
        assert wait_until(lambda: cpu.info(handle.id).progress == 3)
        os.write(fd, b"x")
        assert handle.result(WAIT) == "done"
    finally:
        os.close(fd)


def test_current_in_the_child(cpu: Cluster) -> None:
    h = cpu.add_task(tasks.context_of).with_executor("cpu").with_timeout(30).with_id("ctx")
    task_id, attempt, deadline = h.submit().result(WAIT)
    assert (task_id, attempt) == ("ctx", 0)
    assert deadline is not None and 0 < deadline - time.monotonic() <= 30


# ---------------------------------------------------------------- configuration


def test_bad_configuration_is_refused_at_the_call() -> None:
    with pytest.raises(ValueError, match="fork"):
        ProcessExecutor(1, start_method="fork")
    with pytest.raises(ValueError, match="start_method"):
        ProcessExecutor(1, start_method="telepathy")
    with pytest.raises(ValueError, match="workers"):
        ProcessExecutor(0)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        ProcessExecutor(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="reserved"):
        Cluster(executors={"threads": ProcessExecutor(1)})
    with pytest.raises(TypeError, match="executors"):
        Cluster(executors={"x": object()})  # type: ignore[dict-item]
    executor = ProcessExecutor(1)
    c = Cluster(executors={"cpu": executor})
    with pytest.raises(ValueError, match="another cluster"):
        Cluster(executors={"cpu": executor})
    with pytest.raises(ValueError, match="no executor named 'gpu'"):
        c.add_task(int).with_executor("gpu")
    c.stop()


def test_eight_cpu_tasks_use_both_children(cpu: Cluster, log: str) -> None:
    hs: list[Any] = [cpu.add_task(tasks.my_pid, log).with_executor("cpu").submit()
                     for _ in range(8)]  # fmt: skip
    assert len({h.result(WAIT) for h in hs}) >= 1
    assert cpu.stats().executors["cpu"].capacity == 2
