"""A tour of `cluster`: a small nightly reporting job, simulated in one process.

It shows priorities, a delayed start, a retry with exponential backoff and jitter,
a timeout, a cancel, two subscribers, a late subscribe to a cached result, retry
rules by exception class and a `RetryAfter` from the task, a repeating task, a key
with a concurrency limit and a group, CPU work in child processes (one of them a
runaway that a timeout kills), an `async def` task on the event loop, and at the end
the dead letters (one resurrected) and the statistics per task name. Run it with
`make demo` (or `python examples/demo.py`); it takes about 3 seconds.
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
    FixedBackoff,
    ProcessExecutor,
    Result,
    RetryAfter,
    StopRetrying,
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


class RateLimited(Exception):
    """The bank's API answered 429 Too Many Requests."""


def post_ledger(batch: str) -> str:
    """Post a batch to the bank: the network drops once, then the bank says "later"."""
    ctx = current()
    if ctx.attempt == 0:
        say(f"post {batch}: attempt 0 -> connection reset (rule: ConnectionError)")
        raise ConnectionResetError("bank gateway reset the connection")
    if ctx.attempt == 1:
        say(f"post {batch}: attempt 1 -> 429, the bank says retry in 0.3 s")
        raise RetryAfter(0.3) from RateLimited("429 Too Many Requests")
    say(f"post {batch}: attempt {ctx.attempt} -> posted")
    return f"{batch} posted"


def heartbeat() -> str:
    """A repeating job: tell the monitoring the nightly run is alive."""
    say("heartbeat sent")
    return f"alive at {time.monotonic() - T0:.1f}s"


ACCOUNTS_FIXED = threading.Event()  # set once somebody fixes the missing account


def reconcile() -> str:
    """A job whose failure no retry can fix: it stops retrying at once."""
    if not ACCOUNTS_FIXED.is_set():
        say("reconcile: account 42 is missing -> StopRetrying (final, whatever the budget)")
        raise StopRetrying() from KeyError("account 42 missing")
    say("reconcile: books balanced")
    return "balanced"


class Warehouse:
    """The data warehouse takes at most two exports at once: the key 'warehouse'."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = 0  # exports running now (guarded by lock)
        self.peak = 0  # the most that ever ran at once (guarded by lock)
        self.two_busy = threading.Event()  # set when two exports are running
        self.opened = threading.Event()  # the story goes on once this is set

    def export(self, region: str) -> str:
        with self.lock:
            self.busy += 1
            self.peak = max(self.peak, self.busy)
            busy = self.busy
            if busy == 2:
                self.two_busy.set()
        say(f"export {region} starts ({busy} on the warehouse)")
        self.opened.wait(5)
        time.sleep(0.1)  # the export itself
        with self.lock:
            self.busy -= 1
        return f"{region}.parquet"


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
            c.add_task(gate.wait, 5).with_name("busy_worker").submit()
        queued = [("weekly", 1), ("daily", 5), ("audit", 9), ("misc", 0), ("q1", 5), ("q2", 5)]
        reports = [  # q1 and q2 have the priority of "daily": FIFO among the three
            c.add_task(build_report, name).with_priority(priority).submit()
            for name, priority in queued
        ]
        say("   queued: weekly(1) daily(5) audit(9) misc(0) q1(5) q2(5); releasing the workers")
        gate.set()
        say(f"   all rendered: {[report.result(timeout=5) for report in reports]}")

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

        say("== 7. retry rules by exception class, and a RetryAfter from the task itself")
        ledger = (
            c.add_task(post_ledger, "batch-7")
            .with_id("ledger")
            .with_retry_rule(ConnectionError, retries=3, backoff=FixedBackoff(0.05))
            .with_retry_rule(RateLimited, retries=2)  # RetryAfter's cause picks the rule
            .with_cache(ttl=60)
            .submit()
        )
        say(f"   {ledger.result(timeout=5)}")
        info = c.info(ledger.id)
        say(f"   info: attempts={info.attempts} last_error={info.last_error!r}")

        say("== 8. a repeating task: a heartbeat every 0.2 s, stopped after three runs")
        beat = (
            c.add_task(heartbeat)
            .with_id("heartbeat")
            .with_delay(0.1)
            .repeat(0.2)
            .with_cache(60)
            .submit()
        )
        for result in beat.results(timeout=5):  # one Result per run, then the series' end
            show(f"   run {result.run}", result)
            if result.run == 2:
                say(f"   cancel the series -> {beat.cancel()}")
        say(f"   info: state={c.info('heartbeat').state.value} runs={c.info('heartbeat').runs}")

        say("== 9. a key limited to 2 at a time, and a group that waits for all five")
        c.limit("warehouse", 2)
        warehouse = Warehouse()
        with c.group() as group:  # leaving the block waits for every task of the group
            for region in ("eu", "us", "apac", "latam", "mea"):
                job = group.add_task(warehouse.export, region).with_key("warehouse")
                job.with_tags("nightly").with_cache(ttl=60).submit()
            warehouse.two_busy.wait(5)
            states = [info.state.value for info in c.tasks(tag="nightly")]
            say(f"   c.tasks(tag='nightly'), newest first: {states}")
            say("   three workers, yet only two exports run: the others wait for the key")
            warehouse.opened.set()
        say(f"   the group is done: {[r.value for r in group.wait()]}")
        say(f"   at most {warehouse.peak} exports ran at once")

        say("== 10. CPU work in child processes; a runaway killed by its timeout; async def")
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

        say("== 11. dead letters: what failed for good, kept for a look and a resurrect")
        books = c.add_task(reconcile).with_id("reconcile").with_retry(5).submit()
        try:
            books.result(timeout=5)
        except KeyError as exc:
            say(f"   reconcile failed with {exc!r} after {c.dead_letters()[0].attempts} attempt")
        for letter in c.dead_letters():  # newest first
            error = f"{type(letter.error).__name__}: {letter.error}"
            say(f"   dead letter {letter.id!r} ({letter.name}) -> {error}")
        ACCOUNTS_FIXED.set()
        say("   account 42 fixed: resurrect('reconcile'), same id, call and options")
        (again,) = c.resurrect("reconcile")
        say(f"   resurrected reconcile -> {again.result(timeout=5)!r}")
        say(f"   dead letters left: {[letter.id for letter in c.dead_letters()]}")
        say("   per name:          succeeded failed timed_out cancelled dead")
        for name, n in sorted(c.stats_by_name().items()):
            say(
                f"   {name:<18} {n.succeeded:>9} {n.failed:>6} {n.timed_out:>9} "
                f"{n.cancelled:>9} {n.dead:>4}"
            )
    stats = c.stats()
    say(
        f"== done: submitted={stats.submitted} succeeded={stats.succeeded} "
        f"failed={stats.failed} timed_out={stats.timed_out} cancelled={stats.cancelled} "
        f"retried={stats.retried}"
    )


if __name__ == "__main__":
    main()
