"""The parent-side handle of one child process (``cluster._child``), with real processes.

Every test that starts a process runs under both ``forkserver`` and ``spawn``.
Synchronisation is through the child's own pipe (progress events), fifos and
pidfds; nothing sleeps to wait for something to happen.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _child_tasks as tasks
import pytest

from cluster import ClusterError, RetryAfter, WorkerCrashedError
from cluster._child import Attempt, Child, Outcome, dump_call, kill_all, mp_context

METHODS = ["forkserver", "spawn"]
GRACE = 0.25
SLACK = 0.1  #: the research target: the group is gone within grace + 100 ms
WAIT = 10.0  #: generous bound for anything that must merely happen

Event = tuple[str, Any]


class Bell:
    """The ``wake`` connection a slot thread would own: ``ring()`` interrupts ``wait()``."""

    def __init__(self) -> None:
        self.reader, self.writer = multiprocessing.Pipe(duplex=False)

    def ring(self) -> None:
        self.writer.send_bytes(b"!")

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


@pytest.fixture(params=METHODS)
def ctx(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    return mp_context(request.param)


@pytest.fixture
def bell() -> Iterator[Bell]:
    b = Bell()
    yield b
    b.close()


@pytest.fixture
def make_child(ctx: multiprocessing.context.BaseContext) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def make(name: str = "test-child") -> Child:
        child = Child(ctx, name=name)
        children.append(child)
        child.start()
        return child

    yield make
    for child in children:
        child.kill(grace=0)


@pytest.fixture
def child(make_child: Callable[..., Child]) -> Child:
    return make_child()


ATTEMPT = Attempt("task-1", 0, None)


def run(
    child: Child,
    bell: Bell,
    fn: Callable[..., Any],
    *args: Any,
    attempt: Attempt = ATTEMPT,
    on_event: Callable[[str, Any], None] | None = None,
    **kwargs: Any,
) -> tuple[Outcome, list[Event]]:
    """Run one attempt to its end; return its outcome and the events it sent."""
    events: list[Event] = []

    def record(kind: str, value: Any) -> None:
        events.append((kind, value))
        if on_event is not None:
            on_event(kind, value)

    child.begin(dump_call(fn, args, kwargs), attempt)
    while (outcome := child.wait(bell.reader, record)) is None:
        pass
    return outcome, events


def assert_still_works(child: Child, bell: Bell) -> None:
    """The child survived the previous attempt and its pipe protocol is intact."""
    outcome, events = run(child, bell, tasks.add, 40, b=2)
    assert outcome == Outcome(value=42)
    assert events == []


def pid_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (this container's init never reaps orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_exit(pidfd: int, timeout: float) -> bool:
    """Block (no polling) until the process behind ``pidfd`` has exited."""
    return bool(select.select([pidfd], [], [], timeout)[0])


@contextlib.contextmanager
def watching(*pids: int) -> Iterator[Callable[[float], bool]]:
    """Open pidfds of ``pids`` now (while they exist); yield ``exited(timeout)``, which
    blocks until all of them have exited, for at most ``timeout`` seconds in all."""
    fds = [os.pidfd_open(pid) for pid in pids]

    def exited(timeout: float) -> bool:
        end = time.monotonic() + timeout
        return all(wait_exit(fd, max(0.0, end - time.monotonic())) for fd in fds)

    try:
        yield exited
    finally:
        for fd in fds:
            os.close(fd)


def crash_of(outcome: Outcome) -> WorkerCrashedError:
    assert outcome.value is None
    assert isinstance(outcome.error, WorkerCrashedError), outcome
    return outcome.error


# ------------------------------------------------------------------- start method, pickling


def test_mp_context_default_is_forkserver_on_linux() -> None:
    assert mp_context(None).get_start_method() == "forkserver"


@pytest.mark.parametrize("method", METHODS)
def test_mp_context_accepts_forkserver_and_spawn(method: str) -> None:
    assert mp_context(method).get_start_method() == method


def test_mp_context_refuses_fork() -> None:
    with pytest.raises(ValueError, match="'fork' is not supported"):
        mp_context("fork")


def test_mp_context_refuses_an_unknown_method_by_name() -> None:
    with pytest.raises(ValueError, match=r"start_method .*'threads'"):
        mp_context("threads")


def test_mp_context_refuses_a_non_string() -> None:
    with pytest.raises(TypeError, match="start_method must be a str or None, got int"):
        mp_context(3)  # type: ignore[arg-type]


def test_dump_call_happy_path_round_trips() -> None:
    data = dump_call(tasks.add, (1,), {"b": 2})
    assert pickle.loads(data) == (tasks.add, (1,), {"b": 2})


def test_dump_call_names_an_unpicklable_fn() -> None:
    with pytest.raises(TypeError, match=r"^fn .*<lambda> does not pickle: "):
        dump_call(lambda: 1, (), {})


def test_dump_call_names_an_unpicklable_argument_by_position_and_type() -> None:
    with pytest.raises(TypeError, match=r"^argument 2 \(a _thread.lock\) does not pickle: "):
        dump_call(tasks.add, (1, threading.Lock()), {})


def test_dump_call_names_an_unpicklable_keyword_argument() -> None:
    with pytest.raises(TypeError, match=r"^keyword argument 'b' \(a _thread.lock\) does not"):
        dump_call(tasks.add, (1,), {"b": threading.Lock()})


def test_dump_call_chains_the_pickling_error() -> None:
    with pytest.raises(TypeError) as info:
        dump_call(tasks.add, (threading.Lock(),), {})
    assert info.value.__cause__ is not None


# ------------------------------------------------------------------------------- values


def test_returns_the_value(child: Child, bell: Bell) -> None:
    assert run(child, bell, tasks.add, 2, 3) == (Outcome(value=5), [])


def test_keyword_arguments_arrive(child: Child, bell: Bell) -> None:
    assert run(child, bell, tasks.add, 2, b=5)[0].value == 7


def test_none_is_a_value(child: Child, bell: Bell) -> None:
    assert run(child, bell, tasks.noop)[0] == Outcome()


def test_current_in_the_child_has_the_attempts_fields(child: Child, bell: Bell) -> None:
    deadline = time.monotonic() + 30
    outcome, _ = run(child, bell, tasks.context_info, attempt=Attempt("job-9", 2, deadline))
    info = outcome.value
    assert info["task_id"] == "job-9"
    assert info["attempt"] == 2
    assert info["deadline"] == deadline
    assert info["cancelled"] is False
    assert info["reason"] is None
    assert info["is_task_context"] is True
    # CLOCK_MONOTONIC is system-wide: the child's "now" lies before the parent's.
    assert deadline - 30 <= info["now"] <= time.monotonic()


def test_each_attempt_has_its_own_context_and_a_stale_one_sends_nothing(
    child: Child, bell: Bell
) -> None:
    run(child, bell, tasks.save_context)
    assert run(child, bell, tasks.use_saved_context) == (Outcome(value=True), [])


def test_progress_and_reset_backoff_events_arrive_in_order(child: Child, bell: Bell) -> None:
    outcome, events = run(child, bell, tasks.events)
    assert outcome.value == "done"
    assert events == [
        ("progress", 1),
        ("reset_backoff", None),
        ("progress", {"step": 2}),
        ("progress", 3),
    ]


def test_progress_from_many_task_threads_arrives_whole(child: Child, bell: Bell) -> None:
    size = 200_000  # several writes per frame: unguarded sends would interleave
    outcome, events = run(child, bell, tasks.progress_from_threads, 4, 25, size)
    assert outcome.value == 100
    assert len(events) == 100
    for n in range(4):
        mine = [value for kind, value in events if kind == "progress" and value[0] == n]
        assert [i for _, i, _ in mine] == list(range(25))  # each thread's own order
        assert all(data == bytes([n]) * size for _, _, data in mine)


def test_an_unpicklable_progress_value_raises_type_error_in_the_child(
    child: Child, bell: Bell
) -> None:
    outcome, events = run(child, bell, tasks.unpicklable_progress)
    assert outcome.value.startswith("progress value (a _thread.lock) does not pickle")
    assert events == []
    assert_still_works(child, bell)


@pytest.mark.timeout(120)
def test_a_50_mb_argument_arrives(child: Child, bell: Bell) -> None:
    data = os.urandom(50 * 2**20)
    outcome, _ = run(child, bell, tasks.size_and_sample, data)
    assert outcome.value == (len(data), data[:: 1 << 20])
    assert_still_works(child, bell)


@pytest.mark.timeout(120)
def test_a_50_mb_result_arrives(child: Child, bell: Bell) -> None:
    outcome, _ = run(child, bell, tasks.big, 50 * 2**20)
    assert outcome.value == tasks.big(50 * 2**20)
    assert_still_works(child, bell)


@pytest.mark.timeout(120)
def test_one_child_runs_a_thousand_attempts_in_a_row(child: Child, bell: Bell) -> None:
    for i in range(1000):
        outcome, _ = run(child, bell, tasks.add, i, b=1, attempt=Attempt(f"t{i}", 0, None))
        assert outcome.value == i + 1
    assert child.tasks == 1000
    assert child.alive


# ------------------------------------------------------------------------------- errors


def test_an_exception_arrives_with_its_cause_chain(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.raise_chain)[0].error
    assert type(error) is ValueError and str(error) == "top"
    middle = error.__cause__
    assert type(middle) is OSError and str(middle) == "middle"
    root = middle.__cause__
    assert type(root) is KeyError and root.args == ("root",)
    assert root.__cause__ is None
    assert error.__suppress_context__ and middle.__suppress_context__
    assert error.__context__ is middle  # raise ... from inside except: both links
    assert_still_works(child, bell)


def test_an_implicit_context_is_relinked(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.raise_implicit)[0].error
    assert type(error) is RuntimeError
    assert error.__cause__ is None and not error.__suppress_context__
    assert type(error.__context__) is KeyError


def test_the_childs_traceback_arrives_as_notes_and_text(child: Child, bell: Bell) -> None:
    outcome = run(child, bell, tasks.raise_chain)[0]
    error = outcome.error
    assert error is not None and error.__cause__ is not None
    (note,) = error.__notes__
    assert note.startswith(f"Traceback in child process {child.pid}")
    assert "raise ValueError" in note
    assert "raise OSError" in error.__cause__.__notes__[0]
    assert outcome.traceback is not None
    assert "KeyError: 'root'" in outcome.traceback
    assert "The above exception was the direct cause" in outcome.traceback
    assert outcome.traceback.rstrip().endswith("ValueError: top")


def test_retry_after_keeps_its_delay_and_cause(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.raise_retry_after)[0].error
    assert isinstance(error, RetryAfter) and error.delay == 5.0
    assert type(error.__cause__) is ConnectionError and str(error.__cause__) == "host down"


@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "keyword"])
def test_a_frozen_dataclass_exception_arrives(child: Child, bell: Bell, by_keyword: bool) -> None:
    error = run(child, bell, tasks.raise_frozen, by_keyword)[0].error
    assert type(error) is tasks.FrozenError
    assert error.code == 7
    assert "Traceback in child process" in error.__notes__[0]
    assert_still_works(child, bell)


def test_sigint_does_not_disturb_an_attempt_nor_stay_ignored_in_grandchildren(
    child: Child, bell: Bell
) -> None:
    mask = run(child, bell, tasks.sigint_self_then_grandchild_sigign)[0].value
    assert isinstance(mask, int)
    assert not mask & (1 << (signal.SIGINT - 1))
    assert_still_works(child, bell)


def test_system_exit_fails_the_attempt_and_the_child_survives(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.raise_system_exit)[0].error
    assert type(error) is SystemExit and error.code == 4
    assert_still_works(child, bell)


def test_an_unpicklable_return_value_fails_with_type_error(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.return_unpicklable)[0].error
    assert type(error) is TypeError
    assert str(error).startswith("the return value (a _thread.lock) does not pickle: ")
    assert error.__cause__ is not None
    assert_still_works(child, bell)


def test_a_return_value_that_does_not_unpickle_fails_with_cluster_error(
    child: Child, bell: Bell
) -> None:
    error = run(child, bell, tasks.return_child_only)[0].error
    assert type(error) is ClusterError
    assert "the return value does not unpickle in the parent" in str(error)
    assert "_only_in_child" in str(error)
    assert_still_works(child, bell)


def test_an_unpicklable_exception_arrives_as_cluster_error(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.raise_unpicklable)[0].error
    assert type(error) is ClusterError
    assert str(error).startswith("_child_tasks.LockedError: holding a lock (")
    assert "does not pickle in the child" in str(error)
    assert "raise LockedError" in error.__notes__[0]
    assert_still_works(child, bell)


def test_an_exception_that_does_not_unpickle_arrives_as_cluster_error(
    child: Child, bell: Bell
) -> None:
    error = run(child, bell, tasks.raise_child_only)[0].error
    assert type(error) is ClusterError
    assert str(error).startswith("_only_in_child.ChildOnlyError: made in the child (")
    assert "does not unpickle in the parent" in str(error)
    assert "Traceback in child process" in error.__notes__[0]
    assert_still_works(child, bell)


def test_only_the_unpicklable_link_of_a_chain_is_replaced(child: Child, bell: Bell) -> None:
    error = run(child, bell, tasks.raise_unpicklable_cause)[0].error
    assert type(error) is ValueError and str(error) == "picklable head"
    assert type(error.__cause__) is ClusterError
    assert "LockedError: unpicklable cause" in str(error.__cause__)


def test_a_call_that_does_not_unpickle_in_the_child_fails_with_that_error(
    child: Child, bell: Bell
) -> None:
    module = types.ModuleType("_only_in_parent")
    exec("def f():\n    return 1\n", module.__dict__)
    module.f.__module__ = "_only_in_parent"
    sys.modules["_only_in_parent"] = module
    try:
        outcome, _ = run(child, bell, module.f)
    finally:
        del sys.modules["_only_in_parent"]
    assert type(outcome.error) is ModuleNotFoundError
    assert "_only_in_parent" in str(outcome.error)
    assert "unpickling the task's function" in outcome.error.__notes__[0]
    assert_still_works(child, bell)


# ------------------------------------------------------------------------------ crashes


def test_os_exit_is_a_crash_with_its_exit_code(child: Child, bell: Bell) -> None:
    pid = child.pid
    error = crash_of(run(child, bell, tasks.exit_now, 3)[0])
    assert (error.exitcode, error.signal) == (3, None)
    assert f"child process {pid} (test-child) exited with code 3" in str(error)
    assert "'task-1' (attempt 0)" in str(error)
    assert not child.alive


def test_a_segfault_is_a_crash_with_its_signal(child: Child, bell: Bell) -> None:
    error = crash_of(run(child, bell, tasks.segfault)[0])
    assert (error.exitcode, error.signal) == (None, signal.SIGSEGV)
    assert "was killed by SIGSEGV" in str(error)


def test_sigkill_from_outside_is_a_crash_with_its_signal(child: Child, bell: Bell) -> None:
    def kill_it(kind: str, pid: Any) -> None:
        assert pid == child.pid  # the task reported it is running
        os.kill(pid, signal.SIGKILL)

    error = crash_of(run(child, bell, tasks.report_pid_and_block, on_event=kill_it)[0])
    assert (error.exitcode, error.signal) == (None, signal.SIGKILL)


def test_events_sent_before_a_crash_are_delivered(child: Child, bell: Bell) -> None:
    outcome, events = run(child, bell, tasks.progress_then_exit, 5)
    assert events == [("progress", "about to exit")]
    assert crash_of(outcome).exitcode == 5


def test_a_child_that_died_idle_fails_the_next_attempt_as_a_crash(child: Child, bell: Bell) -> None:
    assert child.pid is not None
    pidfd = os.pidfd_open(child.pid)
    try:
        os.kill(child.pid, signal.SIGKILL)
        assert wait_exit(pidfd, WAIT)
    finally:
        os.close(pidfd)
    assert not child.alive
    assert crash_of(run(child, bell, tasks.add, 1)[0]).signal == signal.SIGKILL


# -------------------------------------------------------------------------------- kills


def begin_and_wait_for_event(child: Child, bell: Bell, fn: Callable[..., Any]) -> Any:
    """Begin ``fn`` on ``child`` and return the value of its first progress event.

    The event rings the bell, so ``wait()`` returns None with the attempt still running.
    """
    values: list[Any] = []

    def on_event(kind: str, value: Any) -> None:
        values.append(value)
        bell.ring()

    child.begin(dump_call(fn, (), {}), ATTEMPT)
    assert child.wait(bell.reader, on_event) is None
    (value,) = values
    return value


def start_stubborn(child: Child, bell: Bell) -> tuple[int, int]:
    """Begin ``stubborn`` on ``child``; return (child pid, grandchild pid) once it spins."""
    pids: tuple[int, int] = begin_and_wait_for_event(child, bell, tasks.stubborn)
    return pids


def test_kill_ends_a_child_ignoring_sigterm_and_its_grandchild_within_grace(
    child: Child, bell: Bell
) -> None:
    child_pid, grandchild_pid = start_stubborn(child, bell)
    assert child_pid == child.pid
    with watching(child_pid, grandchild_pid) as exited:
        start = time.monotonic()
        child.kill(grace=GRACE)
        returned = time.monotonic() - start
        assert exited(GRACE + SLACK - returned)
        gone = time.monotonic() - start
    assert returned >= GRACE - 0.01  # SIGTERM was ignored, so it waited the whole grace
    assert gone <= GRACE + SLACK
    assert pid_gone(grandchild_pid)
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)  # reaped, not a zombie
    assert not child.alive


def test_kill_returns_early_when_the_child_obeys_sigterm(child: Child, bell: Bell) -> None:
    assert begin_and_wait_for_event(child, bell, tasks.report_pid_and_block) == child.pid
    start = time.monotonic()
    child.kill(grace=WAIT)
    assert time.monotonic() - start < WAIT / 2
    assert not child.alive


def test_kill_right_after_start_ends_the_child(ctx: multiprocessing.context.BaseContext) -> None:
    c = Child(ctx, name="short-lived")
    c.start()
    assert c.pid is not None
    with watching(c.pid) as exited:
        c.kill(grace=0)  # quite possibly before the child has called setsid()
        assert exited(WAIT)
    assert not c.alive


def test_an_on_event_error_propagates_and_the_attempt_goes_on(child: Child, bell: Bell) -> None:
    def fail(kind: str, value: Any) -> None:
        raise LookupError(f"{kind} {value}")

    child.begin(dump_call(tasks.events, (), {}), ATTEMPT)
    with pytest.raises(LookupError, match="progress 1"):
        child.wait(bell.reader, fail)
    rest: list[Event] = []
    assert child.wait(bell.reader, lambda kind, value: rest.append((kind, value))) == Outcome(
        value="done"
    )
    assert rest == [("reset_backoff", None), ("progress", {"step": 2}), ("progress", 3)]


def test_kill_is_idempotent_and_fine_after_a_crash(child: Child, bell: Bell) -> None:
    crash_of(run(child, bell, tasks.exit_now, 1)[0])
    child.kill()
    child.kill(grace=0)
    child.close()
    assert not child.alive


def test_kill_of_a_child_never_started_does_nothing(
    ctx: multiprocessing.context.BaseContext,
) -> None:
    c = Child(ctx, name="never")
    c.kill()
    c.close()
    assert not c.alive and c.pid is None


def test_kill_refuses_a_negative_grace(ctx: multiprocessing.context.BaseContext) -> None:
    with pytest.raises(ValueError, match="grace must be >= 0"):
        Child(ctx, name="x").kill(grace=-1)


def test_kill_all_shares_one_grace_period(make_child: Callable[..., Child], bell: Bell) -> None:
    children = [make_child(f"stubborn-{i}") for i in range(2)]
    pids = [pid for c in children for pid in start_stubborn(c, bell)]
    with watching(*pids) as exited:
        start = time.monotonic()
        kill_all(children, grace=GRACE)
        assert exited(WAIT)
    assert time.monotonic() - start < 2 * GRACE


def test_wake_interrupts_wait_and_a_later_wait_gets_the_outcome(
    child: Child, bell: Bell, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child.begin(dump_call(tasks.block_on_fifo, (str(fifo),), {}), ATTEMPT)
    events: list[Event] = []

    def on_event(kind: str, value: Any) -> None:
        events.append((kind, value))
        bell.ring()  # the task is blocked now: this wake must interrupt the wait

    assert child.wait(bell.reader, on_event) is None
    assert events == [("progress", "started")]
    assert not bell.reader.poll(0)  # drained
    with open(fifo, "w") as f:
        f.write("released\n")
    assert child.wait(bell.reader, on_event) == Outcome(value="released")
    assert_still_works(child, bell)


def test_close_kills_a_running_child(child: Child, bell: Bell) -> None:
    with watching(*start_stubborn(child, bell)) as exited:
        child.close()
        assert not child.alive
        assert exited(WAIT)


# ---------------------------------------------------------------------- life and errors


def test_pid_alive_and_tasks(make_child: Callable[..., Child], bell: Bell) -> None:
    c = make_child("counted")
    assert c.pid is not None and c.alive and c.tasks == 0
    run(c, bell, tasks.noop)
    run(c, bell, tasks.noop)
    assert c.tasks == 2
    c.close()
    assert not c.alive


def test_begin_refuses_a_second_attempt_while_one_runs(child: Child, bell: Bell) -> None:
    child.begin(dump_call(tasks.noop, (), {}), ATTEMPT)
    with pytest.raises(RuntimeError, match="is running, not idle"):
        child.begin(dump_call(tasks.noop, (), {}), ATTEMPT)
    assert child.wait(bell.reader, lambda k, v: None) == Outcome()


def test_wait_refuses_when_no_attempt_runs(child: Child, bell: Bell) -> None:
    with pytest.raises(RuntimeError, match="no attempt is running"):
        child.wait(bell.reader, lambda k, v: None)


def test_start_refuses_a_second_start(child: Child) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        child.start()


def test_the_child_exits_when_the_parent_closes_the_pipe(child: Child, bell: Bell) -> None:
    run(child, bell, tasks.noop)
    assert child.pid is not None
    pidfd = os.pidfd_open(child.pid)
    try:
        assert child._conn is not None
        child._conn.close()  # as if the parent process had gone
        assert wait_exit(pidfd, WAIT)
    finally:
        os.close(pidfd)
    assert not child.alive


def test_close_lets_an_idle_child_exit_cleanly(child: Child, bell: Bell) -> None:
    run(child, bell, tasks.noop)
    child.close()
    assert child._exitcode == 0  # it left its loop by itself, not by a signal


@pytest.mark.timeout(120)
def test_close_and_kill_leak_no_fds_or_zombies(
    ctx: multiprocessing.context.BaseContext, bell: Bell
) -> None:
    def fd_count() -> int:
        return len(os.listdir("/proc/self/fd"))

    warm = Child(ctx, name="warm")  # the forkserver and resource tracker stay up
    warm.start()
    run(warm, bell, tasks.noop)
    warm.close()
    before = fd_count()
    pids = []
    for end in ("close", "kill", "crash", "kill-running"):
        c = Child(ctx, name=end)
        c.start()
        assert c.pid is not None
        pids.append(c.pid)
        if end == "crash":
            crash_of(run(c, bell, tasks.exit_now, 2)[0])
        elif end == "kill-running":
            start_stubborn(c, bell)
            c.kill(grace=0)
        else:
            run(c, bell, tasks.noop)
            c.close() if end == "close" else c.kill()
    assert fd_count() == before
    live = {p.pid for p in multiprocessing.active_children()}
    for pid in pids:
        assert pid not in live
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already (or not ours: forkserver reaped it)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def run_parent(body: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Run ``body`` as a parent process in its own interpreter; return it and the
    pids it printed on its first line."""
    script = textwrap.dedent(
        """
        import multiprocessing, os, signal, sys
        import _child_tasks
        from cluster._child import Attempt, Child, dump_call, mp_context
        """
    ) + textwrap.dedent(body)
    tests_dir = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests_dir.parent), str(tests_dir)]))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert parent.stdout is not None
    with contextlib.closing(parent.stdout):
        line = parent.stdout.readline()
    return parent, [int(pid) for pid in line.split()]


def kill_leftovers(parent: subprocess.Popen[bytes], pids: list[int]) -> None:
    """After a failed assertion: leave no process of the test behind."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
    parent.kill()
    parent.wait()


def assert_all_exit(pids: list[int]) -> None:
    """Every pid exits (or has already), within WAIT seconds."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            fds.append(os.pidfd_open(pid))
    try:
        end = time.monotonic() + WAIT
        for fd in fds:
            assert wait_exit(fd, max(0.0, end - time.monotonic()))
    finally:
        for fd in fds:
            os.close(fd)
    assert all(pid_gone(pid) for pid in pids)


@pytest.mark.parametrize("method", METHODS)
def test_a_child_dies_with_its_parent_even_mid_attempt(method: str) -> None:
    parent, pids = run_parent(
        f"""
        child = Child(mp_context({method!r}), name="orphan")
        child.start()
        child.begin(dump_call(_child_tasks.stubborn, (), {{}}), Attempt("t", 0, None))
        wake, _ = multiprocessing.Pipe(duplex=False)

        def report(kind, pids):
            print(*pids, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # the parent dies; no atexit runs

        child.wait(wake, report)
        """
    )
    try:
        assert parent.wait(WAIT) == -signal.SIGKILL
        assert len(pids) == 2
        assert_all_exit(pids)
    finally:
        kill_leftovers(parent, pids)


@pytest.mark.parametrize("method", METHODS)
def test_interpreter_exit_kills_children_left_open(method: str) -> None:
    parent, pids = run_parent(
        f"""
        ctx = mp_context({method!r})
        idle = Child(ctx, name="idle")
        idle.start()
        busy = Child(ctx, name="busy")
        busy.start()
        busy.begin(dump_call(_child_tasks.stubborn, (), {{}}), Attempt("t", 0, None))
        wake, _ = multiprocessing.Pipe(duplex=False)

        def report(kind, pids):
            print(idle.pid, *pids, flush=True)
            sys.exit(0)  # a normal exit with both children still open

        busy.wait(wake, report)
        """
    )
    # Without the exit hook, multiprocessing would join the (non-daemonic) children forever.
    try:
        assert parent.wait(WAIT) == 0
        assert len(pids) == 3
        assert_all_exit(pids)
    finally:
        kill_leftovers(parent, pids)


def test_a_kill_from_another_thread_ends_a_wait_in_progress(child: Child, bell: Bell) -> None:
    started = threading.Event()
    outcomes: list[Outcome | None] = []
    child.begin(dump_call(tasks.report_pid_and_block, (), {}), ATTEMPT)

    def slot() -> None:
        outcomes.append(child.wait(bell.reader, lambda kind, value: started.set()))

    thread = threading.Thread(target=slot)
    thread.start()
    assert started.wait(WAIT)
    child.kill(grace=0)
    thread.join(WAIT)
    assert not thread.is_alive()
    (outcome,) = outcomes
    assert outcome is not None
    assert crash_of(outcome).signal in (signal.SIGTERM, signal.SIGKILL)
    assert not child.alive
