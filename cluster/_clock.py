"""The clock a cluster schedules by: monotonic seconds, and their wall-clock dates.

Every time-dependent decision of a cluster reads its ``Clock``: start times, delays,
backoff, timeouts, TTLs, ``info()`` timestamps. ``SystemClock`` follows real time;
``cluster.testing.FakeClock`` moves only when told, so a user's test can run a day
of schedule in milliseconds with real worker threads. Threads that sleep until a
moment of the clock ask ``timeout()`` how long to block in real time: ``None``
(until woken) for a fake clock, whose ``advance()`` wakes them through the
listeners the cluster registers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "SystemClock"]


class Clock:
    """Monotonic seconds plus one wall/monotonic anchor to convert them to dates.

    Subclasses provide ``monotonic()`` and ``timeout()``; the anchor is taken once,
    so that equal datetimes always map to equal monotonic times (FIFO among them).
    """

    #: True for clocks that move only when told (no thread may block on real time for them).
    fake = False

    def __init__(self, wall: float, mono: float) -> None:
        self._wall = wall  # wall-clock epoch seconds at the anchor ...
        self._mono = mono  # ... and this clock's monotonic seconds at the same moment

    def monotonic(self) -> float:
        """Seconds on this clock's monotonic scale (comparable only with each other)."""
        raise NotImplementedError

    def timeout(self, seconds: float) -> float | None:
        """How long (real seconds) a thread may block to wait ``seconds`` of this clock;
        ``None``: block until woken."""
        raise NotImplementedError

    def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever this clock jumps (only fake clocks do)."""

    def unlisten(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake``."""

    def now(self) -> datetime:
        """The clock's wall time, an aware local datetime."""
        return self.to_date(self.monotonic())

    def to_date(self, mono: float) -> datetime:
        """The aware local datetime of monotonic time ``mono``."""
        try:
            return datetime.fromtimestamp(self._wall + (mono - self._mono), UTC).astimezone()
        except (OverflowError, OSError, ValueError):  # beyond what datetime holds
            edge = datetime.max if mono > self._mono else datetime.min
            return edge.replace(tzinfo=UTC)

    def to_epoch(self, mono: float) -> float:
        """The wall-clock epoch seconds (``time.time()``'s scale) of monotonic ``mono``.

        ``to_date(mono).timestamp()`` without the datetime: a float sum, so no
        microsecond rounding and no range limit (the durable store's times use it).
        """
        return self._wall + (mono - self._mono)

    def from_epoch(self, epoch: float) -> float:
        """The monotonic time of wall-clock epoch seconds ``epoch`` (``to_epoch``'s inverse)."""
        return self._mono + (epoch - self._wall)

    def from_date(self, when: datetime) -> float:
        """The monotonic time of ``when`` (aware, or naive meaning local time)."""
        try:
            return self._mono + (when.timestamp() - self._wall)
        except (OverflowError, OSError, ValueError):  # beyond what the platform converts
            return math.inf if when.year >= 1970 else -math.inf


class SystemClock(Clock):
    """Real time: ``time.monotonic``, anchored to ``time.time`` when created."""

    # The builtin itself, not a method wrapping it: the hot paths call it per task.
    monotonic = staticmethod(time.monotonic)

    def __init__(self) -> None:
        super().__init__(time.time(), time.monotonic())

    def timeout(self, seconds: float) -> float | None:
        """Real time: exactly ``seconds``."""
        return seconds
