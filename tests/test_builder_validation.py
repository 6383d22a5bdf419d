"""SPEC §3: the fluent TaskBuilder, its validation, ids, start times and backoff strategies."""

from __future__ import annotations

import enum
import math
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from _helpers import WAIT, MakeCluster, NewEvent, is_purged, wait_until

from cluster import (
    Cluster,
    ClusterError,
    DuplicateTaskError,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    RetryMode,
    current,
)

SLACK = 0.02  # clock granularity between the test's clock reading and the cluster's


def noop() -> None:
    return None


# --------------------------------------------------------------------------- fluent API


def test_every_setter_returns_the_same_builder(cluster: Cluster) -> None:
    b = cluster.add_task(noop)
    chain: list[Callable[[], Any]] = [
        lambda: b.with_id("fluent"),
        lambda: b.with_start_time(datetime.now()),
        lambda: b.with_delay(0),
        lambda: b.with_timeout(5),
        lambda: b.with_priority(3),
        lambda: b.with_retry(1),
        lambda: b.with_backoff(FixedBackoff(0)),
        lambda: b.with_jitter(0.2),
        lambda: b.with_jitter(),
        lambda: b.retry_if(lambda exc: True),
        lambda: b.with_retry_mode(RetryMode.IMMEDIATE),
        lambda: b.with_cache(ttl=10),
        lambda: b.with_cache(),
        lambda: b.on_complete(lambda task_id, value, error: None),
        lambda: b.on_failure(lambda task_id, error: None),
    ]
    for call in chain:
        assert call() is b
    h = b.submit()
    assert h.id == "fluent"
    assert h.result(timeout=WAIT) is None


def test_fully_configured_builder_runs_task(cluster: Cluster) -> None:
    h = (
        cluster.add_task(lambda x: x * 2, 21)
        .with_id("all-options")
        .with_priority(5)
        .with_timeout(timedelta(seconds=5))
        .with_retry(2)
        .with_backoff(LinearBackoff(0, 0.01))
        .with_jitter(0.5)
        .retry_if(lambda exc: isinstance(exc, OSError))
        .with_retry_mode(RetryMode.REQUEUE)
        .with_cache(ttl=timedelta(seconds=30))
        .submit()
    )
    assert h.result(timeout=WAIT) == 42


# --------------------------------------------------------------------------- ids


def test_with_id_sets_task_and_handle_id(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: current().task_id).with_id("my-task").submit()
    assert h.id == "my-task"
    assert h.result(timeout=WAIT) == "my-task"


def test_generated_ids_are_unique_non_empty_strings(cluster: Cluster) -> None:
    handles = [cluster.add_task(noop).submit() for _ in range(100)]
    ids = [h.id for h in handles]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 100
    for h in handles:
        h.result(timeout=WAIT)


def test_with_id_empty_string_raises_value_error(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="id"):
        cluster.add_task(noop).with_id("").submit()


@pytest.mark.parametrize("bad", [5, None, b"bytes", ["x"]])
def test_with_id_non_str_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match="id"):
        cluster.add_task(noop).with_id(bad).submit()


def test_duplicate_id_of_queued_task_raises(make_cluster: MakeCluster) -> None:
    c = make_cluster(1, run=False)
    first = c.add_task(lambda: "first").with_id("dup").submit()
    with pytest.raises(DuplicateTaskError):
        c.add_task(lambda: "second").with_id("dup").submit()
    c.run()
    assert first.result(timeout=WAIT) == "first"
    assert c.stats().submitted == 1


def test_duplicate_id_of_delayed_task_raises(cluster: Cluster) -> None:
    cluster.add_task(noop).with_id("later").with_delay(60).submit()
    with pytest.raises(DuplicateTaskError):
        cluster.add_task(noop).with_id("later").submit()


def test_duplicate_id_of_running_task_raises(cluster: Cluster, new_event: NewEvent) -> None:
    started, release = threading.Event(), new_event()

    def fn() -> str:
        started.set()
        release.wait(10)
        return "original"

    h = cluster.add_task(fn).with_id("busy").submit()
    assert started.wait(WAIT)
    with pytest.raises(DuplicateTaskError):
        cluster.add_task(noop).with_id("busy").submit()
    release.set()
    assert h.result(timeout=WAIT) == "original"


def test_duplicate_id_of_task_waiting_to_retry_raises(cluster: Cluster) -> None:
    failed = threading.Event()

    def fn() -> None:
        failed.set()
        raise RuntimeError("retry later")

    cluster.add_task(fn).with_id("retrying").with_retry(1).with_backoff(FixedBackoff(60)).submit()
    assert failed.wait(WAIT)
    with pytest.raises(DuplicateTaskError):
        cluster.add_task(noop).with_id("retrying").submit()


def test_duplicate_id_of_cached_task_raises(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_id("kept").with_cache(ttl=60).submit()
    assert h.result(timeout=WAIT) == 1
    with pytest.raises(DuplicateTaskError):
        cluster.add_task(lambda: 2).with_id("kept").submit()
    assert cluster.subscribe("kept").get_nowait().value == 1


def test_duplicate_task_error_is_cluster_error() -> None:
    assert issubclass(DuplicateTaskError, ClusterError)


def test_id_of_finished_uncached_task_can_be_reused(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: 1).with_id("reuse").submit()
    assert h.result(timeout=WAIT) == 1
    assert wait_until(lambda: is_purged(cluster, "reuse"))
    h2 = cluster.add_task(lambda: 2).with_id("reuse").submit()
    assert h2.result(timeout=WAIT) == 2


def test_builder_can_be_submitted_only_once(cluster: Cluster) -> None:
    calls: queue.SimpleQueue[int] = queue.SimpleQueue()
    b = cluster.add_task(calls.put, 1)
    h = b.submit()
    with pytest.raises((RuntimeError, ClusterError)):
        b.submit()
    h.result(timeout=WAIT)
    assert calls.get(timeout=WAIT) == 1
    with pytest.raises(queue.Empty):
        calls.get(timeout=0.2)
    assert cluster.stats().submitted == 1


# --------------------------------------------------------------------------- start time / delay


def run_time(c: Cluster, configure: Callable[[Any], Any]) -> float:
    """Submit a task configured by ``configure``; return the wall time it started."""
    h = configure(c.add_task(time.time)).submit()
    return float(h.result(timeout=WAIT))


def test_with_start_time_in_the_past_runs_asap(cluster: Cluster) -> None:
    t0 = time.time()
    started = run_time(cluster, lambda b: b.with_start_time(datetime(2000, 1, 1)))
    assert started - t0 < 1.0


def test_with_start_time_naive_future_is_local_time(cluster: Cluster) -> None:
    when = datetime.now() + timedelta(seconds=0.25)
    started = run_time(cluster, lambda b: b.with_start_time(when))
    assert started >= when.timestamp() - SLACK
    assert started - when.timestamp() < 1.0


def test_with_start_time_aware_future_waits(cluster: Cluster) -> None:
    when = datetime.now(UTC) + timedelta(seconds=0.25)
    started = run_time(cluster, lambda b: b.with_start_time(when))
    assert started >= when.timestamp() - SLACK
    assert started - when.timestamp() < 1.0


def test_with_start_time_aware_non_utc_offset_is_respected(cluster: Cluster) -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    when = datetime.now(tz) + timedelta(seconds=0.25)
    started = run_time(cluster, lambda b: b.with_start_time(when))
    assert started >= when.timestamp() - SLACK
    assert started - when.timestamp() < 1.0


@pytest.mark.parametrize("bad", ["2030-01-01", 1_900_000_000.0, None])
def test_with_start_time_non_datetime_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"start|when"):
        cluster.add_task(noop).with_start_time(bad).submit()


def test_with_delay_waits_at_least_that_long(cluster: Cluster) -> None:
    t0 = time.time()
    started = run_time(cluster, lambda b: b.with_delay(0.2))
    assert started >= t0 + 0.2 - SLACK
    assert started - t0 < 1.2


def test_with_delay_accepts_timedelta(cluster: Cluster) -> None:
    t0 = time.time()
    started = run_time(cluster, lambda b: b.with_delay(timedelta(milliseconds=200)))
    assert started >= t0 + 0.2 - SLACK
    assert started - t0 < 1.2


def test_with_delay_zero_runs_asap(cluster: Cluster) -> None:
    t0 = time.time()
    assert run_time(cluster, lambda b: b.with_delay(0)) - t0 < 1.0


@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf, timedelta(seconds=-1)])
def test_with_delay_invalid_value_raises_value_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"delay|seconds"):
        cluster.add_task(noop).with_delay(bad).submit()


@pytest.mark.parametrize("bad", ["1", None, [1]])
def test_with_delay_non_number_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"delay|seconds"):
        cluster.add_task(noop).with_delay(bad).submit()


# --------------------------------------------------------------------------- timeout


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, -math.inf, timedelta(0)])
def test_with_timeout_invalid_value_raises_value_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"timeout|seconds"):
        cluster.add_task(noop).with_timeout(bad).submit()


@pytest.mark.parametrize("bad", ["5", None])
def test_with_timeout_non_number_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"timeout|seconds"):
        cluster.add_task(noop).with_timeout(bad).submit()


def test_with_timeout_accepts_timedelta(cluster: Cluster) -> None:
    def fn() -> float:
        deadline = current().deadline
        assert deadline is not None
        return deadline - time.monotonic()

    remaining = cluster.add_task(fn).with_timeout(timedelta(seconds=3)).submit().result(WAIT)
    assert 2.0 < remaining <= 3.0


# --------------------------------------------------------------------------- priority / retry


@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None])
def test_with_priority_non_int_or_bool_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match="priority"):
        cluster.add_task(noop).with_priority(bad).submit()


def test_with_priority_accepts_negative_int(cluster: Cluster) -> None:
    h = cluster.add_task(lambda: "neg").with_priority(-10).with_cache(60).submit()
    assert h.result(timeout=WAIT) == "neg"
    assert cluster.info(h.id).priority == -10


@pytest.mark.parametrize("bad", [True, False, 1.0, "2", None])
def test_with_retry_non_int_or_bool_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match="retr"):
        cluster.add_task(noop).with_retry(bad).submit()


def test_with_retry_negative_raises_value_error(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="retr"):
        cluster.add_task(noop).with_retry(-1).submit()


# ------------------------------------------------------------------ backoff / jitter / predicate


@pytest.mark.parametrize("bad", [5, 0.5, "fixed", None])
def test_with_backoff_non_callable_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"backoff|strategy"):
        cluster.add_task(noop).with_backoff(bad).submit()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, 2, math.nan, math.inf])
def test_with_jitter_ratio_out_of_range_raises_value_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"jitter|ratio"):
        cluster.add_task(noop).with_jitter(bad).submit()


@pytest.mark.parametrize("bad", ["0.2", None])
def test_with_jitter_non_number_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"jitter|ratio"):
        cluster.add_task(noop).with_jitter(bad).submit()


@pytest.mark.parametrize("ratio", [1, 1.0, 0.5, 1e-6])
def test_with_jitter_accepts_ratio_in_range(cluster: Cluster, ratio: float) -> None:
    h = cluster.add_task(lambda: "ok").with_jitter(ratio).submit()
    assert h.result(timeout=WAIT) == "ok"


@pytest.mark.parametrize("bad", [True, "always", None, 1])
def test_retry_if_non_callable_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"predicate|retry_if"):
        cluster.add_task(noop).retry_if(bad).submit()


def test_with_retry_mode_rejects_non_member(cluster: Cluster) -> None:
    with pytest.raises((TypeError, ValueError)):
        cluster.add_task(noop).with_retry_mode("requeue").submit()  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cache / callbacks


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, timedelta(seconds=-5)])
def test_with_cache_invalid_ttl_raises_value_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        cluster.add_task(noop).with_cache(ttl=bad).submit()


def test_with_cache_non_number_ttl_raises_type_error(cluster: Cluster) -> None:
    with pytest.raises(TypeError, match="ttl"):
        cluster.add_task(noop).with_cache(ttl="300").submit()  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, "print", 3])
def test_on_complete_non_callable_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"on_complete|fn|callback"):
        cluster.add_task(noop).on_complete(bad).submit()


@pytest.mark.parametrize("bad", [None, "print", 3])
def test_on_failure_non_callable_raises_type_error(cluster: Cluster, bad: Any) -> None:
    with pytest.raises(TypeError, match=r"on_failure|fn|callback"):
        cluster.add_task(noop).on_failure(bad).submit()


def test_rejected_builders_never_reach_the_queue(cluster: Cluster) -> None:
    bad_calls: list[Callable[[], Any]] = [
        lambda: cluster.add_task(noop).with_priority(True).submit(),
        lambda: cluster.add_task(noop).with_retry(-1).submit(),
        lambda: cluster.add_task(noop).with_delay(math.nan).submit(),
        lambda: cluster.add_task(noop).with_timeout(0).submit(),
        lambda: cluster.add_task(noop).with_jitter(3).submit(),
        lambda: cluster.add_task(noop).with_backoff(None).submit(),  # type: ignore[arg-type]
        lambda: cluster.add_task(noop).with_id("").submit(),
    ]
    for call in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            call()
    s = cluster.stats()
    assert (s.submitted, s.queued, s.delayed, s.running) == (0, 0, 0, 0)


# --------------------------------------------------------------------------- backoff strategies


def test_fixed_backoff_is_constant() -> None:
    b = FixedBackoff(0.5)
    assert [b(0), b(1), b(9)] == [0.5, 0.5, 0.5]


def test_fixed_backoff_accepts_timedelta() -> None:
    assert FixedBackoff(timedelta(seconds=2))(0) == 2.0


def test_linear_backoff_is_base_plus_step_times_attempt() -> None:
    b = LinearBackoff(1, 2)
    assert LinearBackoff(1, 2)(3) == 7
    assert [b(0), b(1), b(2)] == [1, 3, 5]


def test_linear_backoff_max_caps_delay() -> None:
    b = LinearBackoff(1, 2, max=4)
    assert [b(0), b(1), b(2), b(3), b(100)] == [1, 3, 4, 4, 4]


def test_exponential_backoff_default_multiplier_is_two() -> None:
    b = ExponentialBackoff(0.5)
    assert [b(0), b(1), b(3)] == [0.5, 1.0, 4.0]


def test_exponential_backoff_custom_multiplier() -> None:
    assert ExponentialBackoff(1, 3)(2) == 9


def test_exponential_backoff_max_caps_delay() -> None:
    assert ExponentialBackoff(0.5, 2.0, 30)(10) == 30
    assert ExponentialBackoff(0.5, 2.0, max=30)(5) == 16


def test_exponential_backoff_huge_attempt_with_max_is_capped() -> None:
    assert ExponentialBackoff(1, 2.0, max=5)(10_000) == 5


def test_exponential_backoff_multiplier_below_one_raises_value_error() -> None:
    with pytest.raises(ValueError, match="multiplier"):
        ExponentialBackoff(1, 0.5)


def test_exponential_backoff_multiplier_one_is_constant() -> None:
    b = ExponentialBackoff(2, 1)
    assert [b(0), b(5)] == [2, 2]


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedBackoff(-1),
        lambda: FixedBackoff(math.nan),
        lambda: LinearBackoff(-1, 1),
        lambda: LinearBackoff(1, math.inf),
        lambda: ExponentialBackoff(-0.5),
    ],
)
def test_backoff_negative_or_non_finite_durations_raise_value_error(
    make: Callable[[], Any],
) -> None:
    with pytest.raises(ValueError):
        make()


def test_backoff_strategies_are_callable() -> None:
    for b in (FixedBackoff(1), LinearBackoff(1, 1), ExponentialBackoff(1)):
        assert callable(b)


def test_retry_mode_is_enum_with_requeue_and_immediate() -> None:
    assert issubclass(RetryMode, enum.Enum)
    assert {"REQUEUE", "IMMEDIATE"} <= {m.name for m in RetryMode}
    assert len({RetryMode.REQUEUE, RetryMode.IMMEDIATE}) == 2
