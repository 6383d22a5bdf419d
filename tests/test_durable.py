"""Durable tasks (SPEC §14), at the cluster level, on real SQLite files and real processes.

A test that needs a crash runs ``tests/_durable_child.py`` (a cluster driven by JSON
commands on its stdin, reporting JSON lines on its stdout) and SIGKILLs it; the test
process then opens the same file with its own ``Cluster(store=...)``. What a store holds
is read with a separate read-only ``sqlite3`` connection. The store layer itself is
tested in ``tests/test_store.py``.

Bugs it found were kept as ``xfail(strict=True)`` until fixed; none is left.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _durable_tasks as tasks
import pytest
from _durable_helpers import ROOT, WAIT, Child, read_only, read_rows, task_rows

import cluster
from cluster import (
    Cluster,
    ClusterError,
    ClusterStoppedError,
    DuplicateTaskError,
    ProcessExecutor,
    Result,
    SQLiteStore,
    StoreError,
    StoreLockedError,
    StoreWriteError,
    TaskInterruptedError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
    current,
)
from cluster._durable import MAX_INTERRUPTS
from cluster._store import Row

EXAMPLE = ROOT / "examples" / "durable.py"
LIVE_STATES = {"pending", "delayed", "running", "retrying"}
TERMINAL_STATES = {"succeeded", "failed", "cancelled", "timed_out"}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """``spawn(*args)``: a ``Child``, killed at teardown."""
    made: list[Child] = []

    def spawn(*args: object) -> Child:
        child = Child(*args, log=tmp_path / f"child-{len(made)}.log")
        made.append(child)
        return child

    yield spawn
    for child in made:
        child.kill()


def serve(spawn: Callable[..., Child], path: Path, workers: int = 1, *extra: str) -> Child:
    """A child serving commands on the store ``path``, ready."""
    child = spawn("serve", path, workers, *extra)
    line = child.wait_for(lambda line: "ready" in line or "open_error" in line)
    assert "ready" in line, line
    return child


@pytest.fixture
def clusters() -> Iterator[Callable[..., Cluster]]:
    """``open_cluster(path, workers=1, types=TYPES, run=True)``: a cluster with a store
    and the given task types registered; stopped (store released) at teardown."""
    made: list[Cluster] = []

    def open_cluster(
        path: Path | SQLiteStore,
        workers: int = 1,
        types: dict[str, Callable[..., Any]] | None = None,
        run: bool = True,
        **options: Any,
    ) -> Cluster:
        c = Cluster(workers=workers, store=path, **options)
        made.append(c)
        for name, fn in (tasks.TYPES if types is None else types).items():
            c.register(name, fn)
        if run:
            c.run()
        return c

    yield open_cluster
    for c in made:
        with contextlib.suppress(ClusterError):
            c.stop(timeout=10, cancel_pending=True)


OpenCluster = Callable[..., Cluster]
Spawn = Callable[..., Child]


def raw_rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=WAIT)
    try:
        return sorted(conn.execute("SELECT id, seq, state, doc FROM task"), key=repr)
    finally:
        conn.close()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of ``directory`` with the sha256 of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def wait_for_row(path: Path, task_id: str, states: set[str]) -> tuple[int, str, Any]:
    """Poll the file (a real state, written by another process) until the row is in ``states``."""
    deadline = time.monotonic() + WAIT
    while True:
        row = read_rows(path).get(task_id)
        if row is not None and row[1] in states:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"row {task_id!r} never reached {states}: {row}")
        time.sleep(0.01)


def get(q: queue.SimpleQueue[Result[Any]]) -> Result[Any]:
    return q.get(timeout=WAIT)


def wal_commits(path: Path) -> int:
    """How many commits the write-ahead log of ``path`` holds (commit frames of its
    current salt): each transaction ends with exactly one."""
    data = Path(str(path) + "-wal").read_bytes()
    if len(data) < 32:
        return 0
    page_size = int.from_bytes(data[8:12], "big")
    salt = data[16:24]
    commits = 0
    offset = 32
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if header[8:16] != salt:
            break
        if int.from_bytes(header[4:8], "big"):
            commits += 1
        offset += 24 + page_size
    return commits


def past(seconds_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()


# --------------------------------------------------------------------- register, add_task


def test_a_registered_type_runs_by_name(clusters: OpenCluster, tmp_path: Path) -> None:
    c = clusters(tmp_path / "t.db", types={})
    c.register("add", tasks.add)
    assert c.add_task("add", 2, b=3).submit().result(WAIT) == 5


def test_register_as_a_decorator_returns_the_function(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    c = clusters(tmp_path / "t.db", types={})

    @c.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8
    assert c.add_task("double", 21).submit().result(WAIT) == 42


def test_registering_a_name_twice_is_a_value_error(clusters: OpenCluster, tmp_path: Path) -> None:
    c = clusters(tmp_path / "t.db", types={"add": tasks.add})
    with pytest.raises(ValueError, match="'add'"):
        c.register("add", tasks.echo)
    with pytest.raises(ValueError, match="'add'"):
        c.register("add")(tasks.echo)
    assert c.add_task("add", 1, 1).submit().result(WAIT) == 2  # the first one stays


def test_registering_what_is_not_callable_is_a_type_error(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    c = clusters(tmp_path / "t.db", types={})
    with pytest.raises(TypeError, match="fn"):
        c.register("x", 42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="fn"):
        c.register("y")("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        c.register(7, tasks.add)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="name"):
        c.register("", tasks.add)
    with pytest.raises(ValueError, match="'x'"):
        c.add_task("x")  # nothing was registered


def test_add_task_with_an_unknown_type_is_a_value_error_naming_it(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    c = clusters(tmp_path / "t.db", types={"add": tasks.add})
    with pytest.raises(ValueError, match="'send_email'"):
        c.add_task("send_email", "a@b")
    assert task_rows(tmp_path / "t.db") == {}


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        (({1, 2},), {}, "argument 1"),
        ((1, object()), {}, "argument 2"),
        ((), {"when": datetime.now()}, "'when'"),
        ((float("nan"),), {}, "argument 1"),
        (([1, b"bytes"],), {}, "argument 1"),
    ],
)
def test_an_argument_that_is_not_json_is_a_type_error_at_add_task(
    clusters: OpenCluster, tmp_path: Path, args: tuple[Any, ...], kwargs: dict[str, Any], named: str
) -> None:
    c = clusters(tmp_path / "t.db")
    with pytest.raises(TypeError, match=named):
        c.add_task("echo", *args, **kwargs)
    assert c.stats().submitted == 0
    assert task_rows(tmp_path / "t.db") == {}


def test_a_registered_type_on_a_cluster_without_a_store_runs_in_memory() -> None:
    with Cluster(workers=1) as c:
        c.register("add", tasks.add)
        assert c.add_task("add", 1, 2).submit().result(WAIT) == 3
        with pytest.raises(TypeError, match="argument 1"):
            c.add_task("add", {1})


def test_a_callable_task_on_a_cluster_with_a_store_is_not_in_the_file(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    c = clusters(tmp_path / "t.db")
    h = c.add_task(tasks.add, 1, 2).with_id("mem").with_delay(60).with_cache(60).submit()
    done = c.add_task(lambda s: len(s), {1, 2}).with_cache(60).submit()  # non-JSON: fine
    assert done.result(WAIT) == 2
    assert c.info(h.id).state is TaskState.DELAYED
    assert read_rows(tmp_path / "t.db") == {}


# ------------------------------------------------------------------------------ restart


def test_a_durable_task_survives_a_sigkill_once_submit_returned(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="add", args=[20, 22], delay=0.3)
    child.kill()
    assert child.proc.returncode == -signal.SIGKILL
    c = clusters(path)
    assert get(c.subscribe(task_id)).value == 42


def test_a_task_submitted_before_run_survives_a_sigkill(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="echo", args=[{"to": "a@b", "n": [1, 2]}], ttl=60)
    child.kill()
    c = clusters(path)
    assert get(c.subscribe(task_id)).value == {"to": "a@b", "n": [1, 2]}
    assert c.info(task_id).name == "echo"


def test_queued_tasks_come_back_in_priority_start_and_submission_order(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    # (id, priority, start: seconds ago or None for "now")
    plan = [
        ("a", 0, 60),
        ("b", 1, 55),
        ("c", 0, 59),
        ("d", 1, 55),
        ("e", 2, 50),
        ("f", 0, 60),
        ("g", 0, None),
        ("h", 1, 58),
    ]
    for tid, priority, ago in plan:
        spec: dict[str, Any] = {"type": "echo", "args": [tid], "id": tid, "priority": priority}
        spec["ttl"] = 60
        if ago is not None:
            spec["start"] = past(ago)
        child.submit(**spec)
    child.submit(type="echo", args=["late"], id="late", priority=9, delay=3600)
    child.kill()
    ran: list[str] = []
    c = clusters(path, types={"echo": lambda tid: ran.append(tid)})
    for tid, _, _ in plan:
        get(c.subscribe(tid))
    assert ran == ["e", "h", "b", "d", "a", "f", "c", "g"]
    assert c.info("late").state is TaskState.DELAYED
    assert c.info("late").priority == 9


def test_a_delayed_task_keeps_its_start_time_across_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="echo", args=[1], delay=1.0)
    due = child.send("info", id=task_id)["info"]["start_at"]
    child.kill()
    started: list[float] = []
    c = clusters(path, types={"echo": lambda x: started.append(time.time())})
    assert c.info(task_id).start_at.timestamp() == pytest.approx(due, abs=0.001)
    get(c.subscribe(task_id))
    assert started[0] >= due - 0.005


def test_a_task_waiting_to_retry_comes_back_with_its_attempts_and_due_time(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="flaky", args=[1], retries=2, backoff=["fixed", 2.0], ttl=60)
    _, _, doc = wait_for_row(path, task_id, {"retrying"})
    child.kill()
    attempts: list[int] = []

    def flaky(failures: int) -> int:
        attempts.append(current().attempt)
        return current().attempt

    c = clusters(path, types={"flaky": flaky})
    info = c.info(task_id)
    assert info.attempts == 1
    assert isinstance(info.last_error, cluster.StoredError)
    assert info.last_error.type_name.endswith("OSError")
    assert "attempt 0" in str(info.last_error)
    if time.time() < doc["start"] - 0.5:  # (not yet due: the retry still waits)
        assert info.state is TaskState.RETRYING
        assert info.next_attempt_at is not None
    assert get(c.subscribe(task_id)).value == 1
    assert attempts == [1]
    assert c.info(task_id).attempts == 2


def test_a_running_task_is_interrupted_and_retried_counting_that_attempt(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="block", retries=1, ttl=60)
    child.wait_for(lambda line: line.get("ev") == "started" and line["id"] == task_id)
    child.kill()
    c = clusters(path, types={"block": lambda: current().attempt})
    assert get(c.subscribe(task_id)).value == 1
    info = c.info(task_id)
    assert info.attempts == 2
    assert info.state is TaskState.SUCCEEDED
    assert isinstance(info.last_error, TaskInterruptedError)


def test_a_running_task_without_retries_left_fails_with_task_interrupted_error(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="block", retries=0, tags=["t"])
    child.wait_for(lambda line: line.get("ev") == "started" and line["id"] == task_id)
    child.kill()
    ran: list[int] = []
    c = clusters(path, types={"block": lambda: ran.append(1)})
    dead = {d.id: d for d in c.dead_letters()}
    assert isinstance(dead[task_id].error, TaskInterruptedError)
    assert isinstance(dead[task_id].error, ClusterError)
    assert dead[task_id].attempts == 1
    assert dead[task_id].tags == ("t",)
    assert ran == []  # never run again


def test_an_interrupted_task_that_became_a_dead_letter_stays_cleared(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="block")
    child.wait_for(lambda line: line.get("ev") == "started" and line["id"] == task_id)
    child.kill()
    c = clusters(path)
    assert [d.id for d in c.dead_letters()] == [task_id]
    assert c.clear_dead_letters() == 1
    c.stop(timeout=10)
    c = clusters(path)
    assert c.dead_letters() == []
    assert read_rows(path) == {}


def test_a_retry_rule_keeps_its_count_across_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    # The rule allows one retry: the first attempt used it in the child.
    task_id = child.submit(
        type="flaky", args=[9], rules=[[["OSError"], 1]], backoff=["fixed", 0.2], ttl=60
    )
    wait_for_row(path, task_id, {"retrying"})
    child.kill()

    def flaky(failures: int) -> None:
        raise OSError(f"attempt {current().attempt}")

    c = clusters(path, types={"flaky": flaky})
    result = get(c.subscribe(task_id))
    assert isinstance(result.error, OSError)
    assert str(result.error) == "attempt 1"  # no second retry: the count survived
    assert c.info(task_id).attempts == 2


def test_a_task_that_kills_its_process_every_time_ends_as_a_dead_letter(
    children: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    child.post("submit", spec={"type": "suicide", "id": "k", "retries": 50})
    kills = 0
    dead: list[dict[str, Any]] = []
    for _ in range(MAX_INTERRUPTS + 3):
        assert child.proc.wait(WAIT) == -signal.SIGKILL, child.stderr()
        kills += 1
        child = serve(children, path)
        child.post("run")
        start = child.post("dead")
        try:
            dead = child.wait_for(lambda line: line.get("re") == "dead", start)["dead"]
        except AssertionError:  # it died before it could answer
            continue
        if dead:
            break
    assert kills == MAX_INTERRUPTS + 1
    assert [(d["id"], d["error"], d["attempts"]) for d in dead] == [
        ("k", "TaskInterruptedError", MAX_INTERRUPTS + 1)
    ]
    assert child.send("info", id="k").get("refused", "").startswith("TaskNotFoundError")
    assert child.proc.poll() is None  # not run again: the process lives on


# ------------------------------------------------------------------------ values, errors


def test_a_json_value_comes_back_in_a_cached_result_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="echo", args=[{"a": [1, 2.5, None, True], "b": "é"}], ttl=3600)
    assert child.send("wait", id=task_id)["ok"]
    child.kill()
    c = clusters(path)
    result = get(c.subscribe(task_id))
    assert result.ok
    assert result.value == {"a": [1, 2.5, None, True], "b": "é"}
    assert c.info(task_id).value == result.value
    assert c.info(task_id).state is TaskState.SUCCEEDED


def test_a_value_that_is_not_json_is_unavailable_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="opaque", ttl=3600)
    assert child.send("wait", id=task_id)["value"] == "{1, 2, 3}"  # delivered there
    child.kill()
    c = clusters(path)
    result = get(c.subscribe(task_id))
    assert result.ok
    assert result.value is cluster.UNAVAILABLE
    assert c.info(task_id).value is cluster.UNAVAILABLE
    assert "unavailable" in repr(cluster.UNAVAILABLE)


def test_an_error_comes_back_as_a_stored_error_with_type_and_traceback(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="fail", args=["boom"], ttl=3600)
    assert child.send("wait", id=task_id)["error"] == "ValueError"
    child.kill()
    c = clusters(path)
    result = get(c.subscribe(task_id))
    error = result.error
    assert isinstance(error, cluster.StoredError)
    assert isinstance(error, ClusterError)
    assert error.type_name.rpartition(":")[2] == "ValueError"
    assert "boom" in str(error)
    assert "raise ValueError(message)" in error.text
    assert "_durable_tasks.py" in error.text
    assert c.info(task_id).state is TaskState.FAILED
    with pytest.raises(cluster.StoredError):
        result.unwrap()


def test_a_timed_out_task_comes_back_timed_out(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="sleep", args=[30], timeout=0.2, ttl=3600)
    assert child.send("wait", id=task_id)["error"] == "TaskTimeoutError"
    child.kill()
    c = clusters(path)
    assert c.info(task_id).state is TaskState.TIMED_OUT
    error = get(c.subscribe(task_id)).error
    assert isinstance(error, cluster.StoredError)
    assert error.type_name.endswith("TaskTimeoutError")


def test_a_cached_cancelled_task_comes_back_cancelled(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="echo", args=[1], delay=3600, ttl=3600)
    assert child.send("cancel", id=task_id)["cancelled"] is True
    assert task_rows(path)[task_id][1] == "cancelled"
    child.kill()
    c = clusters(path)
    assert c.info(task_id).state is TaskState.CANCELLED
    result = get(c.subscribe(task_id))
    assert isinstance(result.error, cluster.TaskCancelledError)


# ---------------------------------------------------------------------- options survive


FULL_OPTIONS: dict[str, Any] = {
    "priority": 3,
    "timeout": 2.5,
    "retries": 4,
    "backoff": ["exponential", 0.5, 3.0, 10.0],
    "jitter": 0.3,
    "mode": "IMMEDIATE",
    "rules": [[["OSError", "KeyError"], 2]],
    "ttl": 120,
    "name": "invoice",
    "tags": ["billing", "eu"],
    "key": "customer-7",
}


def test_options_are_kept_across_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="echo", args=[1], delay=3600, **FULL_OPTIONS)
    child.kill()
    c = clusters(path)
    info = c.info(task_id)
    assert (info.priority, info.retries, info.name, info.tags, info.key) == (
        3,
        4,
        "invoice",
        ("billing", "eu"),
        "customer-7",
    )
    assert [i.id for i in c.tasks(tag="eu")] == [task_id]
    assert [i.id for i in c.tasks(key="customer-7")] == [task_id]
    assert [i.id for i in c.tasks(name="invoice")] == [task_id]


def test_the_options_the_restarted_cluster_writes_back_are_those_it_read(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    # Timeout, backoff, jitter, retry mode, rules and TTL are not in info(): the row the
    # restarted cluster writes for the task (after a reschedule) must carry them unchanged.
    path = tmp_path / "t.db"
    child = serve(children, path)
    first = child.submit(type="echo", args=[1], delay=3600, **FULL_OPTIONS)
    second = child.submit(
        type="echo",
        args=[2],
        delay=3600,
        backoff=["linear", 0.1, 0.2, 5.0],
        retries=2,
        repeat={"every": 30, "count": 5},
    )
    child.kill()
    before = task_rows(path)
    c = clusters(path)
    for tid in (first, second):
        assert c.reschedule(tid, 7200)
    after = task_rows(path)
    for tid in (first, second):
        assert after[tid][2]["opts"] == before[tid][2]["opts"]
        assert after[tid][2]["start"] > before[tid][2]["start"] + 3000


def test_a_built_in_backoff_still_spaces_the_retries_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="flaky", args=[2], retries=3, backoff=["exponential", 0.3, 2.0])
    child.kill()
    spans: list[tuple[float, float]] = []

    def flaky(failures: int) -> int:
        began = time.monotonic()
        try:
            if current().attempt < failures:
                raise OSError("not yet")
            return current().attempt
        finally:
            spans.append((began, time.monotonic()))

    c = clusters(path, types={"flaky": flaky})
    assert get(c.subscribe(task_id)).value == 2
    assert spans[1][0] - spans[0][1] >= 0.3 - 0.01
    assert spans[2][0] - spans[1][1] >= 0.6 - 0.01


def test_a_timeout_still_applies_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="sleep", args=[30], timeout=0.2)
    child.kill()
    c = clusters(path)
    started = time.monotonic()
    assert isinstance(get(c.subscribe(task_id)).error, TaskTimeoutError)
    assert time.monotonic() - started < 5


def test_a_cached_result_keeps_its_ttl_across_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    keep = child.submit(type="add", args=[1, 1], ttl=3600)
    brief = child.submit(type="add", args=[2, 2], ttl=0.5)
    assert child.send("wait", id=keep)["ok"]
    assert child.send("wait", id=brief)["ok"]
    expires = task_rows(path)[brief][2]["finished"] + 0.5
    child.kill()
    time.sleep(max(0.0, expires - time.time() + 0.05))  # its TTL passed while no one ran
    c = clusters(path)
    assert get(c.subscribe(keep)).value == 2
    with pytest.raises(TaskNotFoundError):
        c.subscribe(brief)
    assert brief not in task_rows(path)
    assert keep in task_rows(path)


def test_a_repeating_series_goes_on_where_it_stood(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(
        type="echo", args=["r"], repeat={"every": 0.5, "count": 4}, retries=1, ttl=60
    )
    ran = 0
    for _ in range(2):  # runs 0 and 1 began
        ran = 1 + child.wait_index(lambda e: e.get("ev") == "ran" and e["id"] == task_id, ran)
    # The second run started (its "running" row was committed first); the next change
    # of the row is the end of that run.
    wait_for_row(path, task_id, {"delayed"})
    info = child.send("info", id=task_id)["info"]
    child.kill()
    _, state, doc = task_rows(path)[task_id]
    if state == "delayed" and info["state"] == "delayed":  # (the third run had not begun)
        assert doc["start"] == pytest.approx(info["next_run_at"], abs=0.001)
    runs: list[int] = []
    c = clusters(path, types={"echo": lambda v: v})
    q = c.subscribe(task_id)
    while not runs or runs[-1] < 3:
        runs.append(get(q).run)
    assert runs == [2, 3]
    assert c.info(task_id).state is TaskState.SUCCEEDED
    assert c.info(task_id).runs == 4


def test_callable_options_are_dropped_but_the_task_still_runs(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="flaky", args=[1], retries=2, delay=0.1, callables=True, ttl=60)
    child.kill()
    c = clusters(path)
    assert get(c.subscribe(task_id)).value == 1  # retried (no predicate left), then done
    assert c.info(task_id).attempts == 2


def test_generated_and_stored_ids_never_collide_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    stored = {child.submit(type="echo", args=[i], delay=3600) for i in range(3)}
    child.kill()
    c = clusters(path, run=False)
    for tid in stored:  # taken before run() brings them back
        with pytest.raises(DuplicateTaskError):
            c.add_task("echo", 0).with_id(tid).submit()
    fresh = {c.add_task("echo", 0).with_delay(3600).submit().id for _ in range(3)}
    assert not fresh & stored
    c.run()
    assert {i.id for i in c.tasks()} == stored | fresh


def test_a_reprioritized_task_keeps_its_new_priority_across_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="echo", args=[1], delay=3600, priority=1)
    assert child.send("reprioritize", id=task_id, priority=8)["done"] is True
    child.kill()
    c = clusters(path)
    assert c.info(task_id).priority == 8


def test_a_cancelled_durable_task_does_not_come_back(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="echo", args=[1], delay=3600)
    kept = child.submit(type="echo", args=[2], delay=3600)
    assert child.send("cancel", id=task_id)["cancelled"] is True
    child.kill()
    c = clusters(path)
    with pytest.raises(TaskNotFoundError):
        c.info(task_id)
    assert c.info(kept).state is TaskState.DELAYED


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_survive_a_restart_and_can_be_resurrected(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="fail", args=["bad card"], retries=1, name="charge", tags=["x"])
    assert child.send("wait", id=task_id)["error"] == "ValueError"
    assert [d["id"] for d in child.send("dead")["dead"]] == [task_id]
    child.kill()
    fixed: list[str] = []

    def charge(message: str) -> str:
        fixed.append(message)
        return "charged"

    c = clusters(path, types={"fail": charge})
    (dead,) = c.dead_letters()
    assert (dead.id, dead.name, dead.tags, dead.attempts) == (task_id, "charge", ("x",), 2)
    assert isinstance(dead.error, cluster.StoredError)
    assert "bad card" in str(dead.error)
    assert c.stats_by_name()["charge"].dead == 1
    (handle,) = c.resurrect(task_id)
    assert handle.result(WAIT) == "charged"
    assert fixed == ["bad card"]
    assert c.dead_letters() == []


def test_a_dead_letters_error_text_is_the_original_traceback_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="fail", args=["bad card"])
    child.send("wait", id=task_id)
    child.kill()
    c = clusters(path)
    (dead,) = c.dead_letters()
    assert "raise ValueError(message)" in dead.error_text


def test_a_resurrected_durable_task_is_durable(
    clusters: OpenCluster, tmp_path: Path, new_event: Callable[[], threading.Event]
) -> None:
    path = tmp_path / "t.db"
    fixed = threading.Event()
    release = new_event()  # set at teardown: the resurrected attempt runs until then

    def charge(card: str) -> str:
        if not fixed.is_set():
            raise ValueError("declined")
        release.wait(WAIT)
        return "charged"

    c = clusters(path, types={"charge": charge})
    first = c.add_task("charge", "4242").submit()
    first.wait(WAIT)
    assert [state for _, state, _ in read_rows(path).values()] == ["dead"]
    fixed.set()
    (again,) = c.resurrect(first.id)
    assert again.id in task_rows(path)


def test_a_cached_failed_task_is_still_a_dead_letter_after_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="fail", args=["x"], ttl=3600)
    child.send("wait", id=task_id)
    assert [d["id"] for d in child.send("dead")["dead"]] == [task_id]
    child.kill()
    c = clusters(path)
    assert c.info(task_id).state is TaskState.FAILED  # the cached Result is back
    assert [d.id for d in c.dead_letters()] == [task_id]


def test_clearing_a_dead_letter_after_a_restart_removes_it_from_the_file(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="fail", args=["x"])
    child.send("wait", id=task_id)
    child.kill()
    assert [r[1] for r in read_rows(path).values()] == ["dead"]
    c = clusters(path)
    assert c.clear_dead_letters(task_id) == 1
    assert read_rows(path) == {}


# ---------------------------------------------------------------------------- submit_all


def test_submit_all_with_a_duplicate_id_queues_nothing_and_writes_nothing(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, run=False)
    builders = [c.add_task("echo", i).with_id(f"b{i}") for i in range(5)]
    builders.append(c.add_task("echo", 9).with_id("b2"))
    with pytest.raises(DuplicateTaskError, match="'b2'"):
        c.submit_all(builders)
    assert c.tasks() == []
    assert c.stats().submitted == 0
    assert read_rows(path) == {}
    handles = c.submit_all([c.add_task("echo", i).with_id(f"b{i}") for i in range(3)])
    assert [h.id for h in handles] == ["b0", "b1", "b2"]  # the ids were not kept


def test_submit_all_with_an_id_already_stored_queues_nothing(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, run=False)
    c.add_task("echo", 0).with_id("taken").with_delay(3600).submit()
    before = raw_rows(path)
    with pytest.raises(DuplicateTaskError, match="'taken'"):
        c.submit_all([c.add_task("echo", 1).with_id("new"), c.add_task("echo", 2).with_id("taken")])
    assert raw_rows(path) == before
    assert [i.id for i in c.tasks()] == ["taken"]


def test_submit_all_commits_its_durable_tasks_in_one_transaction(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, run=False)
    c.add_task("echo", 0).with_delay(3600).submit()
    start = wal_commits(path)
    c.submit_all([c.add_task("echo", i).with_delay(3600) for i in range(10)])
    assert wal_commits(path) == start + 1
    assert len(task_rows(path)) == 11
    for i in range(3):  # (the count works: one submit, one commit)
        c.add_task("echo", i).with_delay(3600).submit()
    assert wal_commits(path) == start + 4


def test_submit_all_on_a_stopped_cluster_writes_nothing(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path)
    builders = [c.add_task("echo", i) for i in range(3)]
    c.stop(timeout=10)
    with pytest.raises(ClusterStoppedError):
        c.submit_all(builders)
    assert read_rows(path) == {}


def test_submit_all_mixes_durable_and_in_memory_tasks(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, run=False)
    handles = c.submit_all(
        [
            c.add_task("echo", 1).with_id("d").with_delay(3600),
            c.add_task(tasks.add, 1, 2).with_id("m").with_delay(3600),
        ]
    )
    assert [h.id for h in handles] == ["d", "m"]
    assert set(task_rows(path)) == {"d"}
    assert {i.id for i in c.tasks()} == {"d", "m"}


def test_tasks_submit_all_acknowledged_survive_a_sigkill(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    reply = child.send(
        "submit_all", specs=[{"type": "add", "args": [i, i], "ttl": 60} for i in range(20)]
    )
    ids = reply["ack"]
    child.kill()
    c = clusters(path)
    assert [get(c.subscribe(tid)).value for tid in ids] == [2 * i for i in range(20)]


# ------------------------------------------------------------------ persist, then deliver


def test_a_subscriber_never_sees_a_result_the_store_could_still_lose(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, workers=4, run=False)
    problems: list[str] = []
    reader = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    reader_lock = threading.Lock()

    def row_of(task_id: str) -> tuple[str, Any] | None:
        with reader_lock:
            found = reader.execute("SELECT state, doc FROM task WHERE id = ?", (task_id,))
            row = found.fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def check(task_id: str, result: Result[Any], cached: bool, where: str) -> None:
        row = row_of(task_id)
        if cached:
            if row is None or row[0] not in TERMINAL_STATES:
                problems.append(f"{where}: {task_id} delivered {result}, row is {row}")
            elif result.ok and row[1]["value"].get("json") != result.value:
                problems.append(f"{where}: {task_id} value {result.value}, row {row}")
        elif row is not None and row[0] in LIVE_STATES:
            problems.append(f"{where}: {task_id} delivered {result}, row still {row[0]}")

    def on_complete(task_id: str, value: Any, error: BaseException | None, cached: bool) -> None:
        check(task_id, Result(value, error), cached, "on_complete")

    specs: list[tuple[str, bool]] = []
    for i in range(80):
        cached = i % 2 == 0
        b = c.add_task("add" if i % 3 else "fail", *((i, 1) if i % 3 else ("x",)))
        if cached:
            b.with_cache(60)
        if i % 5 == 0:
            b.with_retry(1)
        b.on_complete(functools.partial(on_complete, cached=cached))
        specs.append((b.submit().id, cached))
    subscribers = []
    for task_id, cached in specs:
        q = c.subscribe(task_id)

        def watch(task_id: str = task_id, q: Any = q, cached: bool = cached) -> None:
            check(task_id, q.get(timeout=WAIT), cached, "subscriber")

        thread = threading.Thread(target=watch)
        thread.start()
        subscribers.append(thread)
    c.run()
    for thread in subscribers:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in subscribers)
    reader.close()
    assert problems == []


def test_a_handle_result_is_committed_when_result_returns(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, workers=2)
    for i in range(30):
        h = c.add_task("add", i, 0).with_cache(60).submit()
        assert h.result(WAIT) == i
        seq_state_doc = read_rows(path)[h.id]
        assert seq_state_doc[1] == "succeeded"
        assert seq_state_doc[2]["value"] == {"json": i}


@contextlib.contextmanager
def commits_held(store: SQLiteStore) -> Iterator[None]:
    """No commit of ``store`` completes inside the block (its connection lock is held)."""
    with store._db_lock:
        yield


def test_a_result_is_not_delivered_while_its_commit_is_held(
    clusters: OpenCluster, tmp_path: Path, new_event: Callable[[], threading.Event]
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    started, proceed = new_event(), new_event()

    def step() -> str:
        started.set()
        proceed.wait(WAIT)
        return "done"

    c = clusters(store, types={"step": step})
    handle = c.add_task("step").with_cache(60).submit()
    q = handle.subscribe()
    assert started.wait(WAIT)
    with commits_held(store):
        proceed.set()
        with pytest.raises(queue.Empty):
            q.get(timeout=1.0)  # the attempt ended, but its end is not on disk yet
    assert get(q).value == "done"


def test_a_handle_does_not_return_a_result_while_its_commit_is_held(
    clusters: OpenCluster, tmp_path: Path, new_event: Callable[[], threading.Event]
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    started, proceed = new_event(), new_event()

    def step() -> str:
        started.set()
        proceed.wait(WAIT)
        return "done"

    c = clusters(store, types={"step": step})
    handle = c.add_task("step").with_cache(60).submit()
    assert started.wait(WAIT)
    with commits_held(store):
        proceed.set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not handle.done():
            time.sleep(0.005)
        assert not handle.done()  # the attempt ended, but its end is not on disk yet
        assert handle.wait(timeout=0) is None
    assert handle.result(WAIT) == "done"


def test_a_run_result_is_not_delivered_while_its_commit_is_held(
    clusters: OpenCluster, tmp_path: Path, new_event: Callable[[], threading.Event]
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    started, proceed = new_event(), new_event()

    def step() -> str:
        if not started.is_set():
            started.set()
            proceed.wait(WAIT)
        return "run"

    c = clusters(store, types={"step": step})
    handle = c.add_task("step").repeat(every=30, count=2).submit()
    q = handle.subscribe()
    assert started.wait(WAIT)
    with commits_held(store):
        proceed.set()
        with pytest.raises(queue.Empty):
            q.get(timeout=1.0)
    assert get(q).run == 0


# ----------------------------------------------------------------------- rows kept aside


def test_rows_that_cannot_be_recovered_are_listed_and_kept_untouched(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    good = child.submit(type="echo", args=[1], id="good", delay=0.05)
    orphan = child.submit(type="add", args=[1, 2], id="orphan", delay=3600)
    child.submit(type="echo", args=[2], id="garbled", delay=3600)
    child.submit(type="echo", args=[3], id="hollow", delay=3600)
    child.kill()
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal"):
        if Path(str(path) + suffix).exists():
            shutil.copy(str(path) + suffix, str(copy / "t.db") + suffix)
    copied = copy / "t.db"
    raw = sqlite3.connect(copied)
    raw.execute("UPDATE task SET doc = ? WHERE id = 'garbled'", ("{not json at all",))
    raw.execute("UPDATE task SET doc = '{}' WHERE id = 'hollow'")
    raw.commit()
    raw.close()
    kept = [r for r in raw_rows(copied) if r[0] != good]
    c = clusters(copied, types={"echo": tasks.echo})  # "add" is no longer registered
    reasons = {bad.id: bad.reason for bad in c.unrecovered}
    assert set(reasons) == {orphan, "garbled", "hollow"}
    assert "not registered" in reasons[orphan] and "'add'" in reasons[orphan]
    assert "JSON" in reasons["garbled"]
    assert get(c.subscribe(good)).value == 1
    c.stop(timeout=10)
    assert [r for r in raw_rows(copied) if r[0] != good] == kept


def test_a_row_kept_aside_comes_back_once_its_type_is_registered(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    task_id = child.submit(type="add", args=[4, 5], delay=0.05)
    child.kill()
    c = clusters(path, types={})
    assert [b.id for b in c.unrecovered] == [task_id]
    c.stop(timeout=10)
    c = clusters(path, types={"add": tasks.add})
    assert c.unrecovered == []
    assert get(c.subscribe(task_id)).value == 9


# ------------------------------------------------------------------------------ ownership


def test_a_second_cluster_on_the_same_store_in_this_process_is_refused(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path)
    with pytest.raises(StoreLockedError, match=re.escape(str(path))) as info:
        Cluster(workers=1, store=path)
    assert info.value.pid == os.getpid()
    assert c.add_task("add", 1, 1).submit().result(WAIT) == 2  # the owner is unharmed


def test_a_second_process_on_the_same_store_is_refused_while_the_owner_lives(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path)
    other = children("serve", path, 1)
    line = other.wait_for(lambda line: "ready" in line or "open_error" in line)
    assert line.get("type") == "StoreLockedError", line
    assert str(path) in line["open_error"] and str(os.getpid()) in line["open_error"]
    c.stop(timeout=10)
    assert "ready" in children("serve", path, 1).wait_for(
        lambda line: "ready" in line or "open_error" in line
    )


def test_a_store_is_free_again_once_its_owner_is_killed(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    with pytest.raises(StoreLockedError):
        Cluster(workers=1, store=path)
    child.kill()
    clusters(path)


def test_a_forked_child_cannot_write_through_the_parents_store(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    c = clusters(store)
    c.add_task("echo", 1).with_id("before").with_delay(3600).submit()
    before = raw_rows(path)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without any cleanup
        outcome = []
        try:
            c.add_task("echo", 2).with_id("from-child").submit()
            outcome.append("submitted")
        except ClusterStoppedError:
            outcome.append("submit-refused")
        except BaseException as exc:
            outcome.append(f"submit-{type(exc).__name__}")
        try:
            store.write([Row("raw", 1, "pending", {})])
            outcome.append("written")
        except RuntimeError:
            outcome.append("write-refused")
        except BaseException as exc:
            outcome.append(f"write-{type(exc).__name__}")
        os.write(writer, " ".join(outcome).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said == "submit-refused write-refused"
    assert raw_rows(path) == before
    c.add_task("echo", 3).with_id("after").with_delay(3600).submit()  # the parent still writes
    assert set(task_rows(path)) == {"before", "after"}


# ----------------------------------------------------------------------------- bad files


def make_store(path: Path, rows: int = 200) -> None:
    """A store with ``rows`` cached Results, closed."""
    c = Cluster(workers=2, store=path)
    c.register("add", tasks.add)
    c.run()
    handles = c.submit_all([c.add_task("add", i, 1).with_cache(3600) for i in range(rows)])
    for h in handles:
        h.wait(WAIT)
    c.stop(timeout=10)


def corrupt(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(os.urandom(8192))
    elif kind == "text":
        path.write_text("name,email\nann,a@b\n")
    elif kind == "sqlite header and garbage":
        path.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    elif kind == "truncated":
        make_store(path, rows=300)
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "damaged pages":
        make_store(path, rows=300)
        data = bytearray(path.read_bytes())
        page = int.from_bytes(data[16:18], "big")
        data[2 * page : 4 * page] = os.urandom(2 * page)
        path.write_bytes(bytes(data))
    elif kind == "foreign":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("INSERT INTO users (email) VALUES ('a@b')")
        conn.commit()
        conn.close()
    elif kind == "newer version":
        make_store(path, rows=3)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        conn.close()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "random bytes",
        "text",
        "sqlite header and garbage",
        "truncated",
        "damaged pages",
        "foreign",
        "newer version",
    ],
)
def test_a_file_that_is_not_a_usable_store_is_refused_and_left_as_it_was(
    tmp_path: Path, kind: str
) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    path = directory / "tasks.db"
    corrupt(path, kind)
    before = snapshot(directory)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Cluster(workers=1, store=path)
    assert snapshot(directory) == before
    with pytest.raises(ValueError, match=re.escape(str(path))):  # and again: nothing changed
        Cluster(workers=1, store=str(path))
    assert snapshot(directory) == before


def test_a_newer_version_is_refused_with_a_message_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    corrupt(path, "newer version")
    with pytest.raises(ValueError, match="newer"):
        Cluster(workers=1, store=path)


def test_a_store_in_a_read_only_directory_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    make_store(directory / "t.db", rows=2)
    before = snapshot(directory)
    with read_only(directory), pytest.raises(StoreError, match=r"t\.db.*not writable"):
        Cluster(workers=1, store=directory / "t.db")
    assert snapshot(directory) == before


def test_a_new_store_in_a_read_only_directory_is_refused_with_a_clear_error(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    with read_only(directory), pytest.raises(StoreError, match=r"t\.db.*not writable"):
        Cluster(workers=1, store=directory / "t.db")
    assert list(directory.iterdir()) == []


# ------------------------------------------------------------------------------ full disk


def cap_size(store: SQLiteStore, extra_pages: int) -> None:
    """Let the database grow by ``extra_pages`` pages only (SQLITE_FULL beyond)."""
    with store._db_lock:
        assert store._conn is not None
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages + extra_pages}")


def test_a_full_database_refuses_the_submit_and_queues_nothing(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    c = clusters(store, run=False)
    acked = [c.add_task("echo", i).with_delay(3600).submit().id for i in range(5)]
    cap_size(store, 2)
    with pytest.raises(StoreWriteError, match="full") as info:
        c.add_task("echo", "x" * 200_000).with_id("big").submit()
    assert info.value.path == str(path)
    with pytest.raises(StoreWriteError):
        c.submit_all([c.add_task("echo", "y" * 200_000), c.add_task("echo", 1).with_id("small")])
    for refused in ("big", "small"):
        with pytest.raises(TaskNotFoundError):
            c.info(refused)
    assert {i.id for i in c.tasks()} == set(acked)
    assert c.stats().submitted == 5
    assert set(task_rows(path)) == set(acked)
    c.add_task("echo", 2).with_id("big").with_delay(3600).submit()  # the id is free again
    assert set(task_rows(path)) == {*acked, "big"}


def test_a_failed_commit_of_a_tasks_progress_is_logged_and_the_work_goes_on(
    clusters: OpenCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    c = clusters(store, types={"big": lambda: "v" * 300_000})
    cap_size(store, 2)  # the cached Result (300 kB of JSON) cannot be written
    result = get(c.add_task("big").with_cache(60).submit().subscribe())
    assert result.value == "v" * 300_000  # delivered in this process all the same
    assert any("could not record" in r.getMessage() for r in caplog.records)
    failed = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], StoreError)]
    assert failed and str(path) in str(failed[0].exc_info[1])  # type: ignore[index]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only): a disk that really fills up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_refuses_the_submit_and_keeps_every_acknowledged_task(
    children: Spawn, clusters: OpenCluster, tiny_fs: Path
) -> None:
    path = tiny_fs / "t.db"
    child = serve(children, path)
    acked = [child.submit(type="echo", args=[i], delay=3600) for i in range(20)]
    ballast = tiny_fs / "ballast"
    with contextlib.suppress(OSError), open(ballast, "wb", buffering=0) as f:
        while True:  # until ENOSPC
            f.write(b"\0" * 4096)
    reply = child.send("submit", spec={"type": "echo", "args": ["z" * 300_000], "id": "big"})
    assert reply.get("refused", "").startswith("StoreWriteError"), reply
    assert "full" in reply["refused"]
    assert "refused" in child.send("info", id="big")
    child.kill()
    ballast.unlink()
    c = clusters(path, run=False)
    c.run()
    assert {i.id for i in c.tasks()} == set(acked)


# --------------------------------------------------------------------------- concurrency


def test_max_pending_refuses_a_durable_submit_before_anything_is_written(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, run=False, max_pending=2, on_full="reject")
    c.add_task("echo", 1).with_id("a").submit()
    c.add_task("echo", 2).with_id("b").submit()
    with pytest.raises(cluster.QueueFullError):
        c.add_task("echo", 3).with_id("c").submit()
    with pytest.raises(cluster.QueueFullError):
        c.submit_all([c.add_task("echo", 4).with_id("d")])
    assert set(task_rows(path)) == {"a", "b"}


def test_without_dead_letters_an_interrupted_task_leaves_nothing_behind(
    children: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="block")
    child.wait_for(lambda line: line.get("ev") == "started" and line["id"] == task_id)
    child.kill()
    c = Cluster(workers=1, store=path, dead_letters=0)
    try:
        c.register("block", tasks.block)
        c.run()
        assert c.dead_letters() == []
        with pytest.raises(TaskNotFoundError):
            c.info(task_id)
        assert read_rows(path) == {}
    finally:
        c.stop(timeout=10)


def test_eight_threads_submitting_while_workers_finish_lose_nothing(
    clusters: OpenCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, workers=4)
    ends: dict[str, int] = {}
    ends_lock = threading.Lock()

    def ended(task_id: str, value: Any, error: BaseException | None) -> None:
        with ends_lock:
            ends[task_id] = ends.get(task_id, 0) + 1

    submitted: list[str] = []
    errors: list[BaseException] = []
    go = threading.Barrier(8)

    def submitter(t: int) -> None:
        go.wait()
        try:
            for i in range(150):
                b = c.add_task("add", t, i).on_complete(ended)
                if i % 3 == 0:
                    b.with_cache(60)
                if i % 10 == 0:
                    handles = c.submit_all([b, c.add_task("add", i, t).on_complete(ended)])
                    ids = [h.id for h in handles]
                else:
                    ids = [b.submit().id]
                with ends_lock:
                    submitted.extend(ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert c.wait_idle(30)
    c.stop(timeout=30)
    assert len(submitted) == len(set(submitted)) == 8 * 165
    assert set(ends) == set(submitted)
    assert set(ends.values()) == {1}
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    rows = task_rows(path)
    assert len(rows) == 8 * 50  # the cached ones (every third of each thread's)
    assert all(state == "succeeded" for _, state, _ in rows.values())


# --------------------------------------------------------------- other executors, async


def test_a_durable_task_runs_on_a_process_executor(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with Cluster(workers=1, store=path, executors={"cpu": ProcessExecutor(1)}) as c:
        c.register("pid", tasks.pid)
        h = c.add_task("pid").with_executor("cpu").with_cache(60).submit()
        assert h.result(30) != os.getpid()
        assert task_rows(path)[h.id][2]["executor"] == "cpu"


def test_a_durable_process_task_runs_after_a_restart(children: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path, 1, "cpu")
    task_id = child.submit(type="pid", executor="cpu", delay=0.05)
    child.kill()
    with Cluster(workers=1, store=path, executors={"cpu": ProcessExecutor(1)}) as c:
        c.register("pid", tasks.pid)
        result = get(c.subscribe(task_id))
        assert result.error is None, result.error
        assert result.value != os.getpid()


def test_a_stored_task_of_an_unknown_executor_is_kept_aside(
    children: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path, 1, "cpu")
    task_id = child.submit(type="pid", executor="cpu", delay=3600)
    child.kill()
    c = Cluster(workers=1, store=path)  # no "cpu" executor now
    c.register("pid", tasks.pid)
    try:
        c.run()
        assert [b.id for b in c.unrecovered] == [task_id]
    finally:
        with contextlib.suppress(Exception):
            c.stop(timeout=10)


def test_an_async_durable_task_runs_and_survives_a_restart(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path)
    assert c.add_task("aecho", [1, 2]).submit().result(WAIT) == [1, 2]
    c.stop(timeout=10)
    child = serve(children, path)
    task_id = child.submit(type="aecho", args=["later"], delay=0.1)
    child.kill()
    assert task_rows(path)[task_id][2]["executor"] == "async"
    c = clusters(path)
    assert get(c.subscribe(task_id)).value == "later"


# ----------------------------------------------------------------------- found by this suite


def test_a_delayed_durable_task_survives_a_normal_exit(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="echo", args=[1], delay=3600)
    assert child.proc.stdin is not None
    child.proc.stdin.close()  # the command loop ends: the interpreter exits normally
    assert child.proc.wait(WAIT) == 0
    assert task_id in task_rows(path)


def test_an_interrupted_run_of_a_series_does_not_end_the_series(
    children: Spawn, clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    child = serve(children, path)
    child.send("run")
    task_id = child.submit(type="block", repeat={"every": 0.2, "count": 3})
    child.wait_for(lambda line: line.get("ev") == "started" and line["id"] == task_id)
    child.kill()
    c = clusters(path, types={"block": lambda: "ran"})
    assert c.dead_letters() == []
    assert c.info(task_id).state is not TaskState.FAILED


# ---------------------------------------------------------------------------- the example


@pytest.mark.timeout(60)
def test_the_example_survives_a_kill_and_completes_on_the_second_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(
        [sys.executable, str(EXAMPLE), "--crash"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    sent_first = re.findall(r"sent invoice (\d+)", first.stdout)
    assert 0 < len(sent_first) < 10, first.stdout
    assert (tmp_path / "jobs.db").exists()
    second = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 0, second.stderr
    sent_second = re.findall(r"sent invoice (\d+)", second.stdout)
    assert sorted(map(int, set(sent_first) | set(sent_second))) == list(range(1, 11))
    assert "all 10 invoices sent" in second.stdout
