"""What ``cluster run`` shows: commands' output, notes, progress and the summary.

Two displays with one interface, both used from the main thread only (no lock):

* ``PlainDisplay`` when stderr is not a terminal: output as the commands wrote it,
  notes and a status line every ``STATUS_EVERY`` seconds on stderr, a one-line
  summary; never a control code.
* ``TerminalDisplay`` (``rich``, the ``cli`` extra): a live bar on stderr with
  done/failed/running, elapsed time and an ETA, rendered at most ``FPS`` times a
  second; each command's output is written above it (the bar is erased, the
  output written, the bar drawn again), and a table sums the run up at the end.

Output goes to the file descriptors directly, stdout to 1 and stderr to 2, as the
bytes the command wrote: one command's output is written whole, before the next.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Counts", "Display", "PlainDisplay", "Summary", "TerminalDisplay", "make_display"]

#: Seconds between two status lines of the plain display.
STATUS_EVERY = 5.0

#: Most renderings of the terminal bar per second.
FPS = 10


@dataclass(frozen=True, slots=True)
class Counts:
    """Where the run stands: commands to run, finished, failed, running now."""

    total: int
    done: int
    failed: int
    running: int


@dataclass(frozen=True, slots=True)
class Summary:
    """How the run ended, for the closing summary."""

    succeeded: int
    failed: int
    skipped: int
    interrupted: int
    wall: float  #: seconds

    def line(self) -> str:
        """The summary in one plain line."""
        text = f"cluster: {self.succeeded} succeeded, {self.failed} failed, {self.skipped} skipped"
        if self.interrupted:
            text += f", {self.interrupted} interrupted"
        return f"{text} in {duration(self.wall)}"


class Display(Protocol):
    """What the runner needs of a display."""

    def output(self, stdout: bytes, stderr: bytes) -> None:
        """Write one command's output, whole."""

    def note(self, text: str) -> None:
        """Write one line of the runner's own (a failure, a warning) to stderr."""

    def update(self, counts: Counts) -> None:
        """Record where the run stands (shown at the next refresh)."""

    def refresh_in(self) -> float:
        """Seconds until ``refresh()`` is due."""

    def refresh(self) -> None:
        """Redraw whatever shows progress, if due."""

    def close(self, summary: Summary) -> None:
        """Show the final state and the summary; the display is not used again."""


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``; a reader that went away (EPIPE) is ignored."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass


def duration(seconds: float) -> str:
    """``seconds`` for people: ``0.41s``, ``3m05s``, ``2h03m05s``."""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class PlainDisplay:
    """Plain lines for a pipe or a file: no control codes, no redraws."""

    def __init__(self, total: int, *, out_fd: int = 1, err_fd: int = 2) -> None:
        """Show a run of ``total`` commands on ``out_fd``/``err_fd``."""
        self._out = out_fd
        self._err = err_fd
        self._counts = Counts(total, 0, 0, 0)
        self._start = time.monotonic()
        self._next_status = self._start + STATUS_EVERY

    def output(self, stdout: bytes, stderr: bytes) -> None:
        """Write the command's stdout to stdout and its stderr to stderr."""
        if stdout:
            write_all(self._out, stdout)
        if stderr:
            write_all(self._err, stderr)

    def note(self, text: str) -> None:
        """Write ``text`` as a line on stderr."""
        write_all(self._err, (text + "\n").encode("utf-8", "surrogateescape"))

    def update(self, counts: Counts) -> None:
        """Remember ``counts`` for the next status line."""
        self._counts = counts

    def refresh_in(self) -> float:
        """Seconds until the next status line."""
        return max(0.0, self._next_status - time.monotonic())

    def refresh(self) -> None:
        """Write a status line if one is due."""
        now = time.monotonic()
        if now < self._next_status:
            return
        self._next_status = now + STATUS_EVERY
        c = self._counts
        eta = ""
        if 0 < c.done < c.total:
            eta = f", ETA {duration((now - self._start) / c.done * (c.total - c.done))}"
        self.note(f"cluster: {c.done}/{c.total} done, {c.failed} failed, {c.running} running{eta}")

    def close(self, summary: Summary) -> None:
        """Write the summary line."""
        self.note(summary.line())


class TerminalDisplay:
    """A live progress bar on a terminal (stderr), drawn with ``rich``."""

    def __init__(self, total: int, *, out_fd: int = 1, err_fd: int = 2) -> None:
        """Show a run of ``total`` commands; raises ImportError without ``rich``."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._out = out_fd
        self._err = err_fd
        self._console = Console(file=sys.stderr, highlight=False)
        self._progress = Progress(
            SpinnerColumn(),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            auto_refresh=False,
        )
        self._task = self._progress.add_task("", total=total, status=self._status(0, 0))
        # stdout shares the screen with the bar when it is the same terminal.
        self._same_screen = _same_terminal(out_fd, err_fd)
        self._lines = 0  # lines of the bar now on screen (0: erased)
        self._bar: bytes | None = None  # the bar as last rendered
        self._next_render = 0.0  # monotonic time before which the bar is not rendered
        write_all(self._err, b"\x1b[?25l")  # hide the cursor while drawing

    @staticmethod
    def _status(failed: int, running: int) -> str:
        failed_text = f"[red]{failed} failed[/red]" if failed else "0 failed"
        return f"{failed_text} · {running} running"

    def _erase(self) -> None:
        if self._lines:
            write_all(self._err, b"\r\x1b[2K" + b"\x1b[1A\x1b[2K" * (self._lines - 1))
            self._lines = 0

    def _draw(self, *, render: bool = True) -> None:
        """Draw the bar, rendered anew (``render``) or as last rendered."""
        if render or self._bar is None:
            with self._console.capture() as capture:
                self._console.print(self._progress.get_renderable())
            self._bar = ("\r" + capture.get().rstrip("\n")).encode("utf-8", "replace")
            self._next_render = time.monotonic() + 1 / FPS
        self._erase()
        write_all(self._err, self._bar)
        self._lines = self._bar.count(b"\n") + 1

    def output(self, stdout: bytes, stderr: bytes) -> None:
        """Write the output above the bar (drawn again at the next refresh)."""
        if not stdout and not stderr:
            return
        self._erase()
        if stdout:
            if self._same_screen and not stdout.endswith(b"\n"):
                stdout += b"\n"  # else the bar would erase the last line
            write_all(self._out, stdout)
        if stderr:
            write_all(self._err, stderr if stderr.endswith(b"\n") else stderr + b"\n")

    def note(self, text: str) -> None:
        """Write ``text`` (rich markup is not interpreted) above the bar."""
        self._erase()
        self._console.print(text, markup=False, style="yellow", soft_wrap=True)

    def update(self, counts: Counts) -> None:
        """Move the bar (drawn at the next refresh)."""
        self._progress.update(
            self._task,
            total=counts.total,
            completed=counts.done,
            status=self._status(counts.failed, counts.running),
        )

    def refresh_in(self) -> float:
        """Seconds until the bar is rendered again (the spinner and the clock move on)."""
        return max(0.0, self._next_render - time.monotonic())

    def refresh(self) -> None:
        """Redraw the bar: rendered anew at most FPS times a second, else as last
        rendered if output erased it."""
        if time.monotonic() >= self._next_render:
            self._draw()
        elif not self._lines:
            self._draw(render=False)

    def close(self, summary: Summary) -> None:
        """Draw the bar one last time, then the summary table, and show the cursor."""
        from rich.table import Table

        try:
            self._progress.stop_task(self._task)
            self._draw()
            write_all(self._err, b"\n")
            self._lines = 0
            table = Table(title="cluster run", title_justify="left")
            row = {
                "succeeded": str(summary.succeeded),
                "failed": str(summary.failed),
                "skipped": str(summary.skipped),
            }
            if summary.interrupted:
                row["interrupted"] = str(summary.interrupted)
            row["wall time"] = duration(summary.wall)
            for name in row:
                table.add_column(name, justify="right")
            table.add_row(*row.values())
            self._console.print(table)
        finally:
            write_all(self._err, b"\x1b[?25h")


def _same_terminal(fd_a: int, fd_b: int) -> bool:
    try:
        if not (os.isatty(fd_a) and os.isatty(fd_b)):
            return False
        return os.fstat(fd_a).st_rdev == os.fstat(fd_b).st_rdev
    except OSError:
        return False


def make_display(total: int) -> Display:
    """A TerminalDisplay if stderr is a terminal and ``rich`` is installed, else plain.

    Without ``rich`` on a terminal it says so once and shows plain lines.
    """
    if os.isatty(2):
        try:
            return TerminalDisplay(total)
        except ImportError:
            display = PlainDisplay(total)
            display.note("cluster: no progress bar without rich: pip install 'cluster[cli]'")
            return display
    return PlainDisplay(total)
