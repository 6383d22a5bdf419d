"""Prometheus metrics of a cluster: ``prometheus_text(c)`` (also served at ``/metrics``).

The text exposition format 0.0.4, with no dependency::

    from cluster.metrics import prometheus_text, CONTENT_TYPE

    body = prometheus_text(c)   # hand it to any HTTP server as CONTENT_TYPE

Counters and gauges come from ``c.stats()`` at the moment of the call:

* ``cluster_tasks_submitted_total``, ``cluster_tasks_finished_total{state=...}``
  (succeeded, failed, cancelled, timed_out), ``cluster_retries_total``,
  ``cluster_dead_letters_evicted_total``;
* ``cluster_tasks{state=...}`` (queued, delayed, running, waiting),
  ``cluster_dead_letters``, ``cluster_abandoned_threads``,
  ``cluster_workers{executor=...}`` (each executor's capacity) and
  ``cluster_executor_tasks{executor=...,state=running|queued}``.

The histograms ``cluster_task_wait_seconds`` (due to start, per attempt) and
``cluster_task_run_seconds`` (per attempt) have a ``name`` label: the task name,
never its id. At most ``MAX_NAMES`` (1,000) names get their own series; attempts of
any further name are counted under ``name="other"``. Buckets run from 1 ms to 1 h
(``BUCKETS``), in seconds.

**When the histograms start counting.** They are fed by a ``cluster.Observer``
that is attached to a cluster the first time ``instrument(c)``,
``prometheus_text(c)`` or ``c.serve()`` is called on it, and they count the
attempts that end from then on (the counters from ``stats()`` count from the
cluster's creation). To have the histograms cover a cluster's whole life, call
``instrument(c)`` right after creating it. The observer costs one lock and two
bucket searches per attempt, and holds no reference to the cluster.
"""

from __future__ import annotations

import math
import threading
import weakref
from bisect import bisect_left
from itertools import accumulate
from typing import TYPE_CHECKING

from cluster import Observer

if TYPE_CHECKING:
    from cluster import Cluster

__all__ = ["BUCKETS", "CONTENT_TYPE", "MAX_NAMES", "OTHER", "instrument", "prometheus_text"]

#: The media type of ``prometheus_text()``'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the histogram buckets, before ``+Inf``.
BUCKETS: tuple[float, ...] = (
    # Fine where scheduling latency and short tasks live, coarse above 1 s: each bound
    # is a line per name per histogram (1,000 names: 36,000 lines a scrape).
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
    60.0,
    300.0,
    3600.0,
)

#: How many distinct task names get their own histogram series.
MAX_NAMES = 1000

#: The ``name`` label of the attempts of every name past ``MAX_NAMES``.
OTHER = "other"

_WAIT = "cluster_task_wait_seconds"
_RUN = "cluster_task_run_seconds"


def _float(value: float) -> str:
    """A sample value as the exposition format writes it (Go's ``ParseFloat`` reads it)."""
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_BOUNDS = (*(_float(b) for b in BUCKETS), "+Inf")


def escape_label(value: str) -> str:
    """A label value escaped for the text format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Series:
    """The two histograms of one ``name`` label value. The counts, sums and ``dirty``
    are guarded by ``_Histograms._lock``; the texts are used by a scrape only, under
    ``_Histograms._render_lock``."""

    __slots__ = (
        "dirty",
        "run",
        "run_sum",
        "run_template",
        "run_text",
        "wait",
        "wait_sum",
        "wait_template",
        "wait_text",
    )

    def __init__(self, name: str) -> None:
        size = len(BUCKETS) + 1
        self.wait = [0] * size  # observations per bucket, not cumulative; last: > max
        self.run = [0] * size
        self.wait_sum = 0.0
        self.run_sum = 0.0
        self.dirty = True  # observed since its texts were last rendered
        label = escape_label(name)
        self.wait_template = _template(_WAIT, label)
        self.run_template = _template(_RUN, label)
        self.wait_text = ""
        self.run_text = ""


def _template(metric: str, label: str) -> str:
    """The lines of one series as a %-format: one C-level format call renders it all
    (a scrape of 1,000 names writes some 40,000 lines)."""
    label = label.replace("%", "%%")
    lines = [f'{metric}_bucket{{name="{label}",le="{le}"}} %d\n' for le in _BOUNDS]
    lines.append(f'{metric}_sum{{name="{label}"}} %r\n')  # a float's repr is Go-readable
    lines.append(f'{metric}_count{{name="{label}"}} %d\n')
    return "".join(lines)


def _render(template: str, counts: list[int], total: float) -> str:
    if total < math.inf:
        return template % (*accumulate(counts), total, sum(counts))
    # A sum past the largest float (durations are never NaN): the format spells it +Inf.
    return template.replace("} %r\n", "} +Inf\n") % (*accumulate(counts), sum(counts))


class _Histograms(Observer):
    """The observer behind the histograms of one cluster."""

    def __init__(self) -> None:
        # _lock guards every _Series' counts, sums and dirty flag, and _series itself;
        # attempt_ended holds it for a few increments, a scrape for a copy.
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}
        self._other: _Series | None = None
        # Held by a whole scrape, so rendered texts are never overwritten by older ones.
        self._render_lock = threading.Lock()

    def attempt_ended(
        self,
        name: str,
        executor: str,
        waited: float,
        ran: float,
        error: BaseException | None,
    ) -> None:
        """Count one attempt in its name's wait and run histograms."""
        with self._lock:
            series = self._series.get(name)
            if series is None:
                series = self._add_locked(name)
            series.wait[bisect_left(BUCKETS, waited)] += 1
            series.run[bisect_left(BUCKETS, ran)] += 1
            series.wait_sum += waited
            series.run_sum += ran
            series.dirty = True

    def _add_locked(self, name: str) -> _Series:
        if len(self._series) < MAX_NAMES:
            series = self._series[name] = _Series(name)
            return series
        if self._other is None:
            self._other = _Series(OTHER)
        return self._other

    def render(self) -> tuple[list[str], list[str]]:
        """The samples of the wait and of the run histogram: one text per series."""
        with self._render_lock:
            with self._lock:
                every = list(self._series.values())
                if self._other is not None:
                    every.append(self._other)
                stale = [
                    (s, s.wait.copy(), s.wait_sum, s.run.copy(), s.run_sum)
                    for s in every
                    if s.dirty
                ]
                for s in every:
                    s.dirty = False
            for s, wait, wait_sum, run, run_sum in stale:  # outside the observer's lock
                s.wait_text = _render(s.wait_template, wait, wait_sum)
                s.run_text = _render(s.run_template, run, run_sum)
            return [s.wait_text for s in every], [s.run_text for s in every]


# Which observer feeds which cluster's histograms; guarded by _attach_lock.
_attach_lock = threading.Lock()
_observers: weakref.WeakKeyDictionary[Cluster, _Histograms] = weakref.WeakKeyDictionary()


def instrument(c: Cluster) -> None:
    """Start the histograms of ``c`` now (idempotent): they count the attempts that end
    from this call on. ``prometheus_text(c)`` and ``c.serve()`` call it too."""
    _histograms(c)


def _histograms(c: Cluster) -> _Histograms:
    from cluster import Cluster

    if not isinstance(c, Cluster):
        raise TypeError(f"c must be a Cluster, got {type(c).__name__}")
    with _attach_lock:
        observer = _observers.get(c)
        if observer is None:
            observer = _observers[c] = _Histograms()
            c.observe(observer)
        return observer


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {_escape_help(help_text)}\n# TYPE {name} {kind}\n")


def prometheus_text(c: Cluster) -> str:
    """The metrics of ``c`` in the Prometheus text format (``CONTENT_TYPE``).

    Counters and gauges are read from one ``c.stats()``; the histograms count from
    the first ``instrument(c)``/``prometheus_text(c)``/``c.serve()`` on (see the
    module's docstring). Cost: O(executors + task names), never O(tasks).
    """
    histograms = _histograms(c)
    s = c.stats()
    out: list[str] = []
    _family(out, "cluster_tasks_submitted_total", "counter", "Tasks submitted.")
    out.append(f"cluster_tasks_submitted_total {s.submitted}\n")
    _family(
        out,
        "cluster_tasks_finished_total",
        "counter",
        "Tasks that reached a terminal state, by that state.",
    )
    for state, count in (
        ("succeeded", s.succeeded),
        ("failed", s.failed),
        ("cancelled", s.cancelled),
        ("timed_out", s.timed_out),
    ):
        out.append(f'cluster_tasks_finished_total{{state="{state}"}} {count}\n')
    _family(out, "cluster_retries_total", "counter", "Retries scheduled.")
    out.append(f"cluster_retries_total {s.retried}\n")
    _family(
        out,
        "cluster_dead_letters_evicted_total",
        "counter",
        "Dead letters dropped, oldest first, to make room for newer ones.",
    )
    out.append(f"cluster_dead_letters_evicted_total {s.dead_letters_evicted}\n")
    _family(
        out,
        "cluster_tasks",
        "gauge",
        "Tasks that are not terminal, by state: queued (due, waiting for a worker), "
        "delayed (waiting for a start time or a retry's backoff), running, and waiting "
        "(due, parked until their key or rate limit lets them start).",
    )
    for state, count in (
        ("queued", s.queued),
        ("delayed", s.delayed),
        ("running", s.running),
        ("waiting", s.waiting),
    ):
        out.append(f'cluster_tasks{{state="{state}"}} {count}\n')
    _family(out, "cluster_dead_letters", "gauge", "Dead letters held.")
    out.append(f"cluster_dead_letters {s.dead_letters}\n")
    _family(
        out,
        "cluster_abandoned_threads",
        "gauge",
        "Threads still stuck in an attempt that timed out or was cancelled.",
    )
    out.append(f"cluster_abandoned_threads {s.abandoned}\n")
    executors = [(escape_label(name), e) for name, e in s.executors.items()]
    _family(out, "cluster_workers", "gauge", "Capacity of each executor (its workers).")
    for label, e in executors:
        out.append(f'cluster_workers{{executor="{label}"}} {e.capacity}\n')
    _family(
        out,
        "cluster_executor_tasks",
        "gauge",
        "Attempts running on each executor, and its due tasks waiting for a free slot.",
    )
    for label, e in executors:
        out.append(f'cluster_executor_tasks{{executor="{label}",state="running"}} {e.running}\n')
        out.append(f'cluster_executor_tasks{{executor="{label}",state="queued"}} {e.queued}\n')
    wait, run = histograms.render()
    _family(
        out,
        _WAIT,
        "histogram",
        "Seconds from an attempt being due to its start, by task name.",
    )
    out += wait
    _family(out, _RUN, "histogram", "Seconds an attempt ran, by task name.")
    out += run
    return "".join(out)
