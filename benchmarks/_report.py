"""The table and the JSON file of ``benchmarks.semantics`` and ``benchmarks.coordination``.

Each measured number is a :class:`Row`: its samples (one per repeat, or one), its
unit, what it is compared with, its target and whether the target was met. The
table shows the median of the samples with their min-max.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

DASH = "\u2013"  # en dash, for "min-max" ranges in the table


class BenchmarkError(RuntimeError):
    """A run finished but its outcome was wrong (a lost task, a wrong result...)."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`BenchmarkError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise BenchmarkError(message)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (which must not be empty)."""
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


@dataclass
class Row:
    """One metric of one scenario.

    ``samples``: one value per repeat (the table shows their median [min-max]);
    ``comparison``: what the value is set against, as text (a baseline, a ratio);
    ``ok``: whether ``target`` was met (``None``: no target).
    """

    scenario: str
    metric: str
    samples: list[float]
    unit: str = ""
    comparison: str = ""
    target: str = ""
    ok: bool | None = None

    @property
    def value(self) -> float:
        """The median of the samples."""
        return statistics.median(self.samples)


def fmt(value: float) -> str:
    """A number with about three significant digits (thousands separated)."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_samples(samples: Sequence[float]) -> str:
    """``median [min-max]``, or the single value; counts (``int`` samples) as integers."""
    show = (lambda x: f"{x:,.0f}") if all(type(s) is int for s in samples) else fmt
    m = statistics.median(samples)
    if len(samples) == 1:
        return show(m)
    return f"{show(m)} [{show(min(samples))}{DASH}{show(max(samples))}]"


def format_table(rows: Sequence[Row]) -> str:
    """scenario | metric | value median [min-max] unit | comparison | target | ok."""
    header = ("scenario", "metric", f"value median [min{DASH}max]", "comparison", "target", "")
    cells: list[tuple[str, ...]] = [header]
    previous = None
    for row in rows:
        value = fmt_samples(row.samples) + (f" {row.unit}" if row.unit else "")
        mark = "" if row.ok is None else ("ok" if row.ok else "MISSED")
        label = "" if row.scenario == previous else row.scenario
        previous = row.scenario
        cells.append((label, row.metric, value, row.comparison, row.target, mark))
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Python version, platform, CPU count and load of this machine."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def header_line(title: str, quick: bool, repeats: int) -> str:
    """The first line a module prints: what ran, where."""
    m = machine_info()
    load = f", load {m['loadavg'][0]:.2f}" if "loadavg" in m else ""
    return (
        f"{title} — Python {m['python']}, {m['platform']}, {m['cpu_count']} CPUs{load}; "
        f"{repeats} repeat{'s' * (repeats > 1)}{' — quick' if quick else ''}"
    )


def write_json(
    path: Path, title: str, argv: Sequence[str], quick: bool, rows: Sequence[Row]
) -> None:
    """Every row (with its median) and the machine, as JSON at ``path``."""
    report = {
        "title": title,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "argv": list(argv),
        "quick": quick,
        "rows": [{**asdict(row), "value": row.value} for row in rows],
        "missed": [f"{r.scenario}: {r.metric}" for r in rows if r.ok is False],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


#: A scenario: ``(repeats, quick) -> rows``.
Scenario = Callable[[int, bool], list[Row]]


def run_main(
    prog: str,
    description: str,
    title: str,
    scenarios: dict[str, Scenario],
    footnote: str,
    argv: Sequence[str] | None,
) -> int:
    """The command line of a benchmark module: run its scenarios, print the table (and
    write the JSON); 0 unless an outcome was wrong (that raises ``BenchmarkError``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--repeats", type=int, default=None, help="runs per scenario (3; quick 1)")
    parser.add_argument("--only", action="append", default=[], choices=sorted(scenarios))
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the rows here")  # fmt: skip
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    print(header_line(title, args.quick, repeats), flush=True)
    rows: list[Row] = []
    for name, fn in scenarios.items():
        if args.only and name not in args.only:
            continue
        print(f"  {name} ...", end="", file=sys.stderr, flush=True)
        t0 = perf_counter()
        rows.extend(fn(repeats, args.quick))
        print(f" {perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(format_table(rows))
    print(footnote)
    missed = [f"{r.scenario}: {r.metric}" for r in rows if r.ok is False]
    if missed:
        print("missed:", "; ".join(missed))
    if args.json is not None:
        write_json(args.json, title, sys.argv[1:] if argv is None else argv, args.quick, rows)
        print(f"wrote {args.json}")
    return 0
