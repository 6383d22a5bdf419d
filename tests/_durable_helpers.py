"""What the durable-task tests share: a driven child process, and reading a store's rows.

``Child`` runs ``tests/_durable_child.py`` and reads its stdout (one JSON object per
line) on a thread; ``read_rows`` reads a store file through a separate read-only
``sqlite3`` connection, as another process would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_durable_child.py"
WAIT = 10.0


class Child:
    """``_durable_child.py`` in a child process; its stdout read line by line on a thread."""

    def __init__(self, *args: object, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed by kill()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=env,
        )
        self.lines: list[dict[str, Any]] = []
        self.eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # cut by the kill
            with self._cond:
                self.lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def stderr(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], start: int = 0, timeout: float = WAIT
    ) -> dict[str, Any]:
        """The first line from index ``start`` on that matches ``pred``."""
        return self.lines[self.wait_index(pred, start, timeout)]

    def wait_index(
        self, pred: Callable[[dict[str, Any]], bool], start: int = 0, timeout: float = WAIT
    ) -> int:
        """The index of the first line from ``start`` on that matches ``pred``."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i]):
                        return i
                    i += 1
                if self.eof:
                    raise AssertionError(
                        f"the child ended without the expected line; it wrote {self.lines}"
                        f"\nstderr: {self.stderr()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no expected line within {timeout}s; the child wrote {self.lines}"
                        f"\nstderr: {self.stderr()}"
                    )
                self._cond.wait(remaining)

    def send(self, op: str, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """Run one command; its reply."""
        start = self.post(op, **fields)
        return self.wait_for(lambda line: line.get("re") == op, start, timeout)

    def post(self, op: str, **fields: Any) -> int:
        """Send one command without waiting; the index its reply will come after."""
        with self._cond:
            start = len(self.lines)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return start

    def submit(self, **spec: Any) -> str:
        reply = self.send("submit", spec=spec)
        assert "ack" in reply, reply
        return str(reply["ack"])

    def kill(self) -> None:
        """SIGKILL (if still alive), reap, and close the pipes."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)
        self._reader.join(WAIT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log_file.close()


def read_rows(path: Path) -> dict[str, tuple[int, str, Any]]:
    """Every task row of the store: id -> (seq, state, doc), through a read-only connection."""
    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=WAIT)
    try:
        out: dict[str, tuple[int, str, Any]] = {}
        try:  # (format 2: a row's shared part, if any, is the rest of its doc)
            found = conn.execute(
                "SELECT t.id, t.seq, t.state, t.doc, p.doc FROM task t"
                " LEFT JOIN part p ON p.id = t.part"
            ).fetchall()
        except sqlite3.OperationalError:  # an older format: no part table
            found = [(*row, None) for row in conn.execute("SELECT id, seq, state, doc FROM task")]
        for id_, seq, state, doc, part in found:
            try:
                value = json.loads(doc)
                if part is not None:
                    value = {**json.loads(part), **value}
            except (TypeError, ValueError):
                value = doc
            out[id_] = (seq, state, value)
        return out
    finally:
        conn.close()


def task_rows(path: Path) -> dict[str, tuple[int, str, Any]]:
    """The rows of tasks (not dead letters)."""
    return {k: v for k, v in read_rows(path).items() if v[1] != "dead"}


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` (a file or a directory) unwritable, even for root (``chattr +i``)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    try:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, timeout=WAIT)
    except FileNotFoundError:
        pytest.skip("running as root (permissions are ignored) and chattr is not installed")
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i fails: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True, timeout=WAIT)
