"""SPEC §16: ``cluster.Executor`` behaves as ``ThreadPoolExecutor``; ``as_completed``
over handles; awaiting a handle.

The Executor part covers what CPython's own executor tests check (3.13's
``test_concurrent_futures``) that applies to a thread pool, written afresh. Tests
synchronise on events; they only let time pass where a timeout is what they test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _helpers import WAIT, MakeCluster, NewEvent

import cluster
from cluster import Executor, TaskCancelledError, TaskHandle
from cluster._builder import await_handle

ROOT = Path(__file__).resolve().parents[1]

MakeExecutor = Callable[..., Executor]


@pytest.fixture
def make_executor(new_event: NewEvent) -> Iterator[MakeExecutor]:
    """Executors that are always shut down (after every gate event is released)."""
    made: list[Executor] = []

    def make(max_workers: int | None = 2, **options: Any) -> Executor:
        ex = Executor(max_workers, **options)
        made.append(ex)
        return ex

    yield make
    new_event.release_all()  # type: ignore[attr-defined]
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


def blocker(started: threading.Event, gate: threading.Event, value: Any = None) -> Any:
    """A call that says it started, then waits for its gate."""
    started.set()
    if not gate.wait(WAIT * 4):
        raise RuntimeError("gate never opened")
    return value


def occupy(ex: Executor, new_event: NewEvent) -> tuple[cf.Future[Any], threading.Event]:
    """Keep one worker of ``ex`` busy until the returned gate opens."""
    started, gate = new_event(), new_event()
    future = ex.submit(blocker, started, gate, "first")
    assert started.wait(WAIT)
    return future, gate


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def new_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t not in before}


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


# ============================================================================ submit


def test_submit_returns_a_real_future_of_the_value(make_executor: MakeExecutor) -> None:
    future = make_executor().submit(pow, 2, 8)
    assert isinstance(future, cf.Future)
    assert future.result(WAIT) == 256


def test_submit_passes_keywords_named_fn_and_self_to_the_call(
    make_executor: MakeExecutor,
) -> None:
    future = make_executor().submit(capture, 1, self=2, fn=3)
    assert future.result(WAIT) == ((1,), {"self": 2, "fn": 3})


def test_submit_without_a_positional_fn_raises_type_error(make_executor: MakeExecutor) -> None:
    ex = make_executor()
    with pytest.raises(TypeError):
        ex.submit(fn=capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ex.submit(arg=1)  # type: ignore[call-arg]


def test_submit_of_a_non_callable_raises_type_error_at_once(make_executor: MakeExecutor) -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        make_executor().submit(42)  # type: ignore[arg-type]


def test_an_exception_of_the_call_goes_to_its_future(make_executor: MakeExecutor) -> None:
    future = make_executor().submit(divmod, 1, 0)
    error = future.exception(WAIT)
    assert isinstance(error, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        future.result()


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit])
def test_a_base_exception_goes_to_the_future_and_the_worker_goes_on(
    make_executor: MakeExecutor, kind: type[BaseException]
) -> None:
    def raise_it() -> None:
        raise kind()

    ex = make_executor(1)
    assert isinstance(ex.submit(raise_it).exception(WAIT), kind)
    assert ex.submit(pow, 3, 2).result(WAIT) == 9  # the one worker is still there


@pytest.mark.parametrize("count", [0, -1])
def test_max_workers_below_one_raises_value_error(count: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        Executor(count)


@pytest.mark.parametrize("count", ["4", 2.0, True])
def test_max_workers_that_is_not_an_int_raises_type_error(count: Any) -> None:
    with pytest.raises(TypeError, match="max_workers"):
        Executor(count)


def test_the_workers_option_is_refused_in_favour_of_max_workers() -> None:
    with pytest.raises(TypeError, match="max_workers"):
        Executor(workers=2)


def test_default_max_workers_runs_as_many_calls_at_once_as_a_thread_pool(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    expected = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
    ex = make_executor(None)
    gate = new_event()
    started = [new_event() for _ in range(expected + 1)]
    futures = [ex.submit(blocker, s, gate) for s in started]
    assert all(s.wait(WAIT) for s in started[:expected])
    # Every worker is held by the gate: the extra call cannot have started.
    assert not started[expected].is_set()
    assert not futures[expected].running()
    gate.set()
    assert futures[expected].result(WAIT) is None


# ============================================================================ cancel


def test_cancel_of_a_queued_call_returns_true_and_it_never_runs(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    first, gate = occupy(ex, new_event)
    ran: list[str] = []
    queued = ex.submit(ran.append, "queued")
    assert queued.cancel() is True
    assert queued.cancelled()
    gate.set()
    ex.shutdown(wait=True)
    assert first.result() == "first"
    assert ran == []


def test_cancel_of_a_running_call_returns_false_and_it_completes(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    future, gate = occupy(ex, new_event)
    assert future.running()
    assert future.cancel() is False
    gate.set()
    assert future.result(WAIT) == "first"


def test_cancel_of_a_finished_call_returns_false(make_executor: MakeExecutor) -> None:
    future = make_executor().submit(pow, 2, 2)
    assert future.result(WAIT) == 4
    assert future.cancel() is False
    assert not future.cancelled()


# ============================================================================ map


def test_map_yields_results_in_order_even_when_they_end_out_of_order(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(4)
    gates = [new_event() for _ in range(4)]
    ended: list[int] = []

    def call(i: int) -> int:
        assert gates[i].wait(WAIT)
        ended.append(i)
        if i:
            gates[i - 1].set()  # the later calls end first
        return i * 10

    results = ex.map(call, range(4))
    gates[3].set()
    assert list(results) == [0, 10, 20, 30]
    assert ended == [3, 2, 1, 0]


def test_map_over_several_iterables_stops_at_the_shortest(make_executor: MakeExecutor) -> None:
    results = make_executor().map(pow, [2, 3, 4], [5, 2], [100, 100, 100, 100])
    assert list(results) == [32, 9]


def test_map_over_an_empty_iterable_yields_nothing(make_executor: MakeExecutor) -> None:
    assert list(make_executor().map(pow, [], [])) == []


def test_map_raises_the_first_error_at_its_position(make_executor: MakeExecutor) -> None:
    results = make_executor().map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_submits_every_call_before_its_results_are_read(
    make_executor: MakeExecutor,
) -> None:
    ex = make_executor()
    seen: list[int] = []
    ex.map(seen.append, range(10))  # never iterated
    ex.shutdown(wait=True)
    assert sorted(seen) == list(range(10))


def test_map_consumes_the_iterables_at_the_call(make_executor: MakeExecutor) -> None:
    consumed: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(5):
            consumed.append(i)
            yield i

    results = make_executor().map(abs, numbers())
    assert consumed == [0, 1, 2, 3, 4]
    assert list(results) == [0, 1, 2, 3, 4]


def test_map_timeout_yields_the_ready_results_then_raises(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(2)
    gate = new_event()

    def call(i: int) -> int:
        if i == 2:
            gate.wait(WAIT * 4)
        return i

    results: list[int] = []
    with pytest.raises(TimeoutError):
        for value in ex.map(call, [0, 1, 2], timeout=0.5):
            results.append(value)
    assert results == [0, 1]


def test_map_timeout_counts_from_the_call_to_map(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    occupy(ex, new_event)  # the mapped call cannot start
    results = ex.map(abs, [-1], timeout=1.0)
    threading.Event().wait(1.2)  # the timeout passes before the first next()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - t0 < 0.9  # not another full second from next()


def test_map_accepts_a_timedelta_timeout(make_executor: MakeExecutor) -> None:
    results = make_executor().map(abs, [-3], timeout=timedelta(seconds=WAIT))
    assert list(results) == [3]


def test_a_map_timeout_cancels_the_calls_not_started(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    first, gate = occupy(ex, new_event)
    ran: list[str] = []
    results = ex.map(ran.append, ["second", "third"], timeout=0)
    with pytest.raises(TimeoutError):
        next(results)
    gate.set()
    ex.shutdown(wait=True)
    assert first.result() == "first"
    assert ran == []  # "second" timed out, "third" was still queued


def test_closing_the_map_iterator_early_cancels_the_calls_not_started(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    started, gate = new_event(), new_event()
    ran: list[int] = []

    def call(i: int) -> int:
        ran.append(i)
        if i == 1:
            started.set()
            gate.wait(WAIT * 4)
        return i

    results = ex.map(call, range(4))
    assert next(results) == 0
    assert started.wait(WAIT)  # call 1 runs; 2 and 3 wait in the queue
    results.close()  # type: ignore[attr-defined]
    gate.set()
    ex.shutdown(wait=True)
    assert ran == [0, 1]


def test_a_map_error_cancels_the_calls_not_started(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    started, gate = new_event(), new_event()
    ran: list[int] = []

    def call(i: int) -> int:
        ran.append(i)
        if i == 0:
            raise ValueError("first")
        started.set()
        gate.wait(WAIT * 4)
        return i

    results = ex.map(call, range(4))
    assert started.wait(WAIT)  # call 0 failed, call 1 runs, 2 and 3 wait
    with pytest.raises(ValueError, match="first"):
        next(results)
    gate.set()
    ex.shutdown(wait=True)
    assert ran == [0, 1]


def test_map_keeps_no_reference_to_a_result_once_read(make_executor: MakeExecutor) -> None:
    class Box:
        pass

    for box in make_executor().map(lambda _: Box(), range(10)):
        ref = weakref.ref(box)
        del box
        gc.collect()
        assert ref() is None


def test_map_accepts_and_ignores_chunksize(make_executor: MakeExecutor) -> None:
    results = make_executor().map(pow, range(10), range(10), chunksize=3)
    assert list(results) == [pow(i, i) for i in range(10)]


@pytest.mark.parametrize(("chunksize", "error"), [(0, ValueError), ("2", TypeError)])
def test_map_rejects_a_bad_chunksize(
    make_executor: MakeExecutor, chunksize: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="chunksize"):
        make_executor().map(abs, [1], chunksize=chunksize)


@pytest.mark.parametrize(("timeout", "error"), [("1", TypeError), (float("nan"), ValueError)])
def test_map_rejects_a_bad_timeout(
    make_executor: MakeExecutor, timeout: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="timeout"):
        make_executor().map(abs, [1], timeout=timeout)


def test_map_after_shutdown_raises_runtime_error(make_executor: MakeExecutor) -> None:
    ex = make_executor()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.map(abs, [1])
    assert list(ex.map(abs, [])) == []  # as ThreadPoolExecutor: nothing to schedule


# ============================================================================ shutdown


def test_submit_after_shutdown_raises_runtime_error(make_executor: MakeExecutor) -> None:
    ex = make_executor()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(pow, 2, 5)


def test_shutdown_with_wait_runs_every_queued_call_first(make_executor: MakeExecutor) -> None:
    ex = make_executor(1)
    futures = [ex.submit(pow, i, 2) for i in range(50)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(50)]


def test_shutdown_without_wait_returns_at_once_and_the_calls_still_complete(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    first, gate = occupy(ex, new_event)
    queued = [ex.submit(pow, i, 2) for i in range(10)]
    ex.shutdown(wait=False)  # returns although the only worker is held by the gate
    assert not first.done()
    with pytest.raises(RuntimeError):
        ex.submit(pow, 1, 1)
    gate.set()
    assert first.result(WAIT) == "first"
    assert [f.result(WAIT) for f in queued] == [i * i for i in range(10)]


def test_shutdown_with_cancel_futures_cancels_the_calls_not_started(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    first, gate = occupy(ex, new_event)
    ran: list[int] = []
    queued = [ex.submit(ran.append, i) for i in range(20)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert first.result(WAIT) == "first"
    ex.shutdown(wait=True)
    assert ran == []


def test_shutdown_with_cancel_futures_wakes_threads_waiting_on_them(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    """gh-109934: the waiters of wait() and as_completed() hear of the cancellation."""
    ex = make_executor(1)
    _first, gate = occupy(ex, new_event)
    queued = [ex.submit(pow, i, 2) for i in range(5)]
    outcome: list[set[cf.Future[Any]]] = []
    entered = new_event()

    def waiter() -> None:
        entered.set()
        done, _ = cf.wait(queued, timeout=WAIT * 2)
        outcome.append(done)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert entered.wait(WAIT)
    ex.shutdown(wait=False, cancel_futures=True)
    thread.join(WAIT)
    assert outcome == [set(queued)]
    gate.set()


def test_shutdown_cancel_futures_ends_a_map_iterator_with_cancelled_error(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    occupy(ex, new_event)
    results = ex.map(abs, [-1, -2])
    ex.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(cf.CancelledError):
        next(results)


def test_shutdown_twice_is_harmless(make_executor: MakeExecutor) -> None:
    ex = make_executor()
    future = ex.submit(pow, 2, 3)
    ex.shutdown(wait=False)
    ex.shutdown(wait=True)
    ex.shutdown(wait=True, cancel_futures=True)
    assert future.result() == 8


def test_the_context_manager_shuts_down_and_waits() -> None:
    with Executor(2) as ex:
        futures = [ex.submit(pow, i, 3) for i in range(20)]
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        ex.submit(pow, 1, 1)


def test_shutdown_from_a_call_returns_and_the_queued_calls_still_run(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    gate = new_event()
    started = new_event()
    inner: list[str] = []

    def shut_down_from_inside() -> None:
        started.set()
        assert gate.wait(WAIT)
        ex.shutdown(wait=True)  # cannot wait for its own thread: returns
        inner.append("returned")
        try:
            ex.submit(pow, 1, 1)
        except RuntimeError:
            inner.append("refused")

    first = ex.submit(shut_down_from_inside)
    assert started.wait(WAIT)
    queued = ex.submit(pow, 2, 10)
    gate.set()
    assert first.result(WAIT) is None
    assert inner == ["returned", "refused"]
    assert queued.result(WAIT) == 1024


def submit_until_refused(
    ex: Executor, go: threading.Barrier, futures: list[cf.Future[Any]]
) -> None:
    go.wait()
    while True:
        try:
            futures.append(ex.submit(pow, 2, 2))
        except RuntimeError:
            return


def test_a_submit_racing_shutdown_either_runs_or_is_refused(make_executor: MakeExecutor) -> None:
    """Every future a racing submit returns ends (done or cancelled); the others raise."""
    for _ in range(20):
        ex = make_executor(2)
        futures: list[cf.Future[Any]] = []
        go = threading.Barrier(4)
        threads = [
            threading.Thread(target=submit_until_refused, args=(ex, go, futures)) for _ in range(3)
        ]
        for t in threads:
            t.start()
        go.wait()
        ex.shutdown(wait=True, cancel_futures=True)
        for t in threads:
            t.join(WAIT)
        done, not_done = cf.wait(futures, timeout=WAIT)
        assert not not_done
        assert all(f.cancelled() or f.result() == 4 for f in done)


@pytest.mark.timeout(60)
def test_interpreter_exit_without_shutdown_runs_the_queued_calls() -> None:
    proc = run_script(
        """
        import time
        import cluster

        def later(message):
            time.sleep(0.5)
            print(message, flush=True)

        ex = cluster.Executor(1)
        ex.submit(later, "apple")
        ex.submit(later, "banana")  # still queued when the main thread ends
        """
    )
    assert proc.stderr == ""
    assert proc.stdout.split() == ["apple", "banana"]
    assert proc.returncode == 0


@pytest.mark.timeout(60)
def test_interpreter_exit_after_shutdown_without_wait_runs_the_calls() -> None:
    proc = run_script(
        """
        import time
        import cluster

        def later(message):
            time.sleep(0.5)
            print(message, flush=True)

        ex = cluster.Executor(3)
        ex.submit(later, "apple")
        ex.shutdown(wait=False)
        """
    )
    assert proc.stderr == ""
    assert proc.stdout.split() == ["apple"]
    assert proc.returncode == 0


@pytest.mark.timeout(60)
def test_submit_from_an_exit_hook_raises_runtime_error() -> None:
    proc = run_script(
        """
        import atexit
        import cluster

        @atexit.register
        def run_last():
            try:
                ex.submit(id, None)
            except RuntimeError as exc:
                print("runtime-error:", exc)

        ex = cluster.Executor(2)
        ex.submit(id, 42).result()
        """
    )
    assert proc.stderr == ""
    assert proc.stdout.strip() == (
        "runtime-error: cannot schedule new futures after interpreter shutdown"
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(60)
def test_in_a_forked_child_submit_raises_runtime_error() -> None:
    proc = run_script(
        """
        import os
        import cluster

        ex = cluster.Executor(2)
        assert ex.submit(pow, 2, 3).result() == 8
        pid = os.fork()
        if pid == 0:  # the child has none of the parent's threads
            try:
                ex.submit(pow, 2, 3)
            except RuntimeError as exc:
                print("child:", exc, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent:", ex.submit(pow, 2, 4).result(), flush=True)
        ex.shutdown()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "child: cannot schedule new futures in a forked child process",
        "parent: 16",
    ]


# ============================================================================ references


class Owner:
    def method(self) -> None:
        pass


def after_the_call(ex: Executor, new_event: NewEvent, fn: Callable[..., Any], *args: Any) -> Any:
    """Submit ``fn(*args)``, let it run, then hold the same drainer in a blocking call;
    return the call's future.

    The one worker is held while the call under test and a blocking call queue up
    behind it, so one drainer runs all three: whatever it still held of the call under
    test would stay alive while it blocks.
    """
    _first, gate = occupy(ex, new_event)
    future = ex.submit(fn, *args)
    started, hold = new_event(), new_event()
    ex.submit(blocker, started, hold)
    gate.set()
    assert started.wait(WAIT)  # the call under test is done; its drainer blocks
    return future


def test_no_reference_to_the_function_is_kept_once_the_call_is_done(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    collected = threading.Event()
    owner = Owner()
    ref = weakref.ref(owner, lambda _: collected.set())
    method = owner.method
    del owner
    after_the_call(ex, new_event, method)  # the future is dropped at once
    del method
    assert collected.wait(WAIT)
    assert ref() is None


def test_no_reference_to_the_arguments_is_kept_once_the_call_is_done(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    collected = threading.Event()
    argument = Owner()
    ref = weakref.ref(argument, lambda _: collected.set())
    future = after_the_call(ex, new_event, id, argument)
    del argument
    assert future.result(WAIT)
    assert collected.wait(WAIT)  # the future stays: it holds the value, not the argument
    assert ref() is None


def test_no_reference_to_a_result_is_kept_once_the_future_is_dropped(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    collected = threading.Event()
    future = after_the_call(ex, new_event, Owner)
    result = future.result(WAIT)
    ref = weakref.ref(result, lambda _: collected.set())
    del future, result
    assert collected.wait(WAIT)
    assert ref() is None


def test_no_reference_to_an_error_is_kept_once_the_future_is_dropped(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    collected = threading.Event()

    class Dropped(Exception):  # weakly referenceable, unlike ValueError itself
        pass

    def fail() -> None:
        raise Dropped()

    future = after_the_call(ex, new_event, fail)
    error = future.exception(WAIT)
    ref = weakref.ref(error, lambda _: collected.set())
    del future, error
    gc.collect()  # a traceback's frames may form a cycle with it
    assert collected.wait(WAIT)
    assert ref() is None


# ============================================================================ callbacks, wait


def test_a_done_callback_that_raises_is_logged_and_the_next_one_runs(
    make_executor: MakeExecutor, new_event: NewEvent, caplog: pytest.LogCaptureFixture
) -> None:
    ex = make_executor(1)
    future, gate = occupy(ex, new_event)
    calls: list[str] = []

    def raising(_: cf.Future[Any]) -> None:
        calls.append("raising")
        raise ValueError("doh!")

    future.add_done_callback(raising)
    future.add_done_callback(lambda _: calls.append("next"))
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        gate.set()
        assert future.result(WAIT) == "first"
        assert ex.submit(pow, 1, 1).result(WAIT) == 1  # the callbacks have run
    assert calls == ["raising", "next"]
    assert "exception calling callback" in caplog.text
    assert "doh!" in caplog.text


def test_wait_first_completed_returns_the_finished_call(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(2)
    slow, gate = occupy(ex, new_event)
    fast = ex.submit(pow, 21, 2)
    futures: list[cf.Future[Any]] = [slow, fast]
    done, not_done = cf.wait(futures, timeout=WAIT, return_when=cf.FIRST_COMPLETED)
    assert done == {fast}
    assert not_done == {slow}
    gate.set()


def test_wait_first_exception_returns_at_the_failure(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(3)
    slow, gate = occupy(ex, new_event)
    ok = ex.submit(pow, 2, 2)
    assert ok.result(WAIT) == 4
    failing = ex.submit(divmod, 1, 0)
    futures: list[cf.Future[Any]] = [ok, failing, slow]
    done, not_done = cf.wait(futures, timeout=WAIT, return_when=cf.FIRST_EXCEPTION)
    assert done == {ok, failing}
    assert not_done == {slow}
    gate.set()


def test_wait_all_completed_returns_every_call(make_executor: MakeExecutor) -> None:
    ex = make_executor(2)
    futures: list[cf.Future[Any]] = [ex.submit(divmod, 2, 0), ex.submit(pow, 2, 21)]
    done, not_done = cf.wait(futures, timeout=WAIT, return_when=cf.ALL_COMPLETED)
    assert done == set(futures)
    assert not not_done


def test_concurrent_futures_as_completed_yields_each_future_once(
    make_executor: MakeExecutor,
) -> None:
    ex = make_executor(2)
    futures = [ex.submit(pow, i, 2) for i in range(10)]
    seen = list(cf.as_completed(futures + futures, timeout=WAIT))
    assert sorted(seen, key=futures.index) == futures


# ============================================================================ threads


def test_no_thread_of_the_executor_remains_after_shutdown_with_wait() -> None:
    before = set(threading.enumerate())
    ex = Executor(4)
    list(ex.map(abs, range(-50, 50)))
    assert len(new_threads(before)) == 4
    ex.shutdown(wait=True)
    assert new_threads(before) == set()


def test_a_saturated_executor_has_exactly_max_workers_threads(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    """No service threads: the cluster starts a watchdog only for tasks with a timeout
    and a callback thread only for callbacks of cancelled tasks; the executor needs
    neither."""
    before = set(threading.enumerate())
    ex = make_executor(4)
    gate = new_event()
    started = [new_event() for _ in range(4)]
    futures = [ex.submit(blocker, started[i % 4], gate) for i in range(60)]
    assert all(s.wait(WAIT) for s in started)
    assert len(new_threads(before)) == 4
    gate.set()
    assert all(f.result(WAIT) is None for f in futures)
    ex.shutdown(wait=True)
    assert new_threads(before) == set()


def test_a_collected_executor_runs_its_queued_calls_and_its_threads_exit(
    new_event: NewEvent,
) -> None:
    before = set(threading.enumerate())
    ex = Executor(2)
    started, gate = new_event(), new_event()
    first = ex.submit(blocker, started, gate, "first")
    queued = [ex.submit(pow, i, 2) for i in range(10)]
    threads = new_threads(before)
    assert started.wait(WAIT)
    del ex
    gc.collect()
    gate.set()
    assert first.result(WAIT) == "first"
    assert [f.result(WAIT) for f in queued] == [i * i for i in range(10)]
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def test_many_short_bursts_never_strand_a_call(make_executor: MakeExecutor) -> None:
    """Drainers end whenever the queue runs dry: every call must still find one."""
    ex = make_executor(3)
    for burst in range(300):
        futures = [ex.submit(pow, burst, 1) for _ in range(burst % 7 + 1)]
        assert all(f.result(WAIT) == burst for f in futures)


class RacyQueue(deque[Any]):
    """An executor queue that plays one interleaving of two threads, deterministically.

    ``on_empty``: the first time a drainer finds the queue empty, it runs before the
    drainer hears so (as if another thread ran just then). ``before_append``: it runs
    before the next call is appended (as if another thread ran between the submit's
    first check and its append).
    """

    def __init__(self) -> None:
        super().__init__()
        self.on_empty: Callable[[], object] | None = None
        self.before_append: Callable[[], object] | None = None

    def popleft(self) -> Any:
        hook = self.on_empty
        if hook is not None and not self:
            self.on_empty = None
            hook()
            raise IndexError("pop from an empty deque")  # what the drainer saw
        return super().popleft()

    def append(self, item: Any) -> None:
        hook = self.before_append
        if hook is not None:
            self.before_append = None
            hook()
        super().append(item)


def racy(ex: Executor) -> RacyQueue:
    queue = RacyQueue()
    ex._state.queue = queue  # before any call: every drainer uses this queue
    return queue


def test_a_call_submitted_just_as_the_last_drainer_finds_the_queue_empty_runs(
    make_executor: MakeExecutor,
) -> None:
    ex = make_executor(1)
    queue = racy(ex)
    late: list[cf.Future[int]] = []
    # The submit sees the only drainer still counted, so it starts none.
    queue.on_empty = lambda: late.append(ex.submit(pow, 2, 5))
    assert ex.submit(pow, 1, 1).result(WAIT) == 1
    assert late[0].result(WAIT) == 32  # the retiring drainer saw it and ran it


def test_a_submit_overtaken_by_shutdown_with_cancel_futures_is_refused(
    make_executor: MakeExecutor, new_event: NewEvent
) -> None:
    ex = make_executor(1)
    queue = racy(ex)
    first, gate = occupy(ex, new_event)  # every drainer busy: the submit starts none
    ran: list[str] = []
    queue.before_append = lambda: ex.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(ran.append, "late")
    gate.set()
    ex.shutdown(wait=True)
    assert first.result() == "first"
    assert ran == []  # taken back out of the queue, never run


@pytest.mark.timeout(120)
def test_calls_submitted_while_switching_threads_every_microsecond_all_run(
    make_executor: MakeExecutor,
) -> None:
    """The same races as above, left to chance: threads switch every microsecond."""
    ex = make_executor(1)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for burst in range(3000):
            future = ex.submit(pow, burst, 1)
            if burst % 2:
                future = ex.submit(pow, burst, 1)
            assert future.result(WAIT) == burst, f"burst {burst}: a call was stranded"
    finally:
        sys.setswitchinterval(previous)


def test_calls_submitted_from_several_threads_all_run(make_executor: MakeExecutor) -> None:
    ex = make_executor(3)
    results: list[list[cf.Future[int]]] = [[] for _ in range(4)]

    def submitter(mine: list[cf.Future[int]]) -> None:
        for i in range(2000):
            mine.append(ex.submit(pow, i, 1))

    threads = [threading.Thread(target=submitter, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
    for mine in results:
        assert [f.result(WAIT) for f in mine] == list(range(2000))


def test_calls_submitted_by_calls_run(make_executor: MakeExecutor) -> None:
    ex = make_executor(2)

    def fan_out(n: int) -> list[int]:
        return [f.result(WAIT) for f in [ex.submit(pow, i, 2) for i in range(n)]]

    assert ex.submit(fan_out, 1000).result(WAIT * 2) == [i * i for i in range(1000)]


def test_repr_names_the_state(make_executor: MakeExecutor) -> None:
    ex = make_executor(3)
    assert "running" in repr(ex) and "max_workers=3" in repr(ex)
    ex.shutdown()
    assert "shut down" in repr(ex)


def test_executor_and_as_completed_are_exported() -> None:
    assert cluster.Executor is Executor
    assert issubclass(Executor, cf.Executor)
    assert "Executor" in cluster.__all__ and "as_completed" in cluster.__all__


# ============================================================================ as_completed


def gated(c: cluster.Cluster, gate: threading.Event, value: Any) -> TaskHandle[Any]:
    return c.add_task(blocker, threading.Event(), gate, value).submit()


def test_as_completed_yields_the_handles_as_their_tasks_end(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(3)
    gates = [new_event() for _ in range(3)]
    handles = [gated(c, gates[i], i) for i in range(3)]
    release_order = [2, 0, 1]
    gates[release_order[0]].set()
    seen = []
    for handle in cluster.as_completed(handles, timeout=WAIT):
        seen.append(handle)
        if len(seen) < 3:
            gates[release_order[len(seen)]].set()  # only once the previous one arrived
    assert seen == [handles[i] for i in release_order]


def test_as_completed_yields_the_finished_handles_first_in_their_order(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(2)
    gate = new_event()
    pending = gated(c, gate, "late")
    done = [c.add_task(pow, i, 2).submit() for i in range(3)]
    for h in done:
        h.wait(WAIT)
    iterator = cluster.as_completed([pending, *done])
    assert [next(iterator) for _ in range(3)] == done
    gate.set()
    assert list(iterator) == [pending]


def test_as_completed_yields_a_handle_given_twice_once(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    handle = c.add_task(pow, 2, 2).submit()
    other = c.add_task(pow, 3, 3).submit()
    seen = list(cluster.as_completed([handle, other, handle, handle], timeout=WAIT))
    assert sorted(seen, key=[handle, other].index) == [handle, other]


def test_as_completed_includes_failed_and_cancelled_tasks(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    blocking = gated(c, gate, None)
    failed = c.add_task(divmod, 1, 0).submit()
    cancelled = c.add_task(pow, 1, 1).submit()
    assert cancelled.cancel()
    handles: list[TaskHandle[Any]] = [failed, cancelled, blocking]
    iterator = cluster.as_completed(handles, timeout=WAIT)
    assert next(iterator) is cancelled  # already ended
    gate.set()
    rest = list(iterator)
    assert set(rest) == {failed, blocking}
    with pytest.raises(ZeroDivisionError):
        failed.result()


def test_as_completed_raises_timeout_error_after_the_finished_ones(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(2)
    gate = new_event()
    done = c.add_task(pow, 2, 2).submit()
    done.wait(WAIT)
    pending = gated(c, gate, None)
    seen = []
    with pytest.raises(TimeoutError, match=r"1 \(of 2\) tasks unfinished"):
        for handle in cluster.as_completed([done, pending], timeout=0.2):
            seen.append(handle)
    assert seen == [done]


def test_as_completed_timeout_counts_from_the_call(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    pending = gated(c, new_event(), None)
    iterator = cluster.as_completed([pending], timeout=1.0)
    threading.Event().wait(1.2)  # the timeout passes before the first next()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        next(iterator)
    assert time.monotonic() - t0 < 0.9


def test_as_completed_of_nothing_yields_nothing() -> None:
    assert list(cluster.as_completed([], timeout=0)) == []


def test_as_completed_rejects_what_is_not_a_handle(make_executor: MakeExecutor) -> None:
    future = make_executor().submit(pow, 2, 2)
    with pytest.raises(TypeError, match="TaskHandle"):
        cluster.as_completed([future])  # type: ignore[arg-type]


def test_as_completed_rejects_a_bad_timeout(make_cluster: MakeCluster) -> None:
    handle = make_cluster(1).add_task(pow, 2, 2).submit()
    with pytest.raises(TypeError, match="timeout"):
        cluster.as_completed([handle], timeout="1")  # type: ignore[arg-type]


def test_as_completed_waits_without_a_thread_per_handle(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(2)
    gate = new_event()
    handles = [c.add_task(gate.wait, WAIT).submit() for _ in range(50)]
    before = threading.active_count()
    iterator = cluster.as_completed(handles, timeout=WAIT * 2)
    assert threading.active_count() == before
    gate.set()
    assert len(list(iterator)) == 50


# ============================================================================ await


def awaitable(handle: TaskHandle[Any]) -> Awaitable[Any]:
    """``handle`` itself once TaskHandle has ``__await__``; until then, the same body."""
    if hasattr(TaskHandle, "__await__"):
        return handle

    class Awaiting:
        def __await__(self) -> Generator[Any, None, Any]:
            return await_handle(handle)

    return Awaiting()


def test_awaiting_a_handle_gives_the_value(make_cluster: MakeCluster) -> None:
    handle = make_cluster(1).add_task(pow, 2, 10).submit()

    async def main() -> Any:
        return await awaitable(handle)

    assert asyncio.run(main()) == 1024


def test_awaiting_a_handle_raises_the_task_error(make_cluster: MakeCluster) -> None:
    handle = make_cluster(1).add_task(divmod, 1, 0).submit()

    async def main() -> Any:
        return await awaitable(handle)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(main())


def test_awaiting_a_cancelled_task_raises_its_task_cancelled_error(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    gate = new_event()
    gated(c, gate, None)
    queued = c.add_task(pow, 1, 1).submit()

    async def main() -> Any:
        waiting = asyncio.ensure_future(awaitable(queued))
        await asyncio.sleep(0)  # the coroutine is now waiting on the task
        assert queued.cancel()
        return await waiting

    with pytest.raises(TaskCancelledError) as info:
        asyncio.run(main())
    assert info.value is queued.wait(0).error  # type: ignore[union-attr]


def test_cancelling_the_awaiting_coroutine_leaves_the_task_running(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    started, gate = new_event(), new_event()
    handle = c.add_task(blocker, started, gate, "value").submit()
    assert started.wait(WAIT)

    async def main() -> None:
        waiting = asyncio.ensure_future(awaitable(handle))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    assert not handle.done()
    gate.set()
    assert handle.result(WAIT) == "value"


def test_awaiting_a_finished_task_does_not_suspend(make_cluster: MakeCluster) -> None:
    handle = make_cluster(1).add_task(pow, 3, 3).submit()
    handle.wait(WAIT)
    steps = await_handle(handle)  # no event loop is running: none is needed
    with pytest.raises(StopIteration) as info:
        next(steps)
    assert info.value.value == 27


def test_awaiting_an_unfinished_task_needs_a_running_loop(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    handle = gated(make_cluster(1), new_event(), None)
    with pytest.raises(RuntimeError, match="no running event loop"):
        next(await_handle(handle))


@pytest.mark.timeout(60)
def test_gathering_a_thousand_handles_gives_every_value(make_cluster: MakeCluster) -> None:
    c = make_cluster(4)
    handles = [c.add_task(pow, i, 2).submit() for i in range(1000)]

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(awaitable(h) for h in handles)))

    assert asyncio.run(main()) == [i * i for i in range(1000)]


def test_awaiting_works_from_a_loop_in_another_thread(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1)
    started, gate = new_event(), new_event()
    handle = c.add_task(blocker, started, gate, "value").submit()
    got: list[Any] = []

    async def main() -> None:
        got.append(await awaitable(handle))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    assert started.wait(WAIT)
    gate.set()
    thread.join(WAIT)
    assert got == ["value"]


def test_a_task_ending_after_its_loop_closed_logs_nothing(
    make_cluster: MakeCluster, new_event: NewEvent, caplog: pytest.LogCaptureFixture
) -> None:
    c = make_cluster(1)
    started, gate = new_event(), new_event()
    handle = c.add_task(blocker, started, gate, "value").submit()
    assert started.wait(WAIT)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.ensure_future(awaitable(handle)), 0.05)

    asyncio.run(main())  # the loop is closed now; the task still runs
    with caplog.at_level(logging.DEBUG):
        gate.set()
        assert handle.result(WAIT) == "value"
        c.stop()  # every delivery and callback has run
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ============================================================================ benchmark


def test_the_benchmark_prints_both_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    if str(ROOT) not in sys.path:  # `benchmarks` lives beside `tests`, not in the package
        sys.path.insert(0, str(ROOT))
    from benchmarks.futures import main

    assert main(["--n", "500", "--repeats", "1"]) in (0, 1)  # 1: a ratio above target
    out = capsys.readouterr().out
    assert "n=500" in out
    for scenario in ("submit", "map"):
        line = next(line for line in out.splitlines() if line.startswith(scenario))
        assert line.rstrip().endswith("x")
