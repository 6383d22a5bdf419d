"""One script, two places to run it: this machine's threads, or a Dask cluster.

    python examples/dask_demo.py            # both, one after the other
    python examples/dask_demo.py --local    # threads only (no Dask needed)
    python examples/dask_demo.py --dask     # on Dask only (pip install 'cluster[dask]')
    python examples/dask_demo.py --dask --scheduler tcp://host:8786   # an existing cluster

``run_jobs`` is the same in both cases: priorities, retries with backoff and a
subscriber come from ``cluster``'s own scheduler. The only difference is the
executor the tasks name: ``"threads"`` (the default pool) or ``"dask"`` (a
``DaskExecutor`` over a ``dask.distributed`` client; here a ``LocalCluster`` of
two worker threads in this process unless ``--scheduler`` is given).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from cluster import Cluster, FixedBackoff, current

JOBS = 12


def simulate(seed: int) -> float:
    """A flaky little "simulation": a first attempt fails now and then (a retry helps)."""
    rng = random.Random(seed)
    time.sleep(0.02)  # some work
    if current().attempt == 0 and rng.random() < 0.3:  # current(): this attempt's context
        raise RuntimeError(f"seed {seed}: numerical trouble")
    return round(rng.random(), 3)


def run_jobs(c: Cluster, executor: str) -> None:
    """Submit every job to ``executor``, print each as it ends, then a summary."""
    done = []
    handles = [
        c.add_task(simulate, seed)
        .with_executor(executor)
        .with_id(f"{executor}-{seed}")
        .with_priority(seed % 3)  # higher first among due tasks
        .with_retry(2)
        .with_backoff(FixedBackoff(0.05))
        .on_complete(lambda tid, value, error: done.append(tid))
        .submit()
        for seed in range(JOBS)
    ]
    ok = 0
    for h in handles:
        result = h.wait()
        assert result is not None
        if result.ok:
            ok += 1
            print(f"  {h.id}: {result.value}")
        else:
            print(f"  {h.id}: failed: {result.error}")
    c.wait_idle()
    stats = c.stats()
    print(f"  {ok}/{JOBS} succeeded after {stats.retried} retries; {len(done)} callbacks ran")


def local() -> None:
    """The script on this machine: the default thread pool."""
    print("local (threads):")
    with Cluster(workers=2) as c:
        run_jobs(c, "threads")


def on_dask(scheduler: str | None) -> None:
    """The same script on Dask: only the executor changes."""
    from distributed import Client, LocalCluster

    from cluster import DaskExecutor

    print(f"dask ({scheduler or 'LocalCluster, 2 threads'}):")
    dask_cluster: Any = None
    if scheduler is None:
        dask_cluster = LocalCluster(
            processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"
        )
    client = Client(scheduler or dask_cluster)
    try:
        with Cluster(workers=1, executors={"dask": DaskExecutor(client)}) as c:
            run_jobs(c, "dask")
    finally:
        client.close()
        if dask_cluster is not None:
            dask_cluster.close()


def main() -> None:
    """Parse the flags, run locally and/or on Dask."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", action="store_true", help="run on threads only")
    parser.add_argument("--dask", action="store_true", help="run on Dask only")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler")
    options = parser.parse_args()
    both = options.local == options.dask
    if options.local or both:
        local()
    if options.dask or both:
        on_dask(options.scheduler)


if __name__ == "__main__":
    main()
