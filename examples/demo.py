"""A tour of `cluster`: a small nightly reporting job, simulated in one process.

It shows priorities, a delayed start, a retry with exponential backoff and jitter,
a timeout, a cancel, two subscribers, a late subscribe to a cached result, CPU work
in child processes (one of them a runaway that a timeout kills) and an `async def`
task on the event loop. Run it with `make demo` (or `python examples/demo.py`); it
takes about 4 seconds.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from cluster import (
    Cluster,
    ExponentialBackoff,
    ProcessExecutor,
    Result,
    TaskCancelledError,
    TaskTimeoutError,
    current,
)

T0 = time.monotonic()
print_lock = threading.Lock()


def say(message: str) -> None:
    """Print with the time since the demo started and the thread that speaks."""
    with print_lock:
        where = threading.current_thread().name.replace("cluster-", "")
        print(f"[{time.monotonic() - T0:5.2f}s {where:>9}] {message}", flush=True)


# ---- the jobs --------------------------------------------------------------


def build_report(name: str) -> str:
    """A CPU-ish job: render one report."""
    time.sleep(0.05)
    say(f"rendered report {name!r}")
    return f"{name}.pdf"


def fetch_rates(source: str) -> dict[str, float]:
    """An I/O job whose first two attempts hit a flaky upstream."""
    ctx = current()
    if ctx.attempt < 2:
        say(f"fetch {source}: attempt {ctx.attempt} -> connection reset")
        raise ConnectionResetError(f"{source} reset the connection")
    say(f"fetch {source}: attempt {ctx.attempt} -> ok")
    return {"EUR": 1.0, "USD": 1.08}


def export_archive() -> str:
    """A job that would run for a minute; it honours its context, so a timeout stops it."""
    ctx = current()
    say(f"export started, deadline in {ctx.deadline - time.monotonic():.2f}s")  # type: ignore[operator]
    ctx.cancelled.wait(60)  # real work would call ctx.check() between chunks
    say(f"export noticed it was signalled: reason={ctx.reason!r}")
    return "archive.tar"


def backfill_history() -> int:
    """A long job that somebody cancels."""
    ctx = current()
    for day in range(1000):
        if ctx.cancelled.wait(0.02):
            say(f"backfill stopped at day {day} (reason={ctx.reason!r})")
            ctx.check()  # raises TaskCancelledError
        ctx.progress(day)
    return 1000


def send_digest() -> str:
    """The delayed job: runs at its start time."""
    say("digest e-mail sent")
    return "sent"


def crunch_numbers(n: int) -> tuple[int, int]:
    """CPU-bound work, in a child process (the GIL does not hold it back there)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return os.getpid(), total


def runaway() -> None:
    """A CPU loop that never checks its context: only killing its process stops it."""
    while True:
        pass


async def fetch_inventory(store: str) -> dict[str, int]:
    """An `async def` task: it runs on the cluster's event loop, beside the threads."""
    await asyncio.sleep(0.1)  # a stand-in for an HTTP call
    say(f"inventory of {store!r} fetched on the event loop")
    return {"widgets": 12, "gadgets": 3}


def on_failure(task_id: str, error: BaseException) -> None:
    say(f"on_failure({task_id!r}): {type(error).__name__}")


def show(label: str, result: Result[Any]) -> None:
    outcome = repr(result.value) if result.ok else f"{type(result.error).__name__}"
    say(f"{label}: {outcome}")


def main() -> None:
    gate = threading.Event()
    with Cluster(workers=3, executors={"cpu": ProcessExecutor(2)}) as c:
        say("== 1. priorities: all three workers are busy, six reports wait in the queue")
        for _ in range(3):
            c.add_task(gate.wait, 5).submit()
        for name, priority in [("weekly", 1), ("daily", 5), ("audit", 9), ("misc", 0)]:
            c.add_task(build_report, name).with_priority(priority).submit()
        for name in ("q1", "q2"):  # same priority as "daily": FIFO among them
            c.add_task(build_report, name).with_priority(5).submit()
        say("   queued: weekly(1) daily(5) audit(9) misc(0) q1(5) q2(5); releasing the workers")
        gate.set()
        time.sleep(0.5)

        say("== 2. a delayed start: the digest goes out 0.4 s from now")
        digest = c.add_task(send_digest).with_delay(0.4).with_id("digest").submit()

        say("== 3. retry with exponential backoff and jitter")
        rates = (
            c.add_task(fetch_rates, "ecb")
            .with_id("rates")
            .with_retry(3)
            .with_backoff(ExponentialBackoff(0.1, 2.0, max=1.0))
            .with_jitter(0.2)
            .retry_if(lambda e: isinstance(e, ConnectionError))
            .with_cache(ttl=60)
            .submit()
        )
        first, second = c.subscribe(rates.id), c.subscribe(rates.id)  # two subscribers

        say("== 4. a timeout: the export may run 0.3 s")
        export = c.add_task(export_archive).with_timeout(0.3).on_failure(on_failure).submit()

        say("== 5. a cancel: the backfill is cancelled after 0.25 s")
        backfill = c.add_task(backfill_history).with_id("backfill").submit()
        time.sleep(0.25)
        say(f"   backfill progress before cancel: day {c.info('backfill').progress}")
        say(f"   cancel_task('backfill') -> {c.cancel_task('backfill')}")

        show("subscriber 1 got rates", first.get(timeout=5))
        show("subscriber 2 got rates", second.get(timeout=5))
        try:
            export.result(timeout=5)
        except TaskTimeoutError as exc:
            say(f"export result raised TaskTimeoutError: {exc}")
        try:
            backfill.result(timeout=5)
        except TaskCancelledError as exc:
            say(f"backfill result raised TaskCancelledError: {exc}")
        say(f"digest: {digest.result(timeout=5)!r}")

        say("== 6. a late subscriber: 'rates' finished earlier but is cached for 60 s")
        show("late subscriber got rates", c.subscribe("rates").get(timeout=1))
        info = c.info("rates")
        say(f"   info: state={info.state.value} attempts={info.attempts}")

        say("== 7. CPU work in child processes; a runaway killed by its timeout; async def")
        crunches = [
            c.add_task(crunch_numbers, 3_000_000).with_executor("cpu").submit() for _ in range(2)
        ]
        stuck = c.add_task(runaway).with_executor("cpu").with_timeout(0.3).submit()
        inventory = c.add_task(fetch_inventory, "north").with_timeout(2).submit()
        for h in crunches:
            pid, total = h.result(timeout=30)
            say(f"   crunched {total} in child process {pid}")
        try:
            stuck.result(timeout=10)
        except TaskTimeoutError:
            say("   the runaway timed out: its process group was killed and replaced")
        say(f"   inventory: {inventory.result(timeout=5)}")
        say(f"   the cpu executor runs on: {c.stats().executors['cpu']}")
    stats = c.stats()
    say(
        f"== done: submitted={stats.submitted} succeeded={stats.succeeded} "
        f"failed={stats.failed} timed_out={stats.timed_out} cancelled={stats.cancelled} "
        f"retried={stats.retried}"
    )


if __name__ == "__main__":
    main()
