"""GNU parallel's job log: writing it line by line, and reading it back for ``--resume``.

The format is parallel's exactly (checked against ``parallel --joblog`` 20221122)::

    Seq\\tHost\\tStarttime\\tJobRuntime\\tSend\\tReceive\\tExitval\\tSignal\\tCommand
    1\\t:\\t1796160761.300\\t     0.001\\t0\\t0\\t0\\t0\\ttrue

``Starttime`` is epoch seconds with 3 decimals, ``JobRuntime`` seconds as ``%10.3f``,
``Send`` 0 (commands get no input), ``Receive`` the bytes the command wrote to stdout,
``Exitval``/``Signal`` its exit status and the signal that ended it (``Exitval`` -1
for a command killed because it timed out, as parallel writes), and ``Command`` the
command with each newline written as a NUL byte (parallel does that too), so one
command is one line. ``Host`` is ``:`` (this machine), or, for a ``--jsonl`` command
that has an ``id``, that id: the format has no column of its own for it, an extra
column would break the tools that read the format, and ``--resume`` must find it.

Only a command's final attempt is logged, as parallel does with ``--retries``; a
command cut short by Ctrl-C is not logged (it did not finish; parallel does not log
it either), so every line is the true final outcome of one command.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field

from ._jobs import decode

__all__ = ["HEADER", "LOCAL_HOST", "Entry", "JoblogError", "JoblogWriter", "read_succeeded"]

HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"

#: parallel's Host for a job run on this machine.
LOCAL_HOST = ":"


class JoblogError(ValueError):
    """A file given as ``--joblog`` that is not a job log."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the log: a command's final attempt."""

    seq: int
    host: str
    start: float  #: epoch seconds
    runtime: float  #: seconds
    receive: int  #: bytes written to stdout
    exitval: int
    signal: int
    command: str

    def format(self) -> str:
        """The line as parallel writes it, with its newline."""
        command = command_field(self.command)
        return (
            f"{self.seq}\t{self.host}\t{self.start:.3f}\t{self.runtime:10.3f}\t0\t"
            f"{self.receive}\t{self.exitval}\t{self.signal}\t{command}\n"
        )


def command_field(command: str) -> str:
    """``command`` as the joblog's Command column holds it."""
    return command.replace("\n", "\0")


@dataclass(slots=True)
class Succeeded:
    """What a job log says has already succeeded, for ``--resume``.

    ``commands`` counts the successful lines per Command (a command listed twice in
    the jobs file and logged once as succeeded runs once more); ``ids`` holds the
    ids of successful ``--jsonl`` commands.
    """

    commands: Counter[str] = field(default_factory=Counter)
    ids: set[str] = field(default_factory=set)


def read_succeeded(path: str) -> Succeeded:
    """What the log at ``path`` shows as succeeded.

    A missing or empty file has succeeded nothing. A line that is not nine fields
    with numeric Exitval and Signal (say, a last line cut short when the machine
    went down) is ignored. Raises JoblogError if the first line is not the header.
    """
    succeeded = Succeeded()
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return succeeded
    if not data:
        return succeeded
    lines = decode(data).split("\n")
    if lines[0].rstrip("\r") != HEADER:
        raise JoblogError(f"{path} is not a job log: its first line is not {HEADER!r}")
    for line in lines[1:]:
        fields = line.split("\t", 8)
        if len(fields) != 9:
            continue
        host, exitval, signal, command = fields[1], fields[6], fields[7], fields[8]
        if exitval.strip() != "0" or signal.strip() != "0":
            continue
        if host == LOCAL_HOST:
            succeeded.commands[command] += 1
        else:
            succeeded.ids.add(host)
    return succeeded


class JoblogWriter:
    """Appends lines to a job log, one ``write()`` each, so an interrupted run leaves
    only whole lines; the file is opened unbuffered (each line reaches the file at
    once). Thread-safe: workers log their commands' final attempts.
    """

    def __init__(self, path: str, *, append: bool) -> None:
        """Start a new log at ``path`` (header first), or ``append`` to the existing one."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if not append:
            flags |= os.O_TRUNC
        self._fd = os.open(path, flags, 0o666)
        self._lock = threading.Lock()  # guards: writes to _fd, _fd's closing
        self._closed = False
        size = os.fstat(self._fd).st_size
        if size == 0:
            self._write(HEADER + "\n")
        elif append:
            with open(path, "rb") as file:
                file.seek(size - 1)
                if file.read(1) != b"\n":  # a line cut short: end it, it is ignored
                    self._write("\n")

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "surrogateescape")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def write(self, entry: Entry) -> None:
        """Append ``entry``'s line."""
        with self._lock:
            if not self._closed:
                self._write(entry.format())

    def close(self) -> None:
        """Close the file; later writes are dropped."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
