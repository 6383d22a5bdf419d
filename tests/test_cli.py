"""``cluster run`` end to end: real subprocesses, real shells, a real pseudo-terminal.

Every test runs ``python -m cluster run`` as a child process in a temporary
directory. Commands that must be "running" when the test acts block on a FIFO the
test controls, and report that they started by writing their pid to another FIFO
the test reads; nothing waits on a bare sleep.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest

import cluster

ROOT = Path(__file__).resolve().parent.parent
HEADER = ["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal"]
HEADER.append("Command")
ESC = "\x1b"
WAIT = 20.0  #: bound for a CLI run that should take well under a second

needs_keys = pytest.mark.skipif(
    not hasattr(cluster.TaskBuilder, "with_key"), reason="keys not merged yet"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)
    env.pop("NO_COLOR", None)
    return env


def cli(
    *args: str, cwd: Path, input: bytes | None = None, timeout: float = WAIT
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m cluster run ARGS`` to the end with stdout and stderr to pipes."""
    return subprocess.run(
        [sys.executable, "-m", "cluster", "run", *args],
        cwd=cwd,
        env=_env(),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def start_cli(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m cluster run ARGS`` with stdout and stderr to pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "cluster", "run", *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def write_jobs(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_jsonl(path: Path, objects: Sequence[Mapping[str, object]]) -> Path:
    return write_jobs(path, [json.dumps(obj) for obj in objects])


def read_joblog(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header fields and the other lines' fields (each split into 9)."""
    lines = path.read_bytes().decode().split("\n")
    assert lines[-1] == "", "the joblog ends with a complete line"
    rows = [line.split("\t", 8) for line in lines[1:-1]]
    assert all(len(row) == 9 for row in rows), rows
    return lines[0].split("\t"), rows


def by_command(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[8]: row for row in rows}


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (None: it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(name))
    return members


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait (on a pidfd, not by polling) until ``pid`` has exited; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class Fifo:
    """A FIFO the test reads lines from: commands report to it with ``echo ... > fifo``.

    Opened read-write, so the test's read never sees EOF between two writers.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def lines(self, count: int, timeout: float = WAIT) -> list[str]:
        """The next ``count`` lines written to the FIFO."""
        deadline = time.monotonic() + timeout
        while self._buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {self._buffer!r} arrived"
            if select.select([self._fd], [], [], left)[0]:
                self._buffer += os.read(self._fd, 4096)
        *lines, self._buffer = self._buffer.split(b"\n", count)
        return [line.decode() for line in lines]

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Fifo]:
    reader = Fifo(path)
    try:
        yield reader
    finally:
        reader.close()


def release(path: Path, line: str = "go") -> None:
    """Open the FIFO at ``path`` for writing (waiting for a reader) and write ``line``."""
    with open(path, "w") as file:
        file.write(line + "\n")


def unblock(path: Path) -> None:
    """Write to the FIFO at ``path`` if a command waits on it (cleanup after a failure)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no reader
        os.write(fd, b"go\n")
        os.close(fd)


def kill_groups(pgids: Sequence[int]) -> None:
    """SIGKILL these process groups if anything is left in them (cleanup after a failure)."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def read_until(stream: IO[bytes] | None, needle: bytes, timeout: float = WAIT) -> bytes:
    """Read the pipe ``stream`` until ``needle`` has arrived; return what was read."""
    assert stream is not None
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not arrive; got {data!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {needle!r}; got {data!r}"
            data += chunk
    return data


def run_in_pty(args: Sequence[str], cwd: Path, timeout: float = WAIT) -> tuple[int, str]:
    """Run ``python ARGS`` with stdin, stdout and stderr on a new 100x30 pseudo-terminal;
    return its exit status and everything it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = _env()
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the CLI did not finish; it wrote {data!r}"
            if not select.select([master], [], [], left)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            data += chunk
        status = proc.wait(timeout=WAIT)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, data.decode("utf-8", "replace")


# ---------------------------------------------------------------- output and display


def test_piped_output_is_each_commands_output_in_plain_lines(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["echo one", "echo two >&2", "printf 'three\\n'"])
    done = cli(str(jobs), "-j", "2", cwd=tmp_path)
    assert done.returncode == 0
    assert sorted(done.stdout.decode().splitlines()) == ["one", "three"]
    err = done.stderr.decode()
    assert "two\n" in err
    assert re.search(r"^cluster: 3 succeeded, 0 failed, 0 skipped in [\d.]+s$", err, re.M)
    assert ESC not in done.stdout.decode() + err


def test_terminal_draws_a_progress_bar_with_eta_then_a_summary_table(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", [f"echo out-{i}" for i in range(5)] + ["exit 4"])
    status, screen = run_in_pty(["-m", "cluster", "run", str(jobs), "-j", "2"], tmp_path)
    assert status == 1
    assert ESC + "[" in screen, "control codes: the bar is drawn and redrawn"
    assert "━" in screen and "ETA" in screen and "6/6" in screen
    for i in range(5):
        assert f"out-{i}" in screen
    # The summary table comes last: its frame and its columns, after the last bar.
    last_bar = screen.rindex("6/6")
    table = screen[last_bar:]
    top, bottom = table.index("┏"), table.rindex("┘")
    for column in ("succeeded", "failed", "skipped", "wall time"):
        assert column in table[top:bottom]
    assert re.search(r"│\s+5 │\s+1 │\s+0 │\s+[\d.]+s │", table)
    assert ESC not in table[bottom:].replace(ESC + "[?25h", ""), "nothing drawn after it"


def test_terminal_without_rich_falls_back_to_plain_lines_and_says_so(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["echo hello"])
    code = "import sys; sys.modules['rich'] = None; from cluster.cli import main; sys.exit(main())"
    status, screen = run_in_pty(["-c", code, "run", str(jobs)], tmp_path)
    assert status == 0
    assert "pip install 'cluster[cli]'" in screen
    assert "hello" in screen
    assert "cluster: 1 succeeded, 0 failed, 0 skipped" in screen
    assert ESC not in screen


def test_output_of_two_commands_is_never_interleaved(tmp_path: Path) -> None:
    loop = "for i in $(seq 3000); do echo {n}-$i; echo {n}-$i >&2; done"
    jobs = write_jobs(tmp_path / "jobs.txt", [loop.format(n="A"), loop.format(n="B")])
    done = cli(str(jobs), "-j", "2", cwd=tmp_path)
    assert done.returncode == 0
    for stream in (done.stdout, done.stderr):
        lines = [line for line in stream.decode().splitlines() if not line.startswith("cluster")]
        first = lines[0][0]
        second = "B" if first == "A" else "A"
        expected = [f"{first}-{i}" for i in range(1, 3001)]
        expected += [f"{second}-{i}" for i in range(1, 3001)]
        assert lines == expected


def test_keep_order_prints_in_file_order_not_completion_order(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # The first command can only end after the last one has opened the gate.
    jobs = write_jobs(
        tmp_path / "jobs.txt", ["read x < gate; echo first", "echo second", "echo go > gate"]
    )
    try:
        done = cli(str(jobs), "-j", "3", "--keep-order", cwd=tmp_path)
    finally:
        unblock(gate)
    assert done.returncode == 0
    assert done.stdout.decode().splitlines() == ["first", "second"]


def test_commands_come_from_stdin_with_dash(tmp_path: Path) -> None:
    done = cli("-", cwd=tmp_path, input=b"echo from-stdin\n# not a command\n\necho again\n")
    assert done.returncode == 0
    assert sorted(done.stdout.decode().split()) == ["again", "from-stdin"]


def test_blank_and_comment_lines_are_not_commands(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["", "  # echo no", "#echo no", "echo yes", "   "])
    done = cli(str(jobs), "--joblog", "log", cwd=tmp_path)
    assert done.stdout == b"yes\n"
    _, rows = read_joblog(tmp_path / "log")
    assert [(row[0], row[8]) for row in rows] == [("1", "echo yes")]


# ---------------------------------------------------------------- exit status


@pytest.mark.parametrize(("failures", "status"), [(0, 0), (1, 1), (150, 101)])
def test_exit_status_is_the_number_of_failures_capped_at_101(
    tmp_path: Path, failures: int, status: int
) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["true"] * 3 + ["exit 3"] * failures)
    done = cli(str(jobs), "-j", "4", cwd=tmp_path, timeout=60)
    assert done.returncode == status
    assert f"3 succeeded, {failures} failed" in done.stderr.decode()


@pytest.mark.parametrize(
    "args",
    [
        ["-j", "0"],
        ["-j", "x"],
        ["--timeout", "0"],
        ["--timeout", "-1"],
        ["--retries", "-1"],
        ["--backoff", "nan"],
        ["--resume"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path: Path, args: list[str]) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["touch ran"])
    done = cli(str(jobs), *args, cwd=tmp_path)
    assert done.returncode == 2
    assert b"usage:" in done.stderr and b"error:" in done.stderr
    assert not (tmp_path / "ran").exists()


def test_missing_jobs_file_exits_2(tmp_path: Path) -> None:
    done = cli("nope.txt", cwd=tmp_path)
    assert done.returncode == 2
    assert b"cannot read nope.txt" in done.stderr


# ---------------------------------------------------------------- joblog


def test_joblog_header_is_gnu_parallels(tmp_path: Path) -> None:
    if shutil.which("parallel") is None:
        pytest.skip("GNU parallel is not installed")
    subprocess.run(
        ["parallel", "--will-cite", "--joblog", "theirs", ":::", "true"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=WAIT,
    )
    cli(str(write_jobs(tmp_path / "jobs.txt", ["true"])), "--joblog", "ours", cwd=tmp_path)
    theirs = (tmp_path / "theirs").read_text().split("\n")[0]
    ours = (tmp_path / "ours").read_text().split("\n")[0]
    assert ours == theirs == "\t".join(HEADER)


def test_joblog_has_one_line_per_command_as_parallel_fills_it(tmp_path: Path) -> None:
    commands = ["echo hello", "echo to-stderr >&2", "exit 3", "kill -9 $$"]
    jobs = write_jobs(tmp_path / "jobs.txt", commands)
    before = time.time()
    done = cli(str(jobs), "-j", "2", "--joblog", "jobs.log", cwd=tmp_path)
    after = time.time()
    assert done.returncode == 2
    header, rows = read_joblog(tmp_path / "jobs.log")
    assert header == HEADER
    assert sorted(row[8] for row in rows) == sorted(commands)
    for row in rows:
        assert row[1] == ":"
        assert re.fullmatch(r"\d+\.\d{3}", row[2]) and before - 1 <= float(row[2]) <= after
        assert len(row[3]) == 10 and re.fullmatch(r" *\d+\.\d{3}", row[3])
        assert row[4] == "0"
    rows_by = by_command(rows)
    seq_recv_exit_sig = {cmd: (r[0], r[5], r[6], r[7]) for cmd, r in rows_by.items()}
    assert seq_recv_exit_sig == {
        "echo hello": ("1", "6", "0", "0"),  # Receive: the bytes written to stdout
        "echo to-stderr >&2": ("2", "0", "0", "0"),
        "exit 3": ("3", "0", "3", "0"),
        "kill -9 $$": ("4", "0", "0", "9"),  # killed: Exitval 0, Signal 9, as parallel
    }


def test_joblog_without_resume_starts_anew(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["true"])
    (tmp_path / "jobs.log").write_text("old contents\n")
    cli(str(jobs), "--joblog", "jobs.log", cwd=tmp_path)
    header, rows = read_joblog(tmp_path / "jobs.log")
    assert header == HEADER and len(rows) == 1


def test_retries_log_only_the_final_attempt_and_print_only_its_output(tmp_path: Path) -> None:
    # Fails on its first two attempts, succeeds on the third.
    cmd = "echo x >> tries; n=$(wc -l < tries); echo attempt-$n; [ $n -ge 3 ]"
    jobs = write_jobs(tmp_path / "jobs.txt", [cmd])
    done = cli(str(jobs), "--retries", "2", "--joblog", "jobs.log", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "tries").read_text().count("x") == 3
    assert done.stdout == b"attempt-3\n"
    _, rows = read_joblog(tmp_path / "jobs.log")
    assert [(row[5], row[6]) for row in rows] == [("10", "0")]


def test_retries_exhausted_is_one_failure(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["echo x >> tries; exit 5"])
    done = cli(str(jobs), "--retries", "2", "--backoff", "0.01", "--joblog", "log", cwd=tmp_path)
    assert done.returncode == 1
    assert (tmp_path / "tries").read_text().count("x") == 3  # retries after the first
    _, rows = read_joblog(tmp_path / "log")
    assert [row[6] for row in rows] == ["5"]


# ---------------------------------------------------------------- timeouts


@pytest.mark.timeout(60)
def test_timeout_kills_a_command_that_ignores_sigterm_and_its_child(tmp_path: Path) -> None:
    cmd = "trap '' TERM; sleep 300 & echo $$ $! > pids; wait; wait; echo survived"
    jobs = write_jobs(tmp_path / "jobs.txt", [cmd])
    started = time.monotonic()
    done = cli(str(jobs), "--timeout", "1", "--joblog", "jobs.log", cwd=tmp_path)
    took = time.monotonic() - started
    assert done.returncode == 1
    assert b"survived" not in done.stdout
    shell, child = map(int, (tmp_path / "pids").read_text().split())
    for pid in (shell, child):
        assert wait_gone(pid), f"pid {pid} survived: {process_state(pid)}"
    assert not group_members(shell)
    _, rows = read_joblog(tmp_path / "jobs.log")
    assert [(row[6], row[7]) for row in rows] == [("-1", "9")]  # Exitval -1: timed out
    assert 1.0 <= float(rows[0][3]) < 1.0 + 5.0
    assert took < 15
    assert b"timed out" in done.stderr


def test_timeout_kills_with_sigterm_when_the_command_obeys_it(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["sleep 300"])
    done = cli(str(jobs), "--timeout", "0.3", "--joblog", "jobs.log", cwd=tmp_path)
    assert done.returncode == 1
    _, rows = read_joblog(tmp_path / "jobs.log")
    assert [(row[6], row[7]) for row in rows] == [("-1", "15")]


def test_a_timed_out_command_is_retried(tmp_path: Path) -> None:
    # The first attempt hangs (and is killed), the second returns at once.
    cmd = "echo x >> tries; [ $(wc -l < tries) -ge 2 ] || sleep 300"
    jobs = write_jobs(tmp_path / "jobs.txt", [cmd])
    done = cli(str(jobs), "--timeout", "0.3", "--retries", "1", "--joblog", "log", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "tries").read_text().count("x") == 2
    _, rows = read_joblog(tmp_path / "log")
    assert [(row[6], row[7]) for row in rows] == [("0", "0")]


# ---------------------------------------------------------------- Ctrl-C and --resume


@pytest.mark.timeout(60)
def test_sigint_kills_running_commands_and_resume_runs_exactly_the_rest(tmp_path: Path) -> None:
    quick = [f"echo q{i} >> ran.txt" for i in (1, 2)]
    # Each blocker reports its process group to `ready`, then blocks on `gate`.
    blockers = [f"echo $$ > ready; cat gate; echo b{i} >> ran.txt" for i in (1, 2, 3)]
    later = [f"echo l{i} >> ran.txt" for i in (1, 2)]
    jobs = write_jobs(tmp_path / "jobs.txt", quick + blockers + later)
    os.mkfifo(tmp_path / "gate")
    groups: list[int] = []
    with fifo(tmp_path / "ready") as ready:
        proc = start_cli(str(jobs), "-j", "3", "--joblog", "jobs.log", cwd=tmp_path)
        try:
            groups += [int(pid) for pid in ready.lines(3)]
            members = [pid for pgid in groups for pid in group_members(pgid)]
            assert len(members) >= 3  # the shells, and the `cat`s they started
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            kill_groups(groups)  # only if the CLI left them: asserted below
    assert proc.returncode == 130, err
    assert out == b""
    for pid in members:
        assert wait_gone(pid), f"pid {pid} survived the interrupt"
    for pgid in groups:
        assert not group_members(pgid)
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["q1", "q2"]
    _, rows = read_joblog(tmp_path / "jobs.log")
    assert sorted(row[8] for row in rows) == sorted(quick), "killed commands are not logged"
    assert all(row[6] == "0" and row[7] == "0" for row in rows)
    summary = err.decode().splitlines()[-1]
    assert summary.startswith("cluster: 2 succeeded, 0 failed, 2 skipped, 3 interrupted")

    # Resume: the gate and the ready FIFO become plain files, so nothing blocks.
    for name in ("gate", "ready"):
        (tmp_path / name).unlink()
        (tmp_path / name).touch()
    done = cli(str(jobs), "-j", "3", "--joblog", "jobs.log", "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 skipped" in done.stderr.decode()
    ran = (tmp_path / "ran.txt").read_text().split()
    assert sorted(ran) == ["b1", "b2", "b3", "l1", "l2", "q1", "q2"]  # each exactly once
    _, rows = read_joblog(tmp_path / "jobs.log")
    assert sorted(row[8] for row in rows) == sorted(quick + blockers + later)
    assert sorted(int(row[0]) for row in rows) == list(range(1, 8))


def test_sigterm_interrupts_the_run_like_ctrl_c(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["echo $$ > ready; cat gate", "true"])
    os.mkfifo(tmp_path / "gate")
    groups: list[int] = []
    with fifo(tmp_path / "ready") as ready:
        proc = start_cli(str(jobs), "-j", "1", "--joblog", "jobs.log", cwd=tmp_path)
        try:
            groups += [int(pid) for pid in ready.lines(1)]
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            kill_groups(groups)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not group_members(groups[0])
    assert read_joblog(tmp_path / "jobs.log")[1] == []
    assert "0 succeeded, 0 failed, 1 skipped, 1 interrupted" in err.decode()


def test_resume_matches_command_text_not_line_numbers(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    write_jobs(jobs, ["echo a >> ran.txt", "echo b >> ran.txt; exit 1", "echo c >> ran.txt"])
    assert cli(str(jobs), "--joblog", "jobs.log", cwd=tmp_path).returncode == 1
    (tmp_path / "ran.txt").unlink()
    # Lines moved and one added: a resume by line number would run the wrong commands.
    write_jobs(
        jobs,
        ["echo new >> ran.txt", "echo c >> ran.txt", "echo b >> ran.txt", "echo a >> ran.txt"],
    )
    done = cli(str(jobs), "--joblog", "jobs.log", "--resume", "-j", "1", cwd=tmp_path)
    assert done.returncode == 0
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["b", "new"]
    _, rows = read_joblog(tmp_path / "jobs.log")
    assert len(rows) == 3 + 2  # appended, not rewritten


def test_resume_runs_a_repeated_command_as_often_as_it_did_not_succeed(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["echo x >> ran.txt"])
    cli(str(jobs), "--joblog", "jobs.log", cwd=tmp_path)
    write_jobs(jobs, ["echo x >> ran.txt"] * 3)
    done = cli(str(jobs), "--joblog", "jobs.log", "--resume", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "ran.txt").read_text().split() == ["x"] * 3  # 1, then 2 more


def test_resume_without_a_joblog_yet_runs_everything(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["echo x >> ran.txt"])
    done = cli(str(jobs), "--joblog", "jobs.log", "--resume", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "ran.txt").read_text() == "x\n"
    header, rows = read_joblog(tmp_path / "jobs.log")
    assert header == HEADER and len(rows) == 1


def test_resume_refuses_a_file_that_is_not_a_joblog(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.txt", ["touch ran"])
    (tmp_path / "notes.txt").write_text("my notes\n")
    done = cli(str(jobs), "--joblog", "notes.txt", "--resume", cwd=tmp_path)
    assert done.returncode == 2
    assert b"not a job log" in done.stderr
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- --halt-on-error


def test_halt_on_error_starts_no_new_command_and_lets_running_ones_finish(
    tmp_path: Path,
) -> None:
    os.mkfifo(tmp_path / "gate")
    jobs = write_jobs(
        tmp_path / "jobs.txt",
        ["read x < gate; echo slow >> ran.txt", "exit 1", "echo after >> ran.txt"],
    )
    proc = start_cli(str(jobs), "-j", "2", "--halt-on-error", "--joblog", "log", cwd=tmp_path)
    try:
        err = read_until(proc.stderr, b"exit status 1")  # the failure is known...
        release(tmp_path / "gate")  # ... before the running command may end
        out, rest = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unblock(tmp_path / "gate")
    assert proc.returncode == 1
    assert out == b""
    assert (tmp_path / "ran.txt").read_text().split() == ["slow"]
    assert "1 succeeded, 1 failed, 1 skipped" in (err + rest).decode()
    _, rows = read_joblog(tmp_path / "log")
    assert sorted(row[8] for row in rows) == ["exit 1", "read x < gate; echo slow >> ran.txt"]


# ---------------------------------------------------------------- --jsonl


def test_jsonl_higher_priorities_run_first(tmp_path: Path) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"cmd": "echo p1 >> ran.txt", "priority": 1},
            {"cmd": "echo p5 >> ran.txt", "priority": 5},
            {"cmd": "echo p0 >> ran.txt"},
            {"cmd": "echo p10 >> ran.txt", "priority": 10},
            {"cmd": "echo p-3 >> ran.txt", "priority": -3},
        ],
    )
    done = cli("--jsonl", str(jobs), "-j", "1", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "ran.txt").read_text().split() == ["p10", "p5", "p1", "p0", "p-3"]


def test_jsonl_timeout_applies_to_its_own_command(tmp_path: Path) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [{"cmd": "sleep 300", "timeout": 0.3}, {"cmd": "sleep 0.5; echo ok"}],
    )
    done = cli("--jsonl", str(jobs), "-j", "2", "--timeout", "60", "--joblog", "log", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == b"ok\n"
    rows = by_command(read_joblog(tmp_path / "log")[1])
    assert rows["sleep 300"][6] == "-1"
    assert rows["sleep 0.5; echo ok"][6] == "0"


def test_jsonl_retries_apply_to_their_own_command(tmp_path: Path) -> None:
    flaky = "echo x >> {0}; [ $(wc -l < {0}) -ge 3 ]"
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [{"cmd": flaky.format("a"), "retries": 2}, {"cmd": flaky.format("b")}],
    )
    done = cli("--jsonl", str(jobs), "--retries", "5", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "a").read_text().count("x") == 3
    assert (tmp_path / "b").read_text().count("x") == 3  # --retries 5: stops at success

    write_jsonl(jobs, [{"cmd": flaky.format("c"), "retries": 1}])
    assert cli("--jsonl", str(jobs), "--retries", "5", cwd=tmp_path).returncode == 1
    assert (tmp_path / "c").read_text().count("x") == 2


def test_jsonl_resume_matches_by_id(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jsonl(
        jobs,
        [
            {"cmd": "echo a >> ran.txt", "id": "job-a"},
            {"cmd": "echo b >> ran.txt; exit 1", "id": "job-b"},
        ],
    )
    assert cli("--jsonl", str(jobs), "--joblog", "log", cwd=tmp_path).returncode == 1
    rows = read_joblog(tmp_path / "log")[1]
    assert sorted(row[1] for row in rows) == ["job-a", "job-b"]  # the id, in Host
    (tmp_path / "ran.txt").unlink()
    # job-a's command changed but it succeeded: skipped by its id; job-b runs again.
    write_jsonl(
        jobs,
        [
            {"cmd": "echo a2 >> ran.txt", "id": "job-a"},
            {"cmd": "echo b >> ran.txt", "id": "job-b"},
        ],
    )
    done = cli("--jsonl", str(jobs), "--joblog", "log", "--resume", cwd=tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "ran.txt").read_text().split() == ["b"]


def test_jsonl_command_with_newlines_is_one_joblog_line_and_resumes(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"cmd": "echo one\necho two >> ran.txt"}])
    done = cli("--jsonl", str(jobs), "--joblog", "log", cwd=tmp_path)
    assert done.stdout == b"one\n"
    rows = read_joblog(tmp_path / "log")[1]
    assert [row[8] for row in rows] == ["echo one\0echo two >> ran.txt"]  # as parallel
    cli("--jsonl", str(jobs), "--joblog", "log", "--resume", cwd=tmp_path)
    assert (tmp_path / "ran.txt").read_text() == "two\n"


@needs_keys
def test_jsonl_commands_with_the_same_key_never_run_at_once(tmp_path: Path) -> None:
    # Each holds a directory as a lock; a second holder at the same time fails.
    hold = "mkdir held || exit 9; echo {0} >> ran.txt; sleep 0.2; rmdir held"
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [{"cmd": hold.format(i), "key": "db"} for i in range(4)] + [{"cmd": "true", "key": "x"}],
    )
    done = cli("--jsonl", str(jobs), "-j", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"cmd": "true"', "not valid JSON"),
        ('["true"]', "expected a JSON object"),
        ('{"priority": 3}', "'cmd' is missing"),
        ('{"cmd": ""}', "'cmd' must not be empty"),
        ('{"cmd": "true", "priority": "high"}', "'priority' must be an integer"),
        ('{"cmd": "true", "priority": true}', "'priority' must be an integer"),
        ('{"cmd": "true", "retries": -1}', "'retries' must be >= 0"),
        ('{"cmd": "true", "timeout": 0}', "'timeout' must be > 0"),
        ('{"cmd": "true", "timeout": "1s"}', "'timeout' must be seconds"),
        ('{"cmd": "true", "id": 7}', "'id' must be a string"),
        ('{"cmd": "true", "retry": 1}', "unknown field 'retry'"),
        ('{"cmd": "true", "id": "first"}', "id 'first' is already used on line 1"),
    ],
)
def test_jsonl_bad_line_is_reported_by_line_number_before_anything_runs(
    tmp_path: Path, line: str, message: str
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f'{{"cmd": "touch ran", "id": "first"}}\n\n{line}\n{{"cmd": "true"}}\n')
    done = cli("--jsonl", str(jobs), cwd=tmp_path)
    assert done.returncode == 2
    err = done.stderr.decode()
    assert f"jobs.jsonl:3: {message}" in err, err
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- packaging


def test_console_script_is_declared_and_points_at_main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cluster"] == "cluster.cli:main"
    assert project["optional-dependencies"]["cli"] == ["rich>=13"]
    everything = " ".join(project["optional-dependencies"]["all"])
    assert "cli" in everything.split("[", 1)[1]  # cluster[...,cli,...]
    from cluster.cli import main

    assert callable(main)


def test_import_cluster_does_not_import_the_cli_or_rich() -> None:
    code = "import sys, cluster; print('cluster.cli' in sys.modules, 'rich' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, timeout=WAIT, check=True
    )
    assert done.stdout == b"False False\n"
