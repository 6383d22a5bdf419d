"""Reading a jobs file: one shell command a line, or one JSON object a line (``--jsonl``).

Everything is validated before anything runs, and a bad line is reported with its
file name and line number, as a compiler reports a syntax error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "JobFileError", "decode", "parse_jobs"]

#: The fields a ``--jsonl`` line may have; anything else is a typo worth reporting.
JSONL_FIELDS = frozenset({"cmd", "priority", "timeout", "retries", "id", "key"})


class JobFileError(ValueError):
    """A jobs file that cannot be run: the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class Job:
    """One command to run, as read from the jobs file.

    ``seq`` is the command's 1-based position among the file's commands (blank and
    ``#`` lines do not count), the joblog's ``Seq``; ``line`` is its line number in
    the file, for messages. ``timeout``/``retries`` are ``None`` when the line does
    not set them (the command-line defaults apply).
    """

    seq: int
    line: int
    cmd: str
    priority: int = 0
    timeout: float | None = None
    retries: int | None = None
    id: str | None = None
    key: str | None = None


def decode(data: bytes) -> str:
    """Bytes of a jobs file or a joblog as text; bytes that are not UTF-8 round-trip.

    ``surrogateescape`` is the file-system encoding's error handler, so a command
    with such bytes reaches the shell (``subprocess`` encodes with it) unchanged.
    """
    return data.decode("utf-8", "surrogateescape")


def parse_jobs(text: str, *, source: str, jsonl: bool = False) -> list[Job]:
    """The jobs in ``text`` (a file's contents), in file order.

    Blank lines and lines whose first non-blank character is ``#`` are skipped. A
    plain line is the command as written (its line ending removed). With ``jsonl``
    each other line must be a JSON object (see ``parse_jsonl_line``), and ids must be
    unique. Raises JobFileError naming ``source`` and the line.
    """
    jobs: list[Job] = []
    ids: dict[str, int] = {}
    # Only "\n" ends a line (str.splitlines would also split on \f, \v, U+2028...).
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    for number, raw in enumerate(lines, 1):
        if raw.endswith("\r"):
            raw = raw[:-1]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        seq = len(jobs) + 1
        if not jsonl:
            jobs.append(Job(seq, number, raw))
            continue
        job = parse_jsonl_line(stripped, seq=seq, line=number, source=source)
        if job.id is not None:
            first = ids.setdefault(job.id, number)
            if first != number:
                raise JobFileError(
                    f"{source}:{number}: id {job.id!r} is already used on line {first}"
                )
        jobs.append(job)
    return jobs


def parse_jsonl_line(text: str, *, seq: int, line: int, source: str) -> Job:
    """One ``--jsonl`` line: ``{"cmd": str, "priority": int, "timeout": seconds,
    "retries": int, "id": str, "key": str}``, every field but ``cmd`` optional."""
    import json

    where = f"{source}:{line}"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise JobFileError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise JobFileError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    unknown = sorted(set(obj) - JSONL_FIELDS)
    if unknown:
        allowed = ", ".join(sorted(JSONL_FIELDS))
        raise JobFileError(f"{where}: unknown field {unknown[0]!r} (fields: {allowed})")
    if "cmd" not in obj:
        raise JobFileError(f"{where}: 'cmd' is missing")
    cmd = _text(obj, "cmd", where)
    priority = _integer(obj, "priority", where, minimum=None)
    retries = _integer(obj, "retries", where, minimum=0)
    timeout = _timeout(obj, where)
    job_id = _text(obj, "id", where) if "id" in obj else None
    if job_id is not None and (job_id == ":" or any(c in job_id for c in "\t\n\r\0")):
        # The id is written in the joblog's Host column (see _joblog).
        raise JobFileError(f"{where}: 'id' must not be ':' nor contain tabs or line breaks")
    key = _text(obj, "key", where) if "key" in obj else None
    return Job(
        seq,
        line,
        cmd,
        priority=0 if priority is None else priority,
        timeout=timeout,
        retries=retries,
        id=job_id,
        key=key,
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _text(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise JobFileError(f"{where}: {name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise JobFileError(f"{where}: {name!r} must not be empty")
    return value


def _integer(obj: dict[str, Any], name: str, where: str, *, minimum: int | None) -> int | None:
    if name not in obj:
        return None
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise JobFileError(f"{where}: {name!r} must be an integer, got {_json_type(value)}")
    if minimum is not None and value < minimum:
        raise JobFileError(f"{where}: {name!r} must be >= {minimum}, got {value}")
    return value


def _timeout(obj: dict[str, Any], where: str) -> float | None:
    if "timeout" not in obj:
        return None
    value = obj["timeout"]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise JobFileError(f"{where}: 'timeout' must be seconds, got {_json_type(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an integer too large for a float
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds > 0):
        raise JobFileError(f"{where}: 'timeout' must be > 0 seconds, got {value}")
    return seconds
