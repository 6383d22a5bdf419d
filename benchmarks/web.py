"""The dashboard and the metrics at scale: ``python3 -m benchmarks.web``.

1. **Dashboard JSON at 1M tasks held.** A cluster that is not running holds
   ``--tasks`` (default 1,000,000) queued tasks under 100 names and 10 tags; its
   dashboard is served on loopback and each request is timed from the client, a new
   connection each (as the page makes them), median of ``--repeats``. The first
   listing builds the cluster's ordered index once (shown apart); the state filter
   and the per-name stats scan every task (shown for what they cost).
2. **``prometheus_text()`` with 1,000 task names**, every name with attempts in both
   histograms: "all changed" runs one more attempt of every name before each call
   (the worst case: every series rendered anew), "unchanged" calls it again.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import statistics
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from cluster import Cluster
from cluster.metrics import prometheus_text


def _get(host: str, port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body[:200])
        return body
    finally:
        conn.close()


def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds of ``fn()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def dashboard(tasks: int, repeats: int) -> list[tuple[str, float, float]]:
    """Rows (what, median ms, min ms) for the dashboard's JSON at ``tasks`` held."""
    c = Cluster(workers=1)  # never run: every task stays queued
    try:
        start = time.perf_counter()
        for i in range(tasks):
            c.add_task(int).with_name(f"job-{i % 100}").with_tags(f"tag-{i % 10}").submit()
        held = time.perf_counter() - start
        print(f"  held {tasks:,} tasks (submitted in {held:.1f} s)")
        gc.collect()
        parts = urlsplit(c.serve())
        host, port = parts.hostname, parts.port
        assert host is not None and port is not None

        def get(path: str) -> Callable[[], bytes]:
            return lambda: _get(host, port, path)

        rows = []
        start = time.perf_counter()
        get("/api/tasks?limit=20")()
        rows.append(("first listing (builds the index)", (time.perf_counter() - start) * 1e3, 0.0))
        for label, path, n in [
            ("/api/tasks?limit=20 (the page)", "/api/tasks?limit=20", repeats),
            ("/api/tasks?limit=100", "/api/tasks?limit=100", repeats),
            ("/api/tasks?limit=20&offset=500000", "/api/tasks?limit=20&offset=500000", repeats),
            ("/api/tasks?name=job-7&limit=20", "/api/tasks?name=job-7&limit=20", repeats),
            ("/api/tasks?tag=tag-3&limit=20", "/api/tasks?tag=tag-3&limit=20", repeats),
            ("/api/stats", "/api/stats", repeats),
            ("/dead-letters?limit=20", "/dead-letters?limit=20", repeats),
            ("/metrics", "/metrics", repeats),
            ("/api/tasks?state=pending (scans)", "/api/tasks?state=pending&limit=20", 3),
            ("/api/names (stats_by_name scans)", "/api/names", 3),
        ]:
            median, low = _median_ms(get(path), n)
            rows.append((label, median, low))
        return rows
    finally:
        c.cancel()


def metrics(names: int, repeats: int) -> list[tuple[str, float, float]]:
    """Rows for ``prometheus_text()`` with ``names`` task names."""
    c = Cluster(workers=2)
    try:
        prometheus_text(c)  # the histograms count from here
        c.run()

        def one_attempt_each() -> None:
            for i in range(names):
                c.add_task(int).with_name(f"tasks.job_{i}").submit()
            assert c.wait_idle(60)

        one_attempt_each()
        text = prometheus_text(c)
        lines = text.count("\n")
        print(f"  {names:,} names: {lines:,} lines, {len(text) / 1e6:.1f} MB per scrape")
        changed = []
        for _ in range(repeats):
            one_attempt_each()
            start = time.perf_counter()
            prometheus_text(c)
            changed.append((time.perf_counter() - start) * 1e3)
        same = _median_ms(lambda: prometheus_text(c), repeats)
        return [
            (
                f"prometheus_text, {names:,} names, all changed",
                statistics.median(changed),
                min(changed),
            ),
            (f"prometheus_text, {names:,} names, unchanged", *same),
        ]
    finally:
        c.stop(timeout=30)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both benchmarks and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tasks", type=int, default=1_000_000, help="tasks held (default 1,000,000)")
    ap.add_argument("--names", type=int, default=1000, help="task names for the metrics (1,000)")
    ap.add_argument("--repeats", type=int, default=30, help="requests per measurement (30)")
    ap.add_argument("--quick", action="store_true", help="100,000 tasks and 10 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.repeats = min(args.tasks, 100_000), min(args.repeats, 10)
    print("dashboard JSON over loopback:")
    rows = dashboard(args.tasks, args.repeats)
    print("metrics:")
    rows += metrics(args.names, args.repeats)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'median ms':>10}  {'min ms':>8}")
    for label, median, low in rows:
        print(f"{label:{width}}  {median:10.2f}  {low:8.2f}")


if __name__ == "__main__":
    main()
