"""Retry delay strategies and the retry mode.

Each strategy is a small immutable callable ``attempt -> seconds`` where
``attempt`` is 0 for the first retry; any other callable with that shape works
wherever a strategy is accepted.
"""

from __future__ import annotations

import enum
import math
import sys

from ._validate import Duration, seconds

__all__ = ["ExponentialBackoff", "FixedBackoff", "LinearBackoff", "RetryMode"]


class RetryMode(enum.Enum):
    """Where a failed attempt waits for its retry."""

    #: Back to the queue, due after the backoff, keeping its priority; the worker is freed.
    REQUEUE = "requeue"
    #: The same worker sleeps the backoff (woken early by cancel or shutdown) and retries.
    IMMEDIATE = "immediate"


class _Strategy:
    """Immutable after ``__init__`` (which sets fields with ``object.__setattr__``):
    the strategies precompute where their cap starts, so a field changed later
    would leave that stale."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot delete {name!r})")


_set = object.__setattr__


def _cap(name: str, value: Duration | None) -> float | None:
    return None if value is None else seconds(value, name)


class FixedBackoff(_Strategy):
    """The same ``delay`` before every retry."""

    __slots__ = ("delay",)
    delay: float

    def __init__(self, delay: Duration) -> None:
        _set(self, "delay", seconds(delay, "delay"))

    def __call__(self, attempt: int) -> float:
        return self.delay

    def __reduce__(self) -> tuple[object, ...]:
        return (FixedBackoff, (self.delay,))

    def __repr__(self) -> str:
        return f"FixedBackoff({self.delay!r})"


class LinearBackoff(_Strategy):
    """``base + step * attempt``, capped at ``max``.

    Never raises for a large ``attempt``: past the cap it is the cap, and without a
    cap it grows to ``inf``.
    """

    __slots__ = ("_capped_from", "_limit", "base", "max", "step")
    base: float
    step: float
    max: float | None
    _capped_from: int
    _limit: float

    def __init__(self, base: Duration, step: Duration, max: Duration | None = None) -> None:
        _set(self, "base", seconds(base, "base"))
        _set(self, "step", seconds(step, "step"))
        _set(self, "max", _cap("max", max))
        # From attempt ``_capped_from`` on the answer is ``_limit`` (no arithmetic).
        if self.step == 0:
            _set(self, "_capped_from", 0)
            _set(self, "_limit", _capped(self.base, self.max))
        elif self.max is not None:
            # base + step * n >= max for every n >= this (one step of slack)
            _set(self, "_capped_from", _steps_to((self.max - self.base) / self.step) + 1)
            _set(self, "_limit", self.max)
        else:
            _set(self, "_capped_from", _NEVER)
            _set(self, "_limit", math.inf)

    def __call__(self, attempt: int) -> float:
        if attempt >= self._capped_from:
            return self._limit
        try:
            delay = self.base + self.step * attempt
        except OverflowError:  # an attempt beyond float range: the delay is beyond any clock
            return math.inf
        return delay if self.max is None else min(delay, self.max)

    def __reduce__(self) -> tuple[object, ...]:  # pickle and copy through __init__
        return (LinearBackoff, (self.base, self.step, self.max))

    def __repr__(self) -> str:
        return f"LinearBackoff({self.base!r}, {self.step!r}, max={self.max!r})"


class ExponentialBackoff(_Strategy):
    """``base * multiplier ** attempt``, capped at ``max``; ``multiplier >= 1``.

    Never raises for a large ``attempt`` (tenacity#710, stamina#104 overflow there):
    past the cap it is the cap, and without a cap it grows to ``inf``. Both cases cost
    one integer comparison once the exponent is past the point where the value
    reaches the cap (or the float range).
    """

    __slots__ = ("_capped_from", "_limit", "base", "max", "multiplier")
    base: float
    multiplier: float
    max: float | None
    #: From this attempt on, the answer is ``_limit`` (no arithmetic).
    _capped_from: int
    _limit: float

    def __init__(
        self, base: Duration, multiplier: float = 2.0, max: Duration | None = None
    ) -> None:
        _set(self, "base", seconds(base, "base"))
        if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool):
            raise TypeError(f"multiplier must be a number, got {type(multiplier).__name__}")
        if not math.isfinite(multiplier) or multiplier < 1:
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        _set(self, "multiplier", float(multiplier))
        _set(self, "max", _cap("max", max))
        # From attempt ``_capped_from`` on the answer is ``_limit`` (no pow, no overflow).
        if self.base == 0 or self.multiplier == 1 or self.max == 0:
            _set(self, "_capped_from", 0)
            _set(self, "_limit", _capped(self.base, self.max))
        else:
            limit = _FLOAT_MAX if self.max is None else self.max
            # base * multiplier ** n >= limit for every n >= this (one step of slack)
            ratio = math.log(limit) - math.log(self.base)
            _set(self, "_capped_from", _steps_to(ratio / math.log(self.multiplier)) + 1)
            _set(self, "_limit", math.inf if self.max is None else self.max)

    def __call__(self, attempt: int) -> float:
        if attempt >= self._capped_from:
            return self._limit
        try:
            delay = self.base * self.multiplier**attempt
        except OverflowError:  # multiplier ** attempt alone is past float range; the
            try:  # product may not be (a tiny base): take it through logarithms
                delay = math.exp(math.log(self.base) + attempt * math.log(self.multiplier))
            except OverflowError:
                delay = math.inf
        return delay if self.max is None else min(delay, self.max)

    def __reduce__(self) -> tuple[object, ...]:
        return (ExponentialBackoff, (self.base, self.multiplier, self.max))

    def __repr__(self) -> str:
        return f"ExponentialBackoff({self.base!r}, {self.multiplier!r}, max={self.max!r})"


_FLOAT_MAX = sys.float_info.max
#: An attempt number no retry count reaches: "never capped".
_NEVER = 1 << 1100


def _capped(value: float, cap: float | None) -> float:
    return value if cap is None else min(value, cap)


def _steps_to(x: float) -> int:
    """An int >= ``x`` (and >= 0) for an ``x`` that may be huge or ``inf``, rounded up
    past the float error of computing ``x`` (relative, so it holds for a huge ``x``
    from a multiplier just above 1): the cap then never comes a step early."""
    if x <= 0:
        return 0
    return _NEVER if not math.isfinite(x) else math.ceil(x + x * 1e-9)
