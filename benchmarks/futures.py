"""``cluster.Executor`` against ``ThreadPoolExecutor``: ``python3 -m benchmarks.futures``.

Two scenarios, both with 4 workers and a no-op function, timed from the first call
until ``shutdown(wait=True)`` returns (the executors are created before the clock
starts):

* ``submit``: ``ex.submit(noop)`` ``n`` times (the futures are dropped, as a
  fire-and-forget caller does), then ``shutdown(wait=True)``.
* ``map``: ``for _ in ex.map(identity, range(n))``, then ``shutdown(wait=True)``.

Each runs ``--repeats`` times (default 3), the two executors interleaved (and their
order swapped every other round), with ``gc.collect()`` before each run. It prints
µs per call, the medians and the ratio cluster / ThreadPoolExecutor of the medians
(lower is better; the target is <= 0.5). ``--n`` sets the number of calls (default
200,000; a full run takes about half a minute here).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from time import perf_counter

import cluster

WORKERS = 4
TARGET = 0.5  # the bound on cluster / ThreadPoolExecutor

Factory = Callable[[], Executor]
IMPLS: dict[str, Factory] = {
    "cluster": lambda: cluster.Executor(WORKERS),
    "tpe": lambda: ThreadPoolExecutor(WORKERS),
}


class BenchmarkError(RuntimeError):
    """A run finished but its outcome was wrong."""


def noop() -> None:
    """The call ``submit`` makes."""


def identity(x: int) -> int:
    """The call ``map`` makes."""
    return x


def run_submit(make: Factory, n: int) -> float:
    """Seconds for ``n`` submits and the shutdown that waits for them."""
    ex = make()
    t0 = perf_counter()
    for _ in range(n - 1):
        ex.submit(noop)
    last = ex.submit(noop)
    ex.shutdown(wait=True)
    elapsed = perf_counter() - t0
    if not last.done() or last.exception() is not None:
        raise BenchmarkError(f"{type(ex).__name__}: the last call did not succeed")
    return elapsed


def run_map(make: Factory, n: int) -> float:
    """Seconds for ``map`` over ``n`` items, its results read, and the shutdown."""
    ex = make()
    t0 = perf_counter()
    count = total = 0
    for value in ex.map(identity, range(n)):
        count += 1
        total += value
    ex.shutdown(wait=True)
    elapsed = perf_counter() - t0
    if count != n or total != n * (n - 1) // 2:
        raise BenchmarkError(f"{type(ex).__name__}: map gave {count} results of {n}")
    return elapsed


SCENARIOS: dict[str, Callable[[Factory, int], float]] = {"submit": run_submit, "map": run_map}


def measure(n: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """µs per call of every run: ``{scenario: {impl: [run, ...]}}``."""
    samples: dict[str, dict[str, list[float]]] = {s: {i: [] for i in IMPLS} for s in SCENARIOS}
    for round_ in range(repeats):
        order = list(IMPLS) if round_ % 2 == 0 else list(reversed(IMPLS))
        for scenario, run in SCENARIOS.items():
            for impl in order:
                gc.collect()
                samples[scenario][impl].append(run(IMPLS[impl], n) / n * 1e6)
    return samples


def ratios(samples: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """cluster median / tpe median, per scenario."""
    return {
        scenario: statistics.median(by_impl["cluster"]) / statistics.median(by_impl["tpe"])
        for scenario, by_impl in samples.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0 if every ratio meets the target, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.futures", description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="calls per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per executor")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be >= 1")
    samples = measure(args.n, args.repeats)
    result = ratios(samples)
    print(
        f"cluster.Executor vs ThreadPoolExecutor, {WORKERS} workers, n={args.n:,}, "
        f"median of {args.repeats} (µs per call; ratio: lower is better, target <= {TARGET})"
    )
    print(f"{'scenario':<8}  {'cluster':>16}  {'tpe':>16}  {'ratio':>6}")
    for scenario, by_impl in samples.items():
        cells = []
        for impl in IMPLS:
            runs = by_impl[impl]
            cells.append(f"{statistics.median(runs):6.2f} [{min(runs):.2f}-{max(runs):.2f}]")
        print(f"{scenario:<8}  {cells[0]:>16}  {cells[1]:>16}  {result[scenario]:5.2f}x")
    return 0 if all(r <= TARGET for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
