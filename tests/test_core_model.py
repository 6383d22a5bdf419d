"""Model-based test of the scheduling core (SPEC §3-§5): a Hypothesis state machine drives
``Scheduler`` with a fake clock and checks it against a small reference model.

The model keeps one record per submission (ids can be reused once purged) holding its
priority, start, submission order, retry budget and life-cycle state. After every rule:
dispatch order, due times, states, attempts, gauges and counters must agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from _core_helpers import assert_balanced, make_task
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cluster import (
    DuplicateTaskError,
    FixedBackoff,
    RetryMode,
    TaskCancelledError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
)
from cluster._core import DONE, REQUEUED, SLEEP, STALE, Scheduler, retry_delay
from cluster._task import Task, TaskContext

# Model states of a live record. "waiting": queued or delayed (or a requeued retry);
# "running": an attempt holds ctx; "detached": expired, awaiting fail_detached;
# "sleeping": an IMMEDIATE retry sleeping its backoff on ctx.
LIVE = ("waiting", "running", "detached", "sleeping")
TERMINAL = {
    "succeeded": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
    "cancelled": TaskState.CANCELLED,
    "timed_out": TaskState.TIMED_OUT,
}
USER_IDS = ("t1", "t2", "t3", "u1", "u2")  # "t<n>" may collide with generated ids

EPS = 1e-9


class Boom(Exception):
    """A retryable failure."""


def make_error(kind: str) -> BaseException:
    if kind == "boom":
        return Boom("boom")
    if kind == "kbd":
        return KeyboardInterrupt()
    if kind == "cancelled_err":
        return TaskCancelledError("raised by the task itself")
    assert kind == "timeout_err"
    return TaskTimeoutError("raised by ctx.check()")


@dataclass(frozen=True)
class Spec:
    """What a submit rule asks for."""

    tid: str | None
    priority: int
    delay: float | None  # start = now + delay; None: start at submit
    retries: int
    backoff: float
    jitter: float
    mode: RetryMode
    ttl: float | None
    timeout: float | None


SPECS = st.builds(
    Spec,
    tid=st.none() | st.sampled_from(USER_IDS),
    priority=st.integers(-2, 2),
    delay=st.none() | st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]),
    retries=st.integers(0, 3),
    backoff=st.sampled_from([0.0, 0.25, 1.0, 2.0]),
    jitter=st.sampled_from([0.0, 0.0, 0.5]),
    mode=st.sampled_from([RetryMode.REQUEUE, RetryMode.IMMEDIATE]),
    ttl=st.none() | st.sampled_from([0.0, 1.0, 5.0]),
    timeout=st.none() | st.sampled_from([0.5, 1.0, 3.0]),
)


@dataclass(eq=False)
class Rec:
    task: Task
    tid: str
    priority: int
    start: float
    seq: int
    retries: int
    backoff: float
    jitter: float
    mode: RetryMode
    ttl: float | None
    timeout: float | None
    state: str = "waiting"
    promoted: bool = False  # a pop has moved it to the ready queue (PENDING)
    attempts: int = 0
    ctx: TaskContext | None = None
    deadline: float | None = None
    finished: float | None = None
    terminal_count: int = 0

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def present(self, now: float) -> bool:
        """Does the id still belong to this record (live, or cached within its TTL)?"""
        if self.live:
            return True
        assert self.finished is not None
        return self.ttl is not None and now < self.finished + self.ttl

    def key(self) -> tuple[int, float, int]:
        return (-self.priority, self.start, self.seq)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(rng=random.Random(0))
        self.now = 0.0
        self.recs: list[Rec] = []
        self.seq = 0
        self.stale: list[tuple[Rec, TaskContext]] = []  # abandoned attempts
        self.retries_allowed = True
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

    def after_failure(
        self, r: Rec, error: BaseException, delay: float | None, code: int, may_sleep: bool
    ) -> None:
        """Check the core's decision for a failed attempt and update the model."""
        retryable = isinstance(error, Exception) and not isinstance(error, TaskCancelledError)
        wants_retry = retryable and r.attempts <= r.retries
        assert (delay is not None) == wants_retry, (error, r.attempts, r.retries, delay)
        if wants_retry and self.retries_allowed:
            assert delay is not None
            lo, hi = r.backoff * (1 - r.jitter), r.backoff * (1 + r.jitter)
            assert lo - EPS <= delay <= hi + EPS
            self.expect["retried"] += 1
            assert r.task.start == self.now + delay
            r.start = self.now + delay
            r.deadline = None
            r.promoted = False
            if may_sleep and r.mode is RetryMode.IMMEDIATE:
                assert code == SLEEP
                assert r.task.ctx is not None and r.task.ctx is not r.ctx
                assert r.task.ctx.attempt == r.attempts
                r.state = "sleeping"
                r.ctx = r.task.ctx
            else:
                assert code == REQUEUED
                assert r.task.ctx is None
                r.state = "waiting"
                r.ctx = None
            assert r.task.state is TaskState.RETRYING
            assert r.task.error is error
            return
        assert code == DONE
        terminal = "timed_out" if isinstance(error, TaskTimeoutError) else "failed"
        self.terminate(r, terminal)
        assert r.task.error is error
        assert r.task.value is None

    # -- rules -----------------------------------------------------------------------

    def submit_spec(self, spec: Spec) -> None:
        start = None if spec.delay is None else self.now + spec.delay
        t = make_task(
            spec.tid,
            priority=spec.priority,
            start=start,
            retries=spec.retries,
            backoff=FixedBackoff(spec.backoff),
            jitter=spec.jitter,
            mode=spec.mode,
            ttl=spec.ttl,
            timeout=spec.timeout,
        )
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
        eff_start = self.now if start is None else start
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
                retries=spec.retries,
                backoff=spec.backoff,
                jitter=spec.jitter,
                mode=spec.mode,
                ttl=spec.ttl,
                timeout=spec.timeout,
                promoted=due,
            )
        )

    @initialize(specs=st.lists(SPECS, min_size=1, max_size=6))
    def seed(self, specs: list[Spec]) -> None:
        for spec in specs:
            self.submit_spec(spec)

    @rule(spec=SPECS)
    def submit(self, spec: Spec) -> None:
        self.submit_spec(spec)

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]))
    def advance(self, dt: float) -> None:
        """The clock moves on and the timekeeper expires overdue attempts."""
        self.now += dt
        self.expire()

    @precondition(lambda self: any(r.state == "waiting" for r in self.recs))
    @rule()
    def start(self) -> None:
        """A worker pops the best due task (the model's choice) and starts it."""
        for r in self.by_state("waiting"):
            if r.start <= self.now:
                r.promoted = True
        due = [r for r in self.by_state("waiting") if r.promoted]
        t = self.s.pop(self.now)
        if not due:
            assert t is None, f"popped {t!r} but nothing is due at {self.now}"
            return
        best = min(due, key=Rec.key)
        assert t is best.task, f"popped {t!r}, model chose {best.tid} of {[x.tid for x in due]}"
        assert best.start <= self.now
        best.state = "running"
        best.attempts += 1
        assert t.state is TaskState.RUNNING
        assert t.attempts == best.attempts
        assert t.started_at == self.now
        ctx = t.ctx
        assert ctx is not None and ctx.task_id == best.tid
        assert ctx.attempt == best.attempts - 1
        assert ctx.reason is None
        best.ctx = ctx
        best.deadline = None if best.timeout is None else self.now + best.timeout
        assert ctx.deadline == best.deadline
        # Right after a pop every due task has been promoted: exact gauges.
        assert self.s.queued == len([r for r in self.by_state("waiting") if r.promoted])
        not_due = [r for r in self.by_state("waiting") if not r.promoted]
        assert self.s.delayed == len(not_due) + len(self.by_state("sleeping"))

    @precondition(lambda self: any(r.state == "running" for r in self.recs))
    @rule(
        pick=st.integers(0, 100),
        outcome=st.sampled_from(
            ["ok", "ok", "boom", "boom", "kbd", "cancelled_err", "timeout_err"]
        ),
    )
    def finish(self, pick: int, outcome: str) -> None:
        running = self.by_state("running")
        r = running[pick % len(running)]
        t, ctx = r.task, r.ctx
        assert ctx is not None and t.ctx is ctx
        if outcome == "ok":
            value = ("value", r.tid, r.attempts)
            assert self.s.finish(t, ctx, value, None, None, self.now) == DONE
            self.terminate(r, "succeeded")
            assert t.value == value
            assert t.error is None
            return
        error = make_error(outcome)
        delay = retry_delay(t, error, self.s.rng)
        code = self.s.finish(t, ctx, None, error, delay, self.now)
        self.after_failure(r, error, delay, code, may_sleep=True)

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
        r.ctx = new
        assert r.task.attempts == r.attempts
        assert r.task.started_at == self.now
        r.deadline = None if r.timeout is None else self.now + r.timeout
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
    @rule(pick=st.integers(0, 100))
    def settle(self, pick: int) -> None:
        """The timekeeper settles an expired attempt outside its lock."""
        detached = self.by_state("detached")
        r = detached[pick % len(detached)]
        ctx = r.ctx
        assert ctx is not None
        error = TaskTimeoutError(f"task {r.tid!r} attempt {ctx.attempt} timed out")
        delay = retry_delay(r.task, error, self.s.rng)
        code = self.s.fail_detached(ctx, error, delay, self.now)
        self.after_failure(r, error, delay, code, may_sleep=False)

    @precondition(lambda self: bool(self.stale))
    @rule(pick=st.integers(0, 100), ok=st.booleans())
    def late_return(self, pick: int, ok: bool) -> None:
        """An abandoned attempt returns or raises late: STALE, nothing changes."""
        r, ctx = self.stale.pop(pick % len(self.stale))
        before = (
            r.task.state,
            r.task.value,
            r.task.error,
            r.task.attempts,
            self.s.queued,
            self.s.delayed,
            self.s.running,
            self.s.succeeded,
            self.s.failed,
            self.s.retried,
        )
        if ok:
            code = self.s.finish(r.task, ctx, "late", None, None, self.now)
        else:
            code = self.s.finish(r.task, ctx, None, Boom("late"), 0.0, self.now)
        assert code == STALE
        if r.state != "detached":
            code = self.s.fail_detached(ctx, TaskTimeoutError("late"), 0.0, self.now)
            assert code == STALE
        after = (
            r.task.state,
            r.task.value,
            r.task.error,
            r.task.attempts,
            self.s.queued,
            self.s.delayed,
            self.s.running,
            self.s.succeeded,
            self.s.failed,
            self.s.retried,
        )
        assert after == before

    @precondition(lambda self: bool(self.recs))
    @rule(pick=st.integers(0, 100), live_only=st.booleans(), and_cancel=st.booleans())
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
        self.terminate(r, "cancelled")
        assert isinstance(r.task.error, TaskCancelledError)
        assert r.task.value is None

    @precondition(lambda self: self.retries_allowed and self.steps >= 30)
    @rule(running=st.booleans())
    def shutdown(self, running: bool) -> None:
        """Stop: no more retries; cancel what has not started (and maybe what runs)."""
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
            assert r.attempts <= r.retries + 1
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
TestScheduler = SchedulerMachine.TestCase
