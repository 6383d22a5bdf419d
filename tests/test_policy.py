"""SPEC §3 and §10 on the pure retry decision: ``RetryPolicy.decide`` and ``applied``.

No threads, no clock: a failure is an exception object, the counts are a value,
and the random draws come from a seeded ``random.Random``.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import (
    UNLIMITED,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    RetryAfter,
    StopRetrying,
    TaskCancelledError,
    TaskTimeoutError,
)
from cluster._policy import (
    DEFAULT,
    NONE,
    Decision,
    RetryCounts,
    RetryPolicy,
    RetryRule,
    applied,
    make_rule,
)


class Net(Exception):
    """Matched by the first rule in most tests."""


class SubNet(Net):
    """A subclass of Net: rules match by isinstance."""


class Db(Exception):
    """Matched by the second rule in most tests."""


class Other(Exception):
    """Matched by no explicit rule: the default rule's."""


def rule(*errors: object, retries: object = 3, backoff: object = None) -> RetryRule:
    return make_rule(errors, retries, backoff)


@dataclass
class Run:
    """One task's failures fed through decide() and applied(), as the cluster will."""

    policy: RetryPolicy
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    counts: RetryCounts | None = None

    def fail(
        self, error: BaseException, *, reset: bool = False, stopping: bool = False
    ) -> Decision:
        decision = self.policy.decide(
            error, self.counts, self.rng, reset=reset, stopping=stopping, task_id="t"
        )
        self.counts = applied(self.counts, decision, len(self.policy.rules), reset=reset)
        return decision

    def delays(self, errors: list[BaseException]) -> list[float | None]:
        return [self.fail(e).delay for e in errors]


class Recorder:
    """A backoff that returns ``base + n`` and records each ``n`` it was called with."""

    def __init__(self, base: float = 0.0) -> None:
        self.base = base
        self.calls: list[int] = []

    def __call__(self, n: int) -> float:
        self.calls.append(n)
        return self.base + n


class Seen:
    """A retry_if predicate that answers ``answer`` and records what it was asked."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[BaseException] = []

    def __call__(self, error: BaseException) -> bool:
        self.asked.append(error)
        return self.answer


class FixedDraw(random.Random):
    """A Random whose every draw is ``value``: reaches the ends of the jitter range."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# -- make_rule: with_retry_rule's validation ---------------------------------------


def test_make_rule_keeps_classes_budget_and_backoff() -> None:
    backoff = FixedBackoff(2)
    r = rule(Net, Db, retries=5, backoff=backoff)
    assert r == RetryRule((Net, Db), 5, backoff)


def test_make_rule_default_backoff_is_none_meaning_the_tasks() -> None:
    assert rule(Net).backoff is None


def test_make_rule_accepts_unlimited_but_not_a_plain_minus_one() -> None:
    # SPEC §3 pins with_retry(-1) as a ValueError; only the UNLIMITED object means it.
    assert rule(Net, retries=UNLIMITED).retries is UNLIMITED
    with pytest.raises(ValueError, match="UNLIMITED"):
        rule(Net, retries=-1)


def test_make_rule_needs_at_least_one_error() -> None:
    with pytest.raises(TypeError, match="errors"):
        make_rule((), 3, None)


@pytest.mark.parametrize("bad", [Net("an instance"), "Net", 3, None, int, (Net, Db)])
def test_make_rule_rejects_what_is_not_an_exception_class(bad: object) -> None:
    with pytest.raises(TypeError, match="errors"):
        make_rule((Net, bad), 3, None)


@pytest.mark.parametrize(
    ("bad", "kind"),
    [(-2, ValueError), (True, TypeError), (1.5, TypeError), ("3", TypeError), (None, TypeError)],
)
def test_make_rule_checks_retries(bad: object, kind: type[Exception]) -> None:
    with pytest.raises(kind, match="retries"):
        make_rule((Net,), bad, None)


def test_make_rule_rejects_a_backoff_that_is_not_callable() -> None:
    with pytest.raises(TypeError, match="backoff"):
        make_rule((Net,), 3, 1.5)


def test_retry_rule_and_policy_are_immutable() -> None:
    r = rule(Net)
    with pytest.raises(AttributeError):
        r.retries = 9  # type: ignore[misc]
    p = RetryPolicy(retries=1, rules=(r,))
    with pytest.raises(AttributeError):
        p.retries = 9


def test_a_policy_survives_pickle_and_deepcopy() -> None:
    policy = RetryPolicy(
        retries=UNLIMITED,
        rules=(rule(Net, Db, retries=2, backoff=FixedBackoff(3)),),
        backoff=ExponentialBackoff(1, max=8),
        jitter=0.25,
    )
    for twin in (pickle.loads(pickle.dumps(policy)), copy.deepcopy(policy)):
        assert repr(twin) == repr(policy)
        counts, error = RetryCounts([1], 5), Net()
        assert twin.decide(error, counts, random.Random(4)) == policy.decide(
            error, counts, random.Random(4)
        )


# -- the default rule alone: with_retry(n) as before -------------------------------


def test_with_retry_n_retries_n_times_then_ends_with_the_error() -> None:
    run = Run(RetryPolicy(retries=3))
    errors = [Other(i) for i in range(4)]
    decisions = [run.fail(e) for e in errors]
    assert [d.delay for d in decisions] == [0.0, 0.0, 0.0, None]
    assert all(d.rule == DEFAULT for d in decisions)
    assert decisions[-1].error is errors[-1]


def test_backoff_gets_the_number_of_retries_so_far() -> None:
    backoff = Recorder(10.0)
    run = Run(RetryPolicy(retries=3, backoff=backoff))
    assert run.delays([Other(), Other(), Other(), Other()]) == [10.0, 11.0, 12.0, None]
    assert backoff.calls == [0, 1, 2]


def test_without_with_retry_or_rules_nothing_is_retried() -> None:
    error = Other()
    assert RetryPolicy(retries=None).decide(error, None, random.Random(0)) == Decision(
        None, DEFAULT, error
    )


def test_with_retry_zero_ends_at_the_first_failure() -> None:
    assert Run(RetryPolicy(retries=0)).fail(Other()).delay is None


def test_timeouts_are_retried_like_any_exception() -> None:
    assert Run(RetryPolicy(retries=1)).fail(TaskTimeoutError("t")).delay == 0.0


def test_decide_changes_neither_counts_nor_policy() -> None:
    policy = RetryPolicy(retries=5, rules=(rule(Net, retries=2),))
    counts = RetryCounts([1], 2)
    before = copy.deepcopy(counts)
    for error in (Net(), Other(), RetryAfter(1), StopRetrying()):
        policy.decide(error, counts, random.Random(0), reset=True)
    assert counts == before
    assert policy.rules == (rule(Net, retries=2),)


# -- jitter ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 1.0])
def test_jitter_factor_stays_within_one_plus_minus_ratio(ratio: float) -> None:
    policy = RetryPolicy(retries=1, backoff=FixedBackoff(10.0), jitter=ratio)
    rng = random.Random(7)
    delays = [policy.decide(Other(), None, rng).delay for _ in range(2000)]
    assert all(d is not None and 10 * (1 - ratio) <= d <= 10 * (1 + ratio) for d in delays)
    spread = max(d for d in delays if d is not None) - min(d for d in delays if d is not None)
    assert spread > 10 * ratio  # and it really varies, over most of the range


@pytest.mark.parametrize("draw", [0.0, 0.999999999])
def test_jitter_reaches_but_never_passes_the_ends_of_its_range(draw: float) -> None:
    policy = RetryPolicy(retries=1, backoff=FixedBackoff(10.0), jitter=0.5)
    delay = policy.decide(Other(), None, FixedDraw(draw)).delay
    assert delay is not None
    assert 5.0 <= delay <= 15.0
    assert delay == pytest.approx(5.0 if draw == 0 else 15.0, rel=1e-6)


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(retries=1, backoff=FixedBackoff(4.0), jitter=0.3)
    first = [policy.decide(Other(), None, random.Random(3)).delay for _ in range(3)]
    again = [policy.decide(Other(), None, random.Random(3)).delay for _ in range(3)]
    assert first == again


def test_no_jitter_gives_the_exact_backoff_and_draws_nothing() -> None:
    rng = random.Random(5)
    state = rng.getstate()
    assert RetryPolicy(retries=1, backoff=FixedBackoff(2.5)).decide(Other(), None, rng).delay == 2.5
    assert rng.getstate() == state


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_a_jittered_inf_stays_inf(draw: float) -> None:
    policy = RetryPolicy(retries=UNLIMITED, backoff=ExponentialBackoff(1), jitter=1.0)
    counts = RetryCounts([], 10**6)
    assert policy.decide(Other(), counts, FixedDraw(draw)).delay == math.inf


def test_jitter_applies_to_a_rules_own_backoff() -> None:
    policy = RetryPolicy(retries=None, rules=(rule(Net, backoff=FixedBackoff(100.0)),), jitter=0.5)
    assert policy.decide(Net(), None, FixedDraw(0.0)).delay == pytest.approx(50.0)


# -- retry_if ------------------------------------------------------------------------


def test_predicate_false_ends_the_task_with_its_error() -> None:
    error = Other()
    policy = RetryPolicy(retries=3, predicate=lambda e: not isinstance(e, Other))
    assert policy.decide(error, None, random.Random(0)) == Decision(None, DEFAULT, error)


def test_predicate_true_retries() -> None:
    policy = RetryPolicy(retries=3, predicate=lambda e: isinstance(e, Other))
    assert policy.decide(Other(), None, random.Random(0)).delay == 0.0


def test_predicate_is_not_asked_once_the_budget_is_spent() -> None:
    seen = Seen(True)
    run = Run(RetryPolicy(retries=1, predicate=seen))
    run.fail(Other())
    run.fail(Other())
    assert len(seen.asked) == 1


@pytest.mark.parametrize("raised", [RuntimeError("predicate exploded"), KeyboardInterrupt()])
def test_a_raising_predicate_counts_as_false_and_is_logged(
    raised: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    def predicate(e: BaseException) -> bool:
        raise raised

    error = Other()
    with caplog.at_level(logging.ERROR, logger="cluster"):
        decision = RetryPolicy(retries=3, predicate=predicate).decide(
            error, None, random.Random(0), task_id="pred-task"
        )
    assert decision == Decision(None, DEFAULT, error)
    records = [r for r in caplog.records if r.name == "cluster"]
    assert len(records) == 1
    assert "pred-task" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[1] is raised


def test_predicate_gates_rules_too() -> None:
    policy = RetryPolicy(
        retries=None, rules=(rule(Net, retries=5),), predicate=lambda e: "go" in str(e)
    )
    assert policy.decide(Net("go"), None, random.Random(0)).delay == 0.0
    refused = policy.decide(Net("stop"), None, random.Random(0))
    assert (refused.delay, refused.rule) == (None, 0)


# -- bad backoffs: logged, the retry kept with no delay --------------------------------


def _raising(n: int) -> float:
    raise RuntimeError("backoff exploded")


def _raising_base(n: int) -> float:
    raise SystemExit(3)


@pytest.mark.parametrize(
    "backoff",
    [
        _raising,
        _raising_base,
        lambda n: math.nan,
        lambda n: -1.0,
        lambda n: -math.inf,
        lambda n: "soon",
        lambda n: None,
    ],
    ids=["raises", "raises-base", "nan", "negative", "minus-inf", "str", "none"],
)
def test_a_bad_backoff_is_logged_and_retries_without_delay(
    backoff: Callable[[int], float], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cluster"):
        decision = RetryPolicy(retries=1, backoff=backoff, jitter=0.5).decide(
            Other(), None, random.Random(0), task_id="bad-backoff"
        )
    assert decision.delay == 0.0
    records = [r for r in caplog.records if r.name == "cluster"]
    assert len(records) == 1
    assert "bad-backoff" in records[0].getMessage()


def test_a_bad_rule_backoff_is_treated_the_same(caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(retries=None, rules=(rule(Net, backoff=_raising),))
    with caplog.at_level(logging.ERROR, logger="cluster"):
        assert policy.decide(Net(), None, random.Random(0)).delay == 0.0
    assert len([r for r in caplog.records if r.name == "cluster"]) == 1


def test_a_good_backoff_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cluster"):
        assert (
            RetryPolicy(retries=1, backoff=LinearBackoff(1, 1))
            .decide(Other(), None, random.Random(0))
            .delay
            == 1.0
        )
    assert [r for r in caplog.records if r.name == "cluster"] == []


def test_an_int_returning_backoff_gives_a_float() -> None:
    delay = RetryPolicy(retries=1, backoff=lambda n: 3).decide(Other(), None, random.Random(0))
    assert type(delay.delay) is float and delay.delay == 3.0


# -- final by kind ------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
def test_a_base_exception_is_final_even_with_a_rule_for_it(error: BaseException) -> None:
    policy = RetryPolicy(retries=UNLIMITED, rules=(rule(BaseException, retries=UNLIMITED),))
    assert policy.decide(error, None, random.Random(0)) == Decision(None, NONE, error)


def test_a_cancellation_is_final_even_with_a_rule_for_it() -> None:
    error = TaskCancelledError("cancelled")
    policy = RetryPolicy(retries=UNLIMITED, rules=(rule(TaskCancelledError, retries=5),))
    assert policy.decide(error, None, random.Random(0)) == Decision(None, NONE, error)


def test_final_decisions_count_nothing() -> None:
    run = Run(RetryPolicy(retries=2, rules=(rule(Net, retries=2),)))
    run.fail(KeyboardInterrupt())
    assert run.counts == RetryCounts([0], 0)


# -- StopRetrying -------------------------------------------------------------------


def test_stop_retrying_ends_with_its_cause_whatever_the_budget() -> None:
    cause = Net("down")
    try:
        raise StopRetrying() from cause
    except StopRetrying as e:
        stop = e
    policy = RetryPolicy(retries=UNLIMITED, rules=(rule(Net, retries=UNLIMITED),))
    assert policy.decide(stop, None, random.Random(0)) == Decision(None, NONE, cause)


def test_stop_retrying_without_a_cause_ends_with_itself() -> None:
    stop = StopRetrying()
    assert RetryPolicy(retries=9).decide(stop, None, random.Random(0)) == Decision(None, NONE, stop)


def test_stop_retrying_does_not_ask_the_predicate() -> None:
    seen = Seen(True)
    RetryPolicy(retries=9, predicate=seen).decide(StopRetrying(), None, random.Random(0))
    assert seen.asked == []


# -- RetryAfter ---------------------------------------------------------------------


def retry_after(delay: float | timedelta, cause: BaseException | None = None) -> RetryAfter:
    try:
        raise RetryAfter(delay) from cause
    except RetryAfter as e:
        return e


def test_retry_after_waits_exactly_its_delay_without_backoff_or_jitter() -> None:
    backoff = Recorder(100.0)
    policy = RetryPolicy(retries=3, backoff=backoff, jitter=1.0)
    error = retry_after(timedelta(seconds=2.5))
    assert policy.decide(error, None, FixedDraw(0.0)) == Decision(2.5, DEFAULT, error)
    assert backoff.calls == []


def test_retry_after_without_a_cause_uses_the_default_budget() -> None:
    run = Run(RetryPolicy(retries=2, rules=(rule(Net, retries=5),)))
    assert run.delays([retry_after(1), retry_after(1), retry_after(1)]) == [1.0, 1.0, None]
    assert run.counts == RetryCounts([0], 3)


def test_retry_after_uses_the_budget_of_the_rule_its_cause_matches() -> None:
    run = Run(RetryPolicy(retries=5, rules=(rule(Net, retries=1),)))
    first = run.fail(retry_after(3, Net()))
    assert (first.delay, first.rule) == (3.0, 0)
    cause = Net("again")
    second = run.fail(retry_after(3, cause))
    assert second == Decision(None, 0, cause)  # the rule's budget (1) is spent


def test_retry_after_whose_cause_matches_no_rule_uses_the_default_rule() -> None:
    decision = Run(RetryPolicy(retries=1, rules=(rule(Net),))).fail(retry_after(2, Other()))
    assert (decision.delay, decision.rule) == (2.0, DEFAULT)


def test_retry_after_whose_cause_matches_nothing_without_with_retry_is_final() -> None:
    cause = Other()
    decision = Run(RetryPolicy(retries=None, rules=(rule(Net),))).fail(retry_after(2, cause))
    assert decision == Decision(None, NONE, cause)


def test_retry_after_out_of_budget_ends_with_its_cause() -> None:
    cause = Other()
    assert Run(RetryPolicy(retries=0)).fail(retry_after(1, cause)) == Decision(None, DEFAULT, cause)


def test_retry_after_without_a_cause_out_of_budget_ends_with_itself() -> None:
    error = retry_after(1)
    assert Run(RetryPolicy(retries=None)).fail(error) == Decision(None, DEFAULT, error)


def test_retry_after_shows_its_cause_as_the_last_error() -> None:
    cause = Net()
    assert Run(RetryPolicy(retries=1)).fail(retry_after(1, cause)).error is cause


def test_the_predicate_sees_the_cause_of_a_retry_after_and_may_refuse() -> None:
    seen = Seen(False)
    cause = Net()
    policy = RetryPolicy(retries=3, predicate=seen)
    assert policy.decide(retry_after(1, cause), None, random.Random(0)) == Decision(
        None, DEFAULT, cause
    )
    assert seen.asked == [cause]


@pytest.mark.parametrize("cause", [KeyboardInterrupt(), TaskCancelledError("c")])
def test_retry_after_from_a_final_cause_is_final(cause: BaseException) -> None:
    policy = RetryPolicy(retries=UNLIMITED)
    assert policy.decide(retry_after(1, cause), None, random.Random(0)) == Decision(
        None, NONE, cause
    )


# -- explicit rules -----------------------------------------------------------------


def test_rules_are_tried_in_order_and_the_first_match_decides() -> None:
    policy = RetryPolicy(
        retries=None,
        rules=(rule(Db, retries=1), rule(SubNet, retries=1), rule(Net, retries=1)),
    )
    rng = random.Random(0)
    assert policy.decide(SubNet(), None, rng).rule == 1
    assert policy.decide(Net(), None, rng).rule == 2
    assert policy.decide(Db(), None, rng).rule == 0


def test_a_rule_matches_subclasses_and_any_of_its_errors() -> None:
    policy = RetryPolicy(retries=None, rules=(rule(Net, Db, retries=1),))
    assert policy.decide(SubNet(), None, random.Random(0)).rule == 0
    assert policy.decide(Db(), None, random.Random(0)).rule == 0


def test_each_rule_has_its_own_budget() -> None:
    run = Run(RetryPolicy(retries=None, rules=(rule(Net, retries=1), rule(Db, retries=2))))
    assert run.delays([Db(), Db(), Net()]) == [0.0, 0.0, 0.0]
    assert run.delays([Net()]) == [None]  # Net's one retry is spent; Db's did not use it


def test_failures_of_another_rule_do_not_restart_a_budget() -> None:
    run = Run(RetryPolicy(retries=None, rules=(rule(Net, retries=1), rule(Db, retries=9))))
    assert run.delays([Net(), Db(), Db(), Net()]) == [0.0, 0.0, 0.0, None]


def test_the_default_rule_takes_what_no_rule_matched_on_its_own_budget() -> None:
    run = Run(RetryPolicy(retries=1, rules=(rule(Net, retries=2),)))
    decisions = [run.fail(e) for e in (Other(), Net(), Net(), Other())]
    assert [(d.delay, d.rule) for d in decisions] == [
        (0.0, DEFAULT),
        (0.0, 0),
        (0.0, 0),
        (None, DEFAULT),
    ]


def test_with_rules_and_no_with_retry_an_unmatched_error_is_final() -> None:
    error = Other()
    policy = RetryPolicy(retries=None, rules=(rule(Net),))
    assert policy.decide(error, None, random.Random(0)) == Decision(None, NONE, error)
    assert policy.decide(Net(), None, random.Random(0)).delay == 0.0


def test_a_rule_with_zero_retries_makes_its_errors_final_before_the_default() -> None:
    error = Net()
    policy = RetryPolicy(retries=UNLIMITED, rules=(rule(Net, retries=0),))
    assert policy.decide(error, None, random.Random(0)) == Decision(None, 0, error)


def test_a_rule_without_backoff_uses_the_tasks_with_its_own_count() -> None:
    task_backoff = Recorder(10.0)
    run = Run(RetryPolicy(retries=5, rules=(rule(Net, retries=5),), backoff=task_backoff))
    assert run.delays([Other(), Other(), Net(), Other(), Net()]) == [10, 11, 10, 12, 11]
    assert task_backoff.calls == [0, 1, 0, 2, 1]


def test_a_rules_own_backoff_gets_that_rules_count() -> None:
    net_backoff = Recorder(100.0)
    run = Run(
        RetryPolicy(retries=None, rules=(rule(Db), rule(Net, retries=5, backoff=net_backoff)))
    )
    assert run.delays([Net(), Db(), Db(), Net()]) == [100.0, 0.0, 0.0, 101.0]
    assert net_backoff.calls == [0, 1]


# -- reset_backoff ------------------------------------------------------------------


def test_reset_makes_this_failure_the_first_of_its_rule() -> None:
    backoff = Recorder(0.0)
    run = Run(RetryPolicy(retries=2, backoff=backoff))
    assert run.delays([Other(), Other()]) == [0.0, 1.0]
    assert run.fail(Other(), reset=True).delay == 0.0  # the budget of 2 was spent
    assert backoff.calls == [0, 1, 0]
    assert run.delays([Other(), Other()]) == [1.0, None]


def test_reset_restarts_every_rules_count() -> None:
    run = Run(RetryPolicy(retries=1, rules=(rule(Net, retries=1), rule(Db, retries=1))))
    run.delays([Net(), Db(), Other()])
    assert run.counts == RetryCounts([1, 1], 1)
    assert run.fail(Net(), reset=True).delay == 0.0
    assert run.counts == RetryCounts([1, 0], 0)
    assert run.delays([Db(), Other()]) == [0.0, 0.0]


def test_reset_with_no_counts_yet_is_a_first_failure() -> None:
    run = Run(RetryPolicy(retries=1))
    assert run.fail(Other(), reset=True).delay == 0.0
    assert run.counts == RetryCounts([], 1)


# -- UNLIMITED and stopping ---------------------------------------------------------


@pytest.mark.parametrize("failures", [0, 10**6, 10**18])
def test_unlimited_retries_never_run_out(failures: int) -> None:
    policy = RetryPolicy(retries=UNLIMITED, backoff=ExponentialBackoff(1, max=60))
    decision = policy.decide(Other(), RetryCounts([], failures), random.Random(0))
    assert decision.delay == (1.0 if failures == 0 else 60.0)


def test_an_unlimited_default_does_not_retry_once_stopping() -> None:
    error = Other()
    policy = RetryPolicy(retries=UNLIMITED)
    assert policy.decide(error, None, random.Random(0), stopping=True) == Decision(
        None, DEFAULT, error
    )


def test_an_unlimited_rule_does_not_retry_once_stopping() -> None:
    policy = RetryPolicy(retries=3, rules=(rule(Net, retries=UNLIMITED),))
    assert policy.decide(Net(), None, random.Random(0), stopping=True).delay is None


def test_finite_budgets_are_still_used_while_stopping() -> None:
    policy = RetryPolicy(retries=3, rules=(rule(Net, retries=2),))
    assert policy.decide(Net(), None, random.Random(0), stopping=True).delay == 0.0
    assert policy.decide(Other(), None, random.Random(0), stopping=True).delay == 0.0


def test_an_unlimited_retry_after_does_not_retry_once_stopping() -> None:
    policy = RetryPolicy(retries=UNLIMITED)
    assert policy.decide(retry_after(1), None, random.Random(0), stopping=True).delay is None


# -- applied ------------------------------------------------------------------------


def test_applied_creates_counts_on_the_first_failure() -> None:
    decision = Decision(0.0, 1, Db())
    assert applied(None, decision, 3, reset=False) == RetryCounts([0, 1, 0], 0)


def test_applied_updates_the_counts_in_place() -> None:
    counts = RetryCounts([2, 0], 4)
    assert applied(counts, Decision(1.0, DEFAULT, Other()), 2, reset=False) is counts
    assert counts == RetryCounts([2, 0], 5)


def test_applied_counts_an_ending_decision_of_a_rule_but_not_a_final_kind() -> None:
    counts = RetryCounts([1], 0)
    applied(counts, Decision(None, 0, Net()), 1, reset=False)
    applied(counts, Decision(None, NONE, KeyboardInterrupt()), 1, reset=False)
    assert counts == RetryCounts([2], 0)


def test_applied_with_reset_zeroes_every_count_first() -> None:
    counts = RetryCounts([2, 5], 7)
    applied(counts, Decision(0.0, 1, Db()), 2, reset=True)
    assert counts == RetryCounts([0, 1], 0)


# -- strategies never overflow ------------------------------------------------------

HUGE = [10**6, 10**18, 10**400]


@pytest.mark.parametrize("attempt", HUGE)
@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (FixedBackoff(5), 5.0),
        (LinearBackoff(1, 2, max=30), 30.0),
        (LinearBackoff(7, 0), 7.0),
        (LinearBackoff(7, 0, max=3), 3.0),
        (ExponentialBackoff(1), math.inf),
        (ExponentialBackoff(1, max=60), 60.0),
        (ExponentialBackoff(0), 0.0),
        (ExponentialBackoff(0, max=60), 0.0),
        (ExponentialBackoff(5, multiplier=1.0), 5.0),
        (ExponentialBackoff(5, multiplier=1.0, max=2), 2.0),
        (ExponentialBackoff(1, multiplier=1e300), math.inf),
        (ExponentialBackoff(1, multiplier=1e300, max=3600), 3600.0),
        (ExponentialBackoff(1e-300, multiplier=2.0), math.inf),
        (ExponentialBackoff(2, max=0), 0.0),
    ],
    ids=repr,
)
def test_a_strategy_never_raises_for_a_large_attempt(
    strategy: Callable[[int], float], expected: float, attempt: int
) -> None:
    assert strategy(attempt) == expected


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(0, 1e6) | st.sampled_from([0.0, 1e-300, 1.0]),
    multiplier=st.floats(1.0, 1e3) | st.sampled_from([1.0, 2.0, 1e300]),
    cap=st.none() | st.floats(0, 1e9),
    attempt=st.integers(0, 3000),
)
def test_exponential_is_the_formula_capped_wherever_the_formula_is_a_float(
    base: float, multiplier: float, cap: float | None, attempt: int
) -> None:
    strategy = ExponentialBackoff(base, multiplier, max=cap)
    exact = True
    try:
        formula = base * multiplier**attempt
    except OverflowError:  # multiplier ** attempt alone is past float range
        exact = False
        try:
            formula = math.exp(math.log(base) + attempt * math.log(multiplier)) if base else 0.0
        except OverflowError:
            formula = math.inf
    expected = formula if cap is None else min(formula, cap)
    got = strategy(attempt)
    if exact:
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-9)
    assert strategy(attempt + 1) >= got  # and it never shrinks


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0, 1e6),
    step=st.floats(0, 1e6),
    cap=st.none() | st.floats(0, 1e9),
    attempt=st.integers(0, 10**6),
)
def test_linear_is_the_formula_capped(
    base: float, step: float, cap: float | None, attempt: int
) -> None:
    formula = base + step * attempt
    got = LinearBackoff(base, step, max=cap)(attempt)
    assert got == (formula if cap is None else min(formula, cap))


@pytest.mark.parametrize(
    "strategy", [FixedBackoff(1), LinearBackoff(1, 1, max=5), ExponentialBackoff(1, max=5)]
)
def test_strategies_are_immutable(strategy: object) -> None:
    # each caches where its cap starts: a changed field would leave that stale
    with pytest.raises(AttributeError, match="immutable"):
        strategy.max = 100  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "strategy",
    [FixedBackoff(2), LinearBackoff(1, 2, max=9), ExponentialBackoff(1, 3, max=50)],
    ids=repr,
)
def test_strategies_survive_pickle_and_deepcopy(strategy: Callable[[int], float]) -> None:
    for twin in (pickle.loads(pickle.dumps(strategy)), copy.deepcopy(strategy)):
        assert type(twin) is type(strategy)
        assert repr(twin) == repr(strategy)
        assert [twin(n) for n in (0, 1, 2, 3, 10**9)] == [strategy(n) for n in (0, 1, 2, 3, 10**9)]


def test_an_uncapped_linear_grows_without_raising_to_inf() -> None:
    strategy = LinearBackoff(1, 2)
    assert [strategy(n) for n in HUGE] == [2_000_001.0, 2e18 + 1, math.inf]


def test_the_first_retries_of_a_capped_exponential_are_exact() -> None:
    strategy = ExponentialBackoff(1, 2, max=60)
    assert [strategy(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


# -- a model of per-rule budgets -----------------------------------------------------

KINDS = ["net", "subnet", "db", "other", "after-net", "after-none", "stop", "interrupt"]
#: the rule each kind's error matches (DEFAULT: none of the two explicit rules)
RULE_OF = {"net": 0, "subnet": 0, "after-net": 0, "db": 1, "other": DEFAULT, "after-none": DEFAULT}


def make_error(kind: str) -> BaseException:
    if kind == "net":
        return Net()
    if kind == "subnet":
        return SubNet()
    if kind == "db":
        return Db()
    if kind == "other":
        return Other()
    if kind == "after-net":
        return retry_after(0.25, Net())
    if kind == "after-none":
        return retry_after(0.5)
    if kind == "stop":
        try:
            raise StopRetrying() from Db()
        except StopRetrying as e:
            return e
    return KeyboardInterrupt()


budgets = st.integers(0, 3) | st.just(UNLIMITED)


@settings(max_examples=400, deadline=None)
@given(
    net=budgets,
    db=budgets,
    default=st.none() | budgets,
    events=st.lists(st.tuples(st.sampled_from(KINDS), st.booleans(), st.booleans()), max_size=40),
)
def test_rule_budgets_match_a_reference_model(
    net: int, db: int, default: int | None, events: list[tuple[str, bool, bool]]
) -> None:
    # rule 0: Net with its own backoff 100 + n; rule 1: Db with the task's, 200 + n
    policy = RetryPolicy(
        retries=default,
        rules=(rule(Net, retries=net, backoff=lambda n: 100.0 + n), rule(Db, retries=db)),
        backoff=lambda n: 200.0 + n,
    )
    budget = {0: net, 1: db, DEFAULT: default}
    model: dict[int, int] = {0: 0, 1: 0, DEFAULT: 0}  # consecutive failures per rule
    run = Run(policy)
    for kind, reset, stopping in events:
        error = make_error(kind)
        got = run.fail(error, reset=reset, stopping=stopping)

        # the model's answer
        if reset:
            model = dict.fromkeys(model, 0)
        which = RULE_OF.get(kind, NONE)
        if which == DEFAULT and default is None:
            which = NONE
        if which == NONE:
            delay = None
        else:
            n, allowed = model[which], budget[which]
            model[which] += 1
            if allowed == UNLIMITED:
                retry = not stopping
            else:
                assert allowed is not None
                retry = n < allowed
            if not retry:
                delay = None
            elif kind.startswith("after"):
                delay = 0.25 if kind == "after-net" else 0.5
            else:
                delay = (100.0 if which == 0 else 200.0) + n
        assert (got.delay, got.rule) == (delay, which), (kind, reset, stopping)
        if isinstance(error, RetryAfter | StopRetrying) and error.__cause__ is not None:
            assert got.error is error.__cause__
        else:
            assert got.error is error
        assert run.counts == RetryCounts([model[0], model[1]], model[DEFAULT])
        if delay is None:  # the task ended: the next event is a new task
            run.counts = None
            model = dict.fromkeys(model, 0)
