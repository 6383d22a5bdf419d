"""SPEC §13 with real worker threads: dead letters and per-name statistics.

Which tasks become dead letters (FAILED or TIMED_OUT; never cancelled ones), what a
``DeadLetter`` holds, ``dead_letters()`` order, filter and paging, the bound
(``Cluster(dead_letters=N)``, evictions counted and logged, 0 keeps none), frame
locals released once the Result is delivered while ``error_text`` stays,
``resurrect`` (same id, call and options, attempts from 0; refused for unknown or
taken ids, all or none; racing ``clear_dead_letters``; a process task), and
``clear_dead_letters``; ``stats_by_name()`` against ``stats()``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _dead_letter_tasks import fail_unless_exists
from _helpers import wait_until
from _keys_helpers import START, WAIT, Clusters, Tracker, take
from _semantics_tasks import eventually
from conftest import EventFactory

from cluster import (
    UNLIMITED,
    Cluster,
    ClusterStoppedError,
    DeadLetter,
    DuplicateTaskError,
    FixedBackoff,
    NameStats,
    ProcessExecutor,
    QueueFullError,
    RetryMode,
    StopRetrying,
    TaskCancelledError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
    current,
)


@pytest.fixture
def clusters(new_event: EventFactory) -> Iterator[Clusters]:
    made = Clusters()
    yield made
    new_event.release_all()
    made.close()


class Planned(Exception):
    """A task's planned failure."""


def explode(tag: str = "") -> None:
    raise Planned(f"exploded {tag}")


class Flaky:
    """A task function that fails until ``healed`` is set; records every call."""

    def __init__(self) -> None:
        self.healed = threading.Event()
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], int]] = []
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls.append((args, kwargs, current().attempt))
        if not self.healed.is_set():
            raise Planned(f"not healed (attempt {current().attempt})")
        return (args, kwargs)


def dead_ids(c: Cluster, **kwargs: Any) -> list[str]:
    return [d.id for d in c.dead_letters(**kwargs)]


# ---------------------------------------------------------------- which tasks become dead letters


def test_a_task_that_used_up_its_retries_is_a_dead_letter(clusters: Clusters) -> None:
    c = clusters.make(1)
    h = c.add_task(explode, "r").with_retry(2).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, Planned)
    (dead,) = c.dead_letters()
    assert isinstance(dead, DeadLetter)
    assert dead.id == h.id and dead.attempts == 3
    assert dead.error is result.error
    assert c.stats().dead_letters == 1


def test_a_final_error_without_retries_is_a_dead_letter(clusters: Clusters) -> None:
    c = clusters.make(1)
    plain = c.add_task(explode).submit()
    refused = c.add_task(explode).with_retry(5).retry_if(lambda e: False).submit()

    def stop_now() -> None:
        raise StopRetrying() from ValueError("bad input")

    stopped = c.add_task(stop_now).with_retry(5).submit()
    for h in (plain, refused, stopped):
        h.wait(WAIT)
    letters = {d.id: d for d in c.dead_letters()}
    assert set(letters) == {plain.id, refused.id, stopped.id}
    assert letters[plain.id].attempts == 1 and letters[refused.id].attempts == 1
    assert isinstance(letters[stopped.id].error, ValueError)  # the cause, as the Result has it


def test_a_task_that_timed_out_is_a_dead_letter(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)

    def patient() -> None:
        current().cancelled.wait(WAIT)

    h = c.add_task(patient).with_timeout(1).with_name("patient").submit()
    eventually(lambda: c.info(h.id).state is TaskState.RUNNING, "the attempt")
    clock.advance(1)
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, TaskTimeoutError)
    (dead,) = c.dead_letters()
    assert dead.id == h.id and dead.error is result.error and dead.name == "patient"
    assert [i.state for i in c.tasks(state=TaskState.TIMED_OUT)] == [TaskState.TIMED_OUT]


def test_cancelled_tasks_are_never_dead_letters(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    queued = c.add_task(explode).with_delay(3600).submit()
    started = new_event()

    def cooperative() -> None:
        started.set()
        current().cancelled.wait(WAIT)
        raise Planned("raised after the cancel")

    running = c.add_task(cooperative).submit()
    assert started.wait(WAIT)
    assert queued.cancel() and running.cancel()
    waiting_retry = c.add_task(explode).with_retry(1).with_backoff(FixedBackoff(3600)).submit()
    eventually(lambda: c.info(waiting_retry.id).state is TaskState.RETRYING, "the retry")
    assert waiting_retry.cancel()
    later = c.add_task(explode).with_delay(3600).submit()
    c.stop(timeout=WAIT, cancel_pending=True)
    assert isinstance(later.wait(0).error, TaskCancelledError)  # type: ignore[union-attr]
    assert c.dead_letters() == [] and c.stats().dead_letters == 0
    assert c.stats().cancelled == 4


def test_successful_tasks_are_not_dead_letters(clusters: Clusters) -> None:
    c = clusters.make(1)
    flaky = Flaky()
    flaky.healed.set()
    c.add_task(int).submit().result(WAIT)
    c.add_task(flaky).with_retry(1).submit().result(WAIT)
    assert c.dead_letters() == []


def test_a_dead_letter_holds_what_happened(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)
    h = (
        c.add_task(explode, "loudly")
        .with_id("job-1")
        .with_name("exploder")
        .with_tags("a", "b")
        .with_retry(1)
        .with_backoff(FixedBackoff(30))
        .submit()
    )
    eventually(lambda: c.info(h.id).state is TaskState.RETRYING, "the retry")
    clock.advance(30)
    result = h.wait(WAIT)
    assert result is not None
    (dead,) = c.dead_letters()
    assert (dead.id, dead.name, dead.tags) == ("job-1", "exploder", ("a", "b"))
    assert dead.error is result.error and str(dead.error) == "exploded loudly"
    assert dead.attempts == 2
    assert dead.submitted_at == START
    assert dead.failed_at == START + timedelta(seconds=30)
    assert dead.error_text.startswith("Traceback (most recent call last):")
    assert "in explode" in dead.error_text
    assert "Planned: exploded loudly" in dead.error_text


def test_the_default_name_of_a_dead_letter_is_the_functions(clusters: Clusters) -> None:
    c = clusters.make(1)
    c.add_task(explode).submit().wait(WAIT)
    assert [d.name for d in c.dead_letters()] == ["explode"]


# ---------------------------------------------------------------- listing, bound, eviction


def test_dead_letters_are_newest_first_filtered_by_name_and_paged(clusters: Clusters) -> None:
    c = clusters.make(1)
    order = []
    for i in range(12):
        name = "even" if i % 2 == 0 else "odd"
        h = c.add_task(explode, str(i)).with_name(name).submit()
        h.wait(WAIT)
        order.append((h.id, name))
    newest = [tid for tid, _ in reversed(order)]
    assert dead_ids(c) == newest
    assert dead_ids(c, name="even") == [tid for tid, n in reversed(order) if n == "even"]
    assert dead_ids(c, name="nobody") == []
    assert dead_ids(c, limit=5) == newest[:5]
    assert dead_ids(c, limit=5, offset=5) == newest[5:10]
    assert dead_ids(c, limit=5, offset=10) == newest[10:]
    assert (
        dead_ids(c, name="odd", limit=2, offset=1)
        == [tid for tid, n in reversed(order) if n == "odd"][1:3]
    )
    assert c.dead_letters(limit=0) == [] and c.dead_letters(offset=100) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"limit": -1}, ValueError, "limit"),
        ({"offset": -1}, ValueError, "offset"),
        ({"limit": "5"}, TypeError, "limit"),
        ({"name": 5}, TypeError, "name"),
    ],
)
def test_dead_letters_rejects_bad_arguments(
    clusters: Clusters, kwargs: dict[str, Any], error: type, word: str
) -> None:
    with pytest.raises(error, match=word):
        clusters.make(1, run=False).dead_letters(**kwargs)


def test_only_the_newest_dead_letters_are_kept_and_evictions_are_counted_and_logged(
    clusters: Clusters, caplog: pytest.LogCaptureFixture
) -> None:
    c = clusters.make(1, dead_letters=3)
    with caplog.at_level(logging.WARNING, logger="cluster"):
        handles = [c.add_task(explode, str(i)).submit() for i in range(5)]
        for h in handles:
            h.wait(WAIT)
        eventually(lambda: c.stats().dead_letters_evicted == 2, "two evictions")
        eventually(lambda: len(_evictions(caplog)) == 2, "two eviction logs")
    assert dead_ids(c) == [h.id for h in reversed(handles[2:])]
    stats = c.stats()
    assert stats.dead_letters == 3 and stats.dead_letters_evicted == 2
    logged = _evictions(caplog)
    assert handles[0].id in logged[0].getMessage() and handles[1].id in logged[1].getMessage()
    assert all(r.name == "cluster" and r.levelno == logging.WARNING for r in logged)


def _evictions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "evicted" in r.getMessage()]


def test_dead_letters_zero_keeps_none(clusters: Clusters) -> None:
    c = clusters.make(1, dead_letters=0)
    h = c.add_task(explode).submit()
    result = h.wait(WAIT)
    assert result is not None and isinstance(result.error, Planned)
    assert c.dead_letters() == [] and c.stats().dead_letters == 0
    assert c.stats().dead_letters_evicted == 0
    assert c.stats_by_name()["explode"].dead == 0
    with pytest.raises(TaskNotFoundError):
        c.resurrect(h.id)


@pytest.mark.parametrize("value", [-1, 1.5, "3", None])
def test_a_bad_dead_letters_bound_is_refused(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="dead_letters"):
        Cluster(workers=1, dead_letters=value)


# ---------------------------------------------------------------- frames


class Bulky:
    """Something a failing frame holds."""


def _raising_with_a_local(refs: list[weakref.ref[Bulky]]) -> None:
    local = Bulky()
    refs.append(weakref.ref(local))
    raise Planned("with a bulky local")


async def _async_raising_with_a_local(refs: list[weakref.ref[Bulky]]) -> None:
    local = Bulky()
    refs.append(weakref.ref(local))
    await asyncio.sleep(0)
    raise Planned("with a bulky local")


def _released(ref: weakref.ref[Bulky]) -> bool:
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("callback", [False, True], ids=["plain", "with-callback"])
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_frame_locals_of_a_dead_letter_are_released_once_its_result_is_delivered(
    clusters: Clusters, kind: str, callback: bool
) -> None:
    c = clusters.make(1)
    refs: list[weakref.ref[Bulky]] = []
    fn: Any = _raising_with_a_local if kind == "thread" else _async_raising_with_a_local
    builder = c.add_task(fn, refs)
    if callback:
        builder = builder.on_failure(lambda tid, err: None)
    h = builder.submit()
    result = h.wait(WAIT)  # the Result (and its error) stay referenced here
    assert result is not None and isinstance(result.error, Planned)
    assert wait_until(lambda: _released(refs[0])), "the raising frame's local is still alive"
    (dead,) = c.dead_letters()
    assert dead.error is result.error
    assert fn.__name__ in dead.error_text and "with a bulky local" in dead.error_text


def _unlimited_with_a_local(refs: list[weakref.ref[Bulky]]) -> None:
    local = Bulky()
    refs.append(weakref.ref(local))
    raise ConnectionError("down, with a bulky local")


@pytest.mark.parametrize("mode", [RetryMode.REQUEUE, RetryMode.IMMEDIATE])
def test_frame_locals_of_a_dead_letter_made_by_stop_are_released(
    clusters: Clusters, mode: RetryMode
) -> None:
    c = clusters.make(1)
    refs: list[weakref.ref[Bulky]] = []
    h = (
        c.add_task(_unlimited_with_a_local, refs)
        .with_retry(UNLIMITED)
        .with_backoff(FixedBackoff(3600))
        .with_retry_mode(mode)
        .submit()
    )
    eventually(lambda: c.info(h.id).state is TaskState.RETRYING, "the retry's wait")
    c.stop(timeout=WAIT)
    result = h.wait(0)
    assert result is not None and isinstance(result.error, ConnectionError)
    assert dead_ids(c) == [h.id]
    assert wait_until(lambda: _released(refs[-1]), 2), "the raising frame's local is alive"


# ---------------------------------------------------------------- resurrect


def test_resurrect_submits_the_same_call_with_the_same_id_and_options(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    flaky = Flaky()
    gate = new_event()

    def on_success_wait(*args: Any, **kwargs: Any) -> Any:
        value = flaky(*args, **kwargs)
        assert gate.wait(WAIT)
        return value

    h = (
        c.add_task(on_success_wait, 1, "two", three=3)
        .with_id("job")
        .with_name("flaky-job")
        .with_tags("t1")
        .with_key("k")
        .with_priority(7)
        .with_retry(1)
        .submit()
    )
    h.wait(WAIT)
    assert dead_ids(c) == ["job"] and len(flaky.calls) == 2
    flaky.healed.set()
    (again,) = c.resurrect("job")
    assert again.id == "job"
    assert dead_ids(c) == [] and c.stats().dead_letters == 0
    eventually(lambda: len(flaky.calls) == 3, "the resurrected attempt")
    info = c.info("job")
    assert info.state is TaskState.RUNNING and info.attempts == 1
    assert (info.name, info.tags, info.key, info.priority, info.retries) == (
        "flaky-job", ("t1",), "k", 7, 1
    )  # fmt: skip
    gate.set()
    assert again.result(WAIT) == ((1, "two"), {"three": 3})
    assert [attempt for _, _, attempt in flaky.calls] == [0, 1, 0]


def test_a_resurrected_task_keeps_its_retry_rule_and_counts_attempts_from_zero(
    clusters: Clusters,
) -> None:
    c = clusters.make(1)
    attempts: list[int] = []

    def always_down() -> None:
        attempts.append(current().attempt)
        raise ConnectionError("down")

    h = c.add_task(always_down).with_retry_rule(ConnectionError, retries=2).submit()
    h.wait(WAIT)
    assert c.dead_letters()[0].attempts == 3
    (again,) = c.resurrect(h.id)
    result = again.wait(WAIT)
    assert result is not None and isinstance(result.error, ConnectionError)
    assert attempts == [0, 1, 2, 0, 1, 2]
    (dead,) = c.dead_letters()  # a dead letter again, the newer one
    assert dead.id == h.id and dead.attempts == 3 and dead.error is result.error


def test_a_resurrected_task_is_listed_as_the_newest(clusters: Clusters) -> None:
    c = clusters.make(1)
    old = c.add_task(explode).submit()
    old.wait(WAIT)
    newer = c.add_task(int).with_delay(3600).submit()
    (again,) = c.resurrect(old.id)
    again.wait(WAIT)  # fails again: a dead letter again
    assert [i.id for i in c.tasks()] == [old.id, newer.id]
    assert c.count_tasks() == 2


def test_resurrect_of_several_ids_returns_their_handles_in_order(clusters: Clusters) -> None:
    c = clusters.make(2)
    flaky = Flaky()
    handles = [c.add_task(flaky, i).submit() for i in range(3)]
    for h in handles:
        h.wait(WAIT)
    flaky.healed.set()
    again = c.resurrect(handles[2].id, handles[0].id)
    assert [h.id for h in again] == [handles[2].id, handles[0].id]
    assert [h.result(WAIT) for h in again] == [((2,), {}), ((0,), {})]
    assert dead_ids(c) == [handles[1].id]


def test_resurrect_of_an_id_that_is_not_a_dead_letter_raises_task_not_found(
    clusters: Clusters,
) -> None:
    c = clusters.make(1)
    live = c.add_task(int).with_delay(3600).submit()
    ok = c.add_task(int).with_cache(60).submit()
    ok.result(WAIT)
    for tid in ("never", live.id, ok.id):
        with pytest.raises(TaskNotFoundError):
            c.resurrect(tid)
    with pytest.raises(TypeError):
        c.resurrect(3)  # type: ignore[arg-type]


def test_resurrect_of_an_id_taken_again_raises_duplicate_and_submits_nothing(
    clusters: Clusters,
) -> None:
    c = clusters.make(1)
    a = c.add_task(explode).with_id("a").submit()
    b = c.add_task(explode).with_id("b").submit()
    a.wait(WAIT)
    b.wait(WAIT)
    taker = c.add_task(int).with_id("b").with_delay(3600).submit()  # a dead letter reserves no id
    submitted = c.stats().submitted
    with pytest.raises(DuplicateTaskError):
        c.resurrect("b")
    with pytest.raises(DuplicateTaskError):
        c.resurrect("a", "b")  # all or none
    assert c.stats().submitted == submitted
    assert sorted(dead_ids(c)) == ["a", "b"]
    assert [i.state for i in c.tasks() if i.id == "a"] == [TaskState.FAILED]
    taker.cancel()  # the id is free again (not cached)
    assert [h.id for h in c.resurrect("a", "b")] == ["a", "b"]


def test_resurrect_with_an_unknown_id_among_others_submits_nothing(clusters: Clusters) -> None:
    c = clusters.make(1)
    a = c.add_task(explode).submit()
    a.wait(WAIT)
    submitted = c.stats().submitted
    with pytest.raises(TaskNotFoundError):
        c.resurrect(a.id, "missing")
    with pytest.raises((ValueError, DuplicateTaskError)):
        c.resurrect(a.id, a.id)
    assert c.stats().submitted == submitted and dead_ids(c) == [a.id]


def test_resurrect_on_a_stopped_cluster_raises_cluster_stopped(clusters: Clusters) -> None:
    c = clusters.make(1)
    h = c.add_task(explode).submit()
    h.wait(WAIT)
    c.stop(timeout=WAIT)
    with pytest.raises(ClusterStoppedError):
        c.resurrect(h.id)
    assert dead_ids(c) == [h.id]


def _race_resurrect_and_clear(c: Cluster) -> None:
    """Two threads: one resurrects 100 dead letters one by one, the other clears them
    one by one from the other end; each id must be done exactly once."""
    flaky = Flaky()
    handles = [c.add_task(flaky, i).with_id(f"d{i}").submit() for i in range(100)]
    for h in handles:
        h.wait(WAIT)
    flaky.healed.set()  # a resurrected task succeeds: it never comes back as a dead letter
    barrier = threading.Barrier(2, timeout=WAIT)
    resurrected: list[str] = []
    cleared: list[str] = []
    unexpected: list[BaseException] = []

    def resurrecter() -> None:
        barrier.wait()
        for h in handles:
            try:
                resurrected.extend(x.id for x in c.resurrect(h.id))
            except TaskNotFoundError:
                pass
            except BaseException as exc:  # anything else is a failure
                unexpected.append(exc)

    def clearer() -> None:
        barrier.wait()
        for h in reversed(handles):
            try:
                if c.clear_dead_letters(h.id) == 1:
                    cleared.append(h.id)
            except BaseException as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=resurrecter), threading.Thread(target=clearer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 4)
    assert unexpected == []
    assert set(resurrected).isdisjoint(cleared)
    assert sorted(resurrected + cleared) == sorted(h.id for h in handles)
    assert c.dead_letters() == []
    assert c.wait_idle(WAIT)
    calls = Counter(args[0] for args, _, _ in flaky.calls)
    assert all(calls[int(tid[1:])] == 2 for tid in resurrected)
    assert all(calls[int(tid[1:])] == 1 for tid in cleared)


@pytest.mark.timeout(120)
def test_resurrect_racing_clear_dead_letters_does_each_id_once(clusters: Clusters) -> None:
    for _ in range(5):
        _race_resurrect_and_clear(clusters.make(2))


def test_clear_dead_letters_returns_how_many_it_forgot(clusters: Clusters) -> None:
    c = clusters.make(1)
    hs = [c.add_task(explode).submit() for _ in range(5)]
    for h in hs:
        h.wait(WAIT)
    assert c.clear_dead_letters(hs[0].id, "unknown", hs[1].id) == 2
    assert c.clear_dead_letters(hs[0].id) == 0
    assert dead_ids(c) == [h.id for h in reversed(hs[2:])]
    assert c.clear_dead_letters() == 3
    assert c.dead_letters() == [] and c.clear_dead_letters() == 0
    assert c.stats().dead_letters == 0
    with pytest.raises(TaskNotFoundError):
        c.resurrect(hs[2].id)


def test_a_dead_letter_does_not_keep_a_new_task_from_taking_its_id(clusters: Clusters) -> None:
    c = clusters.make(1)
    c.add_task(explode).with_id("x").submit().wait(WAIT)
    assert c.add_task(int, 4).with_id("x").submit().result(WAIT) == 4
    assert dead_ids(c) == ["x"]


@pytest.mark.timeout(120)
def test_a_dead_letter_of_a_process_task_can_be_resurrected(
    clusters: Clusters, tmp_path: Path
) -> None:
    c = clusters.make(1, executors={"cpu": ProcessExecutor(1)})
    flag = tmp_path / "ready"
    h = c.add_task(fail_unless_exists, str(flag), 42).with_executor("cpu").submit()
    result = h.wait(60)
    assert result is not None and isinstance(result.error, FileNotFoundError)
    (dead,) = c.dead_letters()
    assert dead.name == "fail_unless_exists" and "is not there yet" in dead.error_text
    flag.touch()
    (again,) = c.resurrect(h.id)
    assert again.result(60) == 42
    assert c.dead_letters() == []


def test_resurrect_respects_max_pending(clusters: Clusters) -> None:
    c = clusters.make(1, max_pending=1, on_full="reject")
    h = c.add_task(explode).submit()
    h.wait(WAIT)
    c.add_task(int).with_delay(3600).submit()  # the one pending task allowed
    with pytest.raises(QueueFullError):
        c.resurrect(h.id)


# ---------------------------------------------------------------- stats_by_name


def test_stats_by_name_counts_per_name_and_sums_to_stats(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c, clock = clusters.fake(3)
    t = Tracker()
    gate = new_event()

    def patient() -> None:
        current().cancelled.wait(WAIT)

    for _ in range(3):
        c.add_task(int).with_name("ok").submit().result(WAIT)
    for _ in range(2):
        c.add_task(explode).with_name("bad").submit().wait(WAIT)
    c.add_task(explode).submit().wait(WAIT)  # default name "explode"
    c.add_task(int).submit().result(WAIT)  # default name "int"
    slow = c.add_task(patient).with_name("slow").with_timeout(5).submit()
    eventually(lambda: c.info(slow.id).state is TaskState.RUNNING, "the slow attempt")
    clock.advance(5)
    slow.wait(WAIT)
    c.add_task(int).with_name("gone").with_delay(100).submit().cancel()
    busy = c.add_task(t.body("busy", gate=gate)).with_name("busy").submit()
    assert take(t.started) == "busy"
    c.add_task(int).with_name("busy").with_delay(100).submit()
    by = c.stats_by_name()
    assert by["ok"] == NameStats(active=0, dead=0, succeeded=3, failed=0, cancelled=0, timed_out=0)
    assert by["bad"] == NameStats(active=0, dead=2, succeeded=0, failed=2, cancelled=0, timed_out=0)
    assert by["explode"] == NameStats(
        active=0, dead=1, succeeded=0, failed=1, cancelled=0, timed_out=0
    )
    assert by["int"].succeeded == 1
    assert by["slow"] == NameStats(
        active=0, dead=1, succeeded=0, failed=0, cancelled=0, timed_out=1
    )
    assert by["gone"] == NameStats(
        active=0, dead=0, succeeded=0, failed=0, cancelled=1, timed_out=0
    )
    assert by["busy"] == NameStats(
        active=2, dead=0, succeeded=0, failed=0, cancelled=0, timed_out=0
    )
    stats = c.stats()
    for field in ("succeeded", "failed", "cancelled", "timed_out"):
        assert sum(getattr(s, field) for s in by.values()) == getattr(stats, field), field
    assert sum(s.dead for s in by.values()) == stats.dead_letters == 4
    assert (
        sum(s.active for s in by.values())
        == stats.queued + stats.delayed + stats.running + stats.waiting
    )
    gate.set()
    busy.result(WAIT)
    assert c.stats_by_name()["busy"].active == 1 and c.stats_by_name()["busy"].succeeded == 1


def test_dead_gauges_follow_clear_and_resurrect_while_counters_stay(clusters: Clusters) -> None:
    c = clusters.make(1)
    flaky = Flaky()
    hs = [c.add_task(flaky).with_name("f").submit() for _ in range(3)]
    for h in hs:
        h.wait(WAIT)
    assert c.stats_by_name()["f"].dead == 3
    c.clear_dead_letters(hs[0].id)
    assert c.stats_by_name()["f"].dead == 2
    flaky.healed.set()
    (again,) = c.resurrect(hs[1].id)
    again.result(WAIT)
    f = c.stats_by_name()["f"]
    assert (f.dead, f.failed, f.succeeded, f.active) == (1, 3, 1, 0)


def test_stats_by_name_of_a_new_cluster_is_empty(clusters: Clusters) -> None:
    assert clusters.make(1, run=False).stats_by_name() == {}


def test_stats_by_name_shows_queued_tasks_as_active_under_their_default_names(
    clusters: Clusters,
) -> None:
    c = clusters.make(1, run=False)
    for _ in range(2):
        c.add_task(explode).submit()
    c.add_task(Flaky()).submit()
    by = c.stats_by_name()
    assert by["explode"].active == 2 and by["Flaky"].active == 1


# ---------------------------------------------------------------- ids, callbacks, tasks


def test_resurrect_waits_for_a_cached_failure_to_free_its_id(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)
    h = c.add_task(explode).with_cache(10).submit()
    h.wait(WAIT)
    with pytest.raises(DuplicateTaskError):  # the cached Result still holds the id
        c.resurrect(h.id)
    clock.advance(10)
    with pytest.raises(TaskNotFoundError):  # purged now
        c.info(h.id)
    (again,) = c.resurrect(h.id)
    result = again.wait(WAIT)
    assert result is not None and isinstance(result.error, Planned)


def test_resurrect_right_after_the_cache_time_passed_succeeds(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)
    for _ in range(20):
        h = c.add_task(explode).with_cache(10).submit()
        h.wait(WAIT)
        clock.advance(10)
        (again,) = c.resurrect(h.id)
        again.wait(WAIT)


def test_an_id_that_fails_twice_keeps_its_newest_dead_letter(clusters: Clusters) -> None:
    c = clusters.make(1)
    first = c.add_task(explode, "first").with_id("x").submit().wait(WAIT)
    second = c.add_task(explode, "second").with_id("x").submit().wait(WAIT)
    assert first is not None and second is not None
    (dead,) = c.dead_letters()
    assert dead.id == "x" and dead.error is second.error
    assert [(i.id, i.state) for i in c.tasks()] == [("x", TaskState.FAILED)]
    assert c.stats().dead_letters == 1 and c.stats_by_name()["explode"].dead == 1


def test_an_on_failure_callback_may_resurrect_its_own_task(clusters: Clusters) -> None:
    c = clusters.make(2)
    again: list[Any] = []
    done = threading.Event()

    def on_failure(task_id: str, error: BaseException) -> None:
        if not again:
            again.extend(c.resurrect(task_id))  # a cluster method, from a callback
        else:
            done.set()

    c.add_task(explode).with_id("phoenix").on_failure(on_failure).submit().wait(WAIT)
    assert done.wait(WAIT)
    assert [h.id for h in again] == ["phoenix"]
    assert dead_ids(c) == ["phoenix"]
    assert c.stats_by_name()["explode"].failed == 2


def test_the_dead_letter_methods_may_be_called_from_a_task(clusters: Clusters) -> None:
    c = clusters.make(2)
    c.add_task(explode).with_id("old").submit().wait(WAIT)

    def inspect_from_inside() -> tuple[Any, ...]:
        letters = [d.id for d in c.dead_letters()]
        names = sorted(c.stats_by_name())
        (again,) = c.resurrect("old")
        listed = [i.id for i in c.tasks()]
        return letters, names, again.id, listed, c.clear_dead_letters("nope")

    letters, names, again, listed, cleared = c.add_task(inspect_from_inside).submit().result(WAIT)
    assert letters == ["old"] and "explode" in names and again == "old"
    assert "old" in listed and cleared == 0
