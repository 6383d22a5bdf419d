"""The retry decision (SPEC §3, §10): after a failed attempt, retry when and on
which budget, or end the task with which error.

Everything here is pure: no threads, no clock, no locks. The cluster calls
``RetryPolicy.decide`` *outside* its lock (it runs the user's predicate and
backoff), then, under the lock and only if the attempt is still the task's live
one, applies the answer with ``applied``. ``decide`` therefore reads the counts
and changes nothing.

How a failure is decided, in order:

1. A ``BaseException`` that is not an ``Exception``, and a ``TaskCancelledError``,
   are final (rule ``NONE``).
2. ``StopRetrying`` is final; the task ends with its ``__cause__`` (or itself).
3. ``RetryAfter``: rules and the predicate see its ``__cause__`` (or itself when it
   has none); the delay is exactly ``RetryAfter.delay``, with no backoff or jitter.
   Its cause goes through step 1 too (``RetryAfter(1) from KeyboardInterrupt()`` is
   final).
4. The explicit rules are tried in the order added; the first whose ``errors``
   the error is an instance of decides. No match: the default rule
   (``with_retry(n)``) decides, for any ``Exception``; with rules and no
   ``with_retry``, an unmatched error is final (rule ``NONE``).
5. The deciding rule's budget: ``n`` = its consecutive failures so far (0 after
   ``reset``). ``n >= retries`` ends the task; ``UNLIMITED`` never runs out, but
   does not retry once a graceful stop has begun (``stopping``).
6. ``retry_if`` gates every retry, rules included (called only when budget
   remains; one that raises counts as false and is logged).
7. The delay: ``backoff(n)`` of the rule (its own, or the task's), times a jitter
   factor from ``rng``; a backoff that raises or returns NaN, a negative number or
   a non-number is logged and gives 0 (the retry is not lost); ``inf`` stays ``inf``.

Ending errors and ``Decision.error``: the error the rules saw (the cause of a
``RetryAfter`` or ``StopRetrying``, else the error raised). For a retry it is the
error to show as ``last_error``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from ._backoff import FixedBackoff
from ._errors import RetryAfter, StopRetrying, TaskCancelledError
from ._validate import UNLIMITED, function
from ._validate import retries as _retry_count

__all__ = [
    "DEFAULT",
    "NONE",
    "Decision",
    "RetryCounts",
    "RetryPolicy",
    "RetryRule",
    "applied",
    "make_rule",
]

log = logging.getLogger("cluster")

#: ``Decision.rule`` when the default rule (``with_retry``) decided.
DEFAULT = -1
#: ``Decision.rule`` when no rule applied: the error was final by its kind, or
#: matched no rule of a policy without a default rule.
NONE = -2

#: The task's backoff when ``with_backoff`` was not called (SPEC §3).
NO_BACKOFF = FixedBackoff(0)

_UNLIMITED = int(UNLIMITED)  # a plain -1: compared on every decision
_DIRECTIVES = (RetryAfter, StopRetrying)


@dataclass(frozen=True, slots=True)
class RetryRule:
    """A rule: errors that are instances of ``errors`` get ``retries`` consecutive
    retries, each after ``backoff(n)`` (``None``: the task's backoff)."""

    errors: tuple[type[BaseException], ...]
    #: ``>= 0``, or ``UNLIMITED`` (-1).
    retries: int
    backoff: Callable[[int], float] | None


def make_rule(errors: tuple[object, ...], retries: object, backoff: object) -> RetryRule:
    """Validate ``with_retry_rule(*errors, retries=3, backoff=None)``'s arguments.

    ``errors``: at least one exception class (a subclass of ``BaseException``; an
    instance or any other object is a ``TypeError``). ``retries``: an int >= 0 or
    ``UNLIMITED``. ``backoff``: ``None`` or a callable ``n -> seconds``.
    """
    if not isinstance(errors, tuple) or not errors:
        raise TypeError("errors: with_retry_rule() needs at least one exception class")
    for error in errors:
        if not (isinstance(error, type) and issubclass(error, BaseException)):
            kind = "an instance" if isinstance(error, BaseException) else "a"
            raise TypeError(
                f"errors must be exception classes, got {kind} {type(error).__name__}: {error!r}"
            )
    count = _retry_count(retries, "retries")
    if backoff is not None:
        backoff = function(backoff, "backoff")
    return RetryRule(errors, count, backoff)  # type: ignore[arg-type]  # checked above


@dataclass(slots=True)
class RetryCounts:
    """A task's consecutive failures per rule. Mutable, owned by the cluster (and
    changed only under its lock, by ``applied``); ``None`` until a first failure."""

    #: Consecutive failures each explicit rule matched (one entry per rule).
    rules: list[int]
    #: Consecutive failures the default rule matched.
    default: int


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt."""

    #: Seconds until the retry (may be ``inf``: a backoff without a cap, far out);
    #: ``None``: no retry, the task ends.
    delay: float | None
    #: The rule that decided: an index into the policy's rules, ``DEFAULT`` or ``NONE``.
    rule: int
    #: If it ends: the error to end with; else the error to show as ``last_error``.
    error: BaseException


class RetryPolicy:
    """Immutable once built; shared by every task built with the same settings.

    ``retries`` is the default rule's budget (``with_retry(n)``); ``None`` means
    ``with_retry`` was never called: then the default budget is 0 without rules,
    and there is no default rule with rules (an unmatched error is final).
    ``backoff`` is the task's backoff (rules without their own use it), ``jitter``
    the ratio of ``with_jitter`` (0: none), ``predicate`` ``retry_if``'s.
    """

    __slots__ = ("_default", "backoff", "jitter", "predicate", "retries", "rules")

    retries: int | None
    rules: tuple[RetryRule, ...]
    backoff: Callable[[int], float]
    jitter: float
    predicate: Callable[[BaseException], object] | None
    #: The default rule's budget, or None when there is no default rule.
    _default: int | None

    def __init__(
        self,
        *,
        retries: int | None,
        rules: tuple[RetryRule, ...] = (),
        backoff: Callable[[int], float] = NO_BACKOFF,
        jitter: float = 0.0,
        predicate: Callable[[BaseException], object] | None = None,
    ) -> None:
        for rule in rules:
            if not isinstance(rule, RetryRule):
                raise TypeError(f"rules must be RetryRule objects, got {type(rule).__name__}")
        setattr_ = object.__setattr__
        setattr_(self, "retries", retries)
        setattr_(self, "rules", tuple(rules))
        setattr_(self, "backoff", backoff)
        setattr_(self, "jitter", float(jitter))
        setattr_(self, "predicate", predicate)
        default = retries if retries is not None else (None if rules else 0)
        setattr_(self, "_default", None if default is None else int(default))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RetryPolicy is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RetryPolicy is immutable (cannot delete {name!r})")

    def __reduce__(self) -> tuple[object, ...]:  # pickle and copy through __init__
        fields = (self.retries, self.rules, self.backoff, self.jitter, self.predicate)
        return (_policy, fields)

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(retries={self.retries!r}, rules={self.rules!r}, "
            f"backoff={self.backoff!r}, jitter={self.jitter!r}, predicate={self.predicate!r})"
        )

    def decide(
        self,
        error: BaseException,
        counts: RetryCounts | None,
        rng: random.Random,
        *,
        stopping: bool = False,
        reset: bool = False,
        task_id: str | None = None,
    ) -> Decision:
        """Decide after an attempt failed with ``error``; changes nothing.

        ``counts``: the task's counts before this failure (``None``: none yet).
        ``stopping``: a graceful stop has begun (``UNLIMITED`` budgets stop retrying).
        ``reset``: the attempt called ``reset_backoff()``: every count restarts at
        0 before this decision. ``task_id`` only names the task in log records.
        Runs the user's predicate and backoff: call it outside any lock.
        """
        if not isinstance(error, Exception) or isinstance(error, TaskCancelledError):
            return Decision(None, NONE, error)
        subject: BaseException = error
        after: float | None = None  # RetryAfter's delay
        if isinstance(error, _DIRECTIVES):
            cause = error.__cause__
            if cause is not None:
                subject = cause
            if isinstance(error, StopRetrying):
                return Decision(None, NONE, subject)
            if not isinstance(subject, Exception) or isinstance(subject, TaskCancelledError):
                return Decision(None, NONE, subject)
            after = error.delay  # a RetryAfter: StopRetrying returned above

        # The deciding rule, its budget and its backoff.
        index = DEFAULT
        budget = self._default
        backoff = self.backoff
        if self.rules:
            for i, rule in enumerate(self.rules):
                if isinstance(subject, rule.errors):
                    index, budget, backoff = i, rule.retries, rule.backoff or backoff
                    break
        if budget is None:  # rules, no with_retry, and none matched: final
            return Decision(None, NONE, subject)

        if reset or counts is None:
            n = 0
        elif index == DEFAULT:
            n = counts.default
        else:
            n = counts.rules[index]
        if budget == _UNLIMITED:
            if stopping:
                return Decision(None, index, subject)
        elif n >= budget:
            return Decision(None, index, subject)

        predicate = self.predicate
        if predicate is not None:
            try:
                allowed = bool(predicate(subject))
            except BaseException:
                log.exception("retry_if predicate of task %r raised; not retrying", task_id)
                allowed = False
            if not allowed:
                return Decision(None, index, subject)

        if after is not None:
            return Decision(after, index, subject)
        return Decision(self._delay(backoff, n, rng, task_id), index, subject)

    def _delay(
        self, backoff: Callable[[int], float], n: int, rng: random.Random, task_id: str | None
    ) -> float:
        """``backoff(n)``, sanitised and jittered."""
        try:
            delay = backoff(n)
            if type(delay) is not float:
                delay = float(delay)
        except BaseException:
            log.exception("backoff of task %r raised; retrying without delay", task_id)
            return 0.0
        if not delay >= 0:  # also NaN
            log.error("backoff of task %r returned %r; retrying without delay", task_id, delay)
            return 0.0
        jitter = self.jitter
        if jitter and delay != math.inf:  # inf * 0 would be NaN (jitter 1 can draw 0)
            # rng.uniform(1 - jitter, 1 + jitter), without its call
            delay *= (1.0 - jitter) + (2.0 * jitter) * rng.random()
        return delay


def _policy(
    retries: int | None,
    rules: tuple[RetryRule, ...],
    backoff: Callable[[int], float],
    jitter: float,
    predicate: Callable[[BaseException], object] | None,
) -> RetryPolicy:
    return RetryPolicy(
        retries=retries, rules=rules, backoff=backoff, jitter=jitter, predicate=predicate
    )


def applied(
    counts: RetryCounts | None, decision: Decision, n_rules: int, *, reset: bool
) -> RetryCounts:
    """The counts after ``decision`` (made with the same ``counts`` and ``reset``).

    Updates ``counts`` in place and returns it (a new one when it is ``None``):
    ``reset`` zeroes every count first, then the deciding rule's count goes up by
    one (``NONE`` counts nothing). The cluster calls it under its lock, only if the
    attempt was still the task's live one. ``n_rules`` is ``len(policy.rules)``.
    """
    if counts is None:
        counts = RetryCounts([0] * n_rules, 0)
    elif reset:
        counts.rules[:] = [0] * n_rules
        counts.default = 0
    rule = decision.rule
    if rule == DEFAULT:
        counts.default += 1
    elif rule >= 0:
        counts.rules[rule] += 1
    return counts
