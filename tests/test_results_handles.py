"""SPEC §6 (Result, TaskHandle, exceptions) and result caching (§3 with_cache)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import logging
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import WAIT, MakeCluster, NewEvent, is_purged, wait_until

from cluster import (
    Cluster,
    ClusterError,
    ClusterStoppedError,
    DuplicateTaskError,
    Result,
    StopTimeoutError,
    TaskCancelledError,
    TaskNotFoundError,
    TaskTimeoutError,
)

SLACK = 0.02


def fail_with(exc: BaseException) -> Callable[[], None]:
    def fn() -> None:
        raise exc

    return fn


# =========================================================================== exceptions


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (ClusterError, (Exception,)),
        (TaskTimeoutError, (ClusterError, TimeoutError)),
        (TaskCancelledError, (ClusterError, concurrent.futures.CancelledError)),
        (DuplicateTaskError, (ClusterError,)),
        (TaskNotFoundError, (ClusterError, KeyError)),
        (ClusterStoppedError, (ClusterError,)),
        (StopTimeoutError, (ClusterError, TimeoutError)),
    ],
)
def test_exception_hierarchy(cls: type[BaseException], bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} is not a {base.__name__}"


def test_task_cancelled_error_is_caught_as_futures_cancelled_error(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_delay(60).submit()
    assert h.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        h.result(timeout=WAIT)


# =========================================================================== Result


def test_result_is_a_frozen_dataclass(cluster: Cluster) -> None:
    r = cluster.add_task(lambda: 1).submit().wait(timeout=WAIT)
    assert isinstance(r, Result)
    assert dataclasses.is_dataclass(r)
    assert {"value", "error"} <= {f.name for f in dataclasses.fields(r)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.error = ValueError()  # type: ignore[misc]


def test_result_of_success_is_ok_and_unwraps_to_value(cluster: Cluster) -> None:
    r = cluster.add_task(lambda: {"a": 1}).submit().wait(timeout=WAIT)
    assert r is not None
    assert r.ok is True
    assert r.value == {"a": 1}
    assert r.error is None
    assert r.unwrap() == {"a": 1}


def test_result_of_none_returning_task_is_ok(cluster: Cluster) -> None:
    r = cluster.add_task(lambda: None).submit().wait(timeout=WAIT)
    assert r is not None
    assert r.ok is True
    assert r.unwrap() is None


def test_result_of_failure_is_not_ok_and_unwrap_raises_same_error(cluster: Cluster) -> None:
    boom = ValueError("boom")
    r = cluster.add_task(fail_with(boom)).submit().wait(timeout=WAIT)
    assert r is not None
    assert r.ok is False
    assert r.error is boom
    assert r.value is None
    with pytest.raises(ValueError) as excinfo:
        r.unwrap()
    assert excinfo.value is boom


def test_result_of_cancelled_task_carries_task_cancelled_error(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_delay(60).submit()
    q = h.subscribe()
    h.cancel()
    r = q.get(timeout=WAIT)
    assert r.ok is False
    assert isinstance(r.error, TaskCancelledError)
    with pytest.raises(TaskCancelledError):
        r.unwrap()


def test_error_traceback_is_kept(cluster: Cluster) -> None:
    def deep_failure() -> None:
        raise RuntimeError("with traceback")

    r = cluster.add_task(deep_failure).submit().wait(timeout=WAIT)
    assert r is not None and r.error is not None
    assert r.error.__traceback__ is not None
    names = [frame.name for frame in traceback.extract_tb(r.error.__traceback__)]
    assert "deep_failure" in names


@pytest.fixture
def logging_off() -> Iterator[None]:
    # log records (e.g. captured by pytest) could hold tracebacks; keep them out of the way
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class Marker:
    pass


@pytest.mark.usefixtures("logging_off")
@pytest.mark.parametrize("ttl", [None, 0.05])
def test_frames_of_finished_task_are_not_kept_alive_after_purge(
    cluster: Cluster, ttl: float | None
) -> None:
    refs: list[weakref.ref[Marker]] = []

    def failing() -> None:
        local = Marker()  # lives in this frame, reachable only via the traceback
        refs.append(weakref.ref(local))
        raise RuntimeError("drop me")

    b = cluster.add_task(failing)
    if ttl is not None:
        b = b.with_cache(ttl=ttl)
    h = b.submit()
    task_id = h.id
    assert h.wait(timeout=WAIT) is not None
    del h, b
    assert wait_until(lambda: is_purged(cluster, task_id))
    assert refs and wait_until(lambda: gc.collect() >= 0 and refs[0]() is None), (
        "the finished task's frame is still alive"
    )


# =========================================================================== TaskHandle


def test_handle_id_is_the_task_id(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_id("handle-id").submit()
    assert h.id == "handle-id"
    h.result(timeout=WAIT)


def test_handle_result_returns_value(cluster: Cluster) -> None:
    assert cluster.add_task(lambda: "value").submit().result(timeout=WAIT) == "value"


def test_handle_result_without_timeout_waits_for_completion(
    cluster: Cluster, new_event: NewEvent
) -> None:
    gate = new_event()
    h = cluster.add_task(lambda: gate.wait(10) and "waited").submit()
    threading.Timer(0.05, gate.set).start()
    assert h.result() == "waited"


def test_handle_result_raises_the_task_error(cluster: Cluster) -> None:
    boom = KeyError("missing")
    h = cluster.add_task(fail_with(boom)).submit()
    with pytest.raises(KeyError) as excinfo:
        h.result(timeout=WAIT)
    assert excinfo.value is boom


def test_handle_result_times_out_with_timeout_error(cluster: Cluster, new_event: NewEvent) -> None:
    gate = new_event()
    h = cluster.add_task(lambda: gate.wait(10) and "eventually").submit()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        h.result(timeout=0.05)
    assert time.monotonic() - t0 < 2
    assert not h.done()
    gate.set()
    assert h.result(timeout=WAIT) == "eventually"  # the task itself was not affected


def test_handle_wait_returns_none_until_done(cluster: Cluster, new_event: NewEvent) -> None:
    gate = new_event()
    h = cluster.add_task(lambda: gate.wait(10) and 5).submit()
    assert h.wait(timeout=0.05) is None
    gate.set()
    r = h.wait(timeout=WAIT)
    assert isinstance(r, Result)
    assert r.value == 5 and r.ok


def test_handle_wait_does_not_raise_task_error(cluster: Cluster) -> None:
    boom = RuntimeError("kept in result")
    r = cluster.add_task(fail_with(boom)).submit().wait(timeout=WAIT)
    assert r is not None and r.error is boom


def test_handle_done_reflects_completion(cluster: Cluster, new_event: NewEvent) -> None:
    gate = new_event()
    h = cluster.add_task(gate.wait, 10).submit()
    assert h.done() is False
    gate.set()
    h.result(timeout=WAIT)
    assert h.done() is True


def test_handle_cancel_of_pending_task_returns_true(
    make_cluster: MakeCluster, new_event: NewEvent
) -> None:
    c = make_cluster(1, run=False)
    ran = threading.Event()
    h = c.add_task(ran.set).submit()
    assert h.cancel() is True
    assert h.done() is True
    with pytest.raises(TaskCancelledError):
        h.result(timeout=WAIT)
    c.run()
    c.stop(timeout=10)
    assert not ran.is_set()


def test_handle_cancel_of_finished_task_returns_false(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).submit()
    assert h.result(timeout=WAIT) == 1
    assert h.cancel() is False
    assert h.result(timeout=0) == 1


def test_handle_cancel_of_finished_cached_task_returns_false(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_cache(60).submit()
    assert h.result(timeout=WAIT) == 1
    assert h.cancel() is False


def test_handle_subscribe_receives_result(cluster: Cluster, new_event: NewEvent) -> None:
    gate = new_event()
    h = cluster.add_task(lambda: gate.wait(10) and "sub").submit()
    q = h.subscribe()
    gate.set()
    assert q.get(timeout=WAIT).value == "sub"
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)


def test_handle_future_is_concurrent_future_with_value(cluster: Cluster) -> None:
    fut = cluster.add_task(lambda: "fut").submit().future()
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=WAIT) == "fut"
    assert fut.done()


def test_handle_future_carries_the_task_error(cluster: Cluster) -> None:
    boom = OSError("io")
    fut = cluster.add_task(fail_with(boom)).submit().future()
    assert fut.exception(timeout=WAIT) is boom


def test_handle_future_of_cancelled_task_raises_cancelled_error(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_delay(60).submit()
    fut = h.future()
    assert h.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(timeout=WAIT)


def test_handle_future_done_callback_fires(cluster: Cluster, new_event: NewEvent) -> None:
    gate = new_event()
    h = cluster.add_task(lambda: gate.wait(10) and 9).submit()
    fired: queue.SimpleQueue[Any] = queue.SimpleQueue()
    h.future().add_done_callback(lambda f: fired.put(f.result()))
    gate.set()
    assert fired.get(timeout=WAIT) == 9


def test_handle_future_works_with_asyncio_wrap_future(
    cluster: Cluster, new_event: NewEvent
) -> None:
    gate = new_event()
    h = cluster.add_task(lambda: gate.wait(10) and "async").submit()

    async def main() -> Any:
        waiter = asyncio.wrap_future(h.future())
        gate.set()
        return await asyncio.wait_for(waiter, timeout=WAIT)

    assert asyncio.run(main()) == "async"


def test_handle_future_error_propagates_through_asyncio(cluster: Cluster) -> None:
    boom = ValueError("async boom")
    h = cluster.add_task(fail_with(boom)).submit()

    async def main() -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(h.future()), timeout=WAIT)

    with pytest.raises(ValueError) as excinfo:
        asyncio.run(main())
    assert excinfo.value is boom


# =========================================================================== cache


def test_cached_result_is_served_to_late_subscribers_and_info(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: "kept").with_cache(ttl=60).submit()
    assert h.result(timeout=WAIT) == "kept"
    q1, q2 = cluster.subscribe(h.id), cluster.subscribe(h.id)
    assert q1.get_nowait().value == "kept"
    assert q2.get_nowait().value == "kept"
    assert cluster.info(h.id).id == h.id


def test_default_cache_ttl_keeps_result(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: "default ttl").with_cache().submit()
    assert h.result(timeout=WAIT) == "default ttl"
    assert cluster.subscribe(h.id).get_nowait().value == "default ttl"


def test_cached_failure_is_served_to_late_subscribers(cluster: Cluster) -> None:
    boom = ValueError("cached failure")
    h = cluster.add_task(fail_with(boom)).with_cache(ttl=60).submit()
    assert h.wait(timeout=WAIT) is not None
    assert cluster.subscribe(h.id).get_nowait().error is boom


def test_cached_cancellation_is_served_to_late_subscribers(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_delay(60).with_cache(ttl=60).submit()
    assert cluster.cancel_task(h.id) is True
    assert isinstance(cluster.subscribe(h.id).get_nowait().error, TaskCancelledError)


def test_cached_result_is_purged_after_ttl(cluster: Cluster) -> None:
    finished: list[float] = []

    def fn() -> str:
        finished.append(time.monotonic())
        return "short-lived"

    h = cluster.add_task(fn).with_cache(ttl=0.05).submit()
    assert h.result(timeout=WAIT) == "short-lived"
    assert wait_until(lambda: is_purged(cluster, h.id), deadline=3.0), "never purged"
    assert time.monotonic() - finished[0] >= 0.05 - SLACK
    with pytest.raises(TaskNotFoundError):
        cluster.info(h.id)


def test_cached_result_is_not_purged_before_ttl(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: "v").with_cache(ttl=0.4).submit()
    assert h.result(timeout=WAIT) == "v"
    done_at = time.monotonic()
    while time.monotonic() - done_at < 0.25:
        assert cluster.subscribe(h.id).get_nowait().value == "v"
        time.sleep(0.02)


def test_cache_ttl_accepts_timedelta(cluster: Cluster) -> None:
    from datetime import timedelta

    h = cluster.add_task(lambda: 1).with_cache(ttl=timedelta(milliseconds=50)).submit()
    assert h.result(timeout=WAIT) == 1
    assert wait_until(lambda: is_purged(cluster, h.id), deadline=3.0)


def test_id_can_be_reused_after_cache_expiry(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_id("again").with_cache(ttl=0.05).submit()
    assert h.result(timeout=WAIT) == 1
    assert wait_until(lambda: is_purged(cluster, "again"), deadline=3.0)
    assert cluster.add_task(lambda: 2).with_id("again").submit().result(timeout=WAIT) == 2


def test_uncached_result_is_purged_once_delivered(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).submit()
    assert h.result(timeout=WAIT) == 1
    assert wait_until(lambda: is_purged(cluster, h.id), deadline=1.0)
    with pytest.raises(TaskNotFoundError):
        cluster.info(h.id)
