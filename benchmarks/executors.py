"""Executor benchmarks: ``python3 -m benchmarks.executors [--quick] [--repeats N]``.

Each row runs ``cluster`` and its anchor side by side in one process, interleaved,
and reports the median over the repeats with the min-max:

* cpu: 8 CPU-bound tasks of ~0.5 s on ``ProcessExecutor(2)`` vs
  ``ProcessPoolExecutor(2)``: wall time, and the speedup over running them serially.
* process no-op: 2,000 no-op tasks end to end on warm pools, µs per task.
* kill: a task that ignores SIGTERM, timeout 0.2 s: the Result's delay after the
  deadline, and when its process is gone (grace 0.5 s: TERM, wait, KILL).
* async sleep: 10,000 coroutines each ``await asyncio.sleep(0.1)`` vs
  ``asyncio.gather`` of the same on a bare loop.
* async no-op: no-op ``async def`` tasks end to end vs
  ``asyncio.run_coroutine_threadsafe`` onto a loop thread, µs per task.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from benchmarks import _tasks
from benchmarks._report import DASH
from cluster import Cluster, ProcessExecutor, TaskTimeoutError

Row = tuple[str, str, list[float], list[float] | None, str]  # scenario, metric, ours, anchor, goal


def _calibrate(seconds: float) -> int:
    """How many ``burn`` steps take about ``seconds`` here."""
    n = 200_000
    while True:
        t0 = time.perf_counter()
        _tasks.burn(n)
        dt = time.perf_counter() - t0
        if dt > 0.05:
            return int(n * seconds / dt)
        n *= 2


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _pct(xs: Sequence[float], p: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------- processes


def cpu_rows(repeats: int, quick: bool) -> list[Row]:
    steps = _calibrate(0.05 if quick else 0.5)
    t0 = time.perf_counter()
    for _ in range(8):
        _tasks.burn(steps)
    serial = time.perf_counter() - t0
    ours: list[float] = []
    theirs: list[float] = []
    with (
        Cluster(workers=1, executors={"cpu": ProcessExecutor(2)}) as c,
        ProcessPoolExecutor(2) as ppe,
    ):
        for f in [ppe.submit(_tasks.noop) for _ in range(2)]:
            f.result()  # both pools warm
        for h in [c.add_task(_tasks.noop).with_executor("cpu").submit() for _ in range(2)]:
            h.result(60)
        for _ in range(repeats):
            t0 = time.perf_counter()
            burns = [c.add_task(_tasks.burn, steps).with_executor("cpu").submit() for _ in range(8)]
            for b in burns:
                b.result(600)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            futures = [ppe.submit(_tasks.burn, steps) for _ in range(8)]
            for fut in futures:
                fut.result()
            theirs.append(time.perf_counter() - t0)
    return [
        ("cpu (8 x ~0.5 s, 2 procs)", "wall_s", ours, theirs, "lower"),
        (
            "",
            "speedup_vs_serial",
            [serial / x for x in ours],
            [serial / x for x in theirs],
            ">= 1.8x and >= PPE",
        ),
    ]


def noop_process_rows(repeats: int, quick: bool) -> list[Row]:
    n = 200 if quick else 2000
    ours: list[float] = []
    theirs: list[float] = []
    with (
        Cluster(workers=1, executors={"cpu": ProcessExecutor(2)}) as c,
        ProcessPoolExecutor(2) as ppe,
    ):
        for f in [ppe.submit(_tasks.noop) for _ in range(4)]:
            f.result()
        for h in [c.add_task(_tasks.noop).with_executor("cpu").submit() for _ in range(4)]:
            h.result(60)
        for _ in range(repeats):
            t0 = time.perf_counter()
            hs = [c.add_task(_tasks.noop).with_executor("cpu").submit() for _ in range(n)]
            for h in hs:
                h.result(600)
            ours.append((time.perf_counter() - t0) / n * 1e6)
            t0 = time.perf_counter()
            fs = [ppe.submit(_tasks.noop) for _ in range(n)]
            wait_futures(fs)
            theirs.append((time.perf_counter() - t0) / n * 1e6)
    return [(f"process no-op (n={n})", "e2e_us", ours, theirs, "<= 1.0x PPE")]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


def kill_rows(repeats: int, quick: bool) -> list[Row]:
    samples = 5 if quick else 20
    delays: list[float] = []
    gone_after: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Cluster(workers=1, executors={"cpu": ProcessExecutor(1)}) as c,
    ):
        for i in range(samples):
            pid_file = os.path.join(tmp, f"pid{i}")
            h = c.add_task(_tasks.ignore_term_and_spin, pid_file).with_executor("cpu")
            handle = h.with_timeout(0.2).with_cache(60).submit()
            while not os.path.exists(pid_file) or not Path(pid_file).read_text():
                time.sleep(0.001)
            pid = int(Path(pid_file).read_text())
            result = handle.wait(30)
            got = time.monotonic()
            assert result is not None and isinstance(result.error, TaskTimeoutError)
            info = c.info(handle.id)
            assert info.started_at is not None
            deadline_wall = info.started_at.timestamp() + 0.2
            delays.append((time.time() - (got - time.monotonic()) - deadline_wall) * 1e3)
            while not _gone(pid):
                time.sleep(0.001)
            gone_after.append((time.time() - deadline_wall) * 1e3)
    return [
        ("kill (ignores TERM, timeout 0.2 s)", "result_after_deadline_p50_ms",
         [_median(delays)], None, ""),
        ("", "result_after_deadline_p99_ms", [_pct(delays, 99)], None, "<= 50 ms"),
        ("", "group_gone_after_deadline_max_ms", [max(gone_after)], None,
         "<= grace (500) + 100 ms"),
    ]  # fmt: skip


# ---------------------------------------------------------------- asyncio


def async_sleep_rows(repeats: int, quick: bool) -> list[Row]:
    n = 1000 if quick else 10_000
    ours: list[float] = []
    theirs: list[float] = []

    async def bare() -> None:
        await asyncio.gather(*(_tasks.asleep(0.1) for _ in range(n)))

    with Cluster(workers=1, async_limit=n) as c:
        c.add_task(_tasks.anoop).submit().result(30)  # the loop is up
        for _ in range(repeats):
            t0 = time.perf_counter()
            hs = [c.add_task(_tasks.asleep, 0.1).submit() for _ in range(n)]
            for h in hs:
                h.result(600)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            asyncio.run(bare())
            theirs.append(time.perf_counter() - t0)
    return [(f"async sleep(0.1) x {n:,}", "wall_s", ours, theirs, "<= 1.5x bare loop")]


def async_noop_rows(repeats: int, quick: bool) -> list[Row]:
    n = 2000 if quick else 20_000
    ours: list[float] = []
    theirs: list[float] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with Cluster(workers=1) as c:
            c.add_task(_tasks.anoop).submit().result(30)
            for _ in range(repeats):
                t0 = time.perf_counter()
                hs = [c.add_task(_tasks.anoop).submit() for _ in range(n)]
                for h in hs:
                    h.result(600)
                ours.append((time.perf_counter() - t0) / n * 1e6)
                t0 = time.perf_counter()
                fs = [asyncio.run_coroutine_threadsafe(_tasks.anoop(), loop) for _ in range(n)]
                wait_futures(fs)
                theirs.append((time.perf_counter() - t0) / n * 1e6)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return [(f"async no-op (n={n:,})", "e2e_us", ours, theirs,
             "<= 1.0x run_coroutine_threadsafe")]  # fmt: skip


SCENARIOS: dict[str, Callable[[int, bool], list[Row]]] = {
    "cpu": cpu_rows,
    "process-noop": noop_process_rows,
    "kill": kill_rows,
    "async-sleep": async_sleep_rows,
    "async-noop": async_noop_rows,
}


def _fmt(xs: list[float] | None) -> str:
    if not xs:
        return "—"
    m = _median(xs)
    if len(xs) == 1:
        return f"{m:.3g}"
    return f"{m:.3g} [{min(xs):.3g}{DASH}{max(xs):.3g}]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the executor scenarios and print their table."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.executors")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], choices=sorted(SCENARIOS))
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for name, fn in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"  {name} ...", file=sys.stderr, flush=True)
        rows.extend(fn(args.repeats, args.quick))
    header = (
        "scenario",
        "metric",
        f"cluster median [min{DASH}max]",
        "anchor median",
        "ratio",
        "goal",
    )
    table: list[tuple[str, ...]] = [header]
    for scenario, metric, ours, theirs, goal in rows:
        ratio = "—" if not theirs else f"{_median(ours) / _median(theirs):.2f}x"
        table.append((scenario, metric, _fmt(ours), _fmt(theirs), ratio, goal))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("ratio = cluster median / anchor median (speedup: higher is better; others: lower).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
