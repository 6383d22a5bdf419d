"""Reliability suite, shutdown half: stop()/cancel() with every kind of task in flight,
process exit without stop(), atexit hooks, KeyboardInterrupt and fork.

Invariants are those of ``_reliability_helpers``: one Result per subscriber, callbacks
once, counters add up, attempts <= retries + 1, no late value, threads back to baseline.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _reliability_helpers import (
    WAIT,
    Harness,
    PlannedError,
    Tracker,
    base_seed,
    body,
    scaled,
    wait_until,
)

from cluster import (
    Cluster,
    ClusterStoppedError,
    FixedBackoff,
    RetryMode,
    StopTimeoutError,
    TaskCancelledError,
    TaskState,
    TaskTimeoutError,
    current,
)

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def seed() -> int:
    return base_seed()


@pytest.fixture
def h(seed: int, request: pytest.FixtureRequest) -> Iterator[Harness]:
    print(f"CLUSTER_SEED={seed} (test {request.node.name})")
    harness = Harness(seed, request.node.name)
    yield harness
    harness.close()


# ============================================================================ in-process


def _has_started(tr: Tracker, tid: str) -> bool:
    return tr.attempts[tid] > 0


def _in_state(c: Cluster, tid: str, state: TaskState) -> bool:
    return c.info(tid).state is state


class Population:
    """A cluster of 3 workers with one task in every state:

    * ``running0``/``running1``: running, blocked on ``gate`` (two workers);
    * ``immediate``: failed once, sleeping a 1 s IMMEDIATE backoff on the third worker;
    * ``requeue``: failed once, waiting 1 s in the queue (REQUEUE);
    * ``delayed``: due in ``delay`` seconds;
    * ``queued0..9``: due, waiting for a worker.
    """

    def __init__(self, h: Harness, delay: float) -> None:
        self.c = c = h.cluster(3)
        self.tr = tr = Tracker(c, h)
        self.gate = gate = h.event()
        self.h = h
        for i in range(2):
            tr.submit(c.add_task(body, tr, 0.0, 0, gate).with_priority(10), f"running{i}")
        assert wait_until(lambda: tr.attempts["running0"] + tr.attempts["running1"] == 2)
        for mode in RetryMode:
            tid = mode.name.lower()
            b = c.add_task(body, tr, 0.0, 1).with_priority(10).with_retry_mode(mode)
            tr.submit(b.with_backoff(FixedBackoff(1.0)), tid, retries=1)
        for tid in ("immediate", "requeue"):
            retrying = functools.partial(_in_state, c, tid, TaskState.RETRYING)
            assert wait_until(retrying), f"{tid} not waiting to retry: {c.info(tid)} {h.tag()}"
        tr.submit(c.add_task(body, tr).with_delay(delay), "delayed")
        self.queued = [f"queued{i}" for i in range(10)]
        for tid in self.queued:
            tr.submit(c.add_task(body, tr), tid, subscribers=2)
        s = c.stats()
        assert (s.running, s.queued, s.delayed) == (2, 10, 3), f"setup: {s} {h.tag()}"

    def release_when_stopping(self, before: Callable[[], None] | None = None) -> None:
        """In a helper thread: once submit() is refused (stop() began), run ``before`` and
        then open the gate."""

        def watch() -> None:
            def stopping() -> bool:
                try:
                    self.c.add_task(int).submit()
                except ClusterStoppedError:
                    return True
                return False

            assert wait_until(stopping), "stop() never began"
            if before is not None:
                before()
            self.gate.set()

        self.h.thread(watch, "release")

    def outcome(self, tid: str) -> str:
        r = self.tr.results[tid]
        return "ok" if r.error is None else type(r.error).__name__


def test_stop_carries_every_kind_of_task_to_its_result(h: Harness) -> None:
    """stop() waits for queued, delayed, retry-waiting (REQUEUE and IMMEDIATE) and running
    tasks: when it returns, every subscriber already holds a successful Result."""
    p = Population(h, delay=0.5)
    p.release_when_stopping()
    p.c.stop(timeout=WAIT)
    p.tr.collect(timeout=0.001)  # already there: stop() returned
    p.tr.check_stats_idle()
    p.tr.check(allowed_errors=())
    h.join_helpers()
    h.assert_threads_back()


def test_stop_cancel_pending_cancels_unstarted_and_awaits_running(h: Harness) -> None:
    """stop(cancel_pending=True) cancels every task that is not running at once (before
    the running ones finish) and returns once the running ones have finished."""
    p = Population(h, delay=0.5)
    tr = p.tr
    early: list[Any] = []

    def unstarted_cancelled_first() -> None:
        for tid in p.queued:  # the second subscriber of each queued task, gate still shut
            early.append(tr.queues[tid][1].get(timeout=WAIT))

    p.release_when_stopping(unstarted_cancelled_first)
    p.c.stop(timeout=WAIT, cancel_pending=True)
    h.join_helpers()
    assert all(isinstance(r.error, TaskCancelledError) for r in early), f"{early} {h.tag()}"
    for tid in p.queued:  # consumed above: subscriber 1 is checked by collect()
        tr.queues[tid] = tr.queues[tid][:1]
    tr.collect(timeout=0.001)
    tr.check_stats_idle()
    tr.check(allowed_errors=(TaskCancelledError,))
    for tid in ("running0", "running1"):
        assert p.outcome(tid) == "ok", f"{tid}: {tr.results[tid]!r} {h.tag()}"
    for tid in [*p.queued, "delayed", "requeue", "immediate"]:
        assert p.outcome(tid) == "TaskCancelledError", f"{tid}: {tr.results[tid]!r} {h.tag()}"
    h.assert_threads_back()


def test_stop_timeout_raises_only_after_every_subscriber_has_its_result(h: Harness) -> None:
    p = Population(h, delay=60)
    t0 = time.monotonic()
    with pytest.raises(StopTimeoutError):
        p.c.stop(timeout=0.5)
    elapsed = time.monotonic() - t0
    p.tr.collect(timeout=0.001)  # every Result is there the moment it raises
    assert 0.5 <= elapsed < 2.5, f"stop(timeout=0.5) took {elapsed:.2f}s {h.tag()}"
    p.tr.check_stats_idle()
    p.tr.check(allowed_errors=(TaskCancelledError,))
    for tid in ("running0", "running1", "delayed"):
        assert p.outcome(tid) == "TaskCancelledError", f"{tid} {h.tag()}"
    with pytest.raises(ClusterStoppedError):
        p.c.add_task(int).submit()
    h.assert_threads_back()


def test_cancel_with_stuck_tasks_returns_at_once(h: Harness) -> None:
    p = Population(h, delay=60)
    t0 = time.monotonic()
    p.c.cancel()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"cancel() took {elapsed:.2f}s with stuck tasks {h.tag()}"
    p.tr.collect()
    p.tr.check_stats_idle()
    p.tr.check(allowed_errors=(TaskCancelledError,))
    for tid, r in p.tr.results.items():
        assert isinstance(r.error, TaskCancelledError), f"{tid}: {r!r} {h.tag()}"
    p.c.stop(timeout=WAIT)  # after cancel(): returns at once
    p.tr.check(allowed_errors=(TaskCancelledError,))  # stuck calls return LATE: dropped
    h.assert_threads_back()


@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest.mark.timeout(30)
def test_stop_does_not_wait_for_abandoned_stuck_calls(h: Harness, how: str) -> None:
    """A call abandoned by a timeout or cancel has its Result delivered already; while it
    stays stuck, graceful stop() has nothing left to carry and must return promptly
    without StopTimeoutError (the stuck thread exits later, when its call returns).

    One worker runs a quick task and, in the same breath, takes the task that gets stuck;
    that worker's bookkeeping of the quick task must not be held hostage by the stuck call.
    """
    c = h.cluster(1, run=False)
    tr = Tracker(c, h)
    gate = h.event()
    tr.submit(c.add_task(body, tr), "quick")
    b = c.add_task(body, tr, 0.0, 0, gate)
    if how == "timeout":
        b.with_timeout(0.1)
    tr.submit(b, "stuck")
    c.run()
    if how == "cancel":
        assert wait_until(functools.partial(_has_started, tr, "stuck")), h.tag()
        assert tr.cancel("stuck") is True
    tr.collect()
    tr.check_stats_idle()
    tr.check(allowed_errors=(TaskCancelledError, TaskTimeoutError))
    t0 = time.monotonic()
    try:
        c.stop(timeout=2)
        outcome = "returned"
    except StopTimeoutError as exc:
        outcome = repr(exc)
    elapsed = time.monotonic() - t0
    assert outcome == "returned" and elapsed < 1.0, (
        f"stop(timeout=2) with every task terminal and one abandoned call stuck: {outcome} "
        f"after {elapsed:.2f}s; stats={c.stats()} {h.tag()}"
    )
    h.assert_threads_back()  # releases the gate: the stuck thread exits


@pytest.mark.parametrize("how", ["stop", "stop-cancel-pending", "stop-timeout", "cancel"])
@pytest.mark.timeout(60)
def test_shutdown_racing_submits_and_cancels(h: Harness, how: str) -> None:
    """stop()/cancel() lands while 2 threads submit every kind of task and 2 cancel random
    ids: each accepted task has exactly one Result by the time stop()/cancel() returns (or
    raises), refused submits raise ClusterStoppedError, and a True from cancel_task always
    matches a cancelled Result."""
    c = h.cluster(4)
    tr = Tracker(c, h)
    ids: list[str] = []
    refused: list[str] = []
    done = threading.Event()
    enough = threading.Event()
    target = scaled(3_000)

    def submitter(k: int) -> None:
        rng = h.rng(f"submit-{k}")
        i = 0
        while True:
            tid = f"s{k}-{i}"
            i += 1
            roll = rng.random()
            retries = fail_first = 0
            hold = rng.choice([0.0, 0.0, 0.0005])
            if roll < 0.15:
                retries = fail_first = 1
            b = c.add_task(body, tr, hold, fail_first).with_priority(rng.randint(0, 2))
            if retries:
                b.with_retry_mode(rng.choice(list(RetryMode)))
                b.with_backoff(FixedBackoff(rng.choice([0.001, 0.02])))
            if 0.15 <= roll < 0.2:
                b.with_delay(rng.uniform(0, 0.05))
            elif 0.2 <= roll < 0.22:
                b.with_timeout(0.001)
            try:
                tr.submit(b, tid, retries=retries)
            except ClusterStoppedError:
                refused.append(tid)
                return
            ids.append(tid)
            if len(ids) >= target:
                enough.set()

    def canceller(k: int) -> None:
        rng = h.rng(f"cancel-{k}")
        while not done.is_set():
            if ids:
                tr.cancel(ids[rng.randrange(len(ids))])
            done.wait(0.0002)

    submitters = [h.thread(functools.partial(submitter, k), f"submit-{k}") for k in range(2)]
    cancellers = [h.thread(functools.partial(canceller, k), f"cancel-{k}") for k in range(2)]
    assert enough.wait(60), f"only {len(ids)} submitted {h.tag()}"
    t0 = time.monotonic()
    outcome = "returned"
    try:
        if how == "stop":
            c.stop(timeout=WAIT)
        elif how == "stop-cancel-pending":
            c.stop(timeout=WAIT, cancel_pending=True)
        elif how == "stop-timeout":
            c.stop(timeout=0.01)
        else:
            c.cancel()
    except StopTimeoutError:
        outcome = "StopTimeoutError"
    elapsed = time.monotonic() - t0
    for t in submitters:
        t.join(WAIT)
    assert len(refused) == 2, f"submitters not refused after {how}: {refused} {h.tag()}"
    tr.collect(timeout=0.001)  # all there once stop()/cancel() returned or raised
    done.set()
    for t in cancellers:
        t.join(WAIT)
    tr.check_stats_idle()
    errors = (PlannedError, TaskCancelledError, TaskTimeoutError)
    kinds = tr.check(allowed_errors=errors)
    for tid, trues in tr.cancel_true.items():
        assert trues == 1 and isinstance(tr.results[tid].error, TaskCancelledError), (
            f"{tid}: cancel_task True x{trues}, Result {tr.results[tid]!r} {h.tag()}"
        )
    print(f"{how}: {outcome} after {elapsed:.3f}s; {dict(kinds)}")
    if how in ("stop", "stop-cancel-pending"):
        assert outcome == "returned", f"{how} raised StopTimeoutError {h.tag()}"
    if how == "cancel":
        assert elapsed < 1.0, f"cancel() took {elapsed:.2f}s {h.tag()}"
    h.assert_threads_back()


# ============================================================================ subprocesses


def run_script(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.parametrize("started", [True, False], ids=["running", "never-run"])
def test_process_exits_without_stop_while_a_task_is_stuck(started: bool) -> None:
    """A script that never calls stop() and leaves a task blocked forever (plus a queued
    and a far-delayed one) still exits 0, at once, with nothing on stderr."""
    proc = run_script(
        f"""
        import threading
        import cluster

        c = cluster.Cluster(workers=2)
        gate = threading.Event()
        started = threading.Event()

        def stuck():
            started.set()
            gate.wait()

        c.add_task(stuck).submit()
        c.add_task(print, "delayed ran").with_delay(60).submit()
        if {started}:
            c.run()
            assert started.wait(10)
            print(c.add_task(str, "quick").submit().result(timeout=10), flush=True)
        print("main done", flush=True)
        """
    )
    assert proc.returncode == 0, f"rc={proc.returncode} stderr={proc.stderr!r}"
    assert proc.stderr == "", proc.stderr
    assert "main done" in proc.stdout and "delayed ran" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("hook_first", [True, False], ids=["hook-before-import", "hook-after"])
@pytest.mark.parametrize("started", [True, False], ids=["running", "never-run"])
def test_submit_from_atexit_hook_raises_cluster_stopped(hook_first: bool, started: bool) -> None:
    proc = run_script(
        f"""
        import atexit

        def hook():
            try:
                c.add_task(print, "atexit task ran").submit()
                print("atexit: accepted", flush=True)
            except cluster.ClusterStoppedError:
                print("atexit: ClusterStoppedError", flush=True)
            except BaseException as exc:
                print("atexit: other", type(exc).__name__, exc, flush=True)

        if {hook_first}:
            atexit.register(hook)
        import cluster
        c = cluster.Cluster(workers=1)
        if {started}:
            c.run()
            print(c.add_task(str, "warm").submit().result(timeout=10), flush=True)
        if not {hook_first}:
            atexit.register(hook)
        """
    )
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)
    assert "atexit: ClusterStoppedError" in proc.stdout, proc.stdout
    assert "atexit task ran" not in proc.stdout, proc.stdout


def test_keyboard_interrupt_interrupts_handle_result() -> None:
    """SIGINT while the main thread waits in handle.result() on a stuck task raises
    KeyboardInterrupt there promptly, and the process exits by it."""
    t0 = time.monotonic()
    proc = run_script(
        """
        import os, signal, threading, time
        import cluster

        c = cluster.Cluster(workers=2)
        c.run()
        gate = threading.Event()
        handle = c.add_task(gate.wait).submit()
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        t0 = time.monotonic()
        timer.start()
        try:
            handle.result()
        except KeyboardInterrupt:
            print(f"KeyboardInterrupt after {time.monotonic() - t0:.3f}s", flush=True)
            raise
        print("result() returned", flush=True)
        """
    )
    total = time.monotonic() - t0
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (proc.returncode, proc.stderr)
    assert "KeyboardInterrupt after" in proc.stdout, (proc.stdout, proc.stderr)
    waited = float(proc.stdout.split("after ")[1].split("s")[0])
    assert waited < 1.5, f"KeyboardInterrupt took {waited:.2f}s to interrupt result()"
    assert "KeyboardInterrupt" in proc.stderr
    assert total < 15, f"the interrupted process took {total:.1f}s to exit"


# ============================================================================ fork

# Exit codes of the forked child.
CHILD_OK, CHILD_STATS, CHILD_SUBMIT, CHILD_NEW, CHILD_STOP, CHILD_RAISED = 0, 2, 3, 4, 5, 6
CHILD_HUNG = -999


def fork_and_wait(child: Callable[[], int], timeout: float = 10.0) -> int:
    """Fork; the child runs ``child()`` and exits with its code via os._exit (never
    returning into pytest). The parent waits with a bounded WNOHANG loop; a hung
    child is killed and reported as CHILD_HUNG."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = CHILD_RAISED
        try:
            code = child()
        finally:
            os._exit(code)
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return CHILD_HUNG
        time.sleep(0.005)


def child_check(c: Cluster) -> int:
    """In the child: the inherited cluster answers and refuses work; a new one works."""
    try:
        c.stats()
        c.info  # noqa: B018 - attribute access only
    except BaseException:
        return CHILD_STATS
    try:
        c.add_task(int).submit()
        return CHILD_SUBMIT
    except ClusterStoppedError:
        pass
    except BaseException:
        return CHILD_SUBMIT
    try:
        fresh = Cluster(workers=1)
        fresh.run()
        ok = fresh.add_task(str, "child").submit().result(timeout=5) == "child"
        fresh.stop(timeout=5)
    except BaseException:
        return CHILD_NEW
    return CHILD_OK if ok else CHILD_NEW


@pytest.mark.timeout(90)
def test_fork_from_main_thread_and_from_a_task(h: Harness) -> None:
    """Forks from the main thread and from inside tasks, while 4 workers run a stream of
    tasks: every child exits cleanly (code 0) and the parent's invariants hold."""
    c = h.cluster(4)
    tr = Tracker(c, h)
    stream_done = threading.Event()
    forks = 5

    def stream() -> None:
        for i in range(scaled(3_000)):
            tr.submit(c.add_task(body, tr, 0.0002 if i % 10 == 0 else 0.0), f"s{i}")
        stream_done.set()

    def forking_task() -> object:
        ctx = tr.attempt()
        code = fork_and_wait(lambda: child_check(c))
        return ("code", code) if ctx.reason is None else None

    h.thread(stream, "stream")
    main_codes = []
    task_handles = []
    for k in range(forks):
        main_codes.append(fork_and_wait(lambda: child_check(c)))
        task_handles.append(c.add_task(forking_task).with_id(f"fork{k}").submit())
    task_codes = [handle.result(timeout=30) for handle in task_handles]
    assert stream_done.wait(60)
    h.join_helpers()
    assert main_codes == [CHILD_OK] * forks, f"children forked from main: {main_codes}"
    assert task_codes == [("code", CHILD_OK)] * forks, f"children forked in tasks: {task_codes}"
    tr.check_all(allowed_errors=())
    c.stop(timeout=WAIT)
    tr.check(allowed_errors=())
    h.assert_threads_back()


@pytest.mark.timeout(60)
def test_fork_child_can_stop_its_inherited_cluster(h: Harness) -> None:
    """A child forked while tasks are in flight (e.g. inside ``with Cluster() as c:``)
    can still stop() the inherited cluster: it has no threads to wait for, so stop()
    must return promptly (within 3 s here) rather than wait for tasks that cannot run."""
    c = h.cluster(1)
    tr = Tracker(c, h)
    gate = h.event()
    tr.submit(c.add_task(body, tr, 0.0, 0, gate), "running")
    tr.submit(c.add_task(body, tr), "queued")
    assert wait_until(lambda: tr.attempts["running"] == 1)

    def child() -> int:
        try:
            c.stop(timeout=3)
        except StopTimeoutError:
            return CHILD_STOP
        return CHILD_OK

    code = fork_and_wait(child)
    gate.set()
    tr.check_all(allowed_errors=())
    assert code == CHILD_OK, (
        f"child's stop(timeout=3) on the inherited cluster: exit code {code} "
        f"({'StopTimeoutError' if code == CHILD_STOP else 'hung/other'}) {h.tag()}"
    )
    c.stop(timeout=WAIT)
    h.assert_threads_back()


def test_task_context_in_forked_child_is_harmless(h: Harness) -> None:
    """current() inside a child forked from a task still answers (no lock is left held)."""
    c = h.cluster(2)

    def task() -> int:
        ctx = current()

        def child() -> int:
            inner = current()
            inner.progress(1)
            inner.check()
            return CHILD_OK if inner.task_id == ctx.task_id else CHILD_RAISED

        return fork_and_wait(child)

    assert c.add_task(task).submit().result(timeout=30) == CHILD_OK
    c.stop(timeout=WAIT)
    h.assert_threads_back()
