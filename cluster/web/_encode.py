"""The JSON forms of what the cluster's public API returns.

Every dataclass field is carried over, so a field the cluster adds later shows up
without a change here: datetimes as ISO 8601 (with their UTC offset), states as
their value (``"running"``), exceptions as ``{"type", "message"}``, tuples as
lists. Values and progress are user objects: JSON types pass through (strings,
lists and dicts clipped when large); anything else becomes ``{"repr": "..."}``,
a ``repr`` clipped to ``MAX_TEXT`` characters. No user ``__str__``/``__repr__``
that raises can break a response.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import reprlib
from datetime import datetime
from typing import Any

__all__ = ["MAX_TEXT", "error_json", "jsonable", "record_json"]

#: Longest string (message, value, repr) put into a response, in characters.
MAX_TEXT = 2000
#: Longest list or dict kept as JSON inside a value; larger ones become a repr.
_MAX_ITEMS = 100
_MAX_DEPTH = 4

_repr = reprlib.Repr()
_repr.maxstring = MAX_TEXT
_repr.maxother = MAX_TEXT
_repr.maxlevel = _MAX_DEPTH


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis says it was cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def safe_repr(value: object) -> str:
    """A clipped ``repr`` that never raises."""
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            head = bytes(value[: MAX_TEXT // 4])
            return clip(repr(head) + ("\u2026" if len(value) > len(head) else ""))
        return clip(_repr.repr(value))
    except Exception as exc:  # a user __repr__ that raises
        return f"<unrepresentable {type(value).__qualname__}: {type(exc).__name__}>"


def error_json(error: BaseException | None) -> dict[str, str] | None:
    """``{"type": "module.Class", "message": str(error)}`` (builtins without module)."""
    if error is None:
        return None
    cls = type(error)
    stored = getattr(error, "type_name", None)  # a StoredError names the original type
    if isinstance(stored, str) and stored:
        type_name = stored
    elif cls.__module__ in ("builtins", "__main__"):
        type_name = cls.__qualname__
    else:
        type_name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(error)
    except Exception as exc:
        message = f"<str() raised {type(exc).__name__}>"
    return {"type": type_name, "message": clip(message)}


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON: JSON types as themselves, anything else as ``{"repr": ...}``."""
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str:
        return clip(value)
    if kind is int:
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)  # JSON has no NaN/inf
    if depth < _MAX_DEPTH:
        if (kind is list or kind is tuple) and len(value) <= _MAX_ITEMS:
            return [jsonable(v, depth + 1) for v in value]
        if (
            kind is dict
            and len(value) <= _MAX_ITEMS
            and all(type(k) is str for k in value)  # JSON keys are strings
        ):
            return {clip(k, 200): jsonable(v, depth + 1) for k, v in value.items()}
    return {"repr": safe_repr(value)}


def _field(value: Any) -> Any:
    if type(value) is str:
        return clip(value, 50_000)  # ids, names, a dead letter's traceback text
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseException):
        return error_json(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # UNLIMITED (an int subclass) as -1
    if isinstance(value, tuple) and all(type(v) is str for v in value):
        return list(value)  # tags
    if isinstance(value, dict) and all(type(k) is str for k in value):
        return {k: _field(v) for k, v in value.items()}  # ClusterStats.executors
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return record_json(value)
    return jsonable(value)


def record_json(record: Any) -> dict[str, Any]:
    """A frozen dataclass of the public API (TaskInfo, DeadLetter, ClusterStats, ...)
    as a JSON object, field by field."""
    return {f.name: _field(getattr(record, f.name)) for f in dataclasses.fields(record)}
