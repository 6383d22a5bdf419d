"""Keys, limits, listing, admission (SPEC §12, §13): ``python3 -m benchmarks.coordination``.

Options: ``--quick`` (small sizes, a few seconds), ``--repeats N`` (default 3; quick 1),
``--only NAME`` (``keys``, ``hol``, ``rate``, ``listing``, ``max-pending``),
``--json PATH``.

Every scenario runs its variants side by side in one process, interleaved (their
order swapped every other repeat), with ``gc.collect()`` before each run; the table
shows the median [min-max] over the repeats and the ratio of the medians. All use
4 worker threads and no-op tasks unless said otherwise.

* ``keys``: 200,000 tasks over 1,000 distinct keys, ``with_key(f"k{i % 1000}")``
  (consecutive tasks have different keys; the default limit of a key is 1, SPEC §12,
  so no ``Cluster.limit`` call is needed), vs the same tasks without keys, and with
  an explicit ``c.limit(key, concurrency=1)`` for every key. µs per task from the
  first ``submit()`` until ``stop()`` returns, as ``benchmarks.run``'s throughput
  scenario. Target <= 1.25x.
* ``hol`` (head-of-line blocking): key ``hot`` gets 10,000 tasks first; its first
  task blocks on an event, so it holds the key (and one worker) for the whole
  measurement and the other 9,999 stay queued for the key, ahead of everything
  after them in §4 order (same priority, submitted earlier). Then 10,000 keyless
  no-op tasks are submitted; the time from their first ``submit()`` until the last
  of them has run is compared with the same run without the 9,999 waiting tasks
  (the baseline also has one keyless task blocking one worker, so both have 3
  free workers and the only difference is the queue of waiting keyed tasks).
  If waiting tasks held workers or were scanned on every pick, the keyless tasks
  would wait behind them. It checks that no second ``hot`` task started while the
  first held the key. Target <= 1.2x.
* ``rate``: ``c.limit("rated", rate=100)`` (burst 1) and 1,000 tasks of that key
  (quick: 100); the gaps between consecutive starts (``time.monotonic()`` in the
  task), their deviation from 10 ms: p50, p99, and the mean gap. Target p99 <= 1 ms.
* ``listing``: a cluster holding 1,000,000 tasks delayed by an hour (quick:
  20,000) and 10,000 dead letters (quick: 500), on ``Cluster(dead_letters=10_000)``:
  a bound ten times the default, the same order as Sidekiq's 10,000-job dead set,
  and filled to it (no evictions) so the pages come from a full list. The first
  ``tasks(limit=50)`` and the first ``dead_letters(limit=50)`` are timed alone (the
  first listing builds the ordered index); then ``tasks(limit=50, offset=k)`` and
  ``dead_letters(limit=50, offset=k)`` at 200 random offsets each (seeded), ms per
  page, p50 and p99; then the same dead-letter pages again (a dead letter's
  traceback text is formatted the first time it is listed, so the first visit of
  a page costs more). The cluster is built once (not repeated). Target <= 1 ms per
  page (the median of the first visits).
* ``max-pending``: 200,000 ``submit()`` calls from one thread into
  ``Cluster(workers=4, max_pending=1000)`` (``on_full="block"``) while the workers
  drain, until ``stop()`` returns, vs the same into an unbounded cluster; µs per
  task. Target <= 1.2x.

Outcomes are checked (a lost task raises ``BenchmarkError``); a missed target is
marked MISSED in the table, and the exit status is 0 either way. The full run takes
about two minutes on a 2-core machine (most of it building the 1M-task cluster).
"""

from __future__ import annotations

import gc
import itertools
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from time import perf_counter

from benchmarks._report import (
    DASH,
    BenchmarkError,
    Row,
    check,
    fmt,
    percentile,
    run_main,
)
from cluster import Cluster

TITLE = "cluster coordination benchmarks (SPEC §12, §13)"
WORKERS = 4
STOP_TIMEOUT = 600.0  # generous bound on a graceful stop, so a bug cannot hang the run
WAIT = 120.0  # real-time bound on other waits
HOUR = 3600.0
PAGE = 50  # listing: the page size
PAGES = 200  # listing: random offsets per listing call

__all__ = ["BenchmarkError", "main"]


def noop() -> None:
    """The task of every scenario."""


def fail() -> None:
    """A task that becomes a dead letter."""
    raise ValueError("for the dead letters")


def _ratio_row(
    scenario: str, metric: str, ours: list[float], base: list[float], unit: str,
    against: str, limit: float,
) -> list[Row]:  # fmt: skip
    """Two rows: the value and the baseline, the ratio of their medians on the first."""
    ratio = statistics.median(ours) / statistics.median(base)
    return [
        Row(scenario, metric, ours, unit, f"{ratio:.2f}x {against}", f"<= {limit}x",
            ratio <= limit),
        Row(scenario, f"{metric} ({against})", base, unit, "baseline"),
    ]  # fmt: skip


def _interleave(repeats: int, variants: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every variant ``repeats`` times, interleaved, the order reversed every other round."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            gc.collect()
            out[name].append(variants[name]())
    return out


# ---------------------------------------------------------------------------- keys


def keys_once(n: int, keys: int, mode: str) -> float:
    """µs per task, ``n`` tasks end to end; mode: ``none``, ``keys``, ``limit``."""
    c = Cluster(workers=WORKERS)
    names = [f"k{i}" for i in range(keys)]
    if mode == "limit":
        for key in names:
            c.limit(key, concurrency=1)
    c.run()
    add = c.add_task
    t0 = perf_counter()
    if mode == "none":
        for _ in range(n):
            add(noop).submit()
    else:
        for i in range(n):
            add(noop).with_key(names[i % keys]).submit()
    c.stop(timeout=STOP_TIMEOUT)
    elapsed = perf_counter() - t0
    done = c.stats().succeeded
    check(done == n, f"{mode}: {done} of {n} tasks succeeded")
    return elapsed / n * 1e6


def keys_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``keys`` scenario."""
    n, keys = (10_000, 100) if quick else (200_000, 1000)
    runs = _interleave(
        repeats,
        {mode: partial(keys_once, n, keys, mode) for mode in ("none", "keys", "limit")},
    )
    name = f"{n:,} tasks over {keys:,} keys, limit 1"
    ratio = statistics.median(runs["limit"]) / statistics.median(runs["none"])
    return [
        *_ratio_row(name, "e2e", runs["keys"], runs["none"], "µs/task", "no keys", 1.25),
        Row(name, "e2e, c.limit(key, 1) for each", runs["limit"], "µs/task",
            f"{ratio:.2f}x no keys", "<= 1.25x", ratio <= 1.25),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- hol


def hol_once(n_keyed: int, n_free: int, keyed: bool) -> float:
    """Seconds from the first keyless ``submit()`` until the ``n_free``-th keyless task ran."""
    c = Cluster(workers=WORKERS)
    c.run()
    release = threading.Event()
    blocking = threading.Event()
    hot_started = itertools.count()
    free_done = itertools.count(1)
    all_free = threading.Event()

    def hold() -> None:
        next(hot_started)
        blocking.set()
        release.wait(WAIT)

    def hot() -> None:
        next(hot_started)

    def free() -> None:
        if next(free_done) == n_free:  # itertools.count is atomic under the GIL
            all_free.set()

    try:
        if keyed:
            c.add_task(hold).with_key("hot").submit()
            for _ in range(n_keyed - 1):
                c.add_task(hot).with_key("hot").submit()
        else:
            c.add_task(hold).submit()  # the same blocked worker, no waiting tasks
        check(blocking.wait(WAIT), "the blocking task never started")
        t0 = perf_counter()
        for _ in range(n_free):
            c.add_task(free).submit()
        check(all_free.wait(WAIT), "the keyless tasks did not finish")
        elapsed = perf_counter() - t0
        started = next(hot_started)
        check(started == 1, f"{started} tasks of the held key started")
        if keyed:
            waiting = c.stats().waiting
            check(waiting == n_keyed - 1, f"{waiting} tasks waiting for the key")
    finally:
        release.set()
        c.stop(timeout=STOP_TIMEOUT)
    expected = n_free + (n_keyed if keyed else 1)
    check(c.stats().succeeded == expected, f"{c.stats().succeeded} of {expected} succeeded")
    return elapsed


def hol_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``hol`` scenario."""
    n = 2_000 if quick else 10_000
    runs = _interleave(
        repeats, {"alone": partial(hol_once, n, n, False), "keyed": partial(hol_once, n, n, True)}
    )
    ms = {k: [v * 1e3 for v in vs] for k, vs in runs.items()}
    name = f"{n:,} keyless behind {n:,} waiting for one key"
    return _ratio_row(name, "keyless done", ms["keyed"], ms["alone"], "ms", "keyless alone", 1.2)


# ---------------------------------------------------------------------------- rate


def rate_once(n: int, rate: float) -> list[float]:
    """The gaps (ms) between consecutive starts of ``n`` tasks of a key at ``rate``/s."""
    starts = [0.0] * n
    c = Cluster(workers=WORKERS)
    c.limit("rated", rate=rate)
    c.run()

    def record(i: int) -> None:
        starts[i] = time.monotonic()

    for i in range(n):
        c.add_task(record, i).with_key("rated").submit()
    # Every start is timed before the stop (a graceful stop would run them too).
    check(c.wait_idle(WAIT + n / rate), "the rated tasks did not finish")
    c.stop(timeout=STOP_TIMEOUT)
    check(c.stats().succeeded == n, f"{c.stats().succeeded} of {n} rated tasks ran")
    ordered = sorted(starts)
    return [(b - a) * 1e3 for a, b in itertools.pairwise(ordered)]


def rate_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``rate`` scenario."""
    n, rate = (100 if quick else 1000), 100.0
    period = 1e3 / rate
    p50: list[float] = []
    p99: list[float] = []
    mean: list[float] = []
    worst: list[float] = []
    for _ in range(repeats):
        gc.collect()
        gaps = rate_once(n, rate)
        deviation = [abs(g - period) for g in gaps]
        p50.append(percentile(deviation, 50))
        p99.append(percentile(deviation, 99))
        worst.append(max(deviation))
        mean.append(statistics.fmean(gaps))
    name = f"rate=100 on one key, {n:,} starts"
    ok = statistics.median(p99) <= 1.0
    return [
        Row(name, "|gap - 10 ms| p50", p50, "ms", "gap between consecutive starts"),
        Row(name, "|gap - 10 ms| p99", p99, "ms", "gap between consecutive starts", "<= 1 ms",
            ok),
        Row(name, "|gap - 10 ms| max", worst, "ms", "gap between consecutive starts"),
        Row(name, "mean gap", mean, "ms", f"{1e3 / statistics.median(mean):.1f} starts/s"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- listing


def _page_times(call: Callable[[int], object], offsets: Sequence[int]) -> list[float]:
    """ms for ``call(offset)`` at each offset."""
    out = []
    for k in offsets:
        t0 = perf_counter()
        call(k)
        out.append((perf_counter() - t0) * 1e3)
    return out


def listing_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``listing`` scenario (built once; ``repeats`` is not used)."""
    held, dead = (20_000, 500) if quick else (1_000_000, 10_000)
    c = Cluster(workers=WORKERS, dead_letters=dead)
    c.run()
    try:
        t0 = perf_counter()
        for _ in range(dead):
            c.add_task(fail).with_name("fails").submit()
        check(c.wait_idle(WAIT), "the failing tasks did not finish")
        for _ in range(held):
            c.add_task(noop).with_delay(HOUR).submit()
        built = perf_counter() - t0
        stats = c.stats()
        check(stats.delayed == held, f"{stats.delayed} tasks delayed of {held}")
        check(stats.dead_letters == dead, f"{stats.dead_letters} dead letters of {dead}")
        check(stats.dead_letters_evicted == 0, "dead letters were evicted")
        gc.collect()

        t0 = perf_counter()
        first = c.tasks(limit=PAGE)
        first_tasks = (perf_counter() - t0) * 1e3
        t0 = perf_counter()
        first_dead = c.dead_letters(limit=PAGE)
        first_dead_ms = (perf_counter() - t0) * 1e3
        check(len(first) == PAGE and len(first_dead) == PAGE, "a first page was short")

        total = c.count_tasks()
        check(total == held + dead, f"count_tasks() = {total}, expected {held + dead}")
        rng = random.Random(20261201)
        task_offsets = [rng.randrange(total - PAGE) for _ in range(PAGES)]
        dead_offsets = [rng.randrange(dead - PAGE) for _ in range(PAGES)]
        page = c.tasks(limit=PAGE, offset=task_offsets[0])
        check(len(page) == PAGE, "a page of tasks was short")
        check(len(c.dead_letters(limit=PAGE, offset=dead_offsets[0])) == PAGE, "a short page")
        tasks_ms = _page_times(lambda k: c.tasks(limit=PAGE, offset=k), task_offsets)
        dead_ms = _page_times(lambda k: c.dead_letters(limit=PAGE, offset=k), dead_offsets)
        # The same pages again: a dead letter's traceback is formatted on its first view.
        again_ms = _page_times(lambda k: c.dead_letters(limit=PAGE, offset=k), dead_offsets)
    finally:
        t0 = perf_counter()
        c.cancel()
        c.stop(timeout=STOP_TIMEOUT)
        dropped = perf_counter() - t0
    name = f"{held:,} delayed + {dead:,} dead letters"
    tasks_p50, dead_p50 = statistics.median(tasks_ms), statistics.median(dead_ms)
    return [
        Row(name, "first tasks(limit=50)", [first_tasks], "ms", "builds the index"),
        Row(name, "first dead_letters(limit=50)", [first_dead_ms], "ms", "after tasks()"),
        Row(name, "tasks(limit=50, offset=k) p50", [tasks_p50], "ms",
            f"p99 {fmt(percentile(tasks_ms, 99))} ms, {PAGES} random k", "<= 1 ms",
            tasks_p50 <= 1),
        Row(name, "dead_letters(limit=50, offset=k) p50", [dead_p50], "ms",
            f"p99 {fmt(percentile(dead_ms, 99))} ms, {PAGES} random k", "<= 1 ms",
            dead_p50 <= 1),
        Row(name, "the same dead_letters pages again p50", [statistics.median(again_ms)], "ms",
            f"p99 {fmt(percentile(again_ms, 99))} ms, tracebacks formatted"),
        Row(name, "building the cluster", [built], "s",
            f"cancel + stop after: {dropped:.1f} s"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- max_pending


def pending_once(n: int, max_pending: int | None) -> float:
    """µs per task: ``n`` submits from one thread into a running cluster, until stop()."""
    c = Cluster(workers=WORKERS, max_pending=max_pending)
    c.run()
    add = c.add_task
    t0 = perf_counter()
    for _ in range(n):
        add(noop).submit()
    c.stop(timeout=STOP_TIMEOUT)
    elapsed = perf_counter() - t0
    check(c.stats().succeeded == n, f"{c.stats().succeeded} of {n} tasks succeeded")
    return elapsed / n * 1e6


def max_pending_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``max-pending`` scenario."""
    n = 10_000 if quick else 200_000
    runs = _interleave(
        repeats,
        {"unbounded": lambda: pending_once(n, None), "bounded": lambda: pending_once(n, 1000)},
    )
    name = f"{n:,} submits, max_pending=1000, 4 draining"
    return _ratio_row(name, "e2e", runs["bounded"], runs["unbounded"], "µs/task", "unbounded", 1.2)


SCENARIOS: dict[str, Callable[[int, bool], list[Row]]] = {
    "keys": keys_rows,
    "hol": hol_rows,
    "rate": rate_rows,
    "listing": listing_rows,
    "max-pending": max_pending_rows,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios, print the table (and write the JSON): see ``run_main``."""
    return run_main(
        "python3 -m benchmarks.coordination",
        __doc__.split("\n\n")[0],
        TITLE,
        SCENARIOS,
        f"median [min{DASH}max] over the repeats (listing: one build, stats over its pages); "
        "ratio = median / baseline median; lower is better.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
