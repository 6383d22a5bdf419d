"""``cluster run`` against ``xargs -P`` and GNU ``parallel``: ``python3 -m benchmarks.cli``.

Runs the same file of ``--count`` (default 2,000) ``true`` commands with ``--jobs``
(default 4) at a time, three ways in one run, each as a real process with its output
to /dev/null:

* ``cluster run FILE -j N`` (``python -m cluster``, this checkout);
* ``xargs -P N -I{} sh -c {} < FILE``: every line through ``sh -c``, as the others do;
* ``parallel --will-cite -j N < FILE`` (GNU parallel, the Debian package).

A tool that is not installed is skipped, and said so. With ``--repeats`` the tools
take turns and the median wall time is shown, with the ratio to parallel's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(path: Path, jobs: int) -> dict[str, list[str] | None]:
    """Each tool's command line (None: not installed), reading the jobs from stdin or
    ``path``."""
    return {
        "cluster run": [sys.executable, "-m", "cluster", "run", str(path), "-j", str(jobs)],
        "xargs -P": (
            ["xargs", "-P", str(jobs), "-I{}", "sh", "-c", "{}"] if shutil.which("xargs") else None
        ),
        "GNU parallel": (
            ["parallel", "--will-cite", "-j", str(jobs)] if shutil.which("parallel") else None
        ),
    }


def time_once(argv: list[str], path: Path) -> float:
    """Wall seconds of one run of ``argv`` with ``path`` on its stdin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(path, "rb") as stdin:
        start = time.perf_counter()
        subprocess.run(
            argv,
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            check=True,
        )
        return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print a table; returns 0."""
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.cli", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="commands (default 2000)")
    parser.add_argument("--jobs", type=int, default=4, help="at a time (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool (default 1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobs.txt"
        path.write_text("true\n" * args.count)
        tools = commands(path, args.jobs)
        for name, tool in tools.items():
            if tool is None:
                print(f"{name}: not installed, skipped")
        runnable = {name: tool for name, tool in tools.items() if tool is not None}
        times: dict[str, list[float]] = {name: [] for name in runnable}
        for _ in range(args.repeats):
            for name, tool in runnable.items():
                times[name].append(time_once(tool, path))
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    reference = medians.get("GNU parallel")
    print(f"{args.count} x `true`, -j {args.jobs}, median of {args.repeats}:")
    print(f"{'tool':<14}{'wall s':>9}{'ms/command':>12}{'/ parallel':>12}")
    for name, wall in medians.items():
        ratio = f"{wall / reference:.2f}x" if reference else "-"
        print(f"{name:<14}{wall:>9.2f}{wall / args.count * 1000:>12.3f}{ratio:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
