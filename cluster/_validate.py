"""Argument checks shared by the builder, the backoff strategies and the cluster.

Every check raises at the call that received the bad value, with a message that
names the argument, so that nothing invalid ever reaches a worker.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

Duration = float | int | timedelta

_MAX = sys.float_info.max  # also the largest int that converts to a finite float


def seconds(value: object, name: str, *, positive: bool = False) -> float:
    """Return ``value`` as finite seconds >= 0 (> 0 if ``positive``)."""
    kind = type(value)
    if (kind is float or kind is int) and 0 <= value <= _MAX and (value or not positive):  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]  # the common cases, checked at once
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{name} must be a finite number of seconds, got {value!r}") from None
    else:
        raise TypeError(
            f"{name} must be seconds as int, float or timedelta, got {type(value).__name__}"
        )
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if result < 0 or (positive and result == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    return result


class _Unlimited(int):
    """The type of ``UNLIMITED``: an int (so it passes as a retry count) that reads well."""

    def __repr__(self) -> str:
        return "UNLIMITED"

    __str__ = __repr__


#: A retry count meaning "retry until the task succeeds, is cancelled, the cluster
#: stops, or an error is final" (``with_retry(UNLIMITED)``). An int equal to -1,
#: but only this object means unlimited: a plain negative count is a ValueError.
UNLIMITED: int = _Unlimited(-1)


def retries(value: object, name: str) -> int:
    """Return ``value`` as a retry count: an int >= 0, or ``UNLIMITED``."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, _Unlimited):
        return UNLIMITED
    count = integer(value, name)  # a plain -1 is not UNLIMITED: say what you mean
    if count < 0:
        raise ValueError(f"{name} must be >= 0 or UNLIMITED, got {count}")
    return count


def integer(value: object, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) >= ``minimum``."""
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def function(value: object, name: str) -> Callable[..., Any]:
    """Return ``value`` if it is callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def deadline(timeout: object, name: str = "timeout") -> float | None:
    """The monotonic deadline ``timeout`` seconds from now; None for no limit.

    As in ``concurrent.futures``, a negative timeout has already expired. An infinite
    one, or one too long for a lock to wait (``threading.TIMEOUT_MAX``), is no limit.
    """
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        value = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        try:
            value = float(timeout)
        except OverflowError:  # an int too large for a float: no limit in practice
            value = math.inf if timeout > 0 else -math.inf
    else:
        raise TypeError(
            f"{name} must be seconds as int, float or timedelta, got {type(timeout).__name__}"
        )
    if value != value:
        raise ValueError(f"{name} must be a number of seconds, got {timeout!r}")
    if value >= threading.TIMEOUT_MAX:
        return None
    return time.monotonic() + value
