"""``cluster run``: the jobs of a file on a Cluster, one shell command per task.

Threads and who owns what:

* The main thread submits every job before ``Cluster.run()`` (so priorities order
  the whole file, not only what is queued when a worker frees up), then handles the
  tasks' results as they arrive on ``Runner._events``: it prints the output, counts,
  and drives the display. It alone touches the display and the counters below.
* Each attempt runs ``Runner._attempt`` on a worker (``-j`` workers): it starts the
  command (``_proc.run_command``), waits for it, and writes its joblog line when the
  attempt is the command's last. A failed attempt raises ``CommandFailed``, and the
  cluster's own retry rules (``with_retry``/``with_backoff``) decide what follows.
* The ``on_complete`` callback (a cluster thread) only puts the result on the queue.
* Ctrl-C (SIGINT, or SIGTERM) runs ``_interrupt`` on the main thread: it sets
  ``_stopping`` and writes to the abort pipe that every running command's poll
  watches, so each worker kills its command's process group at once; the main
  thread then stops the cluster (``cancel_pending``: nothing new starts) and
  collects the rest.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from types import FrameType
from typing import Any

from .. import Cluster, ExponentialBackoff, TaskBuilder, TaskCancelledError, current
from ._display import Counts, Display, Summary
from ._joblog import LOCAL_HOST, Entry, JoblogWriter
from ._jobs import Job
from ._proc import Finished, run_command

__all__ = ["EXIT_INTERRUPTED", "MAX_FAILURES_EXIT", "CommandFailed", "RunOptions", "Runner"]

#: The exit status counts failures up to this (GNU parallel's cap: 101 means "more").
MAX_FAILURES_EXIT = 101

#: The exit status after Ctrl-C: 128 + SIGINT, as a shell reports a command it killed.
EXIT_INTERRUPTED = 130

#: The signals that interrupt a run (Ctrl-C, and a polite kill).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_INTERRUPT = object()  # on the events queue: a signal arrived


class CommandFailed(Exception):
    """An attempt of a command failed: nonzero exit, killed by a signal, or timed out."""

    def __init__(self, finished: Finished) -> None:
        super().__init__(finished)
        self.finished = finished


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The options of one ``cluster run``, as parsed from the command line."""

    jobs: int
    retries: int = 0
    backoff: float = 0.0
    timeout: float | None = None
    halt_on_error: bool = False
    keep_order: bool = False


class Runner:
    """Runs ``jobs`` on a Cluster of ``options.jobs`` workers; ``run()`` returns the
    exit status."""

    def __init__(
        self,
        jobs: Sequence[Job],
        options: RunOptions,
        display: Display,
        *,
        joblog: JoblogWriter | None = None,
        skipped: int = 0,
    ) -> None:
        """``skipped``: commands left out already (``--resume``), for the summary."""
        self._jobs = list(jobs)
        self._options = options
        self._display = display
        self._joblog = joblog
        self._resumed = skipped
        self._events: SimpleQueue[Any] = SimpleQueue()
        # Flags that only ever go from False to True, read by workers without a lock
        # (one store, many loads): _stopping by the signal handler (main thread),
        # _halted by the worker whose command failed for good.
        self._stopping = False  # Ctrl-C: start nothing, kill what runs
        self._halted = False  # --halt-on-error: start no new command
        self._abort_r, self._abort_w = os.pipe()  # written once on Ctrl-C, never read
        self._running_lock = threading.Lock()  # guards _running and _tried
        self._running = 0  # commands running now
        self._tried: set[int] = set()  # seqs of the jobs an attempt was started for
        # ---- main thread only ----
        self._succeeded = 0
        self._failed = 0
        self._not_started = 0
        self._interrupted = 0
        self._signum = 0

    # ------------------------------------------------------------------ workers

    def _attempt(self, job: Job) -> Finished | None:
        """One attempt of ``job`` (a task); None if it was not started."""
        attempt = current().attempt
        if self._stopping or (self._halted and attempt == 0):
            return None  # a retry still runs after a halt: it is not a new command
        retries = self._options.retries if job.retries is None else job.retries
        timeout = self._options.timeout if job.timeout is None else job.timeout
        with self._running_lock:
            self._running += 1
            self._tried.add(job.seq)
        try:
            finished = run_command(job.cmd, timeout, self._abort_r)
        finally:
            with self._running_lock:
                self._running -= 1
        if finished.interrupted:
            return finished  # cut short by Ctrl-C: not logged, not retried
        last = finished.ok or attempt >= retries
        if last:
            if self._joblog is not None:
                self._joblog.write(_entry(job, finished))
            if not finished.ok and self._options.halt_on_error:
                self._halted = True
        if not finished.ok:
            raise CommandFailed(finished)
        return finished

    def _on_complete(self, job: Job, task_id: str, value: Any, error: BaseException | None) -> None:
        self._events.put((job, value, error))

    # ------------------------------------------------------------------ main thread

    def _submit(self, cluster: Cluster) -> None:
        backoff = self._options.backoff
        for job in self._jobs:
            builder: TaskBuilder[Finished | None] = cluster.add_task(self._attempt, job)
            builder.on_complete(functools.partial(self._on_complete, job))
            if job.id is not None:
                builder.with_id(job.id)
            if job.priority:
                builder.with_priority(job.priority)
            retries = self._options.retries if job.retries is None else job.retries
            if retries:
                builder.with_retry(retries)
                if backoff > 0:
                    builder.with_backoff(ExponentialBackoff(backoff))
            if job.key is not None:
                # TaskBuilder.with_key (SPEC §12) may not be merged yet: main() checks.
                with_key: Callable[[str], object] | None = getattr(builder, "with_key", None)
                if with_key is None:
                    raise RuntimeError("'key' needs a cluster with TaskBuilder.with_key")
                with_key(job.key)
            builder.submit()

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT/SIGTERM: interrupt the run. A repeat changes nothing (``timeout(1)``
        sends its TERM twice): the kill sequence ends within TERM_SEQ's 375 ms."""
        if self._signum:
            return
        self._signum = signum
        self._stopping = True
        os.write(self._abort_w, b"!")  # every running command's poll wakes up
        self._events.put(_INTERRUPT)

    def run(self) -> int:
        """Run every job; return the exit status (failures, capped; 130 after Ctrl-C)."""
        started = time.monotonic()
        handlers = {sig: signal.signal(sig, self._signal) for sig in _STOP_SIGNALS}
        cluster = Cluster(workers=self._options.jobs)
        try:
            self._submit(cluster)
            cluster.run()
            self._collect(cluster)
            cluster.stop()
        finally:
            cluster.cancel()  # a no-op once stopped
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.close(self._abort_r)
            os.close(self._abort_w)
            if self._joblog is not None:
                self._joblog.close()
            self._display.close(
                Summary(
                    succeeded=self._succeeded,
                    failed=self._failed,
                    skipped=self._resumed + self._not_started,
                    interrupted=self._interrupted,
                    wall=time.monotonic() - started,
                )
            )
        if self._signum:
            return 128 + self._signum
        return min(self._failed, MAX_FAILURES_EXIT)

    def _collect(self, cluster: Cluster) -> None:
        """Handle every job's result as it arrives, refreshing the display meanwhile."""
        display = self._display
        left = len(self._jobs)
        held: dict[int, tuple[Job, Any, BaseException | None]] = {}  # --keep-order
        order = iter(self._jobs)
        next_job = next(order, None)
        stopped = False
        self._update()
        display.refresh()
        while left:
            try:
                item = self._events.get(timeout=display.refresh_in())
            except Empty:
                self._update()
                display.refresh()
                continue
            if item is _INTERRUPT:
                if not stopped:
                    stopped = True
                    display.note("cluster: interrupted: killing the running commands")
                    cluster.stop(cancel_pending=True)
                continue
            left -= 1
            if not self._options.keep_order:
                self._finish(*item)
            else:
                held[item[0].seq] = item
                while next_job is not None and next_job.seq in held:
                    self._finish(*held.pop(next_job.seq))
                    next_job = next(order, None)
            self._update()
            display.refresh()

    def _update(self) -> None:
        with self._running_lock:
            running = self._running
        done = self._succeeded + self._failed
        total = len(self._jobs) - self._not_started - self._interrupted
        self._display.update(Counts(total, done, self._failed, running))

    def _finish(self, job: Job, value: Any, error: BaseException | None) -> None:
        """Account for one job's final result, print its output and any note."""
        display = self._display
        if isinstance(error, CommandFailed):
            finished = error.finished
            display.output(finished.stdout, finished.stderr)
            self._failed += 1
            display.note(f"cluster: {_failure(finished, job)}: {job.cmd}")
        elif error is None and isinstance(value, Finished):
            display.output(value.stdout, value.stderr)
            if value.interrupted:
                self._interrupted += 1
            else:
                self._succeeded += 1
        elif error is None or isinstance(error, TaskCancelledError):
            with self._running_lock:
                tried = job.seq in self._tried
            if tried:  # failed, and its retry was cancelled by Ctrl-C
                self._interrupted += 1
            else:  # halted, interrupted, or cancelled before it ran
                self._not_started += 1
        else:  # the command could not even start (e.g. out of processes)
            self._failed += 1
            display.note(f"cluster: could not run: {error!r}: {job.cmd}")


def _entry(job: Job, finished: Finished) -> Entry:
    return Entry(
        seq=job.seq,
        host=LOCAL_HOST if job.id is None else job.id,
        start=finished.start,
        runtime=finished.runtime,
        receive=len(finished.stdout),
        exitval=finished.exitval,
        signal=finished.signal,
        command=job.cmd,
    )


def _failure(finished: Finished, job: Job) -> str:
    if finished.timed_out:
        how = f"timed out after {finished.runtime:.2f}s"
        if finished.signal:
            how += f", killed by {_signal_name(finished.signal)}"
        return how
    if finished.signal:
        return f"failed: killed by {_signal_name(finished.signal)}"
    return f"failed: exit status {finished.exitval}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
