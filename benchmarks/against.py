"""The thread hot path against an earlier commit: ``python3 -m benchmarks.against REF``.

The rule is that no capability may make the plain thread path slower. Run one after
the other, two commits' numbers differ by more than that on a shared machine (its
speed drifts by 1.5x over a day), so this command loads both into one process: the
package as it is in ``REF`` (``git archive``, imported as ``cluster_ref``) beside the
working tree's, and runs the scenarios of ``benchmarks.run``'s throughput, features
and cancel rows for each in turn, alternating which goes first, ``--rounds`` times.
It prints the median µs per task of each, the ratio of the medians, and the median
of the per-round ratios (the steadiest of the three: both sides of a round ran
within a second of each other). ``--quick``: small sizes, two rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import SimpleQueue
from time import perf_counter
from types import ModuleType
from typing import Any

from benchmarks._report import check
from benchmarks.run import STOP_TIMEOUT, _Hits, noop

ROOT = Path(__file__).resolve().parents[1]


def load_ref(ref: str, into: Path) -> ModuleType:
    """Import the ``cluster`` package of commit ``ref`` as ``cluster_ref``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "cluster"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "cluster").rename(into / "cluster_ref")
    sys.path.insert(0, str(into))
    try:
        # The core imports itself relatively, so the two packages stay apart (only
        # optional parts, such as the dashboard, name ``cluster`` absolutely).
        return importlib.import_module("cluster_ref")
    finally:
        sys.path.remove(str(into))


def _e2e(mod: ModuleType, n: int, workers: int) -> float:
    c = mod.Cluster(workers=workers)
    c.run()
    t0 = perf_counter()
    for _ in range(n):
        c.add_task(noop).submit()
    c.stop(timeout=STOP_TIMEOUT)
    elapsed = perf_counter() - t0
    check(c.stats().succeeded == n, f"{mod.__name__} ran {c.stats().succeeded} of {n}")
    return elapsed


def _submit_then_drain(mod: ModuleType, n: int) -> tuple[float, float]:
    c = mod.Cluster(workers=4)
    t0 = perf_counter()
    for _ in range(n):
        c.add_task(noop).submit()
    t1 = perf_counter()
    c.run()
    c.stop(timeout=STOP_TIMEOUT)
    t2 = perf_counter()
    check(c.stats().succeeded == n, f"{mod.__name__} drained {c.stats().succeeded} of {n}")
    return t1 - t0, t2 - t1


def _features(mod: ModuleType, n: int) -> float:
    c = mod.Cluster(workers=4)
    c.run()
    hits = _Hits()
    queues: list[SimpleQueue[Any]] = []
    t0 = perf_counter()
    for _ in range(n):
        h = c.add_task(noop).with_timeout(10).with_retry(1).on_complete(hits).submit()
        with contextlib.suppress(mod.TaskNotFoundError):  # finished and purged already
            queues.append(c.subscribe(h.id))
    c.stop(timeout=STOP_TIMEOUT)
    elapsed = perf_counter() - t0
    check(len(hits) == n, f"{mod.__name__}: on_complete ran {len(hits)} of {n}")
    return elapsed


def _cancel(mod: ModuleType, n: int, by_handle: bool) -> float:
    c = mod.Cluster(workers=4)
    handles = [c.add_task(noop).submit() for _ in range(n)]
    ids = [h.id for h in handles]
    if not by_handle:
        del handles[:]
    gc.collect()
    t0 = perf_counter()
    if by_handle:
        cancelled = sum(h.cancel() for h in handles)
    else:
        cancelled = sum(c.cancel_task(task_id) for task_id in ids)
    elapsed = perf_counter() - t0
    c.cancel()
    check(cancelled == n, f"{mod.__name__} cancelled {cancelled} of {n}")
    return elapsed


def scenarios(mod: ModuleType, n: int) -> dict[str, float]:
    """µs per task of every scenario, for the package ``mod``."""
    out: dict[str, float] = {}
    for workers in (1, 4):
        out[f"e2e_w{workers}"] = _e2e(mod, n, workers)
        gc.collect()
    out["submit"], out["drain"] = _submit_then_drain(mod, n)
    gc.collect()
    out["features"] = _features(mod, n)
    gc.collect()
    out["cancel_task"] = _cancel(mod, n, by_handle=False)
    gc.collect()
    out["handle_cancel"] = _cancel(mod, n, by_handle=True)
    gc.collect()
    return {name: seconds / n * 1e6 for name, seconds in out.items()}


def compare(
    ref: ModuleType, new: ModuleType, rounds: int, n: int, log: Callable[[str], object]
) -> dict[str, tuple[list[float], list[float]]]:
    """``{scenario: (ref samples, new samples)}``, one sample per round each."""
    scenarios(ref, max(n // 10, 100))  # warm both up: imports, first allocations
    scenarios(new, max(n // 10, 100))
    samples: dict[str, tuple[list[float], list[float]]] = {}
    for r in range(rounds):
        order = [(0, ref), (1, new)] if r % 2 == 0 else [(1, new), (0, ref)]
        for side, mod in order:
            for name, value in scenarios(mod, n).items():
                samples.setdefault(name, ([], []))[side].append(value)
        log(f"  round {r + 1}/{rounds}")
    return samples


def format_table(ref: str, samples: dict[str, tuple[list[float], list[float]]]) -> str:
    """One row per scenario: medians, their ratio, the median of per-round ratios."""
    head = (
        f"{'scenario (µs/task)':20} {ref[:12]:>12} {'working tree':>13}"
        f" {'ratio':>7} {'per-round':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, (old, new) in samples.items():
        per_round = statistics.median(b / a for a, b in zip(old, new, strict=True))
        m_old, m_new = statistics.median(old), statistics.median(new)
        lines.append(
            f"{name:20} {m_old:12.3f} {m_new:13.3f} {m_new / m_old:6.2f}x {per_round:9.2f}x"
        )
    lines.append(
        "ratio: working tree / REF (lower is faster); per-round: median of the rounds' ratios"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.against", description=__doc__)
    parser.add_argument("ref", help="the commit to compare with (a sha, a tag, HEAD~3...)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n", type=int, default=30_000, help="tasks per scenario")
    parser.add_argument("--quick", action="store_true", help="n=2,000 and 2 rounds")
    args = parser.parse_args(argv)
    rounds, n = (2, 2_000) if args.quick else (args.rounds, args.n)
    import cluster

    with tempfile.TemporaryDirectory() as tmp:
        ref = load_ref(args.ref, Path(tmp))
        print(f"{args.ref} against the working tree: {rounds} rounds of n={n:,}", flush=True)
        samples = compare(ref, cluster, rounds, n, lambda line: print(line, flush=True))
    print(format_table(args.ref, samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
