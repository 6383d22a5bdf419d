"""SPEC §17 ``cluster.metrics.prometheus_text(c)``, read back by ``prometheus_client``'s
own parser: every family and its type, counters and gauges equal to ``stats()``, the
histograms (per attempt, by task name, never by id; cumulative buckets, ``+Inf`` =
``_count``; at most 1,000 names, then ``"other"``; counting from the first use),
label escaping, and no reference kept to the cluster.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import WAIT, wait_until

from cluster import Cluster, FixedBackoff, TaskHandle, TaskTimeoutError
from cluster.metrics import BUCKETS, MAX_NAMES, OTHER, instrument, prometheus_text

parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client")

Families = dict[str, Any]


def parse(text: str) -> Families:
    """The metric families of ``text`` by name (a counter's name without ``_total``)."""
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def value(families: Families, family: str, sample: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == sample and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no sample {sample}{labels} in {family}")


def series(families: Families, family: str, name: str) -> dict[str, Any]:
    """One name's histogram: {"buckets": [(le, count)...], "sum": x, "count": n}."""
    buckets: list[tuple[float, float]] = []
    out: dict[str, Any] = {"buckets": buckets}
    for s in families[family].samples:
        if s.labels.get("name") != name:
            continue
        if s.name.endswith("_bucket"):
            buckets.append((float(s.labels["le"]), float(s.value)))
        elif s.name.endswith("_sum"):
            out["sum"] = float(s.value)
        elif s.name.endswith("_count"):
            out["count"] = float(s.value)
    return out


def names_of(families: Families, family: str) -> set[str]:
    return {s.labels["name"] for s in families[family].samples}


@pytest.fixture
def clusters() -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for c in made:
        c.cancel()


def new_cluster(made: list[Cluster], **options: Any) -> Cluster:
    c = Cluster(**options)
    made.append(c)
    return c


def ok() -> int:
    return 1


def fail() -> None:
    raise ValueError("no")


def test_every_family_is_there_with_its_type(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=2)
    text = prometheus_text(c)
    families = parse(text)
    expected = {
        "cluster_tasks_submitted": "counter",
        "cluster_tasks_finished": "counter",
        "cluster_retries": "counter",
        "cluster_dead_letters_evicted": "counter",
        "cluster_tasks": "gauge",
        "cluster_dead_letters": "gauge",
        "cluster_abandoned_threads": "gauge",
        "cluster_workers": "gauge",
        "cluster_executor_tasks": "gauge",
        "cluster_task_wait_seconds": "histogram",
        "cluster_task_run_seconds": "histogram",
    }
    assert {name: f.type for name, f in families.items()} == expected
    for name in expected:
        assert families[name].documentation, f"{name} has no HELP"
    assert text.endswith("\n")


@pytest.mark.timeout(30)
def test_counters_equal_stats(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=2)
    c.run()
    handles: list[TaskHandle[Any]] = [c.add_task(ok).submit() for _ in range(3)]
    handles.append(c.add_task(fail).with_retry(2).with_backoff(FixedBackoff(0)).submit())
    handles.append(c.add_task(time.sleep, 5).with_timeout(0.05).submit())
    cancelled = c.add_task(ok).with_delay(3600).submit()
    assert cancelled.cancel()
    for h in handles:
        assert h.wait(WAIT) is not None
    assert c.wait_idle(WAIT)
    families = parse(prometheus_text(c))
    s = c.stats()
    assert (s.succeeded, s.failed, s.cancelled, s.timed_out, s.retried) == (3, 1, 1, 1, 2)
    assert value(families, "cluster_tasks_submitted", "cluster_tasks_submitted_total") == 6
    assert value(families, "cluster_retries", "cluster_retries_total") == s.retried
    finished = "cluster_tasks_finished_total"
    for state in ("succeeded", "failed", "cancelled", "timed_out"):
        got = value(families, "cluster_tasks_finished", finished, state=state)
        assert got == getattr(s, state), state
    assert value(families, "cluster_dead_letters", "cluster_dead_letters") == s.dead_letters == 2


@pytest.mark.timeout(30)
def test_gauges_equal_stats(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=2)
    release = threading.Event()
    started = [threading.Event(), threading.Event()]

    def hold(i: int) -> None:
        started[i].set()
        release.wait(WAIT)

    c.run()
    try:
        c.add_task(hold, 0).with_key("k").submit()
        assert started[0].wait(WAIT)
        c.add_task(ok).with_key("k").submit()  # the free worker parks it: waiting
        assert wait_until(lambda: c.stats().waiting == 1)
        c.add_task(hold, 1).submit()
        assert started[1].wait(WAIT)
        c.add_task(ok).submit()  # queued: both workers are busy
        c.add_task(ok).submit()
        c.add_task(ok).with_delay(3600).submit()  # delayed
        families = parse(prometheus_text(c))
        s = c.stats()
    finally:
        release.set()
    assert (s.queued, s.delayed, s.running, s.waiting) == (2, 1, 2, 1)
    for state in ("queued", "delayed", "running", "waiting"):
        assert value(families, "cluster_tasks", "cluster_tasks", state=state) == getattr(s, state)
    workers = value(families, "cluster_workers", "cluster_workers", executor="threads")
    assert workers == s.executors["threads"].capacity == 2
    family = "cluster_executor_tasks"
    running = value(families, family, family, executor="threads", state="running")
    assert running == s.executors["threads"].running == 2


@pytest.mark.timeout(30)
def test_workers_gauge_has_one_sample_per_executor(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=3, async_limit=7)
    c.run()

    async def coro() -> int:
        await asyncio.sleep(0)
        return 2

    assert c.add_task(coro).submit().result(WAIT) == 2
    families = parse(prometheus_text(c))
    samples = {s.labels["executor"]: s.value for s in families["cluster_workers"].samples}
    assert samples == {"threads": 3, "async": 7}


@pytest.mark.timeout(30)
def test_histograms_count_each_attempt_under_its_task_name(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=2)
    instrument(c)
    c.run()
    flaky = c.add_task(fail).with_name("flaky").with_retry(2).submit()
    sleepy = [c.add_task(time.sleep, 0.05).with_name("sleepy").submit() for _ in range(3)]
    for h in [flaky, *sleepy]:
        assert h.wait(WAIT) is not None
    assert c.wait_idle(WAIT)
    families = parse(prometheus_text(c))
    for family in ("cluster_task_wait_seconds", "cluster_task_run_seconds"):
        assert names_of(families, family) == {"flaky", "sleepy"}
        assert series(families, family, "flaky")["count"] == 3  # 3 attempts, one task
        assert series(families, family, "sleepy")["count"] == 3
    run = series(families, "cluster_task_run_seconds", "sleepy")
    assert run["sum"] >= 3 * 0.05
    assert dict(run["buckets"])[0.025] == 0  # each ran >= 50 ms
    ids = {flaky.id, *(h.id for h in sleepy)}
    labels = {v for f in families.values() for s in f.samples for v in s.labels.values()}
    assert not ids & labels, "a task id became a label value"


@pytest.mark.timeout(30)
def test_histogram_buckets_are_cumulative_and_end_at_count(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=2)
    instrument(c)
    c.run()
    durations = [0.0, 0.002, 0.02, 0.2, 0.0, 0.03]
    for d in durations:
        c.add_task(time.sleep, d).with_name("mixed").submit()
    assert c.wait_idle(WAIT)
    families = parse(prometheus_text(c))
    for family in ("cluster_task_wait_seconds", "cluster_task_run_seconds"):
        h = series(families, family, "mixed")
        bounds = [le for le, _ in h["buckets"]]
        assert bounds == [*BUCKETS, float("inf")]
        counts = [n for _, n in h["buckets"]]
        assert counts == sorted(counts), "buckets must be cumulative"
        assert counts[-1] == h["count"] == len(durations)
        assert h["sum"] >= 0
    run = series(families, "cluster_task_run_seconds", "mixed")
    assert run["sum"] >= sum(durations)
    assert dict(run["buckets"])[0.1] < len(durations)  # the 0.2 s one is above 0.1


@pytest.mark.timeout(60)
def test_more_than_1000_names_go_to_other(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=2)
    instrument(c)
    extra = 7
    for i in range(MAX_NAMES + extra):
        c.add_task(ok).with_name(f"job-{i:04d}").submit()
    c.run()
    assert c.wait_idle(30)
    families = parse(prometheus_text(c))
    for family in ("cluster_task_wait_seconds", "cluster_task_run_seconds"):
        names = names_of(families, family)
        assert len(names) == MAX_NAMES + 1
        assert OTHER in names
        total = sum(series(families, family, n)["count"] for n in names)
        assert total == MAX_NAMES + extra
        assert series(families, family, OTHER)["count"] == extra


@pytest.mark.timeout(30)
def test_label_values_are_escaped(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=1)
    instrument(c)
    c.run()
    name = 'a "quoted" back\\slash\nnew line {brace} 100%'
    assert c.add_task(ok).with_name(name).submit().result(WAIT) == 1
    assert c.wait_idle(WAIT)
    text = prometheus_text(c)
    assert "\nnew line" not in text  # the newline is escaped, not written
    families = parse(text)
    assert names_of(families, "cluster_task_run_seconds") == {name}


@pytest.mark.timeout(30)
def test_histograms_count_from_the_first_use(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=1)
    c.run()
    assert c.add_task(ok).with_name("before").submit().result(WAIT) == 1
    assert c.wait_idle(WAIT)
    first = parse(prometheus_text(c))  # attaches the observer
    assert names_of(first, "cluster_task_run_seconds") == set()
    assert c.add_task(ok).with_name("after").submit().result(WAIT) == 1
    assert c.wait_idle(WAIT)
    families = parse(prometheus_text(c))
    assert names_of(families, "cluster_task_run_seconds") == {"after"}
    submitted = value(families, "cluster_tasks_submitted", "cluster_tasks_submitted_total")
    assert submitted == 2  # the counters count from the cluster's creation


@pytest.mark.timeout(30)
def test_instrument_twice_counts_each_attempt_once(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=1)
    instrument(c)
    instrument(c)
    prometheus_text(c)
    c.run()
    assert c.add_task(ok).with_name("once").submit().result(WAIT) == 1
    assert c.wait_idle(WAIT)
    families = parse(prometheus_text(c))
    assert series(families, "cluster_task_run_seconds", "once")["count"] == 1


@pytest.mark.timeout(30)
def test_timed_out_and_failed_attempts_are_observed(clusters: list[Cluster]) -> None:
    c = new_cluster(clusters, workers=1)
    instrument(c)
    c.run()
    h = c.add_task(time.sleep, 0.3).with_name("slow").with_timeout(0.05).submit()
    with pytest.raises(TaskTimeoutError):
        h.result(WAIT)
    # The abandoned attempt is reported when its call returns (about 0.3 s after start).
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        families = parse(prometheus_text(c))
        if "slow" in names_of(families, "cluster_task_run_seconds"):
            break
        time.sleep(0.02)
    assert series(families, "cluster_task_run_seconds", "slow")["count"] == 1


def test_prometheus_text_needs_a_cluster() -> None:
    with pytest.raises(TypeError, match="Cluster"):
        prometheus_text("not a cluster")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Cluster"):
        instrument(None)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_metrics_keep_no_reference_to_the_cluster() -> None:
    c = Cluster(workers=1)
    c.run()
    prometheus_text(c)
    c.stop()
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None
