"""Repeating tasks and deterministic time (SPEC §11, §18): ``python3 -m benchmarks.semantics``.

Options: ``--quick`` (small sizes, a few seconds), ``--repeats N`` (default 3),
``--only NAME`` (``lateness``, ``fake-retries``, ``fake-repeat``), ``--json PATH``.

Scenarios, each run ``--repeats`` times; the table shows the median [min-max]:

* ``lateness``: ``repeat(every=0.01, count=1000)`` on an otherwise idle 4-worker
  cluster, real clock. The task records ``time.monotonic()`` when it starts; the
  lateness of run k is its start minus (run 0's start + k * 0.01). p50, p99, max,
  and the trend: the mean lateness of the last 100 runs minus that of the first 100.
  A schedule that drifts (each run planned from the previous one's actual start)
  piles up its lateness: its trend grows with the number of runs; a grid does not.
  ``collapsed`` counts the occurrences that were folded into a later run (§11),
  from the span between the first and last starts.
  Targets: p99 <= 2 ms; trend <= 0.1 ms (noise; no drift); nothing collapsed.
* ``fake-retries``: a task that fails its first 10 attempts (``ConnectionError``)
  and succeeds on the 11th, ``with_retry(10).with_backoff(ExponentialBackoff(1, 2))``:
  1 + 2 + ... + 512 = 1,023 s (17 min) of backoff, on ``Cluster(clock=FakeClock())``.
  Driven as a user's test drives it (``cluster/testing.py``): ``c.wait_idle()``, then
  ``clock.advance(backoff)``, for each retry. Wall time from ``submit()`` to the value.
  Target < 1 s.
* ``fake-repeat``: 1,440 runs of ``repeat(every=60, count=1440)`` (a day) on a
  ``FakeClock``: ``wait_idle()`` once after ``submit()`` (run 0), then
  ``advance(60)`` + ``wait_idle()`` 1,439 times. Wall time from ``submit()`` to the
  last Result; every run is checked to have started at its fake grid time. Target < 5 s.

Outcomes are checked (a wrong one raises ``BenchmarkError``); a missed target is
marked MISSED in the table, and the exit status is 0 either way.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from time import perf_counter

from benchmarks._report import (
    DASH,
    BenchmarkError,
    Row,
    check,
    percentile,
    run_main,
)
from cluster import Cluster, ExponentialBackoff
from cluster.testing import FakeClock

TITLE = "cluster semantics benchmarks (SPEC §11, §18)"
WORKERS = 4
WAIT = 120.0  # real-time bound on any wait, so a bug cannot hang the run
EVERY = 0.01  # lateness: the period of the real-clock series
RETRIES = 10  # fake-retries: retries, on ExponentialBackoff(1, 2)
MINUTE = 60.0  # fake-repeat: the period of the fake-clock series

__all__ = ["BenchmarkError", "main"]


def _record(starts: list[float], now: Callable[[], float]) -> None:
    """The repeating task: note when this run started (``list.append`` is atomic)."""
    starts.append(now())


# ---------------------------------------------------------------------------- lateness


def lateness_once(n: int) -> dict[str, float]:
    """One series of ``n`` runs every 10 ms; lateness figures in ms."""
    starts: list[float] = []
    with Cluster(workers=WORKERS) as c:
        h = c.add_task(_record, starts, time.monotonic).repeat(every=EVERY, count=n).submit()
        result = h.wait(WAIT + n * EVERY)
        check(result is not None and result.ok, f"the series did not end well: {result}")
    check(len(starts) == n, f"{len(starts)} runs of {n}")
    first = starts[0]
    late = [(s - (first + k * EVERY)) * 1e3 for k, s in enumerate(starts)]
    window = min(100, n // 4)
    return {
        "p50": percentile(late, 50),
        "p99": percentile(late, 99),
        "max": max(late),
        "trend": statistics.fmean(late[-window:]) - statistics.fmean(late[:window]),
        "collapsed": round((starts[-1] - first) / EVERY) - (n - 1),
        "window": window,
    }


def lateness_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``lateness`` scenario."""
    n = 200 if quick else 1000
    runs = []
    for _ in range(repeats):
        gc.collect()
        runs.append(lateness_once(n))
    name = f"repeat(every=0.01) x {n:,}, real clock"
    window = int(runs[0]["window"])

    def col(key: str) -> list[float]:
        return [r[key] for r in runs]

    p99 = statistics.median(col("p99"))
    trend = statistics.median(col("trend"))
    collapsed = max(col("collapsed"))
    return [
        Row(name, "lateness p50", col("p50"), "ms", "vs run 0 + k*every"),
        Row(name, "lateness p99", col("p99"), "ms", "vs run 0 + k*every", "<= 2 ms", p99 <= 2),
        Row(name, "lateness max", col("max"), "ms", "vs run 0 + k*every"),
        Row(name, "trend", col("trend"), "ms",
            f"mean of last {window} - first {window}", "<= 0.1 ms (no drift)",
            trend <= 0.1),
        Row(name, "collapsed occurrences", col("collapsed"), "",
            "folded into a later run (any repeat)", "0", collapsed == 0),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- fake clock


def fake_retries_once() -> tuple[float, float]:
    """(wall seconds, fake seconds) for the retry schedule on a FakeClock."""
    clock = FakeClock()
    attempts: list[float] = []
    backoff = ExponentialBackoff(1, 2)

    def flaky() -> int:
        attempts.append(clock.monotonic())
        if len(attempts) <= RETRIES:
            raise ConnectionError("not yet")
        return len(attempts)

    with Cluster(workers=WORKERS, clock=clock) as c:
        t0 = perf_counter()
        h = c.add_task(flaky).with_retry(RETRIES).with_backoff(backoff).submit()
        for n in range(RETRIES):
            check(c.wait_idle(WAIT), "wait_idle timed out")
            clock.advance(backoff(n))
        value = h.result(WAIT)
        wall = perf_counter() - t0
    check(value == RETRIES + 1, f"succeeded on attempt {value}, expected {RETRIES + 1}")
    expected = [float(2**n - 1) for n in range(RETRIES + 1)]  # 0, 1, 3, 7, ... 1023
    check(attempts == expected, f"attempts at fake times {attempts}, expected {expected}")
    return wall, clock.monotonic()


def fake_retries_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``fake-retries`` scenario."""
    walls: list[float] = []
    fake = 0.0
    for _ in range(repeats):
        gc.collect()
        wall, fake = fake_retries_once()
        walls.append(wall)
    wall = statistics.median(walls)
    return [
        Row(f"{RETRIES} retries, ExponentialBackoff(1, 2), FakeClock", "wall to finish",
            walls, "s", f"{fake:,.0f} s of backoff: {fake / wall:,.0f}x real time", "< 1 s",
            wall < 1),
    ]  # fmt: skip


def fake_repeat_once(n: int) -> float:
    """Wall seconds for ``n`` runs of ``repeat(every=60)`` on a FakeClock."""
    clock = FakeClock()
    starts: list[float] = []
    with Cluster(workers=WORKERS, clock=clock) as c:
        t0 = perf_counter()
        h = c.add_task(_record, starts, clock.monotonic).repeat(every=MINUTE, count=n).submit()
        check(c.wait_idle(WAIT), "wait_idle timed out")  # run 0, before the clock moves
        for _ in range(n - 1):
            clock.advance(MINUTE)
            check(c.wait_idle(WAIT), "wait_idle timed out")
        result = h.wait(WAIT)
        wall = perf_counter() - t0
    check(result is not None and result.ok, f"the series did not end well: {result}")
    check(result is not None and result.run == n - 1, f"last run {result}, expected {n - 1}")
    expected = [k * MINUTE for k in range(n)]
    check(starts == expected, f"{len(starts)} runs, not all at their grid times")
    return wall


def fake_repeat_rows(repeats: int, quick: bool) -> list[Row]:
    """The ``fake-repeat`` scenario."""
    n = 144 if quick else 1440
    walls = []
    for _ in range(repeats):
        gc.collect()
        walls.append(fake_repeat_once(n))
    wall = statistics.median(walls)
    fake = (n - 1) * MINUTE
    target = 5.0 * n / 1440
    return [
        Row(f"repeat(every=60) x {n:,}, FakeClock", "wall to finish", walls, "s",
            f"{fake / 3600:.1f} h of runs; {wall / n * 1e3:.2f} ms per run",
            f"< {target:g} s", wall < target),
    ]  # fmt: skip


SCENARIOS: dict[str, Callable[[int, bool], list[Row]]] = {
    "lateness": lateness_rows,
    "fake-retries": fake_retries_rows,
    "fake-repeat": fake_repeat_rows,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios, print the table (and write the JSON): see ``run_main``."""
    return run_main(
        "python3 -m benchmarks.semantics",
        __doc__.split("\n\n")[0],
        TITLE,
        SCENARIOS,
        f"median [min{DASH}max] over the repeats; lower is better.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
