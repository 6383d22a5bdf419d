"""Run the test suite on this CPython and, at the same time, on every other 3.11+ here.

``make test`` calls this after the lint. The project supports CPython 3.11 and newer
(``requires-python``): the suite runs on the interpreter ``make`` was given, in the
foreground, and on each other ``python3.N`` found on ``PATH`` or among pyenv's
versions (N from 11 to 20), each in its own virtual environment under
``.venvs/pythonX.Y`` with the test extras installed. The suite spends half its time
waiting (on threads, child processes, timeouts), so the runs overlap: the other
versions run beside the first one instead of after it, and the whole takes little
longer than one run. Their output goes to ``.venvs/pythonX.Y/pytest.log``; a summary
(and, on a failure, the log's end) is printed at the end.

``--lint`` first runs ``ruff check .`` and ``mypy`` here while the other versions
install (a lint failure stops everything). The other versions run the durable crash
suite with 5 seeds unless ``CLUSTER_CRASH_SEEDS`` says otherwise (this one runs its
default 20): it is the suite's most CPU-hungry part, and what it checks (SQLite and
SIGKILL) does not depend on the Python version.

Other arguments go to every pytest run. ``CLUSTER_PYTHONS=3.12,3.13`` names the other
versions to run (empty: none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
PROBE = (
    "import sys, platform; print('%d.%d' % sys.version_info[:2], platform.python_implementation())"
)


def candidates(names: list[str]) -> list[str]:
    """Executables to ask: ``names`` on ``PATH``, and pyenv's installed versions (its
    shims answer only for the versions selected in the shell)."""
    found = [exe for exe in map(shutil.which, names) if exe is not None]
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for name in names:
        found.extend(sorted(map(str, Path(root, "versions").glob(f"*/bin/{name}"))))
    return found


def other_interpreters() -> list[tuple[str, str]]:
    """``(version, executable)`` of each other working CPython 3.11+ on ``PATH``."""
    wanted = os.environ.get("CLUSTER_PYTHONS")
    if wanted is None:
        names = [f"python3.{minor}" for minor in range(11, 21)]
    else:
        names = [f"python{v.strip()}" for v in wanted.split(",") if v.strip()]
    mine = MINE
    found: dict[str, str] = {}
    for exe in candidates(names):
        try:  # pyenv has shims for versions that are not installed: ask each one
            probe = subprocess.run(
                [exe, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
            )
        except (OSError, subprocess.SubprocessError):
            continue
        version, _, implementation = probe.stdout.strip().partition(" ")
        if implementation == "CPython" and version != mine:
            found.setdefault(version, exe)
    return sorted(found.items())


class Other(threading.Thread):
    """One other version: its venv, its install, then its suite (output to a log)."""

    def __init__(self, version: str, exe: str, pytest_args: list[str]) -> None:
        super().__init__(name=f"python{version}")
        self.version, self.exe, self.pytest_args = version, exe, pytest_args
        self.venv = ROOT / ".venvs" / f"python{version}"
        self.log = self.venv / "pytest.log"
        self.code: int | None = None
        self.seconds = 0.0
        self.cancelled = False  # set by main() on a lint failure
        self.proc: subprocess.Popen[bytes] | None = None  # the command running now

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.code = self._run()
        except Exception as exc:  # reported as this version's failure, never lost
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("a") as out:
                out.write(f"\n{type(exc).__name__}: {exc}\n")
            self.code = 1
        self.seconds = time.monotonic() - started

    def _run(self) -> int:
        python = self.venv / "bin" / "python"
        if not python.exists():
            subprocess.run([self.exe, "-m", "venv", str(self.venv)], check=True)
        env = dict(ENV)
        env.setdefault("CLUSTER_CRASH_SEEDS", "5")
        with self.log.open("w") as out:
            install = [str(python), "-m", "pip", "install", "-q", "-e", ".[test,all]"]
            with INSTALLS:  # one pip at a time in this tree (they write its egg-info)
                code = self._call(install, env, out)
            if code:
                return code
            pytest = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            return self._call([*pytest, *self.pytest_args], env, out)

    def _call(self, cmd: list[str], env: dict[str, str], out: IO[str]) -> int:
        with LAUNCH:
            if self.cancelled:
                return 1
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
        return self.proc.wait()

    def cancel(self) -> None:
        with LAUNCH:
            self.cancelled = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()


INSTALLS = threading.Lock()
LAUNCH = threading.Lock()  # guards Other.cancelled and Other.proc against a cancel
MINE = "{}.{}".format(*sys.version_info[:2])


def main(args: list[str]) -> int:
    lint = "--lint" in args
    pytest_args = [a for a in args if a != "--lint"]
    others = [Other(version, exe, pytest_args) for version, exe in other_interpreters()]
    for other in others:
        other.start()
    if lint:
        for cmd in (["ruff", "check", "."], ["mypy"]):
            print("+ python -m " + " ".join(cmd), flush=True)
            if subprocess.call([sys.executable, "-m", *cmd], cwd=ROOT, env=ENV):
                for other in others:
                    other.cancel()
                for other in others:
                    other.join()
                return 1
    beside = "; beside it on " + ", ".join(o.version for o in others) if others else ""
    print(f"== the suite on Python {MINE} here{beside}", flush=True)
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, env=ENV)
    print(f"== Python {MINE}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
    failed = [MINE] if code else []
    for other in others:
        other.join()
        lines = other.log.read_text(errors="replace").splitlines() if other.log.exists() else []
        summary = next((line for line in reversed(lines) if line.strip()), "(no output)")
        print(f"== Python {other.version}: exit {other.code} in {other.seconds:.0f} s: {summary}")
        if other.code:
            failed.append(other.version)
            print("\n".join(lines[-150:]))
            print(f"== (the whole log: {other.log.relative_to(ROOT)})")
    if failed:
        print("the suite failed on Python " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
