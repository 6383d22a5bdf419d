"""Retry delay strategies and the retry mode.

Each strategy is a small immutable callable ``attempt -> seconds`` where
``attempt`` is 0 for the first retry; any other callable with that shape works
wherever a strategy is accepted.
"""

from __future__ import annotations

import enum
import math

from ._validate import Duration, seconds

__all__ = ["ExponentialBackoff", "FixedBackoff", "LinearBackoff", "RetryMode"]


class RetryMode(enum.Enum):
    """Where a failed attempt waits for its retry."""

    #: Back to the queue, due after the backoff, keeping its priority; the worker is freed.
    REQUEUE = "requeue"
    #: The same worker sleeps the backoff (woken early by cancel or shutdown) and retries.
    IMMEDIATE = "immediate"


def _cap(name: str, value: Duration | None) -> float | None:
    return None if value is None else seconds(value, name)


class FixedBackoff:
    """The same ``delay`` before every retry."""

    __slots__ = ("delay",)

    def __init__(self, delay: Duration) -> None:
        self.delay = seconds(delay, "delay")

    def __call__(self, attempt: int) -> float:
        return self.delay

    def __repr__(self) -> str:
        return f"FixedBackoff({self.delay!r})"


class LinearBackoff:
    """``base + step * attempt``, capped at ``max``."""

    __slots__ = ("base", "max", "step")

    def __init__(self, base: Duration, step: Duration, max: Duration | None = None) -> None:
        self.base = seconds(base, "base")
        self.step = seconds(step, "step")
        self.max = _cap("max", max)

    def __call__(self, attempt: int) -> float:
        delay = self.base + self.step * attempt
        return delay if self.max is None else min(delay, self.max)

    def __repr__(self) -> str:
        return f"LinearBackoff({self.base!r}, {self.step!r}, max={self.max!r})"


class ExponentialBackoff:
    """``base * multiplier ** attempt``, capped at ``max``; ``multiplier >= 1``."""

    __slots__ = ("base", "max", "multiplier")

    def __init__(
        self, base: Duration, multiplier: float = 2.0, max: Duration | None = None
    ) -> None:
        self.base = seconds(base, "base")
        if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool):
            raise TypeError(f"multiplier must be a number, got {type(multiplier).__name__}")
        if not math.isfinite(multiplier) or multiplier < 1:
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        self.multiplier = float(multiplier)
        self.max = _cap("max", max)

    def __call__(self, attempt: int) -> float:
        try:
            delay = self.base * self.multiplier**attempt
        except OverflowError:  # many retries: the uncapped delay is "forever" (0 stays 0)
            delay = math.inf if self.base else 0.0
        return delay if self.max is None else min(delay, self.max)

    def __repr__(self) -> str:
        return f"ExponentialBackoff({self.base!r}, {self.multiplier!r}, max={self.max!r})"
