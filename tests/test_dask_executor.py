"""``DaskExecutor`` (SPEC §15) on a real ``dask.distributed`` LocalCluster.

One in-process LocalCluster (threads) serves most tests; one with worker processes
serves the tests of what crosses a process boundary (``current()`` there, events,
exception chains) and the killed worker. Tasks come from ``_dask_tasks``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip(
    "distributed", reason="dask[distributed] is not installed (pip install 'cluster[dask]')"
)

import _dask_tasks as T  # noqa: E402
from _helpers import WAIT, wait_until  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from cluster import (  # noqa: E402
    Cluster,
    ClusterError,
    DaskExecutor,
    FixedBackoff,
    Result,
    RetryMode,
    TaskBuilder,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[LocalCluster]:
    lc = LocalCluster(processes=False, n_workers=2, threads_per_worker=4, dashboard_address=":0")
    yield lc
    lc.close()


@pytest.fixture(scope="module")
def client(dask_cluster: LocalCluster) -> Iterator[Client]:
    c = Client(dask_cluster)
    yield c
    c.close()


@pytest.fixture(scope="module")
def proc_client() -> Iterator[Client]:
    """Two worker processes (under nannies), one thread each."""
    lc = LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0")
    c = Client(lc)
    yield c
    c.close()
    lc.close()


MakeCluster = Callable[..., Cluster]


@pytest.fixture
def make(client: Client) -> Iterator[MakeCluster]:
    clusters: list[Cluster] = []

    def make(slots: int | None = None, dask: Client | None = None, **options: Any) -> Cluster:
        executor = DaskExecutor(dask if dask is not None else client, slots=slots)
        c = Cluster(workers=1, executors={"dask": executor}, **options)
        clusters.append(c)
        c.run()
        return c

    yield make
    for event in list(T.EVENTS.values()):
        event.set()  # no test leaves a Dask thread blocked
    for c in clusters:
        with contextlib.suppress(ClusterError):
            c.stop(timeout=WAIT, cancel_pending=True)


def on_dask(c: Cluster, fn: Callable[..., Any], *args: Any) -> TaskBuilder[Any]:
    return c.add_task(fn, *args).with_executor("dask")


def unique() -> str:
    return uuid.uuid4().hex[:12]


def scheduler_keys(client: Client) -> set[str]:
    return set(
        client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
    )


class Files:
    """A FIFO gate and a log file that cross process boundaries (see _contract_tasks)."""

    def __init__(self, tmp: Path) -> None:
        self.log = str(tmp / "log")
        Path(self.log).touch()
        self.gate = str(tmp / "gate")
        os.mkfifo(self.gate)
        self._fd: int | None = os.open(self.gate, os.O_RDWR)

    def release(self, n: int = 1) -> None:
        assert self._fd is not None
        os.write(self._fd, b"x" * n)

    def lines(self) -> list[str]:
        return Path(self.log).read_text().splitlines()

    def wait_line(self, predicate: Callable[[str], bool]) -> str:
        found: list[str] = []

        def look() -> bool:
            found[:] = [line for line in self.lines() if predicate(line)]
            return bool(found)

        assert wait_until(look, 20), self.lines()
        return found[0]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # every waiter reads EOF
            self._fd = None


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Files]:
    f = Files(tmp_path)
    yield f
    f.close()


# ---------------------------------------------------------------- the extra, arguments


def test_import_cluster_does_not_import_dask() -> None:
    code = (
        "import sys, cluster; print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_without_the_extra_dask_executor_raises_import_error_naming_it() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'distributed'):\n"
        "            raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import cluster\n"
        "try:\n"
        "    from cluster import DaskExecutor\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.startswith("ImportError:"), out
    assert "cluster[dask]" in out.stdout


def test_bad_arguments_fail_at_the_call_naming_them(client: Client) -> None:
    with pytest.raises(TypeError, match="client"):
        DaskExecutor("tcp://127.0.0.1:8786")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots"):
        DaskExecutor(client, slots=0)
    with pytest.raises(TypeError, match="slots"):
        DaskExecutor(client, slots="2")  # type: ignore[arg-type]


def test_capacity_is_slots_defaulting_to_the_dask_clusters_worker_threads(
    make: MakeCluster, client: Client
) -> None:
    assert sum(client.nthreads().values()) == 8
    assert make().stats().executors["dask"].capacity == 8
    assert make(slots=3).stats().executors["dask"].capacity == 3


# ---------------------------------------------------------------- what runs, and how


def test_values_and_errors_come_back(make: MakeCluster) -> None:
    c = make()
    assert on_dask(c, T.echo, {"a": [1, 2]}).submit().result(WAIT) == {"a": [1, 2]}
    result = on_dask(c, T.chained).submit().wait(WAIT)
    assert result is not None and isinstance(result.error, ValueError)
    assert isinstance(result.error.__cause__, KeyError)
    assert result.error.__traceback__ is not None


def test_each_attempt_is_its_own_dask_key(make: MakeCluster) -> None:
    c = make()
    log = unique()
    h = on_dask(c, T.failing_keys, log, 2).with_retry(2).submit()
    assert h.result(WAIT) == "ok"
    seen = T.notes(log)
    assert [attempt for attempt, _ in seen] == [0, 1, 2]
    keys = [key for _, key in seen]
    assert len(set(keys)) == 3
    assert all(key.startswith("failing_keys-") and f"-{h.id}~" in key for key in keys)


def test_identical_calls_are_not_merged_by_dask(make: MakeCluster) -> None:
    c = make()
    name = unique()
    handles = [on_dask(c, T.count, name).submit() for _ in range(3)]
    assert sorted(h.result(WAIT) for h in handles) == [1, 2, 3]


def test_current_inside_the_task_gives_id_attempt_and_deadline(make: MakeCluster) -> None:
    c = make()
    t0 = time.monotonic()
    h = on_dask(c, T.context).with_id("ctx-task").with_timeout(5).submit()
    task_id, attempt, deadline, _kind = h.result(WAIT)
    assert (task_id, attempt) == ("ctx-task", 0)
    assert deadline is not None and t0 + 4 < deadline < time.monotonic() + 5


def test_progress_reaches_info(make: MakeCluster) -> None:
    c = make()
    name = unique()
    h = on_dask(c, T.progress_then_wait, 0.5, name).submit()
    assert wait_until(lambda: c.info(h.id).progress == 0.5)
    T.event(name).set()
    assert h.result(WAIT) == "done"


def test_a_call_dask_cannot_serialize_fails_at_once_without_retry(make: MakeCluster) -> None:
    c = make()
    h = on_dask(c, T.echo, threading.Lock()).with_retry(3).with_cache(60).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TypeError)
    assert c.info(h.id).attempts == 1


# ---------------------------------------------------------------- order and slots


def test_due_tasks_go_to_dask_in_priority_order_when_slots_are_full(make: MakeCluster) -> None:
    c = make(slots=1)
    log, hold = unique(), unique()
    holder = on_dask(c, T.wait_for, hold, log).submit()
    assert wait_until(lambda: T.notes(log) == [f"start {hold}"])
    plan = [("a", 0), ("b", 5), ("c", 0), ("d", 9), ("e", 5), ("f", -1)]
    handles = [on_dask(c, T.record, log, n).with_priority(p).submit() for n, p in plan]
    assert c.stats().executors["dask"].queued == 6  # ours, not Dask's
    T.event(hold).set()
    holder.result(WAIT)
    for h in handles:
        h.result(WAIT)
    assert T.notes(log)[1:] == ["d", "b", "e", "a", "c", "f"]


def test_never_more_than_slots_attempts_on_dask_at_once(make: MakeCluster) -> None:
    c = make(slots=3)  # the Dask cluster has 8 threads
    name = unique()
    handles = [on_dask(c, T.busy, name, 0.05).submit() for _ in range(12)]
    for h in handles:
        h.result(WAIT)
    assert T.most_at_once(name) == 3


def test_immediate_retries_run_again_on_dask(make: MakeCluster) -> None:
    c = make(slots=1)
    log = unique()
    h = (
        on_dask(c, T.failing_keys, log, 2)
        .with_retry(2)
        .with_retry_mode(RetryMode.IMMEDIATE)
        .with_backoff(FixedBackoff(0.05))
        .submit()
    )
    assert h.result(WAIT) == "ok"
    assert [attempt for attempt, _ in T.notes(log)] == [0, 1, 2]
    assert c.stats().retried == 2


def test_tasks_of_one_key_never_overlap_on_dask(make: MakeCluster) -> None:
    c = make(slots=4)
    name = unique()
    handles = [on_dask(c, T.busy, name, 0.03).with_key(name).submit() for _ in range(5)]
    for h in handles:
        h.result(WAIT)
    assert T.most_at_once(name) == 1


# ---------------------------------------------------------------- timeout and cancel


def test_timeout_delivers_at_once_and_cancels_the_dask_future(
    make: MakeCluster, client: Client
) -> None:
    c = make(slots=1)
    log, name = unique(), unique()
    h = on_dask(c, T.wait_for, name, log).with_timeout(0.2).submit()
    assert wait_until(lambda: bool(T.notes(log)))
    keys = {k for k in scheduler_keys(client) if f"-{h.id}~" in k}
    assert len(keys) == 1
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    assert wait_until(lambda: not keys & scheduler_keys(client))  # Dask forgot it
    # The slot is free while the abandoned call still blocks its Dask thread.
    assert on_dask(c, T.echo, "next").submit().result(WAIT) == "next"
    T.event(name).set()


def test_a_task_that_honours_cancelled_sees_its_timeout(make: MakeCluster) -> None:
    c = make()
    log = unique()
    h = on_dask(c, T.honour_cancel, log).with_timeout(0.2).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)


def test_cancel_of_a_running_attempt_delivers_at_once(make: MakeCluster, client: Client) -> None:
    c = make(slots=1)
    log, name = unique(), unique()
    h = on_dask(c, T.wait_for, name, log).submit()
    assert wait_until(lambda: bool(T.notes(log)))
    keys = {k for k in scheduler_keys(client) if f"-{h.id}~" in k}
    t0 = time.monotonic()
    assert c.cancel_task(h.id) is True
    result = h.wait(0)
    assert result is not None and isinstance(result.error, TaskCancelledError)
    assert time.monotonic() - t0 < 1.0
    assert wait_until(lambda: not keys & scheduler_keys(client))
    assert on_dask(c, T.echo, "next").submit().result(WAIT) == "next"
    T.event(name).set()


def test_a_late_outcome_of_an_abandoned_attempt_is_dropped(make: MakeCluster) -> None:
    c = make()
    log, name = unique(), unique()
    calls: Counter[str] = Counter()
    h = (
        on_dask(c, T.wait_for, name, log)
        .with_timeout(0.2)
        .with_cache(60)
        .on_complete(lambda tid, value, error: calls.update([tid]))
        .submit()
    )
    sub = h.subscribe()
    first = sub.get(timeout=WAIT)
    assert isinstance(first.error, TaskTimeoutError)
    T.event(name).set()  # the abandoned call returns now
    assert wait_until(lambda: T.notes(log) == [f"start {name}"])
    c.wait_idle(WAIT)
    with pytest.raises(queue.Empty):
        sub.get(timeout=0.3)
    assert isinstance(c.info(h.id).error, TaskTimeoutError)
    assert calls == {h.id: 1}


def test_outcomes_racing_their_timeouts_are_delivered_exactly_once(make: MakeCluster) -> None:
    c = make()
    completes: Counter[str] = Counter()
    lock = threading.Lock()

    def on_complete(tid: str, value: Any, error: BaseException | None) -> None:
        with lock:
            completes[tid] += 1

    subs: dict[str, queue.SimpleQueue[Result[Any]]] = {}
    for i in range(40):
        h = on_dask(c, T.sleep_then, i, 0.05).with_timeout(0.05).on_complete(on_complete).submit()
        subs[h.id] = h.subscribe()
    for q in subs.values():
        result = q.get(timeout=WAIT)
        assert result.ok or isinstance(result.error, TaskTimeoutError), result
        with pytest.raises(queue.Empty):
            q.get(timeout=0.01)
    assert wait_until(lambda: sum(completes.values()) == len(subs))
    assert set(completes.values()) == {1}
    s = c.stats()
    assert s.submitted == s.succeeded + s.timed_out == 40


# ---------------------------------------------------------------- the client closing under us


def test_a_client_closed_under_us_fails_its_tasks_clearly_and_stop_returns(
    make: MakeCluster, dask_cluster: LocalCluster
) -> None:
    own = Client(dask_cluster)  # its own connection to the same scheduler
    c = make(slots=1, dask=own)
    log, name = unique(), unique()
    running = on_dask(c, T.wait_for, name, log).submit()
    assert wait_until(lambda: bool(T.notes(log)))
    queued = on_dask(c, T.echo, 1).with_retry(3).submit()
    own.close()
    for h in (running, queued):
        result = h.wait(WAIT)
        assert result is not None and isinstance(result.error, ClusterError), result
        assert "closed" in str(result.error)
    later = on_dask(c, T.echo, 2).with_retry(3).with_cache(60).submit()
    result = later.wait(WAIT)
    assert result is not None and isinstance(result.error, ClusterError)
    assert c.info(later.id).attempts == 1  # final: no retry can help
    T.event(name).set()
    t0 = time.monotonic()
    c.stop(timeout=WAIT)
    assert time.monotonic() - t0 < WAIT


def test_a_client_closed_before_the_cluster_runs_fails_tasks_at_once(
    dask_cluster: LocalCluster,
) -> None:
    own = Client(dask_cluster)
    executor = DaskExecutor(own, slots=1)
    own.close()
    with Cluster(workers=1, executors={"dask": executor}) as c:
        result = on_dask(c, T.echo, 1).submit().wait(WAIT)
        assert result is not None and isinstance(result.error, ClusterError)
        assert "closed" in str(result.error)


# ---------------------------------------------------------------- worker processes


@pytest.fixture
def make_proc(proc_client: Client) -> Iterator[MakeCluster]:
    clusters: list[Cluster] = []

    def make(slots: int | None = None, **options: Any) -> Cluster:
        c = Cluster(workers=1, executors={"dask": DaskExecutor(proc_client, slots=slots)})
        clusters.append(c)
        c.run()
        return c

    yield make
    for c in clusters:
        with contextlib.suppress(ClusterError):
            c.stop(timeout=WAIT, cancel_pending=True)


def test_in_a_worker_process_current_gives_id_attempt_and_deadline(
    make_proc: MakeCluster,
) -> None:
    c = make_proc()
    t0 = time.monotonic()
    h = on_dask(c, T.context).with_id("proc-ctx").with_timeout(20).submit()
    task_id, attempt, deadline, kind = h.result(WAIT * 2)
    assert (task_id, attempt, kind) == ("proc-ctx", 0, "DaskTaskContext")
    # Re-based on the worker's monotonic clock (the same host: the same clock).
    assert deadline is not None and t0 + 19 < deadline < time.monotonic() + 20


def test_in_a_worker_process_errors_keep_their_chain_and_retry_after_its_delay(
    make_proc: MakeCluster, files: Files
) -> None:
    c = make_proc()
    h = (
        on_dask(c, T.retry_after_keyerror, files.log, 0.3)
        .with_retry_rule(KeyError, retries=1)
        .with_cache(60)
        .submit()
    )
    result = h.wait(WAIT * 2)
    assert result is not None and isinstance(result.error, KeyError)  # the cause
    assert "attempt 1" in str(result.error)
    times = [float(line.split()[2]) for line in files.lines()]
    assert len(times) == 2 and times[1] - times[0] >= 0.3  # RetryAfter's delay, its cause's rule
    assert c.info(h.id).attempts == 2


def test_in_a_worker_process_progress_and_reset_backoff_reach_the_cluster(
    make_proc: MakeCluster, files: Files
) -> None:
    c = make_proc()
    h = on_dask(c, T.progress_then_gate, {"done": 3}, files.log, files.gate).submit()
    files.wait_line(lambda line: line == "reported")
    assert wait_until(lambda: c.info(h.id).progress == {"done": 3}, 10)
    files.release()
    assert h.result(WAIT) == "done"
    # reset_backoff on attempt 1 restarts the rule's count: a third attempt is allowed.
    again = on_dask(c, T.with_reset, files.log).with_retry_rule(RuntimeError, retries=1).submit()
    assert again.result(WAIT * 2) == "ok"


def test_in_a_worker_process_a_cancelled_attempt_sees_cancelled(
    make_proc: MakeCluster, files: Files
) -> None:
    c = make_proc()
    h = on_dask(c, T.honour_cancel_logged, files.log).submit()
    files.wait_line(lambda line: line == "started")
    assert c.cancel_task(h.id) is True
    assert isinstance(h.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    assert files.wait_line(lambda line: line.startswith("reason")) == "reason cancelled True"


@pytest.mark.timeout(90)
def test_a_killed_worker_process_fails_only_its_attempt(
    make_proc: MakeCluster, files: Files, proc_client: Client
) -> None:
    c = make_proc(slots=2)
    victim = on_dask(c, T.pid_then_gate, files.log, "victim", files.gate).with_retry(1)
    victim_h = victim.with_cache(60).submit()
    bystander_h = on_dask(c, T.pid_then_gate, files.log, "bystander", files.gate).submit()
    line = files.wait_line(lambda line: line.startswith("victim 0 "))
    files.wait_line(lambda line: line.startswith("bystander 0 "))
    pid, key = int(line.split()[2]), line.split()[3]
    os.kill(pid, signal.SIGKILL)
    # The attempt failed with WorkerCrashedError; its retry waits for a Dask thread.
    assert wait_until(lambda: isinstance(c.info(victim_h.id).last_error, WorkerCrashedError), 20)
    assert "lost while running" in str(c.info(victim_h.id).last_error)
    # Dask rescheduled the attempt on the other worker (its allowed-failures) until our
    # cancel reached it: wait for that, or freeing that worker's thread would race it.
    assert wait_until(lambda: key not in worker_keys(proc_client), 20)
    files.release(2)  # the bystander goes on, then the retry
    assert bystander_h.result(20) == "bystander ok"
    assert victim_h.result(30) == "victim ok"
    assert c.info(victim_h.id).attempts == 2
    ran = [line.split()[:2] for line in files.lines()]
    assert ran.count(["victim", "0"]) == 1  # Dask did not run it again by itself
    assert ran.count(["victim", "1"]) == 1 and ran.count(["bystander", "0"]) == 1
    assert wait_until(lambda: len(proc_client.nthreads()) == 2, 30)  # the nanny restarted it


def worker_keys(client: Client) -> set[str]:
    """Every key some worker still holds (in any state)."""
    held = client.run(lambda dask_worker: [str(k) for k in dask_worker.state.tasks])
    return {key for keys in held.values() for key in keys}


# ---------------------------------------------------------------- the example


def test_the_example_gives_the_same_results_on_threads_and_on_dask(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dask_demo.py")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    local, _, dask = out.partition("dask (")
    assert local.startswith("local (threads):") and dask, out

    def values(part: str, prefix: str) -> list[str]:
        return [
            line.split(": ", 1)[1]
            for line in part.splitlines()
            if line.strip().startswith(f"{prefix}-")
        ]

    assert values(local, "threads") == values(dask, "dask")
    assert len(values(dask, "dask")) == 12
    assert "12/12 succeeded" in dask
