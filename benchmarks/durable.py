"""Durable tasks benchmark: ``python3 -m benchmarks.durable [--quick] [--dir DIR] [--json PATH]``.

In one run, side by side (every store file in a fresh temporary directory under
``--dir``, default the system's temporary directory):

- ``fsync``: the file system's own ceiling, 4 KiB overwrites each followed by
  ``fdatasync``, per second (a durable commit costs at least one);
- ``submit 1 thread``: durable ``submit()`` calls per second from one thread (WAL,
  ``synchronous=FULL``: each returns once its commit is fsynced), on a cluster that
  is not running, so only submission is measured;
- ``huey enqueue``: ``huey.SqliteHuey`` enqueues per second from one thread, with
  the same journal mode and ``synchronous`` (what huey uses is printed);
- ``submit 4 threads``: durable submits per second, four submitting threads (group
  commit shares fsyncs);
- ``submit_all 10k``: one ``submit_all`` of 10,000 durable builders (one
  transaction), tasks per second, with and without building the builders;
- ``end to end``: 20,000 no-op tasks submitted (``submit_all`` in chunks of 1,000)
  and finished by 4 workers, durable vs the same tasks in memory only;
- ``recovery``: 100,000 stored tasks (written by a child process that then exits
  without closing the store) brought back: ``Cluster(store=...)`` (open, load) and
  ``run()`` (rebuild), in seconds.

Targets (checked and shown): ≥ 1.0x huey and ≥ 5k/s from one thread, ≥ 30k/s from
four threads, ≥ 100k tasks/s for ``submit_all``, < 1 s recovery. The run takes
about a minute (``--quick``: a few seconds, smaller sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent


def noop() -> None:
    """The task of every scenario."""


@dataclass
class Line:
    """One measured number, its unit, its target (if any) and a note."""

    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None
    note: str = ""


@dataclass
class Report:
    """Every line of the run, printed as a table and optionally written as JSON."""

    lines: list[Line] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, line: Line) -> Line:
        self.lines.append(line)
        mark = "" if line.ok is None else ("  ok" if line.ok else "  MISSED")
        target = f"  (target {line.target})" if line.target else ""
        note = f"  [{line.note}]" if line.note else ""
        print(f"{line.name:<34} {line.value:>12,.1f} {line.unit:<8}{target}{mark}{note}")
        sys.stdout.flush()
        return line


@contextmanager
def scratch(base: str | None) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cluster-durable-bench-", dir=base))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def durable_cluster(path: Path, workers: int = 1) -> Cluster:
    c = Cluster(workers=workers, store=path)
    c.register("noop", noop)
    return c


def discard(c: Cluster) -> None:
    """Stop a benchmark cluster, whatever it still holds (outside the timings)."""
    c.cancel()
    c.stop(timeout=60)


# ----------------------------------------------------------------------------- scenarios


def fsync_rate(directory: Path, seconds: float) -> float:
    """4 KiB overwrites of a preallocated file, each followed by ``fdatasync``, per
    second: about what one commit of a write-ahead log in steady state costs."""
    path = directory / "fsync.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        block = b"\0" * 4096
        for _ in range(256):
            os.write(fd, block)
        os.fsync(fd)
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            os.pwrite(fd, block, (n % 256) * 4096)
            os.fdatasync(fd)
            n += 1
        return n / (time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()


def submits_per_second(directory: Path, threads: int, seconds: float) -> float:
    """Durable submits per second from ``threads`` threads, for about ``seconds``."""
    c = durable_cluster(directory / f"submit-{threads}.db")
    counts = [0] * threads
    go = threading.Barrier(threads + 1)
    stop = threading.Event()

    def submitter(k: int) -> None:
        add = c.add_task
        go.wait()
        n = 0
        while not stop.is_set():
            for _ in range(50):
                add("noop").submit()
            n += 50
        counts[k] = n

    workers = [threading.Thread(target=submitter, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    go.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    discard(c)
    return sum(counts) / elapsed


def huey_enqueues_per_second(directory: Path, seconds: float) -> tuple[float, dict[str, Any]]:
    """``SqliteHuey`` enqueues per second from one thread, and the settings it ran with."""
    try:
        from huey import SqliteHuey  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return float("nan"), {"error": "huey is not installed (python3 -m pip install huey)"}
    default = SqliteHuey(filename=str(directory / "huey-default.db"))
    conn = default.storage.conn
    settings = {
        "default journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        "default synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
    }
    default.storage.close()
    # As comparable as huey allows: WAL (its default) and synchronous=FULL (fsync=True).
    h = SqliteHuey(filename=str(directory / "huey.db"), fsync=True, journal_mode="wal")
    h.flush()  # (a fresh queue each round)
    conn = h.storage.conn
    settings["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
    settings["synchronous"] = conn.execute("PRAGMA synchronous").fetchone()[0]

    @h.task()  # type: ignore[untyped-decorator]
    def job() -> None:
        """A huey task: calling it enqueues it (no consumer runs)."""

    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            job()
        n += 50
    rate = n / (time.perf_counter() - started)
    settings["queued"] = h.pending_count()
    h.storage.close()
    return rate, settings


def store_writes_per_second(directory: Path, seconds: float) -> float:
    """``SQLiteStore.write`` of one task-sized row per call, one thread: the store's floor."""
    from cluster import SQLiteStore
    from cluster._store import Row

    store = SQLiteStore(directory / "store-only.db")
    store.open()
    doc = {"pad": "x" * 450}  # about the size of a durable no-op task's doc
    try:
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            store.write([Row(f"r{n}", n, "pending", doc)])
            n += 1
        return n / (time.perf_counter() - started)
    finally:
        store.close()


def submit_all_rate(directory: Path, n: int) -> tuple[float, float]:
    """(tasks/s of one ``submit_all`` call, tasks/s building the builders included)."""
    c = durable_cluster(directory / "submit-all.db")
    started = time.perf_counter()
    builders = [c.add_task("noop") for _ in range(n)]
    built = time.perf_counter()
    handles = c.submit_all(builders)
    done = time.perf_counter()
    assert len(handles) == n
    discard(c)
    return n / (done - built), n / (done - started)


def end_to_end(directory: Path, n: int, chunk: int = 1000) -> tuple[float, float]:
    """Seconds for ``n`` no-op tasks submitted and finished: (durable, in memory)."""
    out = []
    for durable in (True, False):
        c = durable_cluster(directory / "e2e.db", workers=4) if durable else Cluster(workers=4)
        c.run()
        started = time.perf_counter()
        for _ in range(n // chunk):
            if durable:
                c.submit_all([c.add_task("noop") for _ in range(chunk)])
            else:
                c.submit_all([c.add_task(noop) for _ in range(chunk)])
        while c.stats().succeeded < n:
            c.wait_idle(60)
        out.append(time.perf_counter() - started)
        c.stop(timeout=60)
    return out[0], out[1]


_MAKE_STORE = """
import os, sys
from cluster import Cluster
def noop(): pass
c = Cluster(workers=1, store=sys.argv[1])
c.register("noop", noop)
n, chunk = int(sys.argv[2]), 1_000
for k in range(0, n, chunk):
    c.submit_all([c.add_task("noop").with_delay(3600) for _ in range(min(chunk, n - k))])
os._exit(0)  # committed: leave without closing (as a crash would)
"""


def recovery(directory: Path, n: int) -> tuple[float, float, float]:
    """Seconds to bring back ``n`` stored tasks: (Cluster(store=...), run(), make)."""
    path = directory / "recover.db"
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", _MAKE_STORE, str(path), str(n)], check=True, env=env)
    made = time.perf_counter() - started
    t0 = time.perf_counter()
    c = Cluster(workers=1, store=path)
    t1 = time.perf_counter()
    c.register("noop", noop)
    c.run()
    t2 = time.perf_counter()
    stats = c.stats()
    assert stats.delayed == n, stats
    discard(c)
    return t1 - t0, t2 - t1, made


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--dir", default=None, help="where the store files go")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    options = parser.parse_args(argv)
    quick = options.quick
    seconds = 0.5 if quick else 3.0
    report = Report()
    with scratch(options.dir) as directory:
        report.facts.update(
            directory=str(directory),
            python=sys.version.split()[0],
            sqlite=sqlite3.sqlite_version,
            cpus=os.cpu_count(),
        )
        print(f"store files in {directory} (SQLite {sqlite3.sqlite_version}, "
              f"{os.cpu_count()} CPUs)")  # fmt: skip
        disk = fsync_rate(directory, 0.3 if quick else 1.0)
        report.add(Line("fdatasync (4 KiB overwrite)", disk, "/s", note="the disk's ceiling"))

        # One thread, ours and huey's interleaved (the machine is shared: medians of 3).
        ones, hueys, floors = [], [], []
        huey_settings: dict[str, Any] = {}
        for _ in range(1 if quick else 3):
            ones.append(submits_per_second(directory, 1, seconds / 3))
            rate, huey_settings = huey_enqueues_per_second(directory, seconds / 3)
            hueys.append(rate)
            floors.append(store_writes_per_second(directory, seconds / 3))
        one, huey_rate = statistics.median(ones), statistics.median(hueys)
        report.facts["huey"] = huey_settings
        report.add(Line("store.write of one row, 1 thread", statistics.median(floors), "/s",
                        note="the store alone: one commit each"))  # fmt: skip
        report.add(Line("durable submit, 1 thread", one, "/s", "≥ 5,000/s", one >= 5000))
        report.add(Line("huey SqliteHuey enqueue, 1 thread", huey_rate, "/s",
                        note=", ".join(f"{k}={v}" for k, v in huey_settings.items())))  # fmt: skip
        ratio = one / huey_rate if huey_rate == huey_rate else float("nan")
        report.add(Line("durable / huey, 1 thread", ratio, "x", "≥ 1.0x", ratio >= 1.0))

        four = submits_per_second(directory, 4, seconds)
        report.add(Line("durable submit, 4 threads", four, "/s", "≥ 30,000/s", four >= 30_000))

        size = 2_000 if quick else 10_000
        call, whole = submit_all_rate(directory, size)
        report.add(Line(f"submit_all of {size:,} (the call)", call, "tasks/s", "≥ 100,000/s",
                        call >= 100_000))  # fmt: skip
        report.add(Line(f"submit_all of {size:,} (with builders)", whole, "tasks/s"))

        size = 4_000 if quick else 20_000
        durable_s, memory_s = end_to_end(directory, size)
        report.add(Line(f"end to end {size:,}, durable", size / durable_s, "tasks/s"))
        report.add(Line(f"end to end {size:,}, in memory", size / memory_s, "tasks/s"))
        report.add(Line("end to end, durable / in memory", durable_s / memory_s, "x time"))

        size = 10_000 if quick else 100_000
        opened, ran, made = recovery(directory, size)
        report.add(Line(f"recovery of {size:,}: Cluster(store=)", opened, "s",
                        note="open, check, load the rows"))  # fmt: skip
        report.add(Line(f"recovery of {size:,}: run()", ran, "s", "< 1 s", ran < 1.0,
                        note="rebuild the queues"))  # fmt: skip
        report.add(Line(f"recovery of {size:,}: both", opened + ran, "s", "< 1 s",
                        opened + ran < 1.0, note=f"(writing them took {made:.1f} s)"))  # fmt: skip
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {"facts": report.facts, "lines": [line.__dict__ for line in report.lines]},
                indent=2,
                default=str,
            )
        )
    missed = [line.name for line in report.lines if line.ok is False]
    if missed:
        print("missed:", "; ".join(missed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
