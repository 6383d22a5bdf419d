"""The ``cluster`` command: ``cluster run FILE`` runs a file of shell commands.

::

    cluster run jobs.txt -j 8 --retries 2 --timeout 60 --joblog jobs.log
    cluster run jobs.txt -j 8 --joblog jobs.log --resume   # only what did not succeed
    cluster run --jsonl jobs.jsonl                         # priorities, ids, keys...
    some-generator | cluster run -                         # commands from stdin

Each non-empty line that does not start with ``#`` is a command for ``/bin/sh``,
run in its own process group on a Cluster of ``-j`` workers, with /dev/null as its
stdin (the jobs file may be stdin itself). What each command writes is printed
whole when it ends (stdout to stdout, stderr to stderr), in the order they end
(``-k``: in the file's order). On a terminal a progress bar with an ETA runs below
the output and a table sums up the run (``rich``, the ``cli`` extra; without it,
plain lines); otherwise plain lines only, a status line every 5 s, and a one-line
summary on stderr. The exit status is the number of commands that failed (at most
101), 0 if all succeeded; 130 after Ctrl-C (143 after SIGTERM); 2 for bad arguments
or a bad jobs file.

Where it differs from GNU parallel, on purpose:

* ``--retries N`` is retries after the first attempt (N + 1 attempts at most), as
  everywhere in ``cluster``; parallel's ``--retries N`` is N attempts in all.
* ``--resume`` skips the commands the joblog shows as *succeeded*, matched by their
  text (a command listed twice and logged once as succeeded runs once more), or by
  ``id`` with ``--jsonl``; never by line number, so the file may change between
  runs. (parallel's ``--resume`` skips by sequence number whatever the outcome.)
* Ctrl-C kills the running commands' process groups (TERM ... KILL, as on timeout)
  and exits 130; parallel exits 255. Neither logs the commands it killed.

This module is the argument parsing; the work is in ``_run`` (the Cluster side),
``_proc`` (one command), ``_joblog``, ``_jobs`` (the jobs file) and ``_display``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from ._display import make_display
from ._joblog import JoblogError, JoblogWriter, command_field, read_succeeded
from ._jobs import Job, JobFileError, decode, parse_jobs
from ._run import Runner, RunOptions

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise argparse.ArgumentTypeError(f"must be {bound} seconds, got {text!r}")
    return value


def _timeout(text: str) -> float:
    return _seconds(text, positive=True)


def _backoff(text: str) -> float:
    return _seconds(text, positive=False)


def build_parser() -> argparse.ArgumentParser:
    """The ``cluster`` argument parser (``run`` is its one subcommand)."""
    parser = argparse.ArgumentParser(
        prog="cluster", description="Run jobs on an in-process priority task cluster."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run a file of shell commands, in parallel",
        description="Run each non-empty, non-# line of FILE ('-': stdin) as a shell command.",
        epilog="Exit status: the number of failed commands (at most 101), 0 if all "
        "succeeded; 130 after Ctrl-C; 2 for bad arguments or a bad jobs file.",
    )
    run.add_argument("file", metavar="FILE", help="the jobs file, or - for stdin")
    run.add_argument(
        "-j",
        "--jobs",
        type=_positive_int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="commands run at once (default: the CPU count)",
    )
    run.add_argument(
        "--retries",
        type=_count,
        default=0,
        metavar="N",
        help="retries after a command's first attempt fails (default 0)",
    )
    run.add_argument(
        "--backoff",
        type=_backoff,
        default=0.0,
        metavar="SECONDS",
        help="wait before a retry: SECONDS, doubling with each retry (default 0)",
    )
    run.add_argument(
        "--timeout",
        type=_timeout,
        default=None,
        metavar="SECONDS",
        help="kill a command's process group after SECONDS (TERM, then KILL)",
    )
    run.add_argument(
        "--joblog", metavar="FILE", help="log each finished command in GNU parallel's format"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="skip the commands the joblog shows as succeeded; append to it",
    )
    run.add_argument(
        "--halt-on-error",
        action="store_true",
        help="after a command fails for good, start no new one (running ones finish)",
    )
    run.add_argument(
        "--jsonl",
        action="store_true",
        help='each line is {"cmd": ..., "priority": int, "timeout": s, "retries": int, '
        '"id": str, "key": str}',
    )
    run.add_argument(
        "-k",
        "--keep-order",
        action="store_true",
        help="print the commands' output in the file's order, not as they end",
    )
    return parser


def _read(path: str) -> str:
    if path == "-":
        return decode(sys.stdin.buffer.read())
    with open(path, "rb") as file:
        return decode(file.read())


def _skip_succeeded(jobs: list[Job], joblog: str) -> list[Job]:
    """The jobs that the joblog does not show as succeeded (``--resume``)."""
    succeeded = read_succeeded(joblog)
    left: list[Job] = []
    for job in jobs:
        if job.id is not None:
            if job.id in succeeded.ids:
                continue
        else:
            command = command_field(job.cmd)
            if succeeded.commands[command] > 0:
                succeeded.commands[command] -= 1
                continue
        left.append(job)
    return left


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cluster`` command with ``argv`` (default: ``sys.argv[1:]``); return
    the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the run began (the run handles its own)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.joblog:
        parser.error("--resume needs --joblog FILE")
    source = "<stdin>" if args.file == "-" else args.file
    try:
        jobs = parse_jobs(_read(args.file), source=source, jsonl=args.jsonl)
    except OSError as exc:
        parser.error(f"cannot read {source}: {exc.strerror or exc}")
    except JobFileError as exc:
        parser.error(str(exc))
    if any(job.key is not None for job in jobs):
        from .. import TaskBuilder

        if not hasattr(TaskBuilder, "with_key"):
            line = next(job.line for job in jobs if job.key is not None)
            parser.error(f"{source}:{line}: 'key' needs a cluster with TaskBuilder.with_key")
    todo = jobs
    try:
        if args.resume:
            todo = _skip_succeeded(jobs, args.joblog)
        joblog = JoblogWriter(args.joblog, append=args.resume) if args.joblog else None
    except JoblogError as exc:
        parser.error(str(exc))
    except OSError as exc:
        parser.error(f"cannot open the joblog {args.joblog}: {exc.strerror or exc}")
    options = RunOptions(
        jobs=args.jobs,
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
        halt_on_error=args.halt_on_error,
        keep_order=args.keep_order,
    )
    sys.stdout.flush()
    display = make_display(len(todo))
    return Runner(todo, options, display, joblog=joblog, skipped=len(jobs) - len(todo)).run()
