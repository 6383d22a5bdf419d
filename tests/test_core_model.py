"""Model-based test of the scheduling core (SPEC §3-§5, §10, §11): a Hypothesis state
machine drives ``Scheduler`` with a fake clock and checks it against a small reference
model.

The model keeps one record per submission (ids can be reused once purged) holding its
priority, start, submission order, retry settings (a default budget, rules by exception
class with their own budgets and backoffs, a ``retry_if``), its per-rule consecutive
counts, its repeat schedule and life-cycle state. The driver decides every attempt's
end the way the cluster does: ``plan()`` outside the lock (the retry decision, and for
a run that ends, when the next run is due), then ``finish``/``fail_detached``. After
every rule: dispatch order, due times, states, attempts, counts, last errors, gauges
and counters must agree.

What it covers: priority order among due tasks and no early start; timeouts (expire,
then fail_detached) and late returns of abandoned attempts (STALE); cancel by id, TTL
purge and id reuse; IMMEDIATE retries sleeping on their context; rules by exception
class (``Net``/``Slow``/``Db``, timeouts, and classes that are final whatever the
rule), each with its own consecutive budget (some UNLIMITED) and ``LinearBackoff``,
with or without a default ``with_retry``, under jitter and ``retry_if``; ``RetryAfter``
and ``StopRetrying`` with and without a cause; ``reset_backoff()``; repeating tasks
(``Repeat(every, count, stop_on_error)``: RUN_ENDED and ``run_result``, the grid,
collapsed occurrences, counts restarting per run, runs never overlapping, cancel
between runs); ``stop_series`` (a graceful stop), also between ``plan()`` and
``finish()``; and ``cancel_all`` shutdowns.

Known bugs of the core are pinned by the ``xfail(strict=True)`` tests at the end of the
file; the machine steers around exactly those cases (see ``AVOID_*``).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import pytest
from _core_helpers import assert_balanced, make_task
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cluster import (
    UNLIMITED,
    DuplicateTaskError,
    LinearBackoff,
    RetryAfter,
    RetryMode,
    StopRetrying,
    TaskCancelledError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
)
from cluster._core import DONE, REQUEUED, RUN_ENDED, SLEEP, STALE, Scheduler, plan
from cluster._policy import DEFAULT, Decision, make_rule
from cluster._repeat import Repeat
from cluster._task import Series, Task, TaskContext
from cluster.testing import FakeClock

# Model states of a live record. "waiting": queued or delayed (a first start, a
# requeued retry, or a repeating task's next run); "running": an attempt holds ctx;
# "detached": expired, awaiting fail_detached; "sleeping": an IMMEDIATE retry
# sleeping its backoff on ctx.
LIVE = ("waiting", "running", "detached", "sleeping")
TERMINAL = {
    "succeeded": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
    "cancelled": TaskState.CANCELLED,
    "timed_out": TaskState.TIMED_OUT,
}
USER_IDS = ("t1", "t2", "t3", "u1", "u2")  # "t<n>" may collide with generated ids

EPS = 1e-9
CLOCK = FakeClock()  # plan()'s wall-time conversions (unused by every= schedules)

# The machine avoids exactly the cases of these known bugs (each pinned by an xfail
# test below). Set one to False to watch the machine find the bug again.
#: A task with no retry policy (no with_retry, no rule) that raises
#: ``StopRetrying() from cause`` or ``RetryAfter(d) from cause`` ends with the
#: directive instead of the cause.
AVOID_DIRECTIVE_WITHOUT_POLICY = False
#: ``stop_series`` keys on the task's state: a waiting retry that a pop promoted to
#: PENDING is cancelled if the task repeats, and not ended if its budget is UNLIMITED.
AVOID_PROMOTED_RETRY_AT_STOP = False
#: An UNLIMITED retry decided just before ``stop_series`` and applied just after it
#: is still scheduled (the task is retried after the stop began).
AVOID_UNLIMITED_RETRY_ACROSS_STOP = False


class Net(Exception):
    """A network failure."""


class Slow(Net):
    """A slow network (matched by rules for ``Net`` too)."""


class Db(Exception):
    """A database failure."""


class Other(Exception):
    """Matched by no rule: only the default rule (``with_retry``) can retry it."""


KINDS: dict[str, type[BaseException]] = {
    "net": Net,
    "slow": Slow,
    "db": Db,
    "other": Other,
    "timeout_err": TaskTimeoutError,
    "kbd": KeyboardInterrupt,
    "cancelled_err": TaskCancelledError,
}


def _final_kind(error: BaseException) -> bool:
    """Never retried, whatever the rules (SPEC §6, §10)."""
    return not isinstance(error, Exception) or isinstance(error, TaskCancelledError)


# -- what the rules ask for ------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """``with_retry_rule(*errors, retries=..., backoff=...)``; backoff (base, step) of a
    ``LinearBackoff``, or None for the task's."""

    errors: tuple[type[BaseException], ...]
    retries: int
    backoff: tuple[float, float] | None


@dataclass(frozen=True)
class RepeatSpec:
    every: float
    count: int | None
    stop_on_error: bool


@dataclass(frozen=True)
class Spec:
    """What a submit rule asks for."""

    tid: str | None
    priority: int
    delay: float | None  # start = now + delay; None: start at submit
    retries: int  # the default rule's budget (0: no with_retry), or UNLIMITED
    rules: tuple[RuleSpec, ...]
    backoff: tuple[float, float]  # the task's LinearBackoff(base, step)
    jitter: float
    no_slow: bool  # retry_if(lambda e: not isinstance(e, Slow))
    mode: RetryMode
    ttl: float | None
    timeout: float | None
    repeat: RepeatSpec | None


RULES = st.builds(
    RuleSpec,
    errors=st.sampled_from(
        [
            (Net,),
            (Net,),
            (Slow,),
            (Db,),
            (Db,),
            (Net, Db),
            (TaskTimeoutError,),
            (KeyboardInterrupt,),
            (TaskCancelledError,),
        ]
    ),
    retries=st.sampled_from([0, 1, 1, 2, UNLIMITED]),
    backoff=st.none() | st.sampled_from([(0.0, 0.0), (0.5, 0.0), (0.25, 0.5)]),
)

REPEATS = st.builds(
    RepeatSpec,
    every=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    count=st.sampled_from([None, None, 1, 2, 4]),
    stop_on_error=st.sampled_from([False, False, True]),
)

SPECS = st.builds(
    Spec,
    tid=st.none() | st.sampled_from(USER_IDS),
    priority=st.integers(-2, 2),
    delay=st.none() | st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]),
    retries=st.sampled_from([0, 0, 1, 2, 3, UNLIMITED, UNLIMITED]),
    rules=st.lists(RULES, max_size=3).map(tuple),
    backoff=st.sampled_from([(0.0, 0.0), (0.25, 0.0), (1.0, 0.0), (2.0, 0.0), (0.25, 0.5)]),
    jitter=st.sampled_from([0.0, 0.0, 0.5]),
    no_slow=st.sampled_from([False, False, False, True]),
    mode=st.sampled_from([RetryMode.REQUEUE, RetryMode.IMMEDIATE]),
    ttl=st.none() | st.sampled_from([0.0, 1.0, 5.0]),
    timeout=st.none() | st.sampled_from([0.5, 1.0, 3.0]),
    repeat=st.none() | REPEATS,
)


@dataclass(frozen=True)
class Outcome:
    """How a running attempt ends: ``kind`` "ok", or the class of the error it raises,
    maybe ``wrap``-ped in a directive; ``reset``: it called reset_backoff() first;
    ``stop_between``: a graceful stop begins between plan() and finish()."""

    kind: str  # "ok", a key of KINDS, or "rule": a class of one of the task's rules
    pick: int  # which rule's class, for "rule"
    wrap: str | None  # None, "after", "after_bare", "stop", "stop_bare"
    after: float  # RetryAfter's delay
    reset: bool
    stop_between: bool


OUTCOMES = st.builds(
    Outcome,
    kind=st.sampled_from(
        [
            "ok",
            "ok",
            "ok",
            "net",
            "net",
            "slow",
            "db",
            "other",
            "timeout_err",
            "kbd",
            "cancelled_err",
            "rule",
            "rule",
        ]
    ),
    pick=st.integers(0, 10),
    wrap=st.sampled_from([None] * 8 + ["after", "after", "after_bare", "stop", "stop_bare"]),
    after=st.sampled_from([0.0, 0.5, 1.5]),
    reset=st.sampled_from([False, False, True]),
    stop_between=st.sampled_from([False] * 7 + [True]),
)


def make_error(o: Outcome, rules: tuple[RuleSpec, ...]) -> BaseException:
    """The exception the attempt raises (``raise RetryAfter(d) from cause`` style)."""
    if o.wrap == "after_bare":
        return RetryAfter(o.after)
    if o.wrap == "stop_bare":
        return StopRetrying()
    if o.kind == "rule":
        errors = [e for rule in rules for e in rule.errors] or [Net]
        cls = errors[o.pick % len(errors)]
    else:
        cls = KINDS[o.kind]
    cause = cls(f"{cls.__name__} error")
    if o.wrap is None:
        return cause
    directive: BaseException = RetryAfter(o.after) if o.wrap == "after" else StopRetrying()
    directive.__cause__ = cause  # what ``raise directive from cause`` does
    return directive


@dataclass(frozen=True)
class Verdict:
    """The model's retry decision: a retry after a delay in [lo, hi] charged to
    ``rule`` (index or DEFAULT), or final (``lo is None``), ending with ``ending``."""

    lo: float | None
    hi: float | None
    rule: int
    ending: BaseException
    unlimited: bool = False  # the deciding rule's budget is UNLIMITED
    why: str = ""  # for the statistics (``event``)

    @property
    def retry(self) -> bool:
        return self.lo is not None


def grid_next(first: float, every: float, last_due: float, now: float) -> float:
    """The model's fixed-rate schedule: the first grid point after ``last_due``, or if
    that is not after ``now``, the latest grid point not after ``now`` (a collapse)."""
    k = 0
    while first + k * every <= last_due:
        k += 1
    if first + k * every > now:
        return first + k * every
    while first + (k + 1) * every <= now:
        k += 1
    return first + k * every


@dataclass(eq=False)
class Rec:
    """The model of one submission."""

    task: Task
    tid: str
    priority: int
    start: float
    seq: int
    spec: Spec
    state: str = "waiting"
    promoted: bool = False  # a pop has moved it to the ready queue (PENDING)
    attempts: int = 0  # attempts started in the current run
    ctx: TaskContext | None = None
    ctxs: list[TaskContext] = field(default_factory=list)  # every attempt's context
    reset: bool = False  # the current attempt called reset_backoff()
    deadline: float | None = None
    finished: float | None = None
    terminal_count: int = 0
    # Retry state of the current run.
    counts: list[int] | None = None  # consecutive failures per explicit rule
    default_count: int = 0
    unlimited: bool = False  # the waiting retry came from an UNLIMITED budget
    last_error: BaseException | None = None
    # Repeat state: the grid's origin, the current run's due time, runs before it.
    first: float = 0.0
    last_due: float = 0.0
    began: float = float("-inf")  # when the current run's first attempt started
    run: int = 0

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def series(self) -> bool:
        return self.spec.repeat is not None

    @property
    def has_policy(self) -> bool:
        """Could anything ever be retried? (Else ``decide`` returns None.)"""
        return self.spec.retries != 0 or bool(self.spec.rules)

    def present(self, now: float) -> bool:
        """Does the id still belong to this record (live, or cached within its TTL)?"""
        if self.live:
            return True
        assert self.finished is not None
        return self.spec.ttl is not None and now < self.finished + self.spec.ttl

    def key(self) -> tuple[int, float, int]:
        return (-self.priority, self.start, self.seq)

    def predict(self, error: BaseException, reset: bool, stopping: bool) -> Verdict:
        """SPEC §10: what must follow ``error``, from the model's own counts."""
        if _final_kind(error):
            return Verdict(None, None, DEFAULT, error, why="final by kind")
        subject = error
        after: float | None = None
        if isinstance(error, (RetryAfter, StopRetrying)):
            if error.__cause__ is not None:
                subject = error.__cause__
            if isinstance(error, StopRetrying) or _final_kind(subject):
                return Verdict(None, None, DEFAULT, subject, why="final: directive")
            after = error.delay
        rules = self.spec.rules
        index = next((i for i, r in enumerate(rules) if isinstance(subject, r.errors)), DEFAULT)
        budget = rules[index].retries if index >= 0 else self.spec.retries
        if reset or self.counts is None:
            n = 0
        else:
            n = self.counts[index] if index >= 0 else self.default_count
        unlimited = budget == UNLIMITED
        on = "default rule" if index == DEFAULT else "a rule"
        if unlimited and stopping:
            return Verdict(None, None, index, subject, why="final: UNLIMITED, stopping")
        if not unlimited and n >= budget:
            return Verdict(None, None, index, subject, why=f"final: budget of {on} spent")
        if self.spec.no_slow and isinstance(subject, Slow):
            return Verdict(None, None, index, subject, why="final: retry_if refused")
        if after is not None:
            return Verdict(after, after, index, subject, unlimited, f"RetryAfter on {on}")
        own = rules[index].backoff if index >= 0 else None
        base, step = own if own is not None else self.spec.backoff
        delay = base + step * n
        j = self.spec.jitter
        why = f"retry on {on}" + (" (UNLIMITED)" if unlimited else "")
        return Verdict(delay * (1 - j), delay * (1 + j), index, subject, unlimited, why)

    def charge(self, rule: int, reset: bool) -> None:
        """A retry on ``rule``: its consecutive count goes up (all restart on reset)."""
        n_rules = len(self.spec.rules)
        if self.counts is None or reset:
            self.counts = [0] * n_rules
            self.default_count = 0
        if rule == DEFAULT:
            self.default_count += 1
        else:
            self.counts[rule] += 1

    def next_run(self, failed: bool, stopping: bool, now: float) -> float | None:
        """When the next run is due after the current one ends (None: the series ends)."""
        rs = self.spec.repeat
        if rs is None or stopping or (failed and rs.stop_on_error):
            return None
        if rs.count is not None and self.run + 1 >= rs.count:
            return None
        last = self.last_due
        if self.began > last:  # occurrences missed before the run began collapsed into it
            caught = grid_next(self.first, rs.every, last, self.began)
            if caught <= self.began:
                last = caught
        return grid_next(self.first, rs.every, last, now)


def _snapshot(s: Scheduler, t: Task) -> tuple[object, ...]:
    return (
        t.state,
        t.value,
        t.error,
        t.attempts,
        t.start,
        s.queued,
        s.delayed,
        s.running,
        s.succeeded,
        s.failed,
        s.cancelled,
        s.timed_out,
        s.retried,
    )


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(rng=random.Random(0))
        self.now = 0.0
        self.recs: list[Rec] = []
        self.seq = 0
        self.stale: list[tuple[Rec, TaskContext]] = []  # abandoned attempts
        self.retries_allowed = True
        self.runs_allowed = True  # False once stop_series ran (a graceful stop began)
        self.steps = 0  # rules run so far (a late shutdown keeps retries common)
        self.expect = dict.fromkeys(("succeeded", "failed", "cancelled", "timed_out", "retried"), 0)

    # -- helpers ---------------------------------------------------------------------

    def by_state(self, *states: str) -> list[Rec]:
        return [r for r in self.recs if r.state in states]

    def terminate(self, r: Rec, state: str) -> None:
        assert r.live, f"{r.tid} reached a second terminal state {state}"
        r.state = state
        r.finished = self.now
        r.ctx = None
        r.terminal_count += 1
        self.expect[state] += 1
        assert r.task.state is TERMINAL[state]
        assert r.task.finished_at == self.now
        assert r.task.result().run == r.run  # a series: the runs started before this one
        if r.series:
            event("series ended: " + state)

    def plan(
        self, r: Rec, ctx: TaskContext, error: BaseException | None
    ) -> tuple[Decision | None, float | None, bool]:
        """What the cluster computes outside its lock when an attempt ends."""
        stopping = not self.runs_allowed
        decision, rearm = plan(r.task, ctx, error, self.s.rng, stopping, self.now, CLOCK)
        return decision, rearm, stopping

    def check_decision(
        self, r: Rec, error: BaseException, decision: Decision | None, verdict: Verdict
    ) -> None:
        if not r.has_policy:
            assert not verdict.retry
            if decision is None:  # nothing may be retried: the error ends the task
                assert verdict.ending is error, verdict
            else:  # a directive with a cause: it ends with the cause
                assert decision.delay is None, decision
                assert decision.error is verdict.ending, (decision, verdict)
            return
        assert decision is not None
        assert decision.error is verdict.ending, (decision, verdict)
        if verdict.retry:
            assert decision.delay is not None, (error, decision, verdict)
            assert verdict.lo is not None and verdict.hi is not None
            assert verdict.lo - EPS <= decision.delay <= verdict.hi + EPS, (decision, verdict)
            if verdict.lo == verdict.hi:
                assert decision.delay == verdict.lo  # no jitter, or a RetryAfter: exact
            assert decision.rule == verdict.rule, (decision, verdict)
        else:
            assert decision.delay is None, (error, decision, verdict, r.counts)

    def after_failure(
        self,
        r: Rec,
        error: BaseException,
        verdict: Verdict,
        decision: Decision | None,
        rearm: float | None,
        planned_stopping: bool,
        code: int,
        may_sleep: bool,
    ) -> None:
        """Check how the core applied the decision for a failed attempt; update the model."""
        t = r.task
        r.last_error = verdict.ending
        assert t.opts.last_error is verdict.ending
        retry = verdict.retry and self.retries_allowed
        if verdict.unlimited and not self.runs_allowed:
            retry = False  # SPEC §10: no UNLIMITED retry once a graceful stop has begun
        if retry:
            assert decision is not None and decision.delay is not None
            assert rearm is None  # the run goes on
            delay = decision.delay
            self.expect["retried"] += 1
            assert t.start == self.now + delay
            r.charge(verdict.rule, r.reset)
            r.unlimited = verdict.unlimited
            r.start = self.now + delay
            r.deadline = None
            r.promoted = False
            event(verdict.why)
            if r.reset:
                event("retry after reset_backoff")
            if may_sleep and r.spec.mode is RetryMode.IMMEDIATE:
                assert code == SLEEP
                assert t.ctx is not None and t.ctx is not r.ctx
                assert t.ctx.attempt == r.attempts
                r.state = "sleeping"
                r.ctx = t.ctx
            else:
                assert code == REQUEUED
                assert t.ctx is None
                r.state = "waiting"
                r.ctx = None
            assert t.state is TaskState.RETRYING
            assert t.error is verdict.ending
            return
        event(verdict.why if verdict.why.startswith("final") else "final: retries disallowed")
        if verdict.retry:  # a retry the stop refused: plan() saw a retry, no rearm
            assert rearm is None
            expected_rearm = None
        else:
            expected_rearm = r.next_run(True, planned_stopping, self.now)
            assert rearm == expected_rearm, (rearm, expected_rearm)
        terminal = "timed_out" if isinstance(verdict.ending, TaskTimeoutError) else "failed"
        self.end_run(r, terminal, None, verdict.ending, rearm, code)

    def end_run(
        self,
        r: Rec,
        state: str,
        value: object,
        error: BaseException | None,
        rearm: float | None,
        code: int,
    ) -> None:
        """A run ended in ``state``: the series goes on at ``rearm``, or the task ends."""
        t = r.task
        if rearm is None or not self.runs_allowed:
            assert code == DONE, code
            assert self.s.run_result is None
            self.terminate(r, state)
            if error is None:
                assert t.value is value
                assert t.error is None
            else:
                assert t.error is error
                assert t.value is None
            return
        assert code == RUN_ENDED, code
        result = self.s.run_result
        assert result is not None
        assert result.value is value
        assert result.error is error
        assert result.run == r.run
        self.s.run_result = None  # delivered (what the cluster does with it)
        assert t.finished_at == self.now
        rs = r.spec.repeat
        assert rs is not None
        last = r.last_due
        if r.began > last:  # occurrences missed before the run began collapsed into it
            caught = grid_next(r.first, rs.every, last, r.began)
            if caught <= r.began:
                last = caught
        nxt = grid_next(r.first, rs.every, last, last)  # the next occurrence
        if nxt <= self.now:
            event("series: missed occurrences collapsed")
            assert rearm <= self.now
        r.run += 1
        r.last_due = rearm
        r.attempts = 0
        r.start = rearm
        r.counts = None
        r.default_count = 0
        r.unlimited = False
        r.state = "waiting"
        r.ctx = None
        r.deadline = None
        r.promoted = rearm <= self.now
        assert t.start == rearm
        assert t.attempts == 0
        assert t.opts.counts is None  # every rule's count restarts with the run
        assert t.opts.series is not None and t.opts.series.run == r.run
        assert t.state is (TaskState.PENDING if r.promoted else TaskState.DELAYED)
        event("series: run ended")

    def stop_hits_known_bug(self) -> bool:
        """Would stop_series meet a waiting retry that a pop promoted (see AVOID_*)?"""
        if not AVOID_PROMOTED_RETRY_AT_STOP:
            return False
        return any(
            r.state == "waiting"
            and r.attempts > 0
            and r.task.state is TaskState.PENDING
            and (r.series or r.unlimited)
            for r in self.recs
        )

    def stop_series(self) -> None:
        """A graceful stop begins: series waiting for a run are cancelled, retries
        waiting on an UNLIMITED budget end with their last error; nothing else changes."""
        assert self.runs_allowed
        cancelled = [r for r in self.recs if r.series and r.state == "waiting" and r.attempts == 0]
        ended = [
            r
            for r in self.recs
            if r.state in ("waiting", "sleeping") and r.attempts > 0 and r.unlimited
        ]
        others = [r for r in self.recs if r.live and r not in cancelled and r not in ended]
        before = {id(r): _snapshot(self.s, r.task)[:5] for r in others}
        done = self.s.stop_series(self.now)
        self.runs_allowed = False
        assert not self.s.runs_allowed
        assert sorted(id(t) for t in done) == sorted(id(r.task) for r in cancelled + ended)
        assert len(done) == len(cancelled) + len(ended)
        for r in others:
            assert _snapshot(self.s, r.task)[:5] == before[id(r)], r.tid
        for r in cancelled:
            self.terminate(r, "cancelled")
            assert isinstance(r.task.error, TaskCancelledError)
            assert "shutdown" in str(r.task.error)
            event("stop: series waiting for a run cancelled")
        for r in ended:
            ctx = r.ctx
            was = r.state
            terminal = "timed_out" if isinstance(r.last_error, TaskTimeoutError) else "failed"
            self.terminate(r, terminal)
            assert r.task.error is r.last_error
            assert r.task.value is None
            if was == "sleeping":
                assert ctx is not None and ctx.reason == "shutdown"
                assert self.s.resume(r.task, ctx, max(self.now, r.start)) is False
            event("stop: UNLIMITED retry ended with its last error")

    # -- rules -----------------------------------------------------------------------

    def submit_spec(self, spec: Spec) -> None:
        start = None if spec.delay is None else self.now + spec.delay
        t = make_task(
            spec.tid,
            priority=spec.priority,
            start=start,
            retries=spec.retries,
            backoff=LinearBackoff(*spec.backoff),
            jitter=spec.jitter,
            mode=spec.mode,
            ttl=spec.ttl,
            timeout=spec.timeout,
            retry_if=(lambda e: not isinstance(e, Slow)) if spec.no_slow else None,
        )
        t.opts.rules = tuple(
            make_rule(
                rs.errors, rs.retries, None if rs.backoff is None else LinearBackoff(*rs.backoff)
            )
            for rs in spec.rules
        )
        eff_start = self.now if start is None else start
        if spec.repeat is not None:  # as TaskBuilder._start_series does
            rs = spec.repeat
            t.opts.repeat = Repeat(rs.every, count=rs.count, stop_on_error=rs.stop_on_error)
            first = t.opts.repeat.first_due(
                eff_start, now_wall=CLOCK.to_date, from_wall=CLOCK.from_date
            )
            assert first == eff_start
            t.start = first
            t.opts.series = Series(first)
        holder = [r for r in self.recs if r.tid == spec.tid and r.present(self.now)]
        if spec.tid is not None and holder:
            self.s.purge(self.now)  # submit may purge expired results first
            before = (self.s.submitted, self.s.live, self.s.sizes())
            with pytest.raises(DuplicateTaskError):
                self.s.submit(t, self.now)
            assert (self.s.submitted, self.s.live, self.s.sizes()) == before
            return
        due = self.s.submit(t, self.now)
        assert t.id is not None
        if spec.tid is None:
            assert not any(r.tid == t.id and r.present(self.now) for r in self.recs), t.id
        else:
            assert t.id == spec.tid
        self.seq += 1
        assert due is (eff_start <= self.now)
        assert t.start == eff_start
        assert t.submitted_at == self.now
        self.recs.append(
            Rec(
                task=t,
                tid=t.id,
                priority=spec.priority,
                start=eff_start,
                seq=self.seq,
                spec=spec,
                promoted=due,
                first=eff_start,
                last_due=eff_start,
            )
        )

    @initialize(specs=st.lists(SPECS, min_size=1, max_size=6))
    def seed(self, specs: list[Spec]) -> None:
        for spec in specs:
            self.submit_spec(spec)

    @rule(spec=SPECS)
    def submit(self, spec: Spec) -> None:
        self.submit_spec(spec)

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 5.0, -1.0, -1.0]))
    def advance(self, dt: float) -> None:
        """The clock moves on (-1: to the next start time the model knows of) and the
        timekeeper expires overdue attempts."""
        if dt < 0:
            later = [r.start for r in self.by_state("waiting") if r.start > self.now]
            dt = min(later, default=self.now) - self.now
        self.now += dt
        self.expire()

    @precondition(lambda self: any(r.state == "waiting" for r in self.recs))
    @rule()
    def start(self) -> None:
        """A worker pops the best due task (the model's choice) and starts it."""
        self.pop()

    @precondition(lambda self: any(r.state == "waiting" for r in self.recs))
    @rule(outcomes=st.lists(OUTCOMES, min_size=1, max_size=3))
    def work(self, outcomes: list[Outcome]) -> None:
        """A worker runs attempts back to back: it pops the best due task and the attempt
        ends with the next outcome. Finding nothing due, it sleeps until the next start
        time (the clock moves on)."""
        for outcome in outcomes:
            waiting = self.by_state("waiting")
            if not waiting:
                return
            if not any(r.start <= self.now for r in waiting):
                self.now = min(r.start for r in waiting)
                self.expire()
            r = self.pop()
            assert r is not None
            self.end_attempt(r, outcome)

    def pop(self) -> Rec | None:
        """Pop as a worker does; check the model's choice; None if nothing was due."""
        for r in self.by_state("waiting"):
            if r.start <= self.now:
                r.promoted = True
        due = [r for r in self.by_state("waiting") if r.promoted]
        t = self.s.pop(self.now)
        if not due:
            assert t is None, f"popped {t!r} but nothing is due at {self.now}"
            return None
        best = min(due, key=Rec.key)
        assert t is best.task, f"popped {t!r}, model chose {best.tid} of {[x.tid for x in due]}"
        assert best.start <= self.now
        best.state = "running"
        best.attempts += 1
        if best.attempts == 1:
            best.began = self.now  # a run begins
        assert t.state is TaskState.RUNNING
        assert t.attempts == best.attempts
        assert t.started_at == self.now
        ctx = t.ctx
        assert ctx is not None and ctx.task_id == best.tid
        assert ctx.attempt == best.attempts - 1
        assert ctx.reason is None
        best.ctxs.append(ctx)
        best.ctx = ctx
        best.reset = False
        best.deadline = None if best.spec.timeout is None else self.now + best.spec.timeout
        assert ctx.deadline == best.deadline
        # Right after a pop every due task has been promoted: exact gauges.
        assert self.s.queued == len([r for r in self.by_state("waiting") if r.promoted])
        not_due = [r for r in self.by_state("waiting") if not r.promoted]
        assert self.s.delayed == len(not_due) + len(self.by_state("sleeping"))
        return best

    @precondition(lambda self: any(r.state == "running" for r in self.recs))
    @rule(pick=st.integers(0, 100))
    def progress(self, pick: int) -> None:
        """A running attempt made progress: ``current().reset_backoff()``."""
        running = self.by_state("running")
        r = running[pick % len(running)]
        assert r.ctx is not None
        r.ctx.reset_backoff()
        r.reset = True

    @precondition(lambda self: any(r.state == "running" for r in self.recs))
    @rule(pick=st.integers(0, 100), outcome=OUTCOMES)
    def finish(self, pick: int, outcome: Outcome) -> None:
        """One of the running attempts ends with ``outcome``."""
        running = self.by_state("running")
        self.end_attempt(running[pick % len(running)], outcome)

    def end_attempt(self, r: Rec, outcome: Outcome) -> None:
        t, ctx = r.task, r.ctx
        assert ctx is not None and t.ctx is ctx
        if outcome.reset:
            ctx.reset_backoff()
            r.reset = True
        if outcome.kind == "ok":
            value = ("value", r.tid, r.run, r.attempts)
            decision, rearm, stopping = self.plan(r, ctx, None)
            assert decision is None
            assert rearm == r.next_run(False, stopping, self.now), rearm
            if outcome.stop_between and self.runs_allowed and not self.stop_hits_known_bug():
                self.stop_series()
            code = self.s.finish(t, ctx, value, None, None, self.now, rearm)
            self.end_run(r, "succeeded", value, None, rearm, code)
            return
        error = make_error(outcome, r.spec.rules)
        if (
            AVOID_DIRECTIVE_WITHOUT_POLICY
            and not r.has_policy
            and isinstance(error, (RetryAfter, StopRetrying))
            and error.__cause__ is not None
        ):
            error = error.__cause__  # the known bug: see test_directive_cause_without_policy
        self.fail_attempt(r, ctx, error, outcome.stop_between, detached=False)

    def fail_attempt(
        self, r: Rec, ctx: TaskContext, error: BaseException, stop: bool, detached: bool
    ) -> None:
        """Attempt ``ctx`` of ``r`` failed with ``error``: plan, maybe stop, settle."""
        verdict = r.predict(error, r.reset, not self.runs_allowed)
        decision, rearm, stopping = self.plan(r, ctx, error)
        self.check_decision(r, error, decision, verdict)
        crosses = AVOID_UNLIMITED_RETRY_ACROSS_STOP and verdict.retry and verdict.unlimited
        if stop and self.runs_allowed and not self.stop_hits_known_bug() and not crosses:
            self.stop_series()
        if detached:
            code = self.s.fail_detached(ctx, error, decision, self.now, rearm)
        else:
            code = self.s.finish(r.task, ctx, None, error, decision, self.now, rearm)
        self.after_failure(r, error, verdict, decision, rearm, stopping, code, not detached)

    @precondition(lambda self: any(r.state == "sleeping" for r in self.recs))
    @rule(pick=st.integers(0, 100))
    def wake(self, pick: int) -> None:
        """A worker sleeping an IMMEDIATE backoff wakes up at (or after) the retry's start."""
        sleeping = self.by_state("sleeping")
        r = sleeping[pick % len(sleeping)]
        self.now = max(self.now, r.start)
        ctx = r.ctx
        assert ctx is not None
        assert self.s.resume(r.task, ctx, self.now) is True
        r.state = "running"
        r.attempts += 1
        assert r.task.state is TaskState.RUNNING
        new = r.task.ctx  # the sleeping context or a fresh one, per implementation
        assert new is not None
        assert (new.task_id, new.attempt, new.reason) == (r.tid, r.attempts - 1, None)
        if new is not ctx:  # the sleep context is spent: a late use of it is stale
            self.stale.append((r, ctx))
        r.ctxs.append(new)
        r.ctx = new
        r.reset = False
        assert r.task.attempts == r.attempts
        assert r.task.started_at == self.now
        r.deadline = None if r.spec.timeout is None else self.now + r.spec.timeout
        assert new.deadline == r.deadline

    def expire(self) -> None:
        expected = {
            id(r.ctx)
            for r in self.by_state("running")
            if r.deadline is not None and r.deadline <= self.now
        }
        got = self.s.expire(self.now)
        assert {id(c) for c in got} == expected
        assert len(got) == len(expected)
        for r in self.by_state("running"):
            if id(r.ctx) in expected:
                assert r.ctx is not None
                assert r.ctx.reason == "timeout"
                assert r.ctx.cancelled.is_set()
                assert r.task.state is TaskState.RUNNING
                r.state = "detached"
                self.stale.append((r, r.ctx))
        assert self.s.next_deadline() == min(
            (r.deadline for r in self.by_state("running") if r.deadline is not None),
            default=None,
        )

    @precondition(lambda self: any(r.state == "detached" for r in self.recs))
    @rule(pick=st.integers(0, 100), stop=st.sampled_from([False] * 7 + [True]))
    def settle(self, pick: int, stop: bool) -> None:
        """The timekeeper settles an expired attempt outside its lock."""
        detached = self.by_state("detached")
        r = detached[pick % len(detached)]
        ctx = r.ctx
        assert ctx is not None
        error = TaskTimeoutError(f"task {r.tid!r} attempt {ctx.attempt} timed out")
        self.fail_attempt(r, ctx, error, stop, detached=True)

    @precondition(lambda self: bool(self.stale))
    @rule(pick=st.integers(0, 100), ok=st.booleans())
    def late_return(self, pick: int, ok: bool) -> None:
        """An abandoned attempt returns or raises late: STALE, nothing changes."""
        r, ctx = self.stale.pop(pick % len(self.stale))
        before = _snapshot(self.s, r.task)
        if ok:
            code = self.s.finish(r.task, ctx, "late", None, None, self.now, self.now)
        else:
            code = self.s.finish(r.task, ctx, None, Other("late"), 0.0, self.now, self.now)
        assert code == STALE
        if r.state != "detached":
            code = self.s.fail_detached(ctx, TaskTimeoutError("late"), 0.0, self.now, self.now)
            assert code == STALE
        assert _snapshot(self.s, r.task) == before
        assert self.s.run_result is None

    @precondition(lambda self: bool(self.recs))
    @rule(
        pick=st.integers(0, 100),
        live_only=st.booleans(),
        and_cancel=st.sampled_from([False, False, True]),
    )
    def by_id(self, pick: int, live_only: bool, and_cancel: bool) -> None:
        """What info(id) and cancel_task(id) do: look the id up, then maybe cancel it."""
        pool = [r for r in self.recs if r.live] if live_only else []
        pool = pool or self.recs
        r = pool[pick % len(pool)]
        holder = [x for x in self.recs if x.tid == r.tid and x.present(self.now)]
        assert len(holder) <= 1
        if not holder:
            with pytest.raises(TaskNotFoundError):
                self.s.lookup(r.tid, self.now)
            if and_cancel:  # a handle still holding the purged task
                self.cancel(r)
            return
        assert self.s.lookup(r.tid, self.now) is holder[0].task
        if and_cancel:
            self.cancel(holder[0])

    def cancel(self, r: Rec) -> None:
        was = r.state
        ctx = r.ctx
        result = self.s.cancel(r.task, "cancelled", self.now)
        if not r.live:
            assert result is False
            assert r.task.state is TERMINAL[was]
            return
        assert result is True
        if was in ("running", "sleeping"):
            assert ctx is not None
            assert ctx.reason == "cancelled"
            assert ctx.cancelled.is_set()
            if was == "running":
                self.stale.append((r, ctx))
            else:
                assert self.s.resume(r.task, ctx, max(self.now, r.start)) is False
        elif was == "detached":
            assert ctx is not None and ctx.reason == "timeout"  # already signalled
        if r.series and was == "waiting" and r.attempts == 0 and r.run > 0:
            event("series cancelled between runs")
        self.terminate(r, "cancelled")
        assert isinstance(r.task.error, TaskCancelledError)
        assert r.task.value is None

    @precondition(
        lambda self: self.runs_allowed and self.steps >= 20 and not self.stop_hits_known_bug()
    )
    @rule()
    def graceful_stop(self) -> None:
        """``stop()`` begins: no series starts another run, UNLIMITED retries end."""
        self.stop_series()

    @precondition(
        lambda self: self.retries_allowed and self.steps >= 30 and not self.stop_hits_known_bug()
    )
    @rule(running=st.booleans())
    def shutdown(self, running: bool) -> None:
        """Stop: no more retries; cancel what has not started (and maybe what runs).
        ``stop(cancel_pending=True)`` (stop_series first), or ``cancel()`` (everything)."""
        if not running and self.runs_allowed:
            self.stop_series()
        self.s.retries_allowed = False
        self.retries_allowed = False
        targets = [r for r in self.recs if r.live and (running or r.state != "running")]
        targets = [r for r in targets if running or r.state != "detached"]
        done = self.s.cancel_all("shutdown", self.now, running)
        assert self.s.abandoned == []
        assert sorted(id(t) for t in done) == sorted(id(r.task) for r in targets)
        for r in targets:
            if r.state == "running":
                assert r.ctx is not None
                self.stale.append((r, r.ctx))
            if r.state in ("running", "sleeping"):
                assert r.ctx is not None and r.ctx.reason == "shutdown"
            self.terminate(r, "cancelled")

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def states_agree(self) -> None:
        self.steps += 1
        for r in self.recs:
            st_ = r.task.state
            assert r.task.attempts == r.attempts
            assert r.terminal_count == (0 if r.live else 1)
            if r.state == "waiting":
                if r.promoted:
                    assert st_ is TaskState.PENDING, (r.tid, st_)
                else:
                    waiting = TaskState.DELAYED if r.attempts == 0 else TaskState.RETRYING
                    allowed = {waiting}
                    if r.start <= self.now:  # due: a core may promote it early
                        allowed.add(TaskState.PENDING)
                    assert st_ in allowed, (r.tid, st_, allowed)
                assert r.task.start == r.start
            elif r.state in ("running", "detached"):
                assert st_ is TaskState.RUNNING
            elif r.state == "sleeping":
                assert st_ is TaskState.RETRYING
            else:
                assert st_ is TERMINAL[r.state]

    @invariant()
    def one_live_attempt(self) -> None:
        """Runs never overlap: at most one attempt of a task is live (would be accepted
        by finish or fail_detached), exactly one while it runs or awaits settling."""
        for r in self.recs:
            t = r.task
            live = [
                c
                for c in r.ctxs
                if t.ctx is c or (c._task is t and t.state is TaskState.RUNNING and t.ctx is None)
            ]
            assert len(live) == (1 if r.state in ("running", "detached") else 0), (r.tid, live)
            if live:
                assert live[0] is r.ctx

    @invariant()
    def retry_state_agrees(self) -> None:
        """Per-rule consecutive counts and the last error, as the model keeps them."""
        for r in self.recs:
            opts = r.task.opts
            assert opts.last_error is r.last_error, (r.tid, opts.last_error, r.last_error)
            if r.counts is None:
                assert opts.counts is None, (r.tid, opts.counts)
            else:
                assert opts.counts is not None
                assert opts.counts.rules == r.counts, (r.tid, opts.counts, r.counts)
                assert opts.counts.default == r.default_count, (r.tid, opts.counts)
        assert self.s.run_result is None  # set only by a RUN_ENDED (and taken at once)
        assert self.s.runs_allowed is self.runs_allowed

    @invariant()
    def gauges_agree(self) -> None:
        s = self.s
        waiting = self.by_state("waiting")
        sleeping = self.by_state("sleeping")
        assert s.running == len(self.by_state("running", "detached"))
        assert s.queued + s.delayed == len(waiting) + len(sleeping)
        # Promotion happens when a worker pops, so due-but-unpopped tasks may be either.
        assert s.queued >= len([r for r in waiting if r.promoted])
        assert s.delayed >= len([r for r in waiting if r.start > self.now]) + len(sleeping)
        assert s.live == len([r for r in self.recs if r.live])

    @invariant()
    def counters_agree(self) -> None:
        s = self.s
        assert s.submitted == len(self.recs)
        assert (s.succeeded, s.failed, s.cancelled, s.timed_out, s.retried) == (
            self.expect["succeeded"],
            self.expect["failed"],
            self.expect["cancelled"],
            self.expect["timed_out"],
            self.expect["retried"],
        )
        assert_balanced(s)

    @invariant()
    def next_due_agrees(self) -> None:
        waits = [r.start for r in self.by_state("waiting") if not r.promoted]
        nd = self.s.next_due()
        if not waits:
            assert nd is None
        elif nd is not None:
            # A core may promote due tasks early; the earliest not-yet-due one must show.
            future = [w for w in waits if w > self.now]
            assert nd == min(waits) or (nd > self.now and nd == min(future))
        else:
            assert all(w <= self.now for w in waits)

    def teardown(self) -> None:
        """Cancel everything left: every submission ends in exactly one terminal state."""
        if sys.exc_info()[0] is not None:
            return  # a step failed (teardown runs in a finally): report that failure
        self.s.retries_allowed = False
        self.retries_allowed = False
        live = [r for r in self.recs if r.live]
        done = self.s.cancel_all("shutdown", self.now, True)
        assert sorted(id(t) for t in done) == sorted(id(r.task) for r in live)
        for r in live:
            self.terminate(r, "cancelled")
        for r in self.recs:
            assert r.terminal_count == 1
            assert r.task.state.terminal
        assert self.s.live == 0
        assert (self.s.queued, self.s.delayed, self.s.running) == (0, 0, 0)
        assert self.s.pop(self.now + 1e6) is None
        assert self.s.next_due() is None
        assert self.s.next_deadline() is None
        assert_balanced(self.s)


SchedulerMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=50, deadline=None
)
# Green, the machine takes ~10 s; a failure is then shrunk, which for this machine can
# take minutes (Hypothesis gives up after five): the timeout leaves room for that, so
# that a failure reports its minimal example rather than pytest-timeout's interruption.
TestScheduler = pytest.mark.timeout(420)(SchedulerMachine.TestCase)


# -- regressions: cases the model found tricky, driven by hand -------------------------


def _fail_once(
    s: Scheduler, t: Task, error: BaseException, now: float, *, reset: bool = False
) -> int:
    """Pop ``t`` at ``now`` and end that attempt with ``error``, as a worker does."""
    assert s.pop(now) is t
    ctx = t.ctx
    assert ctx is not None
    if reset:
        ctx.reset_backoff()
    decision, rearm = plan(t, ctx, error, s.rng, not s.runs_allowed, now, CLOCK)
    return s.finish(t, ctx, None, error, decision, now, rearm)


def _state(t: Task) -> TaskState:
    """``t.state`` (through a call, so that mypy does not narrow it between steps)."""
    return t.state


def _caused(directive: BaseException, cause: BaseException) -> BaseException:
    directive.__cause__ = cause
    return directive


def _series(every: float, first: float, **kw: object) -> Task:
    """A repeating task as TaskBuilder._start_series submits it."""
    t = make_task(start=first, **kw)  # type: ignore[arg-type]
    t.opts.repeat = Repeat(every)
    t.opts.series = Series(first)
    return t


def test_rules_count_their_own_consecutive_failures() -> None:
    """Net, Db, Net, Db, Net: each rule (budget 2) counts only what it matched."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t")
    t.opts.rules = (make_rule((Net,), 2, None), make_rule((Db,), 2, None))
    s.submit(t, 0.0)
    for error in (Net(), Db(), Net(), Db()):
        assert _fail_once(s, t, error, 0.0) == REQUEUED
    assert t.opts.counts is not None
    assert (t.opts.counts.rules, t.opts.counts.default) == ([2, 2], 0)
    last = Net("third")
    assert _fail_once(s, t, last, 0.0) == DONE
    assert t.state is TaskState.FAILED and t.error is last
    assert t.attempts == 5


def test_reset_backoff_restarts_every_rule_and_the_backoff() -> None:
    """After reset_backoff() the next retry waits backoff(0) and the counts restart."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t", retries=3, backoff=LinearBackoff(1.0, 1.0))
    t.opts.rules = (make_rule((Net,), 3, LinearBackoff(10.0, 10.0)),)
    s.submit(t, 0.0)
    assert _fail_once(s, t, Net(), 0.0) == REQUEUED and t.start == 10.0
    assert _fail_once(s, t, Other(), 10.0) == REQUEUED and t.start == 11.0
    assert _fail_once(s, t, Net(), 11.0) == REQUEUED and t.start == 31.0  # n = 1
    assert _fail_once(s, t, Net(), 31.0, reset=True) == REQUEUED
    assert t.start == 41.0  # n = 0 again
    assert t.opts.counts is not None
    assert (t.opts.counts.rules, t.opts.counts.default) == ([1], 0)


def test_retry_after_from_cause_uses_the_causes_rule_and_its_exact_delay() -> None:
    """RetryAfter(d) from Db: Db's budget is charged, the delay is d (no jitter), and
    once Db's budget is spent the task ends with the cause."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t", retries=UNLIMITED, jitter=0.5)
    t.opts.rules = (make_rule((Db,), 1, None),)
    s.submit(t, 0.0)
    assert _fail_once(s, t, _caused(RetryAfter(1.5), Db()), 0.0) == REQUEUED
    assert t.start == 1.5
    cause = Db("second")
    assert _fail_once(s, t, _caused(RetryAfter(1.5), cause), 1.5) == DONE
    assert t.state is TaskState.FAILED and t.error is cause
    assert t.opts.last_error is cause


def test_retry_after_from_a_final_cause_ends_with_that_cause() -> None:
    """RetryAfter(0) from KeyboardInterrupt is final, whatever the budget."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t", retries=UNLIMITED)
    s.submit(t, 0.0)
    cause = KeyboardInterrupt()
    assert _fail_once(s, t, _caused(RetryAfter(0), cause), 0.0) == DONE
    assert t.state is TaskState.FAILED and t.error is cause


def test_a_run_that_overran_several_occurrences_collapses_them() -> None:
    """Every 1 s from 0: a run ending at 3.5 rearms at 3.0 (due at once), and the next
    Result counts runs, not occurrences."""
    s = Scheduler(rng=random.Random(0))
    t = _series(1.0, 0.0)
    s.submit(t, 0.0)
    assert s.pop(0.0) is t
    ctx = t.ctx
    assert ctx is not None
    decision, rearm = plan(t, ctx, None, s.rng, False, 3.5, CLOCK)
    assert (decision, rearm) == (None, 3.0)
    assert s.finish(t, ctx, "v", None, None, 3.5, rearm) == RUN_ENDED
    assert s.run_result is not None and (s.run_result.value, s.run_result.run) == ("v", 0)
    assert t.state is TaskState.PENDING and t.start == 3.0
    assert s.pop(3.5) is t
    ctx = t.ctx
    assert ctx is not None
    assert plan(t, ctx, None, s.rng, False, 3.6, CLOCK) == (None, 4.0)  # the grid holds


def test_a_rearm_planned_before_the_stop_ends_the_series() -> None:
    """plan() ran before stop_series (it saw no stop): finish must still end the series."""
    s = Scheduler(rng=random.Random(0))
    t = _series(1.0, 0.0)
    s.submit(t, 0.0)
    assert s.pop(0.0) is t
    ctx = t.ctx
    assert ctx is not None
    _, rearm = plan(t, ctx, None, s.rng, False, 0.5, CLOCK)
    assert rearm == 1.0
    assert s.stop_series(0.5) == []
    assert s.finish(t, ctx, "v", None, None, 0.5, rearm) == DONE
    assert t.state is TaskState.SUCCEEDED and t.result().run == 0
    assert s.run_result is None


def test_stop_carries_a_series_whose_retry_waits_to_the_end_of_its_run() -> None:
    """A series waiting on a finite retry (not yet due) is left alone by stop_series;
    the run goes on and its end ends the series."""
    s = Scheduler(rng=random.Random(0))
    t = _series(10.0, 0.0, retries=1, backoff=LinearBackoff(1.0, 0.0))
    s.submit(t, 0.0)
    assert _fail_once(s, t, Other(), 0.0) == REQUEUED
    assert s.stop_series(0.5) == []
    assert _state(t) is TaskState.RETRYING
    assert s.pop(1.0) is t
    ctx = t.ctx
    assert ctx is not None
    assert plan(t, ctx, None, s.rng, not s.runs_allowed, 1.0, CLOCK) == (None, None)
    assert s.finish(t, ctx, "v", None, None, 1.0, None) == DONE
    assert t.state is TaskState.SUCCEEDED


def test_a_series_cancelled_between_runs_ends_with_the_next_runs_number() -> None:
    """Two runs ended: the cancellation Result has run == 2."""
    s = Scheduler(rng=random.Random(0))
    t = _series(1.0, 0.0)
    s.submit(t, 0.0)
    for now in (0.0, 1.0):
        assert s.pop(now) is t
        ctx = t.ctx
        assert ctx is not None
        _, rearm = plan(t, ctx, None, s.rng, False, now, CLOCK)
        assert s.finish(t, ctx, now, None, None, now, rearm) == RUN_ENDED
        s.run_result = None
    assert s.cancel(t, "cancelled", 1.5) is True
    result = t.result()
    assert isinstance(result.error, TaskCancelledError) and result.run == 2


# -- known bugs (SPEC §10, §11): strict xfails, so that a fix is noticed ------------------


def test_stop_retrying_from_cause_without_retry_policy_ends_with_the_cause() -> None:
    """SPEC §10: StopRetrying() from cause fails the task with the cause; a task with no
    with_retry and no rule (decide() returns None) ends with the StopRetrying instead."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t")
    s.submit(t, 0.0)
    cause = Db()
    assert _fail_once(s, t, _caused(StopRetrying(), cause), 0.0) == DONE
    assert t.error is cause


def test_retry_after_from_cause_without_retry_policy_ends_with_the_cause() -> None:
    """SPEC §10: when no retry happens the task fails with the RetryAfter's cause."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t")
    s.submit(t, 0.0)
    cause = Db()
    assert _fail_once(s, t, _caused(RetryAfter(1), cause), 0.0) == DONE
    assert t.error is cause


def _promote_retry(s: Scheduler, t: Task, now: float) -> None:
    """A pop for another, higher-priority task moves ``t``'s due retry to the ready queue."""
    other = make_task(priority=9)
    s.submit(other, now)
    assert s.pop(now) is other
    assert t.state is TaskState.PENDING and t.attempts == 1


def test_stop_series_ends_an_unlimited_retry_even_once_it_is_due() -> None:
    """SPEC §10: once a graceful stop has begun an UNLIMITED task is not retried again.
    stop_series only looks at RETRYING tasks: a due retry that a pop promoted to
    PENDING is left alone, and its next attempt runs after the stop began."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t", retries=UNLIMITED)
    s.submit(t, 0.0)
    error = Other()
    assert _fail_once(s, t, error, 0.0) == REQUEUED
    _promote_retry(s, t, 0.0)
    assert s.stop_series(0.0) == [t]
    assert t.state is TaskState.FAILED and t.error is error


def test_stop_series_carries_a_series_whose_due_retry_waits() -> None:
    """SPEC §11: a series whose run is going ends with that run's Result. stop_series
    cancels every series that is PENDING, also one whose retry (within a run) a pop has
    promoted; the same series is left to finish its run while the retry is not due."""
    s = Scheduler(rng=random.Random(0))
    t = _series(10.0, 0.0, retries=1)
    s.submit(t, 0.0)
    assert _fail_once(s, t, Other(), 0.0) == REQUEUED
    _promote_retry(s, t, 0.0)
    assert s.stop_series(0.0) == []
    assert t.state is TaskState.PENDING


def test_an_unlimited_retry_decided_before_the_stop_is_not_scheduled_after_it() -> None:
    """SPEC §10: plan() runs outside the lock; a stop_series between it and finish()
    must not let an UNLIMITED retry through (finish() re-checks runs_allowed for a
    rearm, not for this). Here the retry waits an hour: a graceful stop waits for it."""
    s = Scheduler(rng=random.Random(0))
    t = make_task("t", retries=UNLIMITED, backoff=LinearBackoff(3600.0, 0.0))
    s.submit(t, 0.0)
    assert s.pop(0.0) is t
    ctx = t.ctx
    assert ctx is not None
    error = Other()
    decision, rearm = plan(t, ctx, error, s.rng, False, 0.0, CLOCK)
    assert decision is not None and decision.delay == 3600.0
    assert s.stop_series(0.0) == []
    assert s.finish(t, ctx, None, error, decision, 0.0, rearm) == DONE
    assert t.state is TaskState.FAILED and t.error is error
