"""The encoding layer of durable tasks: clock conversions, a row's JSON text, decoding.

``encode`` makes each row's JSON text part by part (a fixed part once per task, the
changing part per row) and hands it to the store in ``Row.text``, which the store
writes as it is. These tests pin that the text is always the JSON of the row's doc
(so the file format is the one a whole-doc encoding gives), byte for byte for a
known task, on real clusters with a real SQLite file; and that what a restart decodes
shares what it can.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cluster import (
    Cluster,
    ClusterError,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    SQLiteStore,
    StoreWriteError,
    TaskState,
    _durable,
    _store,
)
from cluster._clock import SystemClock
from cluster._durable import decode_doc, encode
from cluster._store import Row, Ticket, _encode
from cluster.testing import FakeClock

START = datetime(2030, 1, 1, tzinfo=UTC)  # epoch 1893456000.0: exact in a float
WAIT = 10.0


class RecordingStore(SQLiteStore):
    """A real store that keeps every row the cluster hands it, to check their text."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rows: list[Row] = []
        self._rows_lock = threading.Lock()

    def enqueue(self, changes: Any) -> Ticket:
        with self._rows_lock:
            self.rows.extend(change for change in changes if isinstance(change, Row))
        return super().enqueue(changes)

    def write(self, puts: Any = (), deletes: Any = (), meta: Any = None) -> None:
        with self._rows_lock:
            self.rows.extend(puts)
        super().write(puts, deletes, meta)


def stored(path: Path) -> dict[str, tuple[str, str]]:
    """id -> (state, doc text) as the file holds them."""
    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=WAIT)
    try:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, state, doc FROM task")}
    finally:
        conn.close()


@pytest.fixture
def clusters() -> Iterator[Callable[..., Cluster]]:
    """``open_cluster(store, **options)``: a cluster on ``store``, stopped at teardown."""
    made: list[Cluster] = []

    def open_cluster(store: Path | SQLiteStore, **options: Any) -> Cluster:
        c = Cluster(workers=2, store=store, **options)
        made.append(c)
        return c

    yield open_cluster
    for c in made:
        with contextlib.suppress(ClusterError):
            c.stop(timeout=WAIT, cancel_pending=True)


OpenCluster = Callable[..., Cluster]


def check_texts(rows: list[Row]) -> None:
    """Every row has a text, and it is the JSON of its doc: of the keys of its shared
    part (``Row.part``, the JSON of the doc's first keys) if it has one, else all."""
    assert rows
    for row in rows:
        assert row.text is not None, row
        if row.part is None:
            assert row.text == _encode(row.doc), row.id
            continue
        shared = json.loads(row.part)
        assert list(row.doc)[: len(shared)] == list(shared), row.id
        assert row.part == _encode({k: row.doc[k] for k in shared}), row.id
        assert row.text == _encode({k: v for k, v in row.doc.items() if k not in shared})


def add(a: int, b: int = 0) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def opaque() -> object:
    return {1, 2, 3}  # a set: not JSON


def nan() -> float:
    return math.nan  # JSON has no NaN


def echo(value: Any) -> Any:
    return value


class Unhashable:
    """A custom backoff that defines ``__eq__`` and so cannot be hashed."""

    def __call__(self, attempt: int) -> float:
        return 0.0

    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- the clock


def test_a_fake_clocks_epoch_is_its_start_plus_its_monotonic_seconds() -> None:
    clock = FakeClock(START)
    assert clock.to_epoch(0.0) == START.timestamp()
    assert clock.to_epoch(3600.0) == START.timestamp() + 3600.0
    clock.advance(90)
    assert clock.to_epoch(clock.monotonic()) == START.timestamp() + 90.0


def test_a_fake_clock_converts_whole_seconds_back_exactly() -> None:
    clock = FakeClock(START)
    for mono in (0.0, 1.0, 60.0, 86_400.0 * 365, -3600.0):
        assert clock.from_epoch(clock.to_epoch(mono)) == mono


def test_the_system_clocks_epoch_matches_its_dates() -> None:
    clock = SystemClock()
    mono = clock.monotonic()
    for at in (mono, mono + 3600.5, mono - 86_400.25):
        assert clock.to_epoch(at) == pytest.approx(clock.to_date(at).timestamp(), abs=1e-6)
        assert clock.from_epoch(clock.to_epoch(at)) == pytest.approx(at, abs=1e-6)


def test_epoch_seconds_have_no_datetime_range_limit() -> None:
    clock = SystemClock()
    far = clock.monotonic() + 1e12  # some 31,700 years: past datetime.max
    assert clock.to_epoch(far) > datetime.max.replace(tzinfo=UTC).timestamp()
    assert clock.from_epoch(clock.to_epoch(far)) == pytest.approx(far, rel=1e-12)


# ----------------------------------------------------------------------------- the text


def test_a_plain_tasks_row_is_byte_for_byte_the_format_2_doc(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, clock=FakeClock(START))
    c.register("add", add)
    h = c.add_task("add", 1, b=2).with_id("one").submit()
    c.add_task("add", 3).with_id("two").submit()  # (the same options: the same part)
    epoch = repr(START.timestamp())
    assert stored(path)[h.id] == (
        "pending",
        '{"v":2,"args":[1],"kwargs":{"b":2},"submitted":' + epoch + ',"start":' + epoch + "}",
    )  # (name, tags, key, priority, attempts, interrupts, counts: their defaults, left out)
    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=WAIT)
    try:
        parts = conn.execute("SELECT id, doc FROM part").fetchall()
        refs = dict(conn.execute("SELECT id, part FROM task").fetchall())
    finally:
        conn.close()
    assert parts == [
        (
            1,
            '{"type":"add","executor":"threads","opts":{"timeout":null,"retries":0,'
            '"backoff":{"kind":"fixed","delay":0.0},"jitter":0.0,"mode":"requeue","rules":[],'
            '"ttl":null,"repeat":null}}',
        )
    ]
    assert refs == {"one": 1, "two": 1}


def test_every_row_of_a_run_to_success_is_the_json_of_its_doc(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    store = RecordingStore(tmp_path / "t.db")
    c = clusters(store)
    c.register("add", add)
    c.run()
    h = c.add_task("add", 2, b=3).with_priority(7).with_tags("x", "é").with_cache(3600).submit()
    assert h.result(timeout=WAIT) == 5
    check_texts(store.rows)
    assert [row.state for row in store.rows] == ["pending", "running", "succeeded"]
    last = store.rows[-1]
    assert last.doc["value"] == {"json": 5}
    assert list(last.doc)[-3:] == ["finished", "expires", "value"]
    assert stored(tmp_path / "t.db")[h.id] == ("succeeded", last.text)


@pytest.mark.parametrize(
    ("fn", "value"),
    [(opaque, {"unavailable": True}), (nan, {"unavailable": True}), (echo, {"json": [1, "a"]})],
)
def test_a_results_value_is_stored_as_json_or_as_unavailable(
    clusters: OpenCluster, tmp_path: Path, fn: Callable[..., Any], value: dict[str, Any]
) -> None:
    store = RecordingStore(tmp_path / "t.db")
    c = clusters(store)
    c.register("fn", fn)
    c.run()
    args = ([1, "a"],) if fn is echo else ()
    h = c.add_task("fn", *args).with_cache(60).submit()
    assert h.wait(WAIT) is not None
    check_texts(store.rows)
    assert store.rows[-1].doc["value"] == value
    assert json.loads(stored(tmp_path / "t.db")[h.id][1])["value"] == value


def test_rows_of_retries_rules_and_errors_are_the_json_of_their_docs(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    store = RecordingStore(tmp_path / "t.db")
    c = clusters(store)
    c.register("fail", fail)
    c.run()
    h = (
        c.add_task("fail", "boom")
        .with_retry(2)
        .with_backoff(ExponentialBackoff(0.001, 2, max=0.01))
        .with_retry_rule(KeyError, retries=1, backoff=LinearBackoff(0.001, 0.001))
        .with_jitter(0.1)
        .with_timeout(30)
        .with_key("k")
        .submit()
    )
    result = h.wait(WAIT)
    assert result is not None
    assert isinstance(result.error, ValueError)
    check_texts(store.rows)
    states = [row.state for row in store.rows]
    assert "retrying" in states
    assert states[-1] in ("failed", "dead")
    retrying = next(row for row in store.rows if row.state == "retrying")
    assert retrying.doc["counts"] is not None
    assert retrying.doc["last_error"]["type"] == "builtins:ValueError"
    assert retrying.doc["opts"]["backoff"]["kind"] == "exponential"
    assert retrying.doc["opts"]["rules"][0]["errors"] == ["builtins:KeyError"]


def test_rows_of_a_cancelled_task_and_a_dead_letter_are_the_json_of_their_docs(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    store = RecordingStore(tmp_path / "t.db")
    c = clusters(store)
    c.register("add", add)
    c.register("fail", fail)
    delayed = c.add_task("add", 1).with_delay(3600).with_cache(60).submit()  # cached: a row
    assert delayed.cancel()
    c.run()
    failed = c.add_task("fail", "x").submit()
    assert failed.wait(WAIT) is not None
    check_texts(store.rows)
    by_state = {row.state: row for row in store.rows}
    assert by_state["cancelled"].doc["cancelled"] is not None
    assert by_state["dead"].id.endswith(failed.id)
    assert by_state["dead"].doc["error"]["type"] == "builtins:ValueError"


def test_rows_of_a_repeating_series_are_the_json_of_their_docs(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    store = RecordingStore(tmp_path / "t.db")
    clock = FakeClock(START)
    c = clusters(store, clock=clock)
    c.register("add", add)
    c.run()
    h = c.add_task("add", 1).repeat(every=60, count=2).submit()
    clock.advance(60)
    c.wait_idle(WAIT)
    clock.advance(60)
    c.wait_idle(WAIT)
    assert h.wait(WAIT)
    check_texts(store.rows)
    series = [row.doc["series"] for row in store.rows if "series" in row.doc]
    assert series
    assert series[0]["first"] == START.timestamp()
    assert store.rows[0].doc["opts"]["repeat"]["every"] == 60.0


def test_options_shared_by_tasks_are_encoded_the_same_as_their_own(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    store = RecordingStore(tmp_path / "t.db")
    c = clusters(store)
    c.register("add", add)
    same = [c.add_task("add", i).with_retry(3).with_timeout(5).submit() for i in range(3)]
    other = c.add_task("add", 9).with_retry(3).with_timeout(5.5).submit()
    custom = c.add_task("add", 8).with_retry(1).with_backoff(lambda n: 0.0).submit()
    unhashable = c.add_task("add", 7).with_retry(1).with_backoff(Unhashable()).submit()
    check_texts(store.rows)
    docs = {row.id: row.doc for row in store.rows}
    assert all(docs[h.id]["opts"] == docs[same[0].id]["opts"] for h in same)
    assert docs[other.id]["opts"]["timeout"] == 5.5
    assert docs[custom.id]["opts"]["backoff"] == {"kind": "custom"}
    assert docs[unhashable.id]["opts"]["backoff"] == {"kind": "custom"}


def test_arguments_made_unserializable_after_add_task_fail_the_submit(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    c = clusters(tmp_path / "t.db")
    c.register("echo", echo)
    value: list[Any] = [1]
    builder = c.add_task("echo", value)
    value.append({1, 2})  # not JSON any more: the store's own encoding refuses it
    with pytest.raises(StoreWriteError, match="not JSON-serializable"):
        builder.submit()
    assert c.add_task("echo", [2]).submit().id  # the store works on
    assert len(stored(tmp_path / "t.db")) == 1


def test_a_row_with_text_is_written_as_that_text(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "t.db") as store:
        store.write([Row("a", 1, "pending", {"x": 1}, '{"x":1}')])
        assert store.load().rows == [Row("a", 1, "pending", {"x": 1})]
        with pytest.raises(TypeError, match=r"puts\[0\]\.text must be a str"):
            store.write([Row("b", 2, "pending", {}, b"{}")])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- decoding


def stored_rows(path: Path, build: Callable[[Cluster], None]) -> list[Row]:
    """The rows a cluster on ``path`` stores for what ``build`` submits (types: add)."""
    c = Cluster(store=path)
    try:
        c.register("add", add)
        build(c)
    finally:
        c.stop(timeout=WAIT, cancel_pending=True)  # (durable rows stay as they stand)
    with SQLiteStore(path) as store:
        return store.load().rows


def test_recovered_tasks_share_their_backoff_strategies(tmp_path: Path) -> None:
    def build(c: Cluster) -> None:
        for i in range(3):
            c.add_task("add", i).with_delay(3600).submit()
        c.add_task("add", 9).with_delay(3600).with_backoff(FixedBackoff(2)).submit()

    rows = stored_rows(tmp_path / "t.db", build)
    lanes = {"threads": object()}
    tasks = [decode_doc(row, {"add": add}, SystemClock(), lanes) for row in rows]
    first = tasks[0].opts.backoff
    assert isinstance(first, FixedBackoff)
    assert first.delay == 0.0
    assert all(t.opts.backoff is first for t in tasks[:3])
    last = tasks[3].opts.backoff
    assert isinstance(last, FixedBackoff)
    assert last.delay == 2.0


def test_a_stored_backoff_of_the_wrong_type_is_still_refused(tmp_path: Path) -> None:
    def build(c: Cluster) -> None:
        c.add_task("add", 1).with_delay(3600).submit()

    (row,) = stored_rows(tmp_path / "t.db", build)
    lanes = {"threads": object()}
    clock = SystemClock()
    decode_doc(row, {"add": add}, clock, lanes)  # FixedBackoff(0.0) is kept for others
    for bad in (False, "0"):
        doc = json.loads(json.dumps(row.doc))
        doc["opts"]["backoff"]["delay"] = bad
        with pytest.raises(ValueError, match="delay must be seconds"):
            decode_doc(Row(row.id, row.seq, row.state, doc), {"add": add}, clock, lanes)


def test_stored_times_come_back_on_a_fake_clock_with_the_same_start(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    c = clusters(path, clock=FakeClock(START))
    c.register("add", add)
    h = c.add_task("add", 1).with_delay(90).submit()
    c.stop(timeout=WAIT, cancel_pending=True)  # (durable rows stay as they stand)
    again = clusters(path, clock=FakeClock(START))
    again.register("add", add)
    again.run()
    info = again.info(h.id)
    assert info.start_at == datetime.fromtimestamp(START.timestamp() + 90, UTC)
    assert info.submitted_at == START


# ----------------------------------------------------------------------------- format 1 files


def v1_doc(args: list[Any], opts: str, state_keys: str, epoch: str) -> str:
    """A doc as format 1 wrote it: every key in the row, name, tags and key in opts."""
    return (
        f'{{"v":1,"type":"add","args":{json.dumps(args)},"kwargs":{{}},"submitted":{epoch},'
        f'"executor":"threads","opts":{{{opts}}},{state_keys}}}'
    )


def test_a_store_written_in_format_1_opens_and_its_tasks_come_back(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    epoch = repr(START.timestamp() - 10)
    plain = (
        '"timeout":null,"retries":0,"backoff":{"kind":"fixed","delay":0.0},"jitter":0.0,'
        '"mode":"requeue","rules":[],"ttl":3600.0,"name":"add","tags":["t"],"key":"k1",'
        '"repeat":null'
    )
    retried = plain.replace('"retries":0', '"retries":2').replace('"k1"', "null")
    rows = [
        (
            "one",
            1,
            "pending",
            v1_doc(
                [1, 2],
                plain,
                f'"priority":5,"start":{epoch},"attempts":0,"interrupts":0,"counts":null',
                epoch,
            ),
        ),
        (
            "two",
            2,
            "running",
            v1_doc(
                [3, 4],
                retried,
                f'"priority":0,"start":{epoch},"attempts":1,"interrupts":0,"counts":null',
                epoch,
            ),
        ),
    ]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in _store._SCHEMA_V1:
            conn.execute(statement)
        conn.executemany("INSERT INTO task VALUES (?, ?, ?, ?)", rows)
        conn.execute(f"PRAGMA application_id = {_store.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
    finally:
        conn.close()
    c = clusters(path, clock=FakeClock(START))
    c.register("add", add)
    c.run()
    assert c.wait_idle(WAIT)
    one, two = c.info("one"), c.info("two")
    assert (one.priority, one.name, one.tags, one.key) == (5, "add", ("t",), "k1")
    assert (one.state, one.value, one.attempts) == (TaskState.SUCCEEDED, 3, 1)
    # It was running: interrupted, then retried (the interrupted attempt counts).
    assert (two.state, two.value, two.attempts) == (TaskState.SUCCEEDED, 7, 2)
    assert c.unrecovered == []
    c.stop(timeout=WAIT)
    # The rows it wrote since are of format 2; reopened, everything reads back.
    c2 = clusters(path, clock=FakeClock(START))
    c2.register("add", add)
    c2.run()
    assert (c2.info("one").value, c2.info("two").value) == (3, 7)
    assert c2.info("one").key == "k1" and c2.unrecovered == []


def test_the_rows_of_a_submit_all_are_those_encode_makes(
    clusters: OpenCluster, tmp_path: Path
) -> None:
    # submit_all encodes its tasks' rows in one pass (encode_submitted): each must be
    # the row encode() makes of the same task, text, part and doc alike.
    store = RecordingStore(tmp_path / "t.db")
    clock = FakeClock(START)
    c = clusters(store, clock=clock)
    c.register("add", add)
    c.register("echo", echo)
    builders = [
        c.add_task("add", 1),
        c.add_task("add", 1, b=2).with_priority(3),
        c.add_task("add", a=1).with_priority(-2).with_delay(60),
        c.add_task("echo", {"x": [1, "é"]}).with_name("custom name"),
        c.add_task("echo", 1).with_tags("t").with_key("k"),  # (through encode itself)
        c.add_task("echo", 2).with_retry(3).with_backoff(ExponentialBackoff(1.0)).with_timeout(5),
        c.add_task("add", 4).with_id("given").with_cache(60),
    ]
    handles = c.submit_all(builders)
    rows = {row.id: row for row in store.rows}
    assert len(rows) == len(builders)
    check_texts(list(rows.values()))
    for h in handles:
        task = h._task
        spec = task.opts.durable
        assert spec is not None
        spec.static = spec.prefix = spec.part = None  # made afresh by encode
        again = encode(task, c._rt.clock)
        row = rows[h.id]
        assert (row.id, row.seq, row.state) == (again.id, again.seq, again.state)
        assert (row.text, row.part, row.doc) == (again.text, again.part, again.doc), h.id
        assert list(row.doc) == list(again.doc)


def test_a_plain_row_decodes_the_same_through_the_shortcut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows that share a part and have only the plain keys are decoded by a shortcut
    # (_decode_plain, with decode_doc's cache); it must make the task the long way does.
    def build(c: Cluster) -> None:
        for _ in range(3):
            c.add_task("add").with_delay(3600).with_retry(2).submit()
        c.add_task("add", 7).with_delay(3600).submit()  # (not plain: arguments)
        c.add_task("add").with_priority(2).with_timeout(3).submit()

    rows = stored_rows(tmp_path / "t.db", build)
    assert sum(len(row.doc) == 6 for row in rows) >= 3
    lanes = {"threads": object()}
    clock = SystemClock()
    cache: dict[int, Any] = {}
    shortcut = _durable._decode_plain
    taken: list[object] = []

    def counted(*args: Any) -> Any:
        task = shortcut(*args)
        taken.append(task)
        return task

    monkeypatch.setattr(_durable, "_decode_plain", counted)
    fast = [decode_doc(row, {"add": add}, clock, lanes, cache) for row in rows]
    assert sum(task is not None for task in taken) == 2  # (the first of the part: the long way)
    monkeypatch.undo()
    slow = [decode_doc(row, {"add": add}, clock, lanes) for row in rows]
    slots = [name for name in type(fast[0].opts).__slots__ if name != "durable"]
    for a, b in zip(fast, slow, strict=True):
        assert (a.id, a.seq, a.priority, a.start, a.submitted_at, a.attempts, a.state) == (
            b.id, b.seq, b.priority, b.start, b.submitted_at, b.attempts, b.state
        )  # fmt: skip
        assert (a.fn, a.args, a.kwargs, a.lane, a.finished_at) == (
            b.fn, b.args, b.kwargs, b.lane, b.finished_at
        )  # fmt: skip
        for name in slots:
            x, y = getattr(a.opts, name), getattr(b.opts, name)
            assert x == y or (name == "backoff" and type(x) is type(y)), name
        da, db = a.opts.durable, b.opts.durable
        assert da is not None and db is not None
        assert (da.kind, da.args, da.kwargs, da.interrupts, da.recorded) == (
            db.kind, db.args, db.kwargs, db.interrupts, db.recorded
        )  # fmt: skip
