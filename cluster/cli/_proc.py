"""Running one shell command in its own process group, with a timeout and a real kill.

The command runs as ``/bin/sh -c CMD`` in a new session (``start_new_session``), so
its process group holds the shell and everything it starts. One ``poll()`` waits on
everything at once, without polling loops: the command's stdout and stderr pipes
(read as they fill, so a chatty command never blocks), a pidfd that becomes
readable when the shell exits, and the run's *abort* pipe, which the CLI writes to
on Ctrl-C (it is never read, so it stays readable for every command, including one
that starts a moment later). The poll's timeout is the command's deadline, on the
monotonic clock.

On timeout or abort the whole group gets GNU parallel's default ``--termseq``:
TERM, 200 ms, TERM, 100 ms, TERM, 50 ms, KILL, 25 ms, each step cut short once the
group is gone. A command that ignores TERM, children included, ends at the KILL.
The group is gone when no member is left but zombies: a killed child whose new
parent (``init``) does not reap it stays a zombie in the group, and runs nothing.

The command has ended when the shell has: what it wrote before it exited is read
to the end, but a background child that keeps the pipes open is not waited for
(parallel behaves the same way).

Why not the cluster's ``with_timeout``: on expiry the cluster delivers
TaskTimeoutError at once and may start the retry, or the next command, while this
group is still being killed, so more than ``-j`` groups would run, and the joblog's
Exitval/Signal and the output are only known once the group is dead. Timing the
command here keeps one worker = one process group, end to end.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass

__all__ = ["TERM_SEQ", "Finished", "run_command"]

#: (signal, seconds to wait for the group to go) — parallel's default --termseq.
TERM_SEQ: tuple[tuple[signal.Signals, float], ...] = (
    (signal.SIGTERM, 0.2),
    (signal.SIGTERM, 0.1),
    (signal.SIGTERM, 0.05),
    (signal.SIGKILL, 0.025),
)

_CHUNK = 1 << 16
_IN = select.POLLIN | select.POLLHUP | select.POLLERR


@dataclass(frozen=True, slots=True)
class Finished:
    """How one attempt of a command ended.

    ``exitval``/``signal`` are as the joblog shows them: the exit status, or 0 and
    the signal that killed the shell; ``exitval`` is -1 when the command timed out
    (``timed_out``) and was killed. ``interrupted``: killed because the run was
    interrupted (Ctrl-C). ``start`` is epoch seconds, ``runtime`` seconds.
    """

    start: float
    runtime: float
    stdout: bytes
    stderr: bytes
    exitval: int
    signal: int
    timed_out: bool = False
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """The command succeeded: exit status 0, not killed."""
        return self.exitval == 0 and self.signal == 0 and not self.interrupted


class _Attempt:
    """One running command: its process, pipes and pidfd, and what it wrote so far.

    Used by one thread only (the worker running the command); no lock.
    """

    def __init__(self, cmd: str, abort_fd: int) -> None:
        self.proc = subprocess.Popen(
            cmd,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out_fd = self.proc.stdout.fileno()
        self.err_fd = self.proc.stderr.fileno()
        self.chunks: dict[int, list[bytes]] = {self.out_fd: [], self.err_fd: []}
        self.poller = select.poll()
        self.poller.register(self.out_fd, _IN)
        self.poller.register(self.err_fd, _IN)
        self.pidfd = -1
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: pipe EOF stands for the exit
            pass
        else:
            self.poller.register(self.pidfd, _IN)
        self.abort_fd = abort_fd
        self.aborted = False  # abort_fd became readable
        if abort_fd >= 0:
            self.poller.register(abort_fd, select.POLLIN)
        self.pipes_open = 2
        self.exited = False  # the shell exited (and, with a pidfd, was reaped)

    def close(self) -> None:
        """Release the pipes and the pidfd; reap the shell if it is still unreaped."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()

    def pump(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: no limit) for something to happen and
        handle it: output read, the shell's exit (it is reaped at once, so that only
        live processes keep the group), the abort pipe (``aborted`` set)."""
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        for fd, _ in self.poller.poll(ms):
            if fd == self.pidfd:
                self.poller.unregister(fd)
                self.proc.wait()  # it has exited: this does not block
                self.exited = True
            elif fd == self.abort_fd:
                self.poller.unregister(fd)
                self.aborted = True
            else:
                data = os.read(fd, _CHUNK)
                if data:
                    self.chunks[fd].append(data)
                else:
                    self.poller.unregister(fd)
                    self.pipes_open -= 1
                    if self.pidfd < 0 and self.pipes_open == 0:
                        self.exited = True  # no pidfd: EOF on both pipes means the end

    def drain(self) -> None:
        """Read what the pipes hold now without waiting for writers that are left."""
        for fd in (self.out_fd, self.err_fd):
            os.set_blocking(fd, False)
            try:
                while data := os.read(fd, _CHUNK):
                    self.chunks[fd].append(data)
            except BlockingIOError:
                pass

    def group_alive(self) -> bool:
        """Whether a live process is left in the command's process group."""
        return group_alive(self.proc.pid)

    def kill_group(self) -> None:
        """Send TERM_SEQ to the group until it is gone; return when the shell exited."""
        for sig, grace in TERM_SEQ:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            end = time.monotonic() + grace
            while (left := end - time.monotonic()) > 0:
                if self.exited and not self.group_alive():
                    break
                if self.exited and self.pipes_open == 0:
                    time.sleep(left)  # only unreaped or detached members left: next step
                    break
                self.pump(left)
            if self.exited and not self.group_alive():
                break
        while not self.exited:  # after KILL the shell dies (unless stuck in the kernel)
            self.pump(None)

    def output(self, fd: int) -> bytes:
        """Everything read from ``fd`` (the attempt's stdout or stderr)."""
        return b"".join(self.chunks[fd])


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie.

    ``killpg(pgid, 0)`` answers for live and zombie members alike; where it finds
    some and ``/proc`` is there, the members' states are read to tell them apart
    (a killed child whose new parent, ``init``, does not reap it stays a zombie).
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its user id: alive, and out of reach
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stat = file.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def run_command(cmd: str, timeout: float | None, abort_fd: int) -> Finished:
    """Run ``cmd`` with ``/bin/sh`` in its own process group and return how it ended.

    ``timeout`` (seconds, or None) limits its run time; past it, or as soon as
    ``abort_fd`` is readable, the group is killed (TERM_SEQ). Raises OSError if the
    shell cannot be started.
    """
    started = time.time()
    start = time.monotonic()
    attempt = _Attempt(cmd, abort_fd)
    try:
        deadline = None if timeout is None else start + timeout
        timed_out = interrupted = False
        while not attempt.exited:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                timed_out = True
                break
            attempt.pump(left)
            if attempt.aborted and not attempt.exited:
                interrupted = True
                break
        if timed_out or interrupted:
            attempt.kill_group()
        attempt.drain()
        returncode = attempt.proc.wait()
        runtime = time.monotonic() - start
    finally:
        attempt.close()
    killed_by = -returncode if returncode < 0 else 0
    # parallel's columns: Exitval -1 for a timeout; 0 and the Signal for a killed shell.
    exitval = -1 if timed_out else max(returncode, 0)
    return Finished(
        start=started,
        runtime=runtime,
        stdout=attempt.output(attempt.out_fd),
        stderr=attempt.output(attempt.err_fd),
        exitval=exitval,
        signal=killed_by,
        timed_out=timed_out,
        interrupted=interrupted,
    )
