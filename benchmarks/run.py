"""Benchmark runner: ``python3 -m benchmarks.run [--quick] [--only NAME] [--json PATH]``.

Every scenario runs, in one process, for ``cluster``, for
``concurrent.futures.ThreadPoolExecutor`` ("tpe") and for the minimal priority pool
in ``benchmarks.baselines`` ("plain"), where the comparison makes sense. Each
scenario is a set of functions ``size -> {metric: value}``, one per implementation;
every function runs ``--repeats`` times (default 3, implementations interleaved,
``gc.collect()`` between runs; the memory scenario runs once by default and takes
three timing samples instead) and the table shows the median with the min-max of the
runs, and the ratio cluster/tpe of the medians. Metric names carry their unit.
Results are also written as JSON (``--json PATH``, default
``benchmarks/results/latest.json``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from queue import SimpleQueue
from time import perf_counter
from typing import Any

from benchmarks._report import DASH, fmt
from benchmarks.baselines import BlockedExecutor, PlainPool

#: A runner's output: one value per metric, or several samples of it taken in one run.
Metrics = dict[str, float | list[float]]
Runner = Callable[[int], Metrics]

IMPLS = ("cluster", "tpe", "plain")
DEFAULT_REPEATS = 3
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
STOP_TIMEOUT = 600.0  # generous bound on a graceful stop, so a bug cannot hang the run
HOUR = 3600.0
SMALL_BATCH = 1000  # submits timed into an empty queue and on top of the backlog
BATCHES = 9  # SMALL_BATCH timings per memory run (that scenario runs once: 1M is slow)
TPE_MEMORY_DIVISOR = 10  # tpe's memory reference queues n / 10 items (~1.8 kB each)
TIMEOUT = 0.05  # scenario "timeout": per-attempt timeout
BLOCK_CAP = 120.0  # a blocked task gives up after this long even if never released


class BenchmarkError(RuntimeError):
    """A run finished but its outcome was wrong (a lost task, a wrong result...)."""


def noop() -> None:
    """The no-op task shared by every scenario."""


class _Hits:
    """A callback that counts its calls (``list.append`` is atomic under the GIL)."""

    def __init__(self) -> None:
        self.calls: list[None] = []

    def __call__(self, *args: object) -> None:
        self.calls.append(None)

    def __len__(self) -> int:
        return len(self.calls)


def _us_per(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (which must not be empty)."""
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkError(message)


# ---------------------------------------------------------------------------
# 1. throughput: end-to-end at 1/2/4 workers, submit-only and drain-only at 4


def _cluster_e2e(n: int, workers: int) -> float:
    from cluster import Cluster

    c = Cluster(workers=workers)
    c.run()
    t0 = perf_counter()
    for _ in range(n):
        c.add_task(noop).submit()
    c.stop(timeout=STOP_TIMEOUT)
    elapsed = perf_counter() - t0
    _check(c.stats().succeeded == n, f"cluster ran {c.stats().succeeded} of {n} tasks")
    return _us_per(elapsed, n)


def throughput_cluster(n: int) -> Metrics:
    """``c.add_task(noop).submit()`` n times, then ``stop()``; µs per task."""
    from cluster import Cluster

    out: Metrics = {f"e2e_w{w}_us": _cluster_e2e(n, w) for w in (1, 2, 4)}
    gc.collect()
    c = Cluster(workers=4)
    t0 = perf_counter()
    for _ in range(n):
        c.add_task(noop).submit()
    t1 = perf_counter()
    c.run()
    c.stop(timeout=STOP_TIMEOUT)
    t2 = perf_counter()
    _check(c.stats().succeeded == n, f"cluster ran {c.stats().succeeded} of {n} tasks")
    out["submit_us"] = _us_per(t1 - t0, n)
    out["drain_us"] = _us_per(t2 - t1, n)
    return out


def _tpe_e2e(n: int, workers: int) -> float:
    ex = ThreadPoolExecutor(max_workers=workers)
    t0 = perf_counter()
    for _ in range(n):
        ex.submit(noop)
    ex.shutdown(wait=True)
    return _us_per(perf_counter() - t0, n)


def throughput_tpe(n: int) -> Metrics:
    """``ex.submit(noop)`` n times, then ``shutdown(wait=True)``; µs per task."""
    out: Metrics = {f"e2e_w{w}_us": _tpe_e2e(n, w) for w in (1, 2, 4)}
    gc.collect()
    blocked = BlockedExecutor(4)
    ex = blocked.executor
    t0 = perf_counter()
    for _ in range(n):
        ex.submit(noop)
    t1 = perf_counter()
    blocked.release()
    ex.shutdown(wait=True)
    t2 = perf_counter()
    out["submit_us"] = _us_per(t1 - t0, n)
    out["drain_us"] = _us_per(t2 - t1, n)
    return out


def _plain_e2e(n: int, workers: int) -> float:
    pool = PlainPool(workers)
    pool.start()
    t0 = perf_counter()
    for _ in range(n):
        pool.submit(noop)
    pool.shutdown(wait=True)
    return _us_per(perf_counter() - t0, n)


def throughput_plain(n: int) -> Metrics:
    """``pool.submit(noop)`` n times, then ``shutdown()``; µs per task."""
    out: Metrics = {f"e2e_w{w}_us": _plain_e2e(n, w) for w in (1, 2, 4)}
    gc.collect()
    pool = PlainPool(4)
    t0 = perf_counter()
    for _ in range(n):
        pool.submit(noop)
    t1 = perf_counter()
    pool.start()
    pool.shutdown(wait=True)
    t2 = perf_counter()
    out["submit_us"] = _us_per(t1 - t0, n)
    out["drain_us"] = _us_per(t2 - t1, n)
    return out


# ---------------------------------------------------------------------------
# 2. features: timeout + retry + subscriber + on_complete, 4 workers


def features_cluster(n: int) -> Metrics:
    """Per task ``.with_timeout(10).with_retry(1).on_complete(cb)`` and a subscriber."""
    from cluster import Cluster, TaskNotFoundError

    c = Cluster(workers=4)
    c.run()
    hits = _Hits()
    queues: list[SimpleQueue[Any]] = []
    missed = 0
    t0 = perf_counter()
    for _ in range(n):
        h = c.add_task(noop).with_timeout(10).with_retry(1).on_complete(hits).submit()
        try:
            queues.append(c.subscribe(h.id))
        except TaskNotFoundError:  # already finished and purged (no cache)
            missed += 1
    c.stop(timeout=STOP_TIMEOUT)
    elapsed = perf_counter() - t0
    _check(len(hits) == n, f"on_complete ran {len(hits)} times for {n} tasks")
    _check(all(q.get_nowait().ok for q in queues), "a subscriber got a failed result")
    return {"e2e_w4_us": _us_per(elapsed, n), "subscribe_missed_pct": 100 * missed / n}


def features_tpe(n: int) -> Metrics:
    """``ex.submit(noop)``, kept, ``.add_done_callback(cb)``, then ``shutdown(wait=True)``.

    The futures are kept and read, as cluster's subscriber queues are: each side
    holds one object per task that carries its result.
    """
    ex = ThreadPoolExecutor(max_workers=4)
    hits = _Hits()
    futures: list[Future[None]] = []
    t0 = perf_counter()
    for _ in range(n):
        future = ex.submit(noop)
        future.add_done_callback(hits)
        futures.append(future)
    ex.shutdown(wait=True)
    elapsed = perf_counter() - t0
    _check(len(hits) == n, f"done callbacks ran {len(hits)} times for {n} tasks")
    _check(all(f.exception() is None for f in futures), "a future failed")
    return {"e2e_w4_us": _us_per(elapsed, n)}


def _call_then(
    fn: Callable[[], object], done: Callable[[object, BaseException | None], object]
) -> None:
    """What a user of the plain pool writes to get a completion callback."""
    try:
        value = fn()
    except Exception as exc:
        done(None, exc)
    else:
        done(value, None)


def features_plain(n: int) -> Metrics:
    """``pool.submit(_call_then, noop, cb)``: a completion callback by hand."""
    pool = PlainPool(4)
    pool.start()
    hits = _Hits()
    t0 = perf_counter()
    for _ in range(n):
        pool.submit(_call_then, noop, hits)
    pool.shutdown(wait=True)
    elapsed = perf_counter() - t0
    _check(len(hits) == n, f"callbacks ran {len(hits)} times for {n} tasks")
    return {"e2e_w4_us": _us_per(elapsed, n)}


# ---------------------------------------------------------------------------
# 3. memory per pending (delayed) task, and submit cost on top of a backlog


def _traced_bytes_per_item(submit_one: Callable[[], object], n: int) -> tuple[float, float]:
    """Bytes per item traced by tracemalloc while ``submit_one()`` runs n times.

    Returns two figures: while the n returned handles are kept in a list (so
    including the list's 8-byte slot per item), and after that list is dropped.
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        handles = [submit_one() for _ in range(n)]
        kept = tracemalloc.get_traced_memory()[0] - base
        del handles
        gc.collect()
        dropped = tracemalloc.get_traced_memory()[0] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return kept / n, dropped / n


def _time_submits(submit_one: Callable[[], object], count: int) -> float:
    """µs per call of ``submit_one()`` over ``count`` calls."""
    t0 = perf_counter()
    for _ in range(count):
        submit_one()
    return _us_per(perf_counter() - t0, count)


def _memory_metrics(make: Callable[[], Callable[[], object]], n: int) -> Metrics:
    """``make()`` returns a fresh, idle queue's submit function; measure it.

    The submit timings are ``BATCHES`` samples each: batches into fresh empty queues,
    and consecutive batches on top of the n-task backlog. The two alternate, after
    the backlog is built, so that both see the same process (heap size, machine
    load) and only the queue they go into differs.
    """
    _time_submits(make(), SMALL_BATCH)  # warm-up: first-use costs are not measured
    submit_one = make()
    kept, dropped = _traced_bytes_per_item(submit_one, n)
    gc.collect()
    empty: list[float] = []
    backlog: list[float] = []
    for _ in range(BATCHES):
        empty.append(_time_submits(make(), SMALL_BATCH))
        backlog.append(_time_submits(submit_one, SMALL_BATCH))
    return {
        "bytes_per_task_handles_kept": kept,
        "bytes_per_task_handles_dropped": dropped,
        "submit_empty_us": empty,
        "submit_backlog_us": backlog,
        "backlog_over_empty": statistics.median(backlog) / statistics.median(empty),
    }


def memory_cluster(n: int) -> Metrics:
    """n tasks ``with_delay(3600)`` into a cluster that is never run."""
    from cluster import Cluster

    clusters: list[Cluster] = []

    def make() -> Callable[[], object]:
        c = Cluster(workers=4)
        clusters.append(c)
        return lambda: c.add_task(noop).with_delay(HOUR).submit()

    out = _memory_metrics(make, n)
    stats = max((c.stats() for c in clusters), key=lambda s: s.delayed)  # the backlog's
    expected = n + BATCHES * SMALL_BATCH
    _check(stats.delayed == expected, f"{stats.delayed} tasks delayed of {expected}")
    _check(stats.running == 0 and stats.succeeded == 0, "a delayed task ran")
    return out


def memory_tpe(n: int) -> Metrics:
    """Reference: n / 10 ``ex.submit(noop)`` queued behind 4 blocked workers."""
    blocked: list[BlockedExecutor] = []

    def make() -> Callable[[], object]:
        b = BlockedExecutor(4)
        blocked.append(b)
        return partial(b.executor.submit, noop)

    try:
        return _memory_metrics(make, max(SMALL_BATCH, n // TPE_MEMORY_DIVISOR))
    finally:
        for b in blocked:
            b.executor.shutdown(wait=False, cancel_futures=True)
            b.release()
            b.executor.shutdown(wait=True)


def memory_plain(n: int) -> Metrics:
    """n ``pool.submit(noop, delay=3600)`` into a pool that is never started."""

    def make() -> Callable[[], object]:
        return partial(PlainPool(4).submit, noop, delay=HOUR)

    return _memory_metrics(make, n)


# ---------------------------------------------------------------------------
# 4. start precision of delayed tasks


def _record_start(starts: list[float], i: int) -> None:
    starts[i] = time.monotonic()


def _precision_plan(n: int) -> list[float]:
    """n delays uniform in [0, window), window = n / 1000 s capped at 2 s (fixed seed)."""
    rng = random.Random(20240601)
    window = min(2.0, n / 1000)
    return [rng.uniform(0, window) for _ in range(n)]


def _lateness_metrics(starts: list[float], scheduled: list[float], loop_end: float) -> Metrics:
    _check(not any(math.isnan(s) for s in starts), "a delayed task never started")
    late = [(s - d) * 1e3 for s, d in zip(starts, scheduled, strict=True)]
    after = [lt for lt, d in zip(late, scheduled, strict=True) if d > loop_end] or late
    return {
        "late_p50_ms": _percentile(late, 50),
        "late_p99_ms": _percentile(late, 99),
        "late_max_ms": max(late),
        "late_min_ms": min(late),
        "after_loop_p50_ms": _percentile(after, 50),
        "after_loop_p99_ms": _percentile(after, 99),
        "after_loop_max_ms": max(after),
    }


def precision_cluster(n: int) -> Metrics:
    """``with_delay(random)`` tasks on a running 4-worker cluster; lateness in ms."""
    from cluster import Cluster

    delays = _precision_plan(n)
    starts = [math.nan] * n
    scheduled = [0.0] * n
    c = Cluster(workers=4)
    c.run()
    for i, delay in enumerate(delays):
        scheduled[i] = time.monotonic() + delay
        c.add_task(_record_start, starts, i).with_delay(delay).submit()
    loop_end = time.monotonic()
    c.stop(timeout=STOP_TIMEOUT)
    return _lateness_metrics(starts, scheduled, loop_end)


def precision_plain(n: int) -> Metrics:
    """``pool.submit(fn, delay=random)`` on a running 4-worker plain pool."""
    delays = _precision_plan(n)
    starts = [math.nan] * n
    scheduled = [0.0] * n
    pool = PlainPool(4)
    pool.start()
    for i, delay in enumerate(delays):
        scheduled[i] = time.monotonic() + delay
        pool.submit(_record_start, starts, i, delay=delay)
    loop_end = time.monotonic()
    pool.shutdown(wait=True)
    return _lateness_metrics(starts, scheduled, loop_end)


# ---------------------------------------------------------------------------
# 5. cancelling queued tasks one by one, then draining them


def cancel_cluster(n: int) -> Metrics:
    """n tasks submitted before ``run()``, ``cancel_task(id)`` each, then run + stop;
    and n more on a second cluster, cancelled through their handles."""
    from cluster import Cluster

    c = Cluster(workers=4)
    ids = [c.add_task(noop).submit().id for _ in range(n)]
    gc.collect()
    t0 = perf_counter()
    cancelled = sum(c.cancel_task(task_id) for task_id in ids)
    t1 = perf_counter()
    c.run()
    c.stop(timeout=STOP_TIMEOUT)
    t2 = perf_counter()
    _check(cancelled == n, f"cancel_task returned True {cancelled} times of {n}")
    stats = c.stats()
    _check(stats.cancelled == n and stats.succeeded == 0, f"after cancelling all: {stats}")

    c = Cluster(workers=4)
    handles = [c.add_task(noop).submit() for _ in range(n)]
    gc.collect()
    t3 = perf_counter()
    cancelled = sum(h.cancel() for h in handles)
    t4 = perf_counter()
    c.cancel()
    _check(cancelled == n, f"handle.cancel returned True {cancelled} times of {n}")
    return {
        "cancels_per_s": n / (t1 - t0),
        "handle_cancels_per_s": n / (t4 - t3),
        "drain_ms": (t2 - t1) * 1e3,
    }


def cancel_tpe(n: int) -> Metrics:
    """n futures queued behind 4 blocked workers, ``Future.cancel()`` each, release.

    A future is tpe's only handle and its only way to cancel, so its rate stands
    against both of cluster's: by id and by handle.
    """
    blocked = BlockedExecutor(4)
    futures: list[Future[None]] = [blocked.executor.submit(noop) for _ in range(n)]
    gc.collect()
    t0 = perf_counter()
    cancelled = sum(f.cancel() for f in futures)
    t1 = perf_counter()
    blocked.release()
    blocked.executor.shutdown(wait=True)
    t2 = perf_counter()
    _check(cancelled == n, f"Future.cancel returned True {cancelled} times of {n}")
    rate = n / (t1 - t0)
    return {"cancels_per_s": rate, "handle_cancels_per_s": rate, "drain_ms": (t2 - t1) * 1e3}


def cancel_plain(n: int) -> Metrics:
    """n tasks before ``start()``, ``cancel(seq)`` each (lazy), then start + shutdown."""
    pool = PlainPool(4)
    seqs = [pool.submit(noop) for _ in range(n)]
    gc.collect()
    t0 = perf_counter()
    cancelled = sum(pool.cancel(seq) for seq in seqs)
    t1 = perf_counter()
    pool.start()
    pool.shutdown(wait=True)
    t2 = perf_counter()
    _check(cancelled == n, f"cancel returned True {cancelled} times of {n}")
    return {"cancels_per_s": n / (t1 - t0), "drain_ms": (t2 - t1) * 1e3}


# ---------------------------------------------------------------------------
# 6. timeout detection latency


def _block_reading_deadline(release: threading.Event, deadlines: list[float], i: int) -> None:
    import cluster

    deadline = cluster.current().deadline
    deadlines[i] = math.inf if deadline is None else deadline
    release.wait(BLOCK_CAP)


def _record_arrival(
    arrivals: list[float],
    errors: list[BaseException | None],
    finished: threading.Semaphore,
    i: int,
    task_id: str,
    value: object,
    error: BaseException | None,
) -> None:
    arrivals[i] = time.monotonic()
    errors[i] = error
    finished.release()


def timeout_cluster(n: int) -> Metrics:
    """n tasks blocking past ``with_timeout(0.05)``; result arrival - attempt deadline."""
    from cluster import Cluster, TaskTimeoutError

    release = threading.Event()
    finished = threading.Semaphore(0)
    deadlines = [math.nan] * n
    arrivals = [math.nan] * n
    errors: list[BaseException | None] = [None] * n
    c = Cluster(workers=4)
    c.run()
    t0 = perf_counter()
    try:
        for i in range(n):
            c.add_task(_block_reading_deadline, release, deadlines, i).with_timeout(
                TIMEOUT
            ).on_complete(partial(_record_arrival, arrivals, errors, finished, i)).submit()
        # Four at a time, each ~TIMEOUT: allow 4x the ideal n / 4 * TIMEOUT, at least 10 s.
        limit = time.monotonic() + max(10.0, n * TIMEOUT)
        for _ in range(n):
            _check(
                finished.acquire(timeout=max(0.0, limit - time.monotonic())),
                "timed-out results did not all arrive in time",
            )
        wall = perf_counter() - t0
    finally:
        release.set()
        c.stop(timeout=STOP_TIMEOUT)
    _check(all(isinstance(e, TaskTimeoutError) for e in errors), "a result was not a timeout")
    _check(all(math.isfinite(d) for d in deadlines), "a task saw no deadline")
    lag = [(a - d) * 1e3 for a, d in zip(arrivals, deadlines, strict=True)]
    return {
        "detect_p50_ms": _percentile(lag, 50),
        "detect_p99_ms": _percentile(lag, 99),
        "detect_max_ms": max(lag),
        "wall_s": wall,
    }


# ---------------------------------------------------------------------------
# the scenario table and the driver


@dataclass(frozen=True)
class Scenario:
    """One scenario: its sizes and one runner ``size -> metrics`` per implementation."""

    name: str
    title: str
    full_size: int
    quick_size: int
    runners: Mapping[str, Runner]
    notes: str = ""
    repeats: int | None = None  # None: the --repeats value


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "throughput",
        "no-op tasks end to end at 1/2/4 workers; submit-only and drain-only at 4",
        200_000,
        2_000,
        {"cluster": throughput_cluster, "tpe": throughput_tpe, "plain": throughput_plain},
        "µs/task. e2e: first submit until stop()/shutdown(wait=True) returns. submit: "
        "cluster/plain not yet running, tpe workers held on an event. drain: from "
        "run()/start()/release until all done.",
    ),
    Scenario(
        "features",
        "4 workers, per task with_timeout(10).with_retry(1), subscriber, on_complete",
        200_000,
        2_000,
        {"cluster": features_cluster, "tpe": features_tpe, "plain": features_plain},
        "µs/task end to end. tpe: future + add_done_callback, the futures kept (as "
        "cluster's queues are); plain: a wrapper calling a callback. "
        "subscribe_missed_pct: tasks that finished (and were purged, no cache) before "
        "c.subscribe(h.id) was called.",
    ),
    Scenario(
        "memory",
        "bytes per pending task with_delay(3600); submit µs into empty vs onto backlog",
        1_000_000,
        10_000,
        {"cluster": memory_cluster, "tpe": memory_tpe, "plain": memory_plain},
        "tracemalloc traced bytes / n; 'kept': handles held in a list (incl. 8 B slot), "
        "'dropped': after deleting that list. cluster never run, plain never started; "
        f"tpe (no delays) is a reference: n/{TPE_MEMORY_DIVISOR} work items queued behind 4 "
        f"blocked workers. submit_*_us: {BATCHES} batches of {SMALL_BATCH} submits into "
        "fresh empty queues / on top of the backlog. One run (the 1M build under "
        f"tracemalloc takes ~30 s); min-max are over the {BATCHES} batches.",
        repeats=1,
    ),
    Scenario(
        "precision",
        "start lateness of with_delay(uniform(0, 2 s)) tasks, 4 workers",
        2_000,
        200,
        {"cluster": precision_cluster, "plain": precision_plain},
        "ms; lateness = monotonic at start - (monotonic before submit + delay); window = "
        "n/1000 s capped at 2 s; after_loop: tasks due after the submit loop ended.",
    ),
    Scenario(
        "cancel",
        "cancel queued tasks one by one, then drain the cancelled entries",
        100_000,
        2_000,
        {"cluster": cancel_cluster, "tpe": cancel_tpe, "plain": cancel_plain},
        "cluster/plain not running, tpe workers held. cancels_per_s: cluster by "
        "cancel_task(id); handle_cancels_per_s: by TaskHandle.cancel() (tpe: the same "
        "Future.cancel() for both). drain_ms: run()/release until stop()/shutdown "
        "returns. plain cancels lazily (a set of seqs).",
    ),
    Scenario(
        "timeout",
        "tasks blocked past with_timeout(0.05), 4 workers; result arrival - deadline",
        400,
        50,
        {"cluster": timeout_cluster},
        "ms from ctx.deadline to the on_complete callback carrying TaskTimeoutError. "
        "4 at a time (stuck workers are replaced, not added), so n/4*50 ms of wall time: "
        "n is 400 rather than 1000 to keep 3 repeats well under 30 s.",
    ),
)


def dask_cluster(size: int) -> Metrics:
    """The "dask" scenario (``benchmarks.dask``): DaskExecutor vs raw client.submit."""
    from benchmarks.dask import scenario

    return scenario(size)


if importlib.util.find_spec("distributed") is not None:  # the dask extra
    SCENARIOS += (
        Scenario(
            "dask",
            "no-op tasks on DaskExecutor over a LocalCluster (1 worker x 2 threads)",
            5_000,
            200,
            {"cluster": dask_cluster},
            "µs/task end to end; raw: client.submit(pure=False) for every task, then "
            "distributed.wait, in the same run; the executor with its default slots (the "
            "2 worker threads) and with 4x as many; *_over_raw: executor / raw (goal "
            "<= 1.2). One run (a LocalCluster each; 5,000 tasks take about a minute): "
            "python3 -m benchmarks.dask repeats it, interleaved.",
            repeats=1,
        ),
    )


@dataclass
class ScenarioResult:
    """The runs of one scenario, per implementation, and any errors."""

    scenario: Scenario
    size: int
    repeats: int
    runs: dict[str, list[Metrics]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{impl: {metric: {median, min, max, samples}}}`` over the successful runs.

        ``samples`` holds one value per run, or all the samples a run returned.
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for impl, runs in self.runs.items():
            if not runs or impl in self.errors:
                continue
            out[impl] = {}
            for metric in runs[0]:
                samples: list[float] = []
                for run in runs:
                    value = run[metric]
                    samples += value if isinstance(value, list) else [value]
                out[impl][metric] = {
                    "median": statistics.median(samples),
                    "min": min(samples),
                    "max": max(samples),
                    "samples": samples,
                }
        return out

    def ratios(self) -> dict[str, float]:
        """cluster/tpe of the medians, for the metrics both have."""
        summary = self.summary()
        cluster, tpe = summary.get("cluster", {}), summary.get("tpe", {})
        return {
            m: cluster[m]["median"] / tpe[m]["median"]
            for m in cluster
            if m in tpe and tpe[m]["median"]
        }


def run_scenario(scenario: Scenario, size: int, repeats: int) -> ScenarioResult:
    """Run every implementation of ``scenario`` ``repeats`` times, interleaved."""
    result = ScenarioResult(scenario, size, repeats)
    t0 = perf_counter()
    for _ in range(repeats):
        for impl, runner in scenario.runners.items():
            if impl in result.errors:
                continue
            gc.collect()
            try:
                metrics = runner(size)
            except Exception:
                result.errors[impl] = traceback.format_exc()
                print(f"[{scenario.name}/{impl}] failed:\n{result.errors[impl]}", file=sys.stderr)
            else:
                result.runs.setdefault(impl, []).append(metrics)
    gc.collect()
    result.seconds = perf_counter() - t0
    return result


def machine_info() -> dict[str, Any]:
    """Python version, platform and CPU count of this machine."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        import cluster

        info["cluster_version"] = getattr(cluster, "__version__", "unknown")
    except ImportError:
        info["cluster_version"] = None
    return info


def format_table(results: Sequence[ScenarioResult]) -> str:
    """The results table: medians [min-max] and the cluster/tpe ratio."""
    header = (
        "scenario",
        "metric",
        f"cluster median [min{DASH}max]",
        "tpe median",
        "plain median",
        "cluster/tpe",
    )
    rows: list[tuple[str, ...]] = []
    for res in results:
        summary, ratios = res.summary(), res.ratios()
        metrics: list[str] = []
        for impl in IMPLS:
            metrics += [m for m in summary.get(impl, {}) if m not in metrics]
        label = f"{res.scenario.name} (n={res.size:,}, {res.repeats} run{'s' * (res.repeats > 1)})"
        for impl in IMPLS:
            if impl in res.errors:
                rows.append((label, f"{impl}: FAILED", "", "", "", ""))
                label = ""
        for metric in metrics:
            cells = [label, metric]
            label = ""
            for impl in IMPLS:
                stat = summary.get(impl, {}).get(metric)
                if stat is None:
                    cells.append("—")
                elif impl == "cluster":
                    cells.append(
                        f"{fmt(stat['median'])} [{fmt(stat['min'])}{DASH}{fmt(stat['max'])}]"
                    )
                else:
                    cells.append(fmt(stat["median"]))
            cells.append(f"{ratios[metric]:.2f}x" if metric in ratios else "—")
            rows.append(tuple(cells))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``python3 -m benchmarks.run``."""
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these scenarios (repeatable or comma-separated): {', '.join(names)}",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help=f"where to write the results (default: {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"runs per scenario (default {DEFAULT_REPEATS}; memory: 1, with 3 timing batches)",
    )
    args = parser.parse_args(argv)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.only = only
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected scenarios, print the table, write the JSON; 1 if a run failed."""
    args = parse_args(argv)
    selected = [s for s in SCENARIOS if not args.only or s.name in args.only]
    machine = machine_info()
    print(
        f"cluster benchmarks — Python {machine['python']} ({machine['implementation']}), "
        f"{machine['platform']}, {machine['cpu_count']} CPUs"
        f"{' — quick' if args.quick else ''}",
        flush=True,
    )
    started = perf_counter()
    results: list[ScenarioResult] = []
    for scenario in selected:
        size = scenario.quick_size if args.quick else scenario.full_size
        print(f"  {scenario.name} (n={size:,}) ...", end="", file=sys.stderr, flush=True)
        res = run_scenario(scenario, size, args.repeats or scenario.repeats or DEFAULT_REPEATS)
        print(f" {res.seconds:.1f} s", file=sys.stderr, flush=True)
        results.append(res)
    print()
    print(format_table(results))
    print(
        f"median [min{DASH}max] over the runs (memory: over its timing batches); ratio = "
        "cluster median / tpe median; *_per_s: higher is better, all others: lower."
    )
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "repeats": args.repeats or DEFAULT_REPEATS,
        "seconds": perf_counter() - started,
        "scenarios": {
            res.scenario.name: {
                "title": res.scenario.title,
                "notes": res.scenario.notes,
                "size": res.size,
                "repeats": res.repeats,
                "seconds": res.seconds,
                "results": res.summary(),
                "ratio_cluster_tpe": res.ratios(),
                "errors": res.errors,
            }
            for res in results
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 1 if any(res.errors for res in results) else 0


if __name__ == "__main__":
    sys.exit(main())
