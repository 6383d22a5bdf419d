"""Dask benchmark: ``python3 -m benchmarks.dask [--quick] [--n 5000] [--repeats 3] [--threads 2]``.

No-op tasks end to end on one in-process ``LocalCluster`` (threads), µs per task,
in one run, interleaved, median of the repeats (with the min-max):

* anchor: raw ``client.submit(noop, pure=False)`` for every task, then
  ``distributed.wait`` on all of them (Dask gets every task at once);
* ``DaskExecutor`` with its default ``slots`` (the cluster's worker threads): each
  task through the cluster's own scheduler, at most ``slots`` on Dask at once,
  every Result delivered to its handle;
* ``DaskExecutor`` with ``slots`` = ``--deep`` x the worker threads (a deeper
  pipeline: Dask's client sends its messages to the scheduler in batches every
  10 ms and the scheduler to the workers every 2 ms, so a freed slot waits that
  long for its next attempt; a few more slots keep the workers fed while §4's
  order still decides among the rest).

The goal: the executor within 1.2x of the anchor. ``benchmarks.run`` runs
``measure`` as its "dask" scenario (when ``dask[distributed]`` is installed).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import _tasks
from benchmarks._report import DASH
from cluster import Cluster

GOAL = 1.2
QUICK_N = 300


def _anchor(client: Any, n: int) -> float:
    from distributed import wait

    t0 = time.perf_counter()
    futures = [client.submit(_tasks.noop, pure=False) for _ in range(n)]
    wait(futures)
    elapsed = time.perf_counter() - t0
    del futures
    return elapsed / n * 1e6


def _ours(c: Cluster, n: int) -> float:
    t0 = time.perf_counter()
    handles = [c.add_task(_tasks.noop).with_executor("dask").submit() for _ in range(n)]
    for h in handles:
        h.result(600)
    return (time.perf_counter() - t0) / n * 1e6


def _settle(client: Any) -> None:
    """Wait until the scheduler has forgotten the previous round's keys."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if not client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            return
        time.sleep(0.05)


def measure(n: int, repeats: int = 1, threads: int = 2, deep: int = 4) -> dict[str, list[float]]:
    """Start a LocalCluster (1 worker, ``threads`` threads), warm up, then ``repeats``
    interleaved rounds of ``n`` tasks: µs/task per round, by row ("anchor",
    "default", "deep")."""
    logging.getLogger("distributed").setLevel(logging.ERROR)

    from distributed import Client, LocalCluster

    from cluster import DaskExecutor

    rows: dict[str, list[float]] = {"anchor": [], "default": [], "deep": []}
    with (
        LocalCluster(
            processes=False, n_workers=1, threads_per_worker=threads, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
        Cluster(workers=1, executors={"dask": DaskExecutor(client)}) as c_default,
        Cluster(
            workers=1, executors={"dask": DaskExecutor(client, slots=deep * threads)}
        ) as c_deep,
    ):
        warm = min(200, n)
        _anchor(client, warm)
        _ours(c_default, warm)
        _ours(c_deep, warm)
        for _ in range(repeats):
            for name, run in (
                ("anchor", lambda: _anchor(client, n)),
                ("default", lambda: _ours(c_default, n)),
                ("deep", lambda: _ours(c_deep, n)),
            ):
                _settle(client)
                rows[name].append(run())
    return rows


def scenario(size: int) -> dict[str, float | list[float]]:
    """``benchmarks.run``'s "dask" scenario: one round of ``size`` tasks."""
    rows = measure(size)
    anchor, default, deep = rows["anchor"][0], rows["default"][0], rows["deep"][0]
    return {
        "raw_submit_wait_us": anchor,
        "executor_default_slots_us": default,
        "executor_4x_slots_us": deep,
        "default_over_raw": default / anchor,
        "4x_over_raw": deep / anchor,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print its table; 1 if the deep row misses the goal."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.dask", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"n={QUICK_N}, one round")
    parser.add_argument("--n", type=int, default=5000, help="tasks per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="worker threads (1 worker)")
    parser.add_argument("--deep", type=int, default=4, help="the deep row's slots per thread")
    args = parser.parse_args(argv)
    n, repeats = (QUICK_N, 1) if args.quick else (args.n, args.repeats)
    threads, deep = args.threads, args.deep * args.threads
    t0 = time.perf_counter()
    rows = measure(n, repeats, threads, args.deep)
    print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    anchor = statistics.median(rows["anchor"])
    table = [
        ("raw client.submit + wait", "-", rows["anchor"]),
        ("DaskExecutor", f"slots={threads} (default)", rows["default"]),
        ("DaskExecutor", f"slots={deep}", rows["deep"]),
    ]
    print(f"{n} no-op tasks, LocalCluster(processes=False, 1 worker x {threads} threads)")
    header = ("scenario", "slots", "us/task (median)", "min-max", "ratio")
    cells = [header]
    for name, slots, xs in table:
        med = statistics.median(xs)
        spread = f"{min(xs):.0f}{DASH}{max(xs):.0f}"
        cells.append((name, slots, f"{med:.0f}", spread, f"{med / anchor:.2f}x"))
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"ratio = median / raw median; goal <= {GOAL:.2f}x")
    return 0 if statistics.median(rows["deep"]) / anchor <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
