"""SPEC §12 names, tags and listing with real worker threads.

``with_name``/``with_tags``/``with_key`` and what ``info()`` shows (default names
of functions, lambdas, bound methods, partials); ``tasks()``: live, cached and
dead-letter tasks, newest submission first, filtered by state (one or several),
name, tag and key, paged with ``limit``/``offset``; ``count_tasks()``; pages that
stay consistent while tasks finish between them; purged tasks not listed; the
lazily kept index after many tasks came and went; bad arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from _keys_helpers import WAIT, Clusters
from _semantics_tasks import eventually
from conftest import EventFactory

from cluster import Cluster, TaskHandle, TaskInfo, TaskNotFoundError, TaskState


@pytest.fixture
def clusters(new_event: EventFactory) -> Iterator[Clusters]:
    made = Clusters()
    yield made
    new_event.release_all()
    made.close()


def plain(x: int = 0) -> int:
    return x


def boom(x: int = 0) -> int:
    raise ValueError(f"boom {x}")


module_lambda = lambda: 1  # noqa: E731 - its __qualname__ is "<lambda>"


class Worker:
    def method(self) -> str:
        return "m"

    class Inner:
        def deep(self) -> str:
            return "d"

    def __call__(self) -> str:
        return "called"


def ids(infos: list[TaskInfo]) -> list[str]:
    return [i.id for i in infos]


def all_pages(c: Cluster, size: int, **filters: Any) -> list[str]:
    """Every page of ``tasks(**filters)``, concatenated."""
    out: list[str] = []
    offset = 0
    while True:
        page = c.tasks(limit=size, offset=offset, **filters)
        out += ids(page)
        if len(page) < size:
            return out
        offset += size


# ---------------------------------------------------------------- names, tags, keys in info()


@pytest.mark.parametrize(
    ("fn", "name"),
    [
        (plain, "plain"),
        (module_lambda, "<lambda>"),
        (Worker().method, "Worker.method"),
        (Worker.Inner().deep, "Worker.Inner.deep"),
        (functools.partial(plain, 3), "plain"),
        (functools.partial(functools.partial(plain), 3), "plain"),
        (functools.partial(Worker().method), "Worker.method"),
        (Worker(), "Worker"),
        (len, "len"),
    ],
    ids=[
        "function",
        "lambda",
        "bound",
        "nested-class",
        "partial",
        "partial2",
        "partial-method",
        "callable-object",
        "builtin",
    ],
)
def test_the_default_name_is_the_functions_qualname(clusters: Clusters, fn: Any, name: str) -> None:
    c = clusters.make(1, run=False)
    args = ("abc",) if fn is len else ()
    h = c.add_task(fn, *args).with_cache(60).submit()
    assert c.info(h.id).name == name
    c.run()
    h.result(WAIT)
    assert c.info(h.id).name == name  # also once its function was dropped
    assert [i.name for i in c.tasks()] == [name]


def test_a_local_lambdas_name_is_its_qualname(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    h = c.add_task(lambda: 1).submit()
    assert c.info(h.id).name == ("test_a_local_lambdas_name_is_its_qualname.<locals>.<lambda>")


def test_the_name_stays_once_the_task_ended_and_its_function_was_dropped(
    clusters: Clusters,
) -> None:
    c = clusters.make(1)
    h = c.add_task(functools.partial(plain, 1)).with_cache(60).submit()
    assert h.result(WAIT) == 1
    assert c.info(h.id).name == "plain"
    assert c.tasks()[0].name == "plain"


def test_with_name_with_tags_and_with_key_show_in_info(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    h = c.add_task(plain).with_name("report").with_tags("nightly", "eu").with_key("db").submit()
    info = c.info(h.id)
    assert (info.name, info.tags, info.key) == ("report", ("nightly", "eu"), "db")


def test_without_them_tags_are_empty_and_the_key_is_none(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    info = c.info(c.add_task(plain).submit().id)
    assert info.tags == () and info.key is None


def test_duplicate_tags_are_kept_once_in_first_seen_order(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    h = c.add_task(plain).with_tags("a", "b", "a").with_tags("c", "b", "d").submit()
    assert c.info(h.id).tags == ("a", "b", "c", "d")
    assert ids(c.tasks(tag="b")) == [h.id]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.with_name(""), ValueError),
        (lambda b: b.with_name(3), TypeError),
        (lambda b: b.with_name(None), TypeError),
        (lambda b: b.with_tags("ok", 3), TypeError),
        (lambda b: b.with_tags(b"bytes"), TypeError),
        (lambda b: b.with_key(""), ValueError),
        (lambda b: b.with_key(1), TypeError),
    ],
    ids=["empty-name", "int-name", "none-name", "int-tag", "bytes-tag", "empty-key", "int-key"],
)
def test_bad_names_tags_and_keys_are_refused_at_the_setter(
    clusters: Clusters, call: Any, error: type
) -> None:
    c = clusters.make(1, run=False)
    with pytest.raises(error, match=r"name|tag|key"):
        call(c.add_task(plain))


# ---------------------------------------------------------------- what tasks() lists


def test_tasks_lists_newest_submission_first(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    handles = [c.add_task(plain, i).submit() for i in range(10)]
    assert ids(c.tasks()) == [h.id for h in reversed(handles)]
    assert all(i.state is TaskState.PENDING for i in c.tasks())


def test_tasks_lists_live_cached_and_dead_letter_tasks_but_not_purged_ones(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(2)
    gate = new_event()
    cached = c.add_task(plain, 1).with_id("cached").with_cache(60).submit()
    purged = c.add_task(plain, 2).with_id("purged").submit()
    dead = c.add_task(boom).with_id("dead").submit()
    cancelled = c.add_task(plain).with_id("cancelled").with_delay(3600).submit()
    running = c.add_task(gate.wait, WAIT).with_id("running").submit()
    c.add_task(plain).with_id("delayed").with_delay(3600).submit()
    for h in (cached, purged, dead):
        h.wait(WAIT)
    assert cancelled.cancel()
    listed = {i.id: i.state for i in c.tasks()}
    assert listed == {
        "delayed": TaskState.DELAYED,
        "running": TaskState.RUNNING,
        "dead": TaskState.FAILED,
        "cached": TaskState.SUCCEEDED,
    }
    assert ids(c.tasks()) == ["delayed", "running", "dead", "cached"]
    assert c.count_tasks() == 4
    gate.set()
    assert running.result(WAIT) is True
    assert ids(c.tasks()) == ["delayed", "dead", "cached"]


def test_a_dead_letter_is_listed_with_its_error_and_state(clusters: Clusters) -> None:
    c = clusters.make(1)
    h = c.add_task(boom, 7).with_name("bad").with_tags("x").with_key("kk").submit()
    result = h.wait(WAIT)
    assert result is not None
    (info,) = c.tasks()
    assert (info.id, info.state, info.name, info.tags, info.key) == (
        h.id, TaskState.FAILED, "bad", ("x",), "kk"
    )  # fmt: skip
    assert info.error is result.error and info.attempts == 1


def test_tasks_filters_by_one_state_or_a_collection_of_states(
    clusters: Clusters, new_event: EventFactory
) -> None:
    c = clusters.make(1)
    gate = new_event()
    ok = c.add_task(plain).with_cache(60).submit()
    bad = c.add_task(boom).submit()
    ok.wait(WAIT)
    bad.wait(WAIT)
    running = c.add_task(gate.wait, WAIT).submit()
    queued = c.add_task(plain).submit()  # behind the running one (one worker)
    later = c.add_task(plain).with_delay(3600).submit()
    eventually(lambda: c.info(running.id).state is TaskState.RUNNING, "the running task")
    assert ids(c.tasks(state=TaskState.PENDING)) == [queued.id]
    assert ids(c.tasks(state=TaskState.DELAYED)) == [later.id]
    assert ids(c.tasks(state=TaskState.FAILED)) == [bad.id]
    assert ids(c.tasks(state=[TaskState.SUCCEEDED, TaskState.FAILED])) == [bad.id, ok.id]
    assert ids(c.tasks(state={TaskState.PENDING, TaskState.DELAYED, TaskState.RUNNING})) == [
        later.id, queued.id, running.id
    ]  # fmt: skip
    assert ids(c.tasks(state=(TaskState.FAILED,))) == [bad.id]
    assert c.tasks(state=frozenset()) == []
    assert c.tasks(state=TaskState.TIMED_OUT) == []
    assert c.count_tasks(state=[TaskState.SUCCEEDED, TaskState.FAILED]) == 2


def test_tasks_accepts_a_generator_of_states(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    h = c.add_task(plain).submit()
    assert ids(c.tasks(state=(s for s in [TaskState.PENDING]))) == [h.id]


def test_tasks_filters_by_name_tag_and_key_and_their_combinations(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)

    def add(name: str, tags: tuple[str, ...], key: str | None) -> str:
        b = c.add_task(plain).with_name(name).with_tags(*tags)
        if key is not None:
            b = b.with_key(key)
        return b.submit().id

    a = add("mail", ("eu", "hot"), "smtp")
    b = add("mail", ("us",), "smtp")
    d = add("report", ("eu",), None)
    e = add("report", ("eu", "hot"), "db")
    f = add("mail", ("eu",), None)
    assert ids(c.tasks(name="mail")) == [f, b, a]
    assert ids(c.tasks(tag="eu")) == [f, e, d, a]
    assert ids(c.tasks(key="smtp")) == [b, a]
    assert ids(c.tasks(name="mail", tag="eu")) == [f, a]
    assert ids(c.tasks(name="report", tag="hot", key="db")) == [e]
    assert ids(c.tasks(tag="hot", key="smtp")) == [a]
    assert ids(c.tasks(name="mail", state=TaskState.PENDING, tag="us")) == [b]
    assert c.tasks(name="nobody") == [] and c.tasks(tag="eu", key="nokey") == []
    assert c.tasks(name="report", key="smtp") == []
    assert c.count_tasks(name="mail") == 3 and c.count_tasks(tag="eu", name="report") == 2
    assert c.count_tasks(name="nobody") == 0


def test_the_default_name_is_a_filter_like_any_other(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    handles = [c.add_task(plain).submit() for _ in range(3)]
    c.add_task(boom).submit()
    assert ids(c.tasks(name="plain")) == [h.id for h in reversed(handles)]


# ---------------------------------------------------------------- paging


def test_pages_of_the_listing_concatenate_to_the_whole_list(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    handles = [c.add_task(plain).with_tags("even" if i % 2 == 0 else "odd").submit()
               for i in range(53)]  # fmt: skip
    everything = [h.id for h in reversed(handles)]
    assert ids(c.tasks(limit=1000)) == everything
    assert ids(c.tasks()) == everything[:100]
    for size in (1, 7, 10, 53, 60):
        assert all_pages(c, size) == everything
    evens = [h.id for i, h in enumerate(handles) if i % 2 == 0][::-1]
    for size in (1, 4, 27):
        assert all_pages(c, size, tag="even") == evens
        assert all_pages(c, size, tag="even", state=TaskState.PENDING) == evens
    assert c.count_tasks() == 53 and c.count_tasks(tag="even") == 27


def test_limit_zero_and_an_offset_past_the_end_give_empty_pages(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    for _ in range(5):
        c.add_task(plain).submit()
    assert c.tasks(limit=0) == []
    assert c.tasks(offset=5) == [] and c.tasks(offset=10**9) == []
    assert len(c.tasks(offset=4)) == 1
    assert c.tasks(limit=0, state=TaskState.PENDING) == []


def test_the_default_limit_is_a_hundred(clusters: Clusters) -> None:
    c = clusters.make(1, run=False)
    for _ in range(150):
        c.add_task(plain).submit()
    assert len(c.tasks()) == 100 and c.count_tasks() == 150


def test_pages_stay_consistent_while_cached_tasks_finish_between_them(
    clusters: Clusters, new_event: EventFactory
) -> None:
    # A finished task that stays held (cached, or a dead letter) keeps its place in
    # the listing, so pages read while tasks finish concatenate to the whole list:
    # no duplicate, no gap. Only states differ from page to page.
    c = clusters.make(4)
    gates = [new_event() for _ in range(40)]
    handles = [
        c.add_task(_wait_then, g, False).with_cache(60).submit()
        if i % 3
        else c.add_task(_wait_then, g, True).submit()  # fails: a dead letter, not cached
        for i, g in enumerate(gates)
    ]
    everything = [h.id for h in reversed(handles)]
    seen: list[str] = []
    for page in range(4):
        seen += ids(c.tasks(limit=10, offset=10 * page))
        for g in gates[10 * page : 10 * page + 10]:  # finish some before the next page
            g.set()
        for h in handles[10 * page : 10 * page + 10]:
            h.wait(WAIT)
    assert seen == everything
    assert all_pages(c, 10) == everything
    assert {i.state for i in c.tasks(limit=100)} == {TaskState.SUCCEEDED, TaskState.FAILED}


def test_pages_never_repeat_a_task_when_finished_tasks_leave_between_them(
    clusters: Clusters, new_event: EventFactory
) -> None:
    # Tasks that are not cached leave the listing when they finish: the entries after
    # them move up by as many places (offsets count what is held now), so a page read
    # later may skip that many tasks but never repeats one, and stays newest first.
    c = clusters.make(5, run=False)
    gates = [new_event() for _ in range(30)]
    handles = [
        c.add_task(_wait_then, g, False).with_priority(1 if i >= 25 else 0).submit()
        for i, g in enumerate(gates)
    ]
    seq = {h.id: n for n, h in enumerate(handles)}
    first = ids(c.tasks(limit=10))
    assert first == [h.id for h in reversed(handles)][:10]
    c.run()  # the 5 newest (priority 1) take the 5 workers
    for g, h in zip(gates[25:], handles[25:], strict=True):  # they end: all on page one
        g.set()
        assert h.result(WAIT) == "ok"
    second = ids(c.tasks(limit=10, offset=10))
    both = first + second
    assert len(set(both)) == len(both)
    assert [seq[i] for i in both] == sorted((seq[i] for i in both), reverse=True)
    assert second == [h.id for h in reversed(handles[:25])][10:20]  # moved up by 5


def _wait_then(gate: Any, fail: bool) -> str:
    if not gate.wait(WAIT):
        raise TimeoutError("gate never opened")
    if fail:
        raise ValueError("planned failure")
    return "ok"


# ---------------------------------------------------------------- the lazy index


def test_the_listing_is_right_after_many_tasks_came_and_went(clusters: Clusters) -> None:
    c = clusters.make(4, dead_letters=50)
    assert c.tasks() == []  # the index is built (and then kept lazily)
    order: dict[str, int] = {}  # id -> submission number
    round_of: dict[str, str] = {}
    kept: list[str] = []
    dead: list[str] = []
    for round_ in range(5):
        batch: list[TaskHandle[Any]] = []
        for i in range(200):
            fails = i % 10 == 3
            b = c.add_task(boom if fails else plain, i).with_tags(f"r{round_}")
            if i % 7 == 0:
                b = b.with_cache(600)
            h = b.submit()
            batch.append(h)
            order[h.id] = len(order)
            round_of[h.id] = f"r{round_}"
            if fails:
                dead.append(h.id)
            elif i % 7 == 0:
                kept.append(h.id)
        for h in batch:
            h.wait(WAIT)
        if round_ % 2:
            c.tasks(limit=3)  # read between rounds too (the catch-up has a log then)
    # dead_letters=50: the older ones were evicted (cached failures were kept: 7 | i
    # and 10 | i - 3 never hold together for i < 200 except i = 63, 133: listed as
    # cached tasks, and their dead letters count among the 50 newest)
    held = set(kept) | set(dead[-50:]) | {i for i in dead if order[i] % 200 % 7 == 0}
    expected = sorted(held, key=order.__getitem__, reverse=True)
    assert ids(c.tasks(limit=10_000)) == expected
    assert c.count_tasks() == len(expected)
    failed = ids(c.tasks(state=TaskState.FAILED, limit=10_000))
    assert failed == [i for i in expected if i in set(dead)]
    assert ids(c.tasks(tag="r4", limit=10_000)) == [i for i in expected if round_of[i] == "r4"]
    assert all_pages(c, 37) == expected


def test_the_listing_is_right_after_most_listed_tasks_left(clusters: Clusters) -> None:
    # Every task is listed while queued, then most of them finish and leave: the
    # index then has more removals to replay than entries left (it rebuilds).
    c = clusters.make(4, run=False)
    handles = []
    for i in range(300):
        b = c.add_task(boom if i % 50 == 0 else plain, i)
        handles.append((b.with_cache(600) if i % 30 == 0 else b).submit())
    assert ids(c.tasks(limit=1000)) == [h.id for h in reversed(handles)]
    c.run()
    for h in handles:
        h.wait(WAIT)
    held = [h.id for i, h in enumerate(handles) if i % 50 == 0 or i % 30 == 0]
    assert ids(c.tasks(limit=1000)) == held[::-1]
    more = [c.add_task(plain).with_cache(600).submit() for _ in range(3)]
    for h in more:
        h.wait(WAIT)
    assert ids(c.tasks(limit=1000)) == [h.id for h in reversed(more)] + held[::-1]
    assert all_pages(c, 9) == [h.id for h in reversed(more)] + held[::-1]


def test_an_expired_cached_task_leaves_the_listing_once_it_is_purged(
    clusters: Clusters,
) -> None:
    c, clock = clusters.fake(1)
    short = c.add_task(plain).with_cache(10).submit()
    long_ = c.add_task(plain).with_cache(100).submit()
    short.wait(WAIT)
    long_.wait(WAIT)
    assert ids(c.tasks()) == [long_.id, short.id]
    clock.advance(50)
    with pytest.raises(TaskNotFoundError):
        c.info(short.id)
    assert ids(c.tasks()) == [long_.id]
    clock.advance(60)
    with pytest.raises(TaskNotFoundError):
        c.subscribe(long_.id)
    assert c.tasks() == [] and c.count_tasks() == 0


def test_tasks_never_lists_a_result_whose_cache_time_has_passed(clusters: Clusters) -> None:
    c, clock = clusters.fake(1)
    for _ in range(20):
        h = c.add_task(plain).with_cache(10).submit()
        h.wait(WAIT)
        clock.advance(10)
        assert h.id not in ids(c.tasks()), "an expired cached result is still listed"
        assert c.count_tasks() == 0


def test_a_cached_task_that_failed_stays_listed_once_after_its_cache_expires(
    clusters: Clusters,
) -> None:
    # While cached it is listed as the task; once purged, as its dead letter.
    c, clock = clusters.fake(1)
    h = c.add_task(boom).with_cache(10).submit()
    h.wait(WAIT)
    assert [(i.id, i.state) for i in c.tasks()] == [(h.id, TaskState.FAILED)]
    clock.advance(20)
    assert [(i.id, i.state) for i in c.tasks()] == [(h.id, TaskState.FAILED)]
    assert c.count_tasks() == 1 and len(c.dead_letters()) == 1


def test_a_dead_letters_id_taken_again_lists_both_newest_first(clusters: Clusters) -> None:
    c = clusters.make(1)
    c.add_task(boom).with_id("job").submit().wait(WAIT)
    again = c.add_task(plain).with_id("job").with_delay(3600).submit()
    assert [(i.id, i.state) for i in c.tasks()] == [
        ("job", TaskState.DELAYED),
        ("job", TaskState.FAILED),
    ]
    again.cancel()
    assert [(i.id, i.state) for i in c.tasks()] == [("job", TaskState.FAILED)]


def test_cleared_and_evicted_dead_letters_leave_the_listing(clusters: Clusters) -> None:
    c = clusters.make(1, dead_letters=2)
    hs = [c.add_task(boom, i).submit() for i in range(3)]
    for h in hs:
        h.wait(WAIT)
    assert ids(c.tasks()) == [hs[2].id, hs[1].id]  # the oldest was evicted
    assert c.clear_dead_letters(hs[1].id) == 1
    assert ids(c.tasks()) == [hs[2].id]
    c.clear_dead_letters()
    assert c.tasks() == []


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"state": "pending"}, TypeError, "state"),
        ({"state": ["pending"]}, TypeError, "state"),
        ({"state": 3}, TypeError, "state"),
        ({"state": [TaskState.PENDING, None]}, TypeError, "state"),
        ({"limit": -1}, ValueError, "limit"),
        ({"limit": 1.5}, TypeError, "limit"),
        ({"limit": "10"}, TypeError, "limit"),
        ({"limit": True}, TypeError, "limit"),
        ({"offset": -1}, ValueError, "offset"),
        ({"offset": None}, TypeError, "offset"),
        ({"name": 3}, TypeError, "name"),
        ({"tag": ("a",)}, TypeError, "tag"),
        ({"key": b"k"}, TypeError, "key"),
    ],
)
def test_tasks_rejects_bad_arguments_naming_them(
    clusters: Clusters, kwargs: dict[str, Any], error: type, word: str
) -> None:
    c = clusters.make(1, run=False)
    with pytest.raises(error, match=word):
        c.tasks(**kwargs)
    if "limit" not in kwargs and "offset" not in kwargs:
        with pytest.raises(error, match=word):
            c.count_tasks(**kwargs)


# ------------------------------------------------------- a first listing of a big cluster


def test_a_first_listing_of_many_tasks_is_built_right(clusters: Clusters) -> None:
    # More tasks than LIST_BULK are indexed outside the lock, from a snapshot.
    c = clusters.make(2, dead_letters=100)
    failed = [c.add_task(boom, i).with_tags("bad").submit() for i in range(40)]
    for h in failed:
        assert h.wait(WAIT) is not None
    handles = []
    for i in range(12_000):
        b = c.add_task(plain, i).with_delay(3600).with_name(f"n{i % 7}").with_tags(f"t{i % 3}")
        handles.append((b.with_key(f"k{i % 5}") if i % 2 else b).submit())
    expected = [h.id for h in reversed(handles)] + [h.id for h in reversed(failed)]
    assert c.count_tasks() == len(expected)
    assert ids(c.tasks(limit=20_000)) == expected
    assert ids(c.tasks(name="n3", limit=20_000)) == [
        h.id for i, h in reversed(list(enumerate(handles))) if i % 7 == 3
    ]
    assert ids(c.tasks(tag="bad", limit=100)) == [h.id for h in reversed(failed)]
    assert c.count_tasks(key="k1") == sum(1 for i in range(12_000) if i % 2 and i % 5 == 1)
    assert all_pages(c, 997)[:2000] == expected[:2000]


def test_a_first_listing_while_tasks_finish_is_right_once_they_did(clusters: Clusters) -> None:
    # Tasks end (and leave) while the bulk index is built from its snapshot: their
    # removals are logged meanwhile, and replayed once it is installed.
    c = clusters.make(2, run=False)
    handles = []
    for i in range(20_000):
        b = c.add_task(plain, i)
        handles.append((b.with_cache(600) if i % 100 == 0 else b).submit())
    c.run()
    first = c.tasks(limit=50)  # built while the workers drain the queue
    assert len(first) == 50
    for h in handles:
        assert h.wait(WAIT) is not None
    kept = [h.id for i, h in enumerate(handles) if i % 100 == 0][::-1]
    assert ids(c.tasks(limit=1000)) == kept
    assert c.count_tasks() == len(kept)
