"""cluster._store: the SQLite journal of durable tasks, on real files and real processes.

Child processes run ``tests/_store_child.py`` and report through a pipe. Where a test
needs a commit to be in a known place (a batch shared by several callers, a close with a
write in flight) it holds the store's connection lock, and waits on the store's own
state rather than on time.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import gc
import hashlib
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _durable_helpers import read_only

from cluster import ClusterError, _store
from cluster._errors import StoreError, StoreLockedError, StoreWriteError
from cluster._store import APPLICATION_ID, FORMAT_VERSION, BadRow, Row, SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_store_child.py"
WAIT = 10.0


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def stores() -> Iterator[Callable[[Path], SQLiteStore]]:
    """``open_store(path)``: an open store, closed at teardown."""
    opened: list[SQLiteStore] = []

    def open_store(path: Path) -> SQLiteStore:
        store = SQLiteStore(path)
        store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


OpenStore = Callable[[Path], SQLiteStore]


#: A row's columns as raw SQL plants them (those of every format since version 1).
INSERT_V1 = "INSERT INTO task (id, seq, state, doc)"


def row(id_: str, seq: int = 0, state: str = "pending", **doc: Any) -> Row:
    return Row(id_, seq, state, doc)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of ``directory`` with the sha256 of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def ids(store: SQLiteStore) -> list[str]:
    return [r.id for r in store.load().rows]


def reopen_ids(path: Path) -> set[str]:
    store = SQLiteStore(path)
    store.open()
    try:
        return {r.id for r in store.load().rows}
    finally:
        store.close()


def child(mode: str, path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(path), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"child exited early with {proc.wait(WAIT)}"
    return line.strip()


def kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection that bypasses the store (to plant data or read it back)."""
    return sqlite3.connect(path, isolation_level=None)


def wait_for(cond: Callable[[], bool]) -> None:
    """Wait for state another thread is about to reach (not for time to pass)."""
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


# ------------------------------------------------------------------ round trip, order


def test_rows_and_meta_come_back_after_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    store.write(
        [row("a", 1, name="send", args=[1, "x"], start=1.5), row("b", 2, "running")],
        meta={"next_seq": 3, "epoch": {"n": 1}},
    )
    store.close()
    store = SQLiteStore(path)
    store.open()
    try:
        loaded = store.load()
        assert loaded.rows == [
            Row("a", 1, "pending", {"name": "send", "args": [1, "x"], "start": 1.5}),
            Row("b", 2, "running", {}),
        ]
        assert loaded.bad == [] and loaded.bad_meta == {}
        assert store.meta() == {"next_seq": 3, "epoch": {"n": 1}}
    finally:
        store.close()


def test_load_orders_rows_by_seq_then_id(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write([row("c", 5), row("z", 1), row("b", 5), row("a", 9), row("m", -3)])
    assert [(r.seq, r.id) for r in store.load().rows] == [
        (-3, "m"),
        (1, "z"),
        (5, "b"),
        (5, "c"),
        (9, "a"),
    ]


def test_a_later_write_of_an_id_replaces_the_row(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write([row("a", 1, v=1)])
    store.write([row("a", 7, "running", v=2)])
    assert store.load().rows == [Row("a", 7, "running", {"v": 2})]


def test_within_one_call_the_last_put_of_an_id_wins(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write([row("a", 1, v=1), row("b", 2), row("a", 3, v=3)])
    assert store.load().rows == [Row("b", 2, "pending", {}), Row("a", 3, "pending", {"v": 3})]


def test_deletes_remove_rows_and_ignore_unknown_ids(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write([row("a"), row("b"), row("c")])
    store.write(deletes=["b", "never-there"])
    store.write(puts=[row("d")], deletes=["a"])
    assert ids(store) == ["c", "d"]


def test_one_call_may_not_put_and_delete_the_same_id(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    with pytest.raises(ValueError, match="deletes: id 'a' is also in puts"):
        store.write([row("a")], deletes=["a"])
    assert ids(store) == []


def test_one_threads_calls_apply_in_call_order(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    rng = random.Random(4)
    expected: dict[str, Row] = {}
    for n in range(300):
        id_ = f"k{rng.randrange(10)}"
        if rng.random() < 0.3:
            store.write(deletes=[id_])
            expected.pop(id_, None)
        else:
            expected[id_] = row(id_, n, v=n)
            store.write([expected[id_]])
    assert sorted(store.load().rows, key=lambda r: r.id) == sorted(
        expected.values(), key=lambda r: r.id
    )


def test_meta_none_deletes_a_key_and_set_meta_writes_through(
    stores: OpenStore, tmp_path: Path
) -> None:
    store = stores(tmp_path / "t.db")
    store.set_meta(a=1, b=[1, 2])
    store.write(meta={"a": None, "c": "x"})
    assert store.meta() == {"b": [1, 2], "c": "x"}
    store.meta()["b"].append(3)  # a fresh copy each time
    assert store.meta()["b"] == [1, 2]


def test_docs_read_back_as_json_values(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    doc = {
        "t": (1, 2),
        "text": "naïve ✓ \u2028 \x00",
        "big": 2**80,
        "f": 0.1,
        "neg": -0.0,
        "deep": {"a": [{"b": None}, True, False]},
    }
    store.write([Row("a", 0, "s", doc)])
    got = store.load().rows[0].doc
    assert got == {**doc, "t": [1, 2]}
    assert math.copysign(1, got["neg"]) == -1


def test_a_write_of_nothing_commits_nothing_and_returns(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write()
    store.write([], [], {})
    assert ids(store) == [] and store.meta() == {}


def test_load_leaves_the_collector_as_it_found_it(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write([row(f"r{i}", i) for i in range(100)])
    assert gc.isenabled()
    assert len(store.load().rows) == 100
    assert gc.isenabled()
    gc.disable()
    try:
        assert len(store.load().rows) == 100
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_recovery_pauses_the_collector_and_leaves_it_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster import Cluster
    from cluster._runtime import Runtime

    seen: list[bool] = []
    original = Runtime._recover_rows_unpaused

    def spy(self: Runtime, *args: Any) -> None:
        seen.append(gc.isenabled())
        original(self, *args)

    monkeypatch.setattr(Runtime, "_recover_rows_unpaused", spy)

    def noop() -> None:
        pass

    path = tmp_path / "t.db"
    c = Cluster(workers=1, store=path)
    c.register("noop", noop)
    c.submit_all([c.add_task("noop").with_delay(3600) for _ in range(50)])
    c.cancel()
    c.stop(timeout=WAIT)
    for enabled in (True, False):
        seen.clear()
        c = Cluster(workers=1, store=path)
        c.register("noop", noop)
        if not enabled:
            gc.disable()
        try:
            c.run()
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
            c.cancel()
            c.stop(timeout=WAIT)
        assert seen == [False]
        assert c.stats().cancelled == 50


def test_load_does_not_thaw_objects_the_program_froze(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    store.write([row("a")])
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        store.load()
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("puts", "error", "message"),
    [
        (["not a row"], TypeError, r"puts\[0\] must be a Row"),
        ([Row(1, 0, "s", {})], TypeError, r"puts\[0\]\.id must be a str"),  # type: ignore[arg-type]
        ([row("ok"), Row("a", True, "s", {})], TypeError, r"puts\[1\]\.seq must be an int"),
        ([Row("a", 2**63, "s", {})], ValueError, r"puts\[0\]\.seq must fit in 64 bits"),
        ([Row("a", 0, None, {})], TypeError, r"puts\[0\]\.state must be a str"),  # type: ignore[arg-type]
        ([Row("a", 0, "s", [])], TypeError, r"puts\[0\]\.doc must be a dict"),  # type: ignore[arg-type]
        ([row("a", f=object())], TypeError, r"puts\[0\]\.doc \(id 'a'\) is not JSON"),
        ([row("a", start=math.inf)], ValueError, r"puts\[0\]\.doc \(id 'a'\) cannot be stored"),
        ([row("a", x=math.nan)], ValueError, r"cannot be stored as JSON"),
        ([Row("a\ud800", 0, "s", {})], ValueError, r"puts\[0\]\.id is not valid text"),
        (row("a"), TypeError, r"puts must be a sequence of Row"),
    ],
    ids=[
        "not-a-row",
        "id-int",
        "seq-bool",
        "seq-huge",
        "state-none",
        "doc-list",
        "doc-object",
        "doc-inf",
        "doc-nan",
        "id-surrogate",
        "a-single-row",
    ],
)
def test_write_refuses_a_bad_row_naming_it_and_writes_nothing(
    stores: OpenStore, tmp_path: Path, puts: Any, error: type[Exception], message: str
) -> None:
    store = stores(tmp_path / "t.db")
    with pytest.raises(error, match=message):
        store.write(puts, meta={"m": 1})
    assert ids(store) == [] and store.meta() == {}


def test_a_circular_doc_is_refused(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    doc: dict[str, Any] = {}
    doc["self"] = doc
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        store.write([Row("a", 0, "s", doc)])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"deletes": "abc"}, TypeError, "deletes must be a sequence of ids"),
        ({"deletes": [1]}, TypeError, r"deletes\[0\] must be a str"),
        ({"meta": [("a", 1)]}, TypeError, "meta must be a mapping"),
        ({"meta": {1: 1}}, TypeError, "meta key must be a str"),
        ({"meta": {"a": {1, 2}}}, TypeError, r"meta\['a'\] is not JSON-serializable"),
        ({"meta": {"a": math.inf}}, ValueError, r"meta\['a'\] cannot be stored"),
    ],
    ids=["deletes-str", "deletes-int", "meta-list", "meta-key", "meta-set", "meta-inf"],
)
def test_write_refuses_bad_deletes_and_meta(
    stores: OpenStore, tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    store = stores(tmp_path / "t.db")
    with pytest.raises(error, match=message):
        store.write(**kwargs)


@pytest.mark.parametrize(
    ("path", "error"),
    [(5, TypeError), (b"x.db", TypeError), ("", ValueError), (":memory:", ValueError)],
    ids=["int", "bytes", "empty", "memory"],
)
def test_the_constructor_refuses_what_is_not_a_file_path(path: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="path"):
        SQLiteStore(path)


def test_the_constructor_only_remembers_the_path(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "t.db"))
    assert store.path == tmp_path / "t.db"
    assert list(tmp_path.iterdir()) == []


def test_using_a_store_that_is_not_open_raises_runtime_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    for call in (store.load, store.meta, lambda: store.write([row("a")])):
        with pytest.raises(RuntimeError, match="is not open"):
            call()
    store.close()  # nothing to do, no error


def test_a_missing_directory_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "t.db"
    with pytest.raises(StoreError, match=f"{path}.*does not exist"):
        SQLiteStore(path).open()


# ---------------------------------------------------------------- threads, group commit


@pytest.mark.timeout(60)
def test_eight_threads_writing_at_once_lose_nothing(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for n in range(150):
                rows = [row(f"{t}-{n}-{j}", n, t=t) for j in range(1 + n % 3)]
                rows.append(row(f"last-{t}", 0, n=n))  # every call upserts it again
                store.write(rows, meta={f"m{t}": n})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = {f"{t}-{n}-{j}" for t in range(8) for n in range(150) for j in range(1 + n % 3)}
    loaded = {r.id: r for r in store.load().rows}
    assert set(loaded) == expected | {f"last-{t}" for t in range(8)}
    assert all(loaded[f"last-{t}"].doc == {"n": 149} for t in range(8))
    assert store.meta() == {f"m{t}": 149 for t in range(8)}


class CountingStore(SQLiteStore):
    """Counts its commits (the transactions it runs)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits = 0

    def _commit(self, batch: _store._Batch) -> None:
        self.commits += 1
        super()._commit(batch)


def test_concurrent_callers_share_commits(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "t.db")
    store.open()
    try:
        start = threading.Barrier(8)

        def work(t: int) -> None:
            start.wait()
            for n in range(50):
                store.write([row(f"{t}-{n}")])

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(ids(store)) == 400
        assert store.commits <= 300, f"{store.commits} commits for 400 writes"
    finally:
        store.close()


def held_commits(store: SQLiteStore) -> _thread.LockType:
    """Hold the store's connection lock: a commit taken meanwhile waits inside it."""
    return store._db_lock


def batch_threads(store: SQLiteStore) -> int:
    """How many callers the batch waiting for the next commit holds."""
    with store._cond:
        batch = store._batch
        return 0 if batch is None else len(batch.threads)


def start(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_close_commits_the_writes_in_flight_first(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    with held_commits(store):
        first, first_errors = start(lambda: store.write([row("first")]))
        wait_for(lambda: store._committing)
        second, second_errors = start(lambda: store.write([row("second")]))
        wait_for(lambda: batch_threads(store) == 1)
        closer, closer_errors = start(store.close)
        wait_for(lambda: store._closing)
        with pytest.raises(RuntimeError, match="is closed"):
            store.write([row("too-late")])
    for thread in (first, second, closer):
        thread.join(WAIT)
    assert first_errors == second_errors == closer_errors == []
    assert reopen_ids(path) == {"first", "second"}


class ThreadRecordingStore(SQLiteStore):
    """Records the thread of each commit, and the number of callers in it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.committers: list[tuple[str, int]] = []

    def _commit(self, batch: _store._Batch) -> None:
        self.committers.append((threading.current_thread().name, len(batch.threads)))
        super()._commit(batch)


def test_a_lone_enqueue_is_committed_by_its_wait_in_the_callers_thread(tmp_path: Path) -> None:
    store = ThreadRecordingStore(tmp_path / "t.db")
    store.open()
    try:
        for n in range(20):
            encoded = n % 2 == 0
            doc = {"n": n}
            put = Row(f"r{n}", n, "pending", doc, _store.dumps(doc) if encoded else None)
            ticket = store.enqueue([put])
            assert not SQLiteStore.settled(ticket)
            store.wait(ticket)
            assert SQLiteStore.settled(ticket)
        me = threading.current_thread().name
        assert store.committers == [(me, 1)] * 20
        stored = [(r.id, r.doc) for r in store.load().rows]
        assert stored == [(f"r{n}", {"n": n}) for n in range(20)]
    finally:
        store.close()


def test_an_enqueue_nobody_waits_for_goes_with_the_next_commit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open()
    try:
        ticket = store.enqueue([row("handed"), "nothing-to-delete"])
        thread, errors = start(lambda: store.write([row("written")]))
        thread.join(WAIT)
        assert errors == []
        assert SQLiteStore.settled(ticket)
        store.wait(ticket)  # committed already: returns at once
        assert set(ids(store)) == {"handed", "written"}
    finally:
        store.close()


def test_close_commits_an_enqueue_nobody_waits_for(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    ticket = store.enqueue([row("handed")])
    store.close()
    assert SQLiteStore.settled(ticket)
    store.wait(ticket)
    assert reopen_ids(path) == {"handed"}


def test_close_waits_for_a_commit_in_a_callers_wait(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    ticket = store.enqueue([row("first")])
    with held_commits(store):
        waiter, waiter_errors = start(lambda: store.wait(ticket))
        wait_for(lambda: store._committing)  # the caller's wait() commits, held here
        second = store.enqueue([row("second")])  # into the next batch
        closer, closer_errors = start(store.close)
        wait_for(lambda: store._closing)
        with pytest.raises(RuntimeError, match="is closed"):
            store.enqueue([row("too-late")])
    for thread in (waiter, closer):
        thread.join(WAIT)
    assert waiter_errors == closer_errors == []
    assert SQLiteStore.settled(second)
    assert reopen_ids(path) == {"first", "second"}


def test_enqueues_from_several_threads_are_committed_by_the_writer(tmp_path: Path) -> None:
    """Once commits hold callers of several threads, an enqueue wakes the writer thread:
    its ticket is settled with nobody waiting."""
    store = ThreadRecordingStore(tmp_path / "t.db")
    store.open()
    try:
        first = store.enqueue([row("a")])
        other, errors = start(lambda: store.wait(store.enqueue([row("b")])))
        other.join(WAIT)  # (it may commit both, or wait for ours: nobody waits yet)
        if not SQLiteStore.settled(first):
            store.wait(first)
        assert errors == []
        if store.committers[-1][1] < 2:
            pytest.skip("the two callers did not share a commit")
        ticket = store.enqueue([row("c")])
        wait_for(lambda: SQLiteStore.settled(ticket))
        assert store.committers[-1][0].startswith("cluster-store-writer")
        assert set(ids(store)) == {"a", "b", "c"}
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_enqueue_and_wait_from_threads_with_writes_and_a_close_lose_nothing(
    tmp_path: Path,
) -> None:
    """Threads that enqueue then wait, alone for a while then all at once, with write()s
    among them and a close() at the end: every change that was waited for is in the file,
    every ticket is settled, and nothing is committed twice over another."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    acked: list[str] = []
    tickets: list[_store.Ticket] = []
    lock = threading.Lock()
    go = threading.Barrier(4)

    def work(t: int) -> None:
        rng = random.Random(t)
        if t:
            go.wait()
        for n in range(300):
            id_ = f"{t}-{n}"
            if t == 0 and n == 150:
                go.wait()  # alone until here: every commit in its own wait()
            if rng.random() < 0.2:
                store.write([row(id_)])
            else:
                ticket = store.enqueue([row(id_), f"{t}-{n - 1}-gone"])
                with lock:
                    tickets.append(ticket)
                if rng.random() < 0.9:
                    store.wait(ticket)
                else:
                    continue  # not waited for: the next commit, or close(), takes it
            with lock:
                acked.append(id_)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    store.close()
    assert all(SQLiteStore.settled(ticket) for ticket in tickets)
    assert all(ticket.batch.error is None for ticket in tickets)
    stored = reopen_ids(path)
    assert set(acked) <= stored
    assert stored == {f"{t}-{n}" for t in range(4) for n in range(300)}


def test_the_writer_is_a_daemon_thread_that_ends_at_close(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open()
    writer = store._writer
    assert writer is not None and writer.daemon and writer.is_alive()
    store.close()
    assert not writer.is_alive()
    store.close()  # idempotent


def test_a_closed_store_can_be_opened_again(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open()
    store.write([row("a")])
    store.close()
    store.open()
    try:
        with pytest.raises(RuntimeError, match="already open"):
            store.open()
        store.write([row("b")])
        assert ids(store) == ["a", "b"]
    finally:
        store.close()


# ----------------------------------------------------------------------- failing writes


def cap_size(store: SQLiteStore, extra_pages: int) -> None:
    """Let the database grow by ``extra_pages`` pages only (SQLITE_FULL beyond)."""
    with store._db_lock:
        assert store._conn is not None
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages + extra_pages}")


def uncap_size(store: SQLiteStore) -> None:
    with store._db_lock:
        assert store._conn is not None
        store._conn.execute("PRAGMA max_page_count = 4294967294")


def big(id_: str) -> Row:
    return row(id_, 0, pad="x" * 50_000)  # a dozen pages


def test_a_full_database_fails_the_batch_and_later_writes_work(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    try:
        store.write([row("kept")], meta={"m": 1})
        cap_size(store, 4)
        store.write([row("small")])  # fits
        with pytest.raises(StoreWriteError, match="commit failed") as info:
            store.write([big("big1"), row("with-big")], meta={"m": 2})
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert "full" in str(info.value.__cause__)
        assert info.value.path == str(path)
        assert ids(store) == ["kept", "small"]
        assert store.meta() == {"m": 1}
        uncap_size(store)
        store.write([big("big2")], meta={"m": 3})
        assert ids(store) == ["big2", "kept", "small"]
    finally:
        store.close()
    assert reopen_ids(path) == {"big2", "kept", "small"}


def test_a_failed_commit_raises_to_every_caller_in_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open()
    try:
        cap_size(store, 4)
        with held_commits(store):
            first, first_errors = start(lambda: store.write([row("first")]))
            wait_for(lambda: store._committing)
            callers = [start(functools.partial(store.write, [big(f"big{i}")])) for i in range(3)]
            wait_for(lambda: batch_threads(store) == 3)
        for thread, _ in [(first, first_errors), *callers]:
            thread.join(WAIT)
        assert first_errors == []
        for _, errors in callers:
            assert len(errors) == 1 and isinstance(errors[0], StoreWriteError)
        assert len({id(errors[0]) for _, errors in callers}) == 3  # one exception each
        assert ids(store) == ["first"]
        uncap_size(store)
        store.write([row("after")])
        assert ids(store) == ["after", "first"]
    finally:
        store.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only): a disk that really fills up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_write_and_room_made_lets_writes_work(tiny_fs: Path) -> None:
    path = tiny_fs / "t.db"
    store = SQLiteStore(path)
    store.open()
    try:
        store.write([row("kept")])
        ballast = tiny_fs / "ballast"
        with contextlib.suppress(OSError), open(ballast, "wb", buffering=0) as f:
            while True:  # until ENOSPC
                f.write(b"\0" * 4096)
        with pytest.raises(StoreWriteError, match="commit failed"):
            store.write([big(f"b{i}") for i in range(4)])
        assert ids(store) == ["kept"]
        ballast.unlink()
        store.write([big("after")])
        assert ids(store) == ["after", "kept"]
    finally:
        store.close()
    assert reopen_ids(path) == {"after", "kept"}


# ------------------------------------------------------------------------ bad rows, meta


def test_a_row_whose_doc_does_not_decode_is_returned_aside_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    store.write([row(f"good{i}", i, v=i) for i in range(5)])
    store.close()
    planted = {
        "garbage": (10, "\x00\xffnot json"),
        "cut": (11, '{"name": "send", "args": [1, 2'),
        "array": (12, "[1, 2]"),
        "json5": (13, "{name: 'x'}"),
        # Three pieces that, glued with commas, would read as three good docs.
        "split1": (14, '{"a":"}'),
        "split2": (15, '{"}'),
        "split3": (16, "{},{}"),
    }
    with contextlib.closing(raw(path)) as conn:
        for id_, (seq, doc) in planted.items():
            conn.execute(f"{INSERT_V1} VALUES (?, ?, 'pending', ?)", (id_, seq, doc))
        conn.execute(f"{INSERT_V1} VALUES ('blob', 17, 'pending', x'7b7d')")
        conn.execute(f"{INSERT_V1} VALUES ('badseq', 'abc', 'pending', '{{}}')")
    store.open()
    try:
        loaded = store.load()
        assert loaded.rows == [Row(f"good{i}", i, "pending", {"v": i}) for i in range(5)]
        bad = {b.id: b for b in loaded.bad}
        assert sorted(bad) == sorted([*planted, "blob", "badseq"])
        assert [b.id for b in loaded.bad] == ["badseq", *planted, "blob"]  # no seq first
        assert bad["cut"] == BadRow("cut", 11, "pending", bad["cut"].reason)
        assert bad["cut"].reason.startswith("doc is not JSON")
        assert bad["array"].reason == "doc is a JSON list"
        assert bad["blob"].reason == "doc is not text"
        assert bad["badseq"] == BadRow("badseq", None, "pending", "seq is not an integer")
    finally:
        store.close()
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("SELECT count(*) FROM task").fetchone()[0] == 5 + len(planted) + 2


def test_a_bad_row_can_be_deleted_by_its_id(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    store.write([row("good")])
    store.close()
    with contextlib.closing(raw(path)) as conn:
        conn.execute(f"{INSERT_V1} VALUES ('bad', 1, 'pending', '{{')")
    store.open()
    try:
        (bad,) = store.load().bad
        store.write(deletes=[bad.id])
        loaded = store.load()
        assert loaded.bad == [] and [r.id for r in loaded.rows] == ["good"]
    finally:
        store.close()


def test_an_undecodable_meta_value_is_reported_and_left_out(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    store.set_meta(ok=1)
    store.close()
    with contextlib.closing(raw(path)) as conn:
        conn.execute("INSERT INTO meta VALUES ('broken', '{nope')")
    store.open()
    try:
        assert store.meta() == {"ok": 1}
        assert list(store.load().bad_meta) == ["broken"]
    finally:
        store.close()


# ------------------------------------------------------------------- what open() accepts


def test_a_zero_byte_file_is_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    path.touch()
    store = SQLiteStore(path)
    store.open()
    store.write([row("a")])
    store.close()
    assert reopen_ids(path) == {"a"}


def test_an_empty_sqlite_database_is_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with contextlib.closing(raw(path)) as conn:
        conn.execute("CREATE TABLE x (a)")
        conn.execute("DROP TABLE x")
    assert path.stat().st_size > 0
    store = SQLiteStore(path)
    store.open()
    store.write([row("a")])
    store.close()
    assert reopen_ids(path) == {"a"}


def test_a_new_store_is_marked_with_its_application_id_and_version(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.open()
    store.close()
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_commits_are_fsynced_write_ahead_log_commits(stores: OpenStore, tmp_path: Path) -> None:
    store = stores(tmp_path / "t.db")
    with store._db_lock:
        assert store._conn is not None
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def make_store(path: Path, rows: int = 300) -> None:
    store = SQLiteStore(path)
    store.open()
    store.write([row(f"r{i}", i, pad="x" * 1000) for i in range(rows)])
    store.close()


def plant_random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(3 * 4096))


def plant_text(path: Path) -> None:
    path.write_text("id,seq\n1,2\n")


def plant_short_header(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 40)


def plant_truncated(path: Path) -> None:
    make_store(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def plant_damaged_page(path: Path) -> None:
    make_store(path)
    page = 4096
    middle = path.stat().st_size // page // 2
    with open(path, "r+b") as f:
        f.seek(middle * page)
        f.write(b"\xff" * page)


def plant_foreign(path: Path) -> None:
    with contextlib.closing(raw(path)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ann')")


def plant_foreign_wal(path: Path) -> None:
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE users (name TEXT)")


def plant_other_application(path: Path) -> None:
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA application_id = 305419896")
        conn.execute("PRAGMA user_version = 1")


def plant_same_tables_without_id(path: Path) -> None:
    with contextlib.closing(raw(path)) as conn:
        for statement in _store._SCHEMA_V1:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")


def plant_newer(path: Path) -> None:
    make_store(path, rows=3)
    with contextlib.closing(raw(path)) as conn:
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")


def plant_negative_version(path: Path) -> None:
    make_store(path, rows=3)
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA user_version = -1")


def plant_missing_table(path: Path) -> None:
    make_store(path, rows=3)
    with contextlib.closing(raw(path)) as conn:
        conn.execute("DROP TABLE meta")


REFUSED: dict[str, tuple[Callable[[Path], None], str]] = {
    "random-bytes": (plant_random_bytes, "not a SQLite database"),
    "text": (plant_text, "not a SQLite database"),
    "short-header": (plant_short_header, "not a SQLite database"),
    "truncated": (plant_truncated, "truncated"),
    "damaged-page": (plant_damaged_page, "damaged|malformed|not a usable"),
    "foreign": (plant_foreign, "another application.*tables: users"),
    "foreign-wal": (plant_foreign_wal, "another application.*tables: users"),
    "other-application-id": (plant_other_application, r"application_id 0x12345678"),
    "our-tables-no-id": (plant_same_tables_without_id, "another application"),
    "newer-version": (plant_newer, f"format version {FORMAT_VERSION + 1}, newer"),
    "negative-version": (plant_negative_version, "unknown format version -1"),
    "missing-table": (plant_missing_table, "damaged.*table meta.*missing"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_file_that_is_not_a_store_is_refused_and_left_as_it_was(
    tmp_path: Path, kind: str
) -> None:
    plant, message = REFUSED[kind]
    path = tmp_path / "t.db"
    plant(path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        SQLiteStore(path).open()
    assert str(path) in str(info.value)
    assert snapshot(tmp_path) == before  # same bytes; no -wal, -shm or .lock left


def test_a_foreign_database_with_a_live_log_is_refused_and_its_files_kept(
    tmp_path: Path,
) -> None:
    """A WAL database of another program that crashed: its log and database are kept.

    (Its -shm, the log's shared-memory index, is read as SQLite reads it; only the
    database and the log are data.)"""
    path = tmp_path / "t.db"
    code = (
        "import os, signal, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA journal_mode = WAL')\n"
        "c.execute('CREATE TABLE users (name TEXT)')\n"
        "c.execute(\"INSERT INTO users VALUES ('ann')\")\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=WAIT)
    assert (tmp_path / "t.db-wal").stat().st_size > 0
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="another application"):
        SQLiteStore(path).open()
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before)
    assert after["t.db"] == before["t.db"] and after["t.db-wal"] == before["t.db-wal"]


def test_a_store_is_opened_from_its_log_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    proc = child("hold", path)
    try:
        assert read_line(proc).startswith("ready")
    finally:
        kill(proc)
    assert (tmp_path / "t.db-wal").stat().st_size > 0  # the row is in the log only
    assert reopen_ids(path) == {"held"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.db"]


# ------------------------------------------------------------------------------- upgrades

V0_SCHEMA = (  # the first released layout, as it is on disk: the state inside the doc
    "CREATE TABLE task (id TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL, doc TEXT NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
)


def make_v0(path: Path) -> None:
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in V0_SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO task VALUES (?, ?, ?)",
            [
                ("a", 2, '{"state":"pending","name":"x","args":[1]}'),
                ("b", 1, '{"name":"y","state":"running"}'),
                ("nostate", 4, '{"name":"z"}'),
                ("bad", 3, '{"state":"pen'),
            ],
        )
        conn.execute("INSERT INTO meta VALUES ('next_seq', '5')")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 0")


def test_a_version_0_store_is_upgraded_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    make_v0(path)
    store = SQLiteStore(path)
    store.open()
    try:
        loaded = store.load()
        assert loaded.rows == [
            Row("b", 1, "running", {"name": "y"}),
            Row("a", 2, "pending", {"name": "x", "args": [1]}),
            Row("nostate", 4, "", {"name": "z"}),
        ]
        assert [(b.id, b.seq, b.state) for b in loaded.bad] == [("bad", 3, "")]
        assert store.meta() == {"next_seq": 5}
    finally:
        store.close()
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
        columns = [r[1] for r in conn.execute("PRAGMA table_info(task)")]
        assert columns == ["id", "seq", "state", "doc", "part"]
        assert conn.execute("SELECT doc FROM task WHERE id = 'bad'").fetchone()[0] == (
            '{"state":"pen'
        )
    assert reopen_ids(path) == {"a", "b", "nostate"}


def test_a_failed_upgrade_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    make_v0(path)
    before = snapshot(tmp_path)

    def upgrade_then_fail(conn: sqlite3.Connection) -> None:
        _store._upgrade_0_to_1(conn)
        raise RuntimeError("boom in the middle of the upgrade")

    monkeypatch.setattr(_store, "_MIGRATIONS", (upgrade_then_fail,))
    with pytest.raises(RuntimeError, match="boom"):
        SQLiteStore(path).open()
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    assert reopen_ids(path) == {"a", "b", "nostate"}


def make_v1(path: Path) -> None:
    """A store of format version 1, as that version wrote it (no part table)."""
    with contextlib.closing(raw(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in _store._SCHEMA_V1:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO task VALUES (?, ?, ?, ?)",
            [
                ("a", 2, "pending", '{"name":"x","args":[1]}'),
                ("b", 1, "running", '{"name":"y"}'),
                ("bad", 3, "pending", '{"name":'),
            ],
        )
        conn.execute("INSERT INTO meta VALUES ('next_seq', '4')")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")


def test_a_version_1_store_is_upgraded_keeping_every_row_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    make_v1(path)
    with contextlib.closing(raw(path)) as conn:
        before = conn.execute("SELECT id, seq, state, doc FROM task ORDER BY id").fetchall()
    store = SQLiteStore(path)
    store.open()
    try:
        loaded = store.load()
        assert loaded.rows == [
            Row("b", 1, "running", {"name": "y"}),
            Row("a", 2, "pending", {"name": "x", "args": [1]}),
        ]
        assert [(b.id, b.seq, b.state) for b in loaded.bad] == [("bad", 3, "pending")]
        assert store.meta() == {"next_seq": 4}
        # New rows, with a shared part, go next to the old ones.
        store.write([Row("c", 5, "pending", {"p": 1, "own": 2}, '{"own":2}', '{"p":1}')])
    finally:
        store.close()
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 2
        columns = [r[1] for r in conn.execute("PRAGMA table_info(task)")]
        assert columns == ["id", "seq", "state", "doc", "part"]
        after = conn.execute(
            "SELECT id, seq, state, doc FROM task WHERE part IS NULL ORDER BY id"
        ).fetchall()
        assert after == before  # the old rows are not rewritten
    assert reopen_ids(path) == {"a", "b", "c"}


def test_a_failed_upgrade_from_version_1_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    make_v1(path)
    before = snapshot(tmp_path)

    def upgrade_then_fail(conn: sqlite3.Connection) -> None:
        _store._upgrade_1_to_2(conn)
        raise RuntimeError("boom in the middle of the upgrade")

    monkeypatch.setattr(_store, "_MIGRATIONS", (_store._upgrade_0_to_1, upgrade_then_fail))
    with pytest.raises(RuntimeError, match="boom"):
        SQLiteStore(path).open()
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    assert reopen_ids(path) == {"a", "b"}


def shared(id_: str, seq: int, part: dict[str, Any], own: dict[str, Any]) -> Row:
    """A row whose doc is ``part``'s keys (stored once, shared), then ``own``'s."""
    return Row(id_, seq, "pending", {**part, **own}, _store.dumps(own), _store.dumps(part))


def test_rows_with_the_same_part_share_one_stored_copy(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    big = {"type": "send", "opts": {"retries": 3, "backoff": [1.0, 2.0]}}
    other = {"type": "other"}
    with SQLiteStore(path) as store:
        store.write([shared(f"r{i}", i, big, {"n": i}) for i in range(5)])
        store.write([shared("o", 9, other, {"n": 9}), shared("r5", 5, big, {"n": 5})])
        store.write([Row("plain", 10, "pending", {"n": 10})])
        expected = [Row(f"r{i}", i, "pending", {**big, "n": i}) for i in range(6)]
        expected += [Row("o", 9, "pending", {"type": "other", "n": 9})]
        expected += [Row("plain", 10, "pending", {"n": 10})]
        loaded = store.load()
        assert loaded.rows == expected and not loaded.bad
        assert list(loaded.rows[0].doc) == ["type", "opts", "n"]  # the part's keys first
        # Every row of a part shares its values (not copied per row).
        assert loaded.rows[0].doc["opts"] is loaded.rows[4].doc["opts"]
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("SELECT count(*) FROM part").fetchone()[0] == 2
        refs = dict(conn.execute("SELECT id, part FROM task"))
    assert len({refs[f"r{i}"] for i in range(6)}) == 1 and refs["plain"] is None
    with SQLiteStore(path) as store:  # reopened: the parts are known, not added again
        store.write([shared("r6", 6, big, {"n": 6})])
        assert store.load().rows[6] == Row("r6", 6, "pending", {**big, "n": 6})
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("SELECT count(*) FROM part").fetchone()[0] == 2


def test_a_failed_commit_adds_no_part_and_the_next_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    part = {"type": "send"}
    with SQLiteStore(path) as store:
        conn = store._conn
        assert conn is not None
        real: sqlite3.Connection = conn

        class Failing:
            """The connection, but the commit fails once."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def execute(self, sql: str, *args: Any) -> Any:
                if sql == "COMMIT":
                    store._conn = real
                    raise sqlite3.OperationalError("disk I/O error")
                return real.execute(sql, *args)

        store._conn = Failing()  # type: ignore[assignment]
        with pytest.raises(StoreWriteError):
            store.write([shared("a", 1, part, {"n": 1})])
        assert store._parts == {}
        store.write([shared("b", 2, part, {"n": 2})])
        assert store.load().rows == [Row("b", 2, "pending", {"type": "send", "n": 2})]
    assert reopen_ids(path) == {"b"}


def test_a_row_whose_part_is_missing_or_unreadable_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        store.write([shared("a", 1, {"x": 1}, {"n": 1}), shared("b", 2, {"y": 2}, {"n": 2})])
        store.write([shared("c", 3, {"x": 1}, {"n": 3})])
    with contextlib.closing(raw(path)) as conn:
        (pa,) = conn.execute("SELECT part FROM task WHERE id = 'a'").fetchone()
        (pb,) = conn.execute("SELECT part FROM task WHERE id = 'b'").fetchone()
        conn.execute("UPDATE part SET doc = '[1]' WHERE id = ?", (pb,))
        conn.execute("DELETE FROM part WHERE id = ?", (pa,))
        conn.execute(f"{INSERT_V1[:-1]}, part) VALUES ('d', 4, 'pending', '{{\"n\":4}}', 'zz')")
    with SQLiteStore(path) as store:
        loaded = store.load()
        assert loaded.rows == []
        reasons = {b.id: b.reason for b in loaded.bad}
        assert reasons == {
            "a": f"its shared part {pa} is missing",
            "c": f"its shared part {pa} is missing",
            "b": f"its shared part {pb} is a JSON list",
            "d": "its shared part 'zz' is missing",
        }
    with contextlib.closing(raw(path)) as conn:  # nothing was deleted
        assert conn.execute("SELECT count(*) FROM task").fetchone()[0] == 4


def test_open_deletes_the_parts_no_row_refers_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store, "_SWEEP_PARTS", 2)
    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        store.write([shared(f"r{i}", i, {"k": i}, {"n": i}) for i in range(5)])
        store.write(deletes=["r0", "r1", "r2"])
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("SELECT count(*) FROM part").fetchone()[0] == 5
    with SQLiteStore(path) as store:
        assert store.load().rows == [Row(f"r{i}", i, "pending", {"k": i, "n": i}) for i in (3, 4)]
        store.write([shared("r9", 9, {"k": 0}, {"n": 9})])  # a part again, a new id
        assert store.load().rows[-1] == Row("r9", 9, "pending", {"k": 0, "n": 9})
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("SELECT count(*) FROM part").fetchone()[0] == 3
    assert reopen_ids(path) == {"r3", "r4", "r9"}


def test_every_released_version_has_an_upgrade_step() -> None:
    assert len(_store._MIGRATIONS) == FORMAT_VERSION
    assert sorted(_store._LAYOUTS) == list(range(FORMAT_VERSION + 1))


# ------------------------------------------------------------------------------ ownership


def test_a_second_store_on_the_same_path_in_this_process_is_refused(
    stores: OpenStore, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    first = stores(path)
    with pytest.raises(StoreLockedError, match=f"{path}.*in this process") as info:
        SQLiteStore(path).open()
    assert isinstance(info.value, ClusterError)
    assert info.value.pid == os.getpid() and info.value.path == str(path)
    first.write([row("still-mine")])
    assert ids(first) == ["still-mine"]


def test_the_same_file_through_a_symlink_is_refused(stores: OpenStore, tmp_path: Path) -> None:
    stores(tmp_path / "t.db")
    (tmp_path / "link.db").symlink_to(tmp_path / "t.db")
    with pytest.raises(StoreLockedError):
        SQLiteStore(tmp_path / "link.db").open()


def test_another_process_is_refused_while_the_owner_lives(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    proc = child("hold", path)
    try:
        ready = read_line(proc)
        with pytest.raises(
            StoreLockedError, match=f"{path} is in use by process {proc.pid}"
        ) as info:
            SQLiteStore(path).open()
        assert ready == f"ready {proc.pid}" and info.value.pid == proc.pid
    finally:
        kill(proc)


def test_the_lock_is_released_when_the_owner_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    proc = child("hold", path)
    try:
        assert read_line(proc).startswith("ready")
    finally:
        kill(proc)  # SIGKILL: no close(), no cleanup
    store = SQLiteStore(path)
    store.open()
    try:
        assert ids(store) == ["held"]
    finally:
        store.close()
    assert not (tmp_path / "t.db.lock").exists()


def test_an_owner_that_exits_normally_releases_the_store(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    proc = child("hold", path)
    assert proc.stdin is not None
    assert read_line(proc).startswith("ready")
    proc.stdin.close()  # the child closes its store and exits
    assert proc.wait(WAIT) == 0
    kill(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.db"]  # no -wal, -shm, .lock
    assert reopen_ids(path) == {"held"}


def test_close_releases_the_store_for_the_next_owner(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SQLiteStore(path)
    first.open()
    first.write([row("a")])
    first.close()
    first.close()
    second = SQLiteStore(path)
    second.open()
    try:
        assert ids(second) == ["a"]
        with pytest.raises(RuntimeError, match="is not open"):
            first.write([row("b")])
    finally:
        second.close()


# ----------------------------------------------------------------------------------- fork


def fork() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        return os.fork()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_forked_child_cannot_use_the_store_and_leaves_it_alone(
    stores: OpenStore, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    store = stores(path)
    store.write([row("a")])
    main_before = sha(path)
    pid = fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 0
        try:
            calls: list[Callable[[], object]] = [
                lambda: store.write([row("child")]),
                store.load,
                store.meta,
            ]
            for bit, call in enumerate(calls):
                try:
                    call()
                    code |= 1 << bit
                except RuntimeError as exc:
                    if "opened by process" not in str(exc):
                        code |= 8
            store.close()
            gc.collect()
        except BaseException:
            code |= 16
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "t.db-wal").exists() and sha(path) == main_before  # no checkpoint
    with pytest.raises(StoreLockedError):  # the child did not release the lock
        SQLiteStore(path).open()
    store.write([row("b")])
    assert ids(store) == ["a", "b"]


@pytest.mark.timeout(30)
def test_a_forked_child_exiting_normally_does_not_touch_the_parents_log(tmp_path: Path) -> None:
    """Closing the inherited connection in a child would checkpoint the parent's log and
    delete it; a write of the parent acknowledged afterwards would then be lost when the
    parent is killed."""
    path = tmp_path / "t.db"
    proc = child("fork-exit", path)
    assert proc.stdout is not None
    lines = proc.stdout.read().split("\n")
    kill(proc)
    assert [line for line in lines if line] == [
        "child-refused",
        "child-exit 0",
        "wal-kept",
        "main-unchanged",
        "ack r2",
    ]
    assert reopen_ids(path) == {"r1", "r2"}


# ---------------------------------------------------------------------------- permissions


def test_a_read_only_file_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    make_store(path, rows=2)
    before = snapshot(tmp_path)
    with read_only(path), pytest.raises(StoreError, match=f"{path} is read-only"):
        SQLiteStore(path).open()
    assert snapshot(tmp_path) == before


def test_a_store_in_a_read_only_directory_is_refused_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    make_store(directory / "t.db", rows=2)
    before = snapshot(directory)
    with read_only(directory), pytest.raises(StoreError, match=r"t\.db.*not writable"):
        SQLiteStore(directory / "t.db").open()
    assert snapshot(directory) == before


def test_a_new_store_in_a_read_only_directory_is_refused_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    with read_only(directory), pytest.raises(StoreError, match=r"t\.db.*not writable"):
        SQLiteStore(directory / "t.db").open()
    assert list(directory.iterdir()) == []


# ---------------------------------------------------------------------------- durability


def kill_and_drain(proc: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child, then read what it had written before it died."""
    assert proc.stdout is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT)
    rest = proc.stdout.read().split("\n")
    kill(proc)
    return [line for line in rest if line]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("seed", "via"),
    [(seed, "write") for seed in range(30)]
    + [(seed, f"enqueue-{seed % 3 or 1}") for seed in range(30, 45)],
)
def test_every_acknowledged_write_survives_a_sigkill(tmp_path: Path, seed: int, via: str) -> None:
    """``write()`` from three threads, or ``enqueue()`` then ``wait()`` from one or two
    (one: every commit runs in the caller's ``wait``) until a random point."""
    path = tmp_path / "t.db"
    if via == "write":
        proc = child("write", path, str(seed))
    else:
        proc = child("enqueue", path, str(seed), via.split("-")[1])
    lines: list[str] = []
    try:
        assert read_line(proc) == "ready"
        target = random.Random(seed).randint(1, 120)
        acked = 0
        while acked < target:
            lines.append(read_line(proc))
            acked += lines[-1].startswith("ack ")
    finally:
        lines += kill_and_drain(proc)
    tried: dict[tuple[int, int], list[str]] = {}
    acks: set[tuple[int, int]] = set()
    for line in lines:
        kind, thread, number, *row_ids = line.split()
        key = (int(thread), int(number))
        if kind == "try":
            tried[key] = row_ids
        else:
            acks.add(key)
    store = SQLiteStore(path)
    store.open()
    try:
        loaded = store.load()
        meta = store.meta()
    finally:
        store.close()
    assert loaded.bad == []
    rows = {r.id: r for r in loaded.rows}
    for key in acks:
        missing = [id_ for id_ in tried[key] if id_ not in rows]
        assert not missing, f"acknowledged write {key} lost {missing}"
    for key, row_ids in tried.items():
        present = [id_ in rows for id_ in row_ids]
        assert all(present) or not any(present), f"write {key} half applied: {present}"
    for t in range(3):
        done = max((n for (tt, n) in acks if tt == t), default=0)
        started = max((n for (tt, n) in tried if tt == t), default=0)
        counter = rows[f"counter-{t}"].doc["n"] if done else 0
        assert done <= counter <= started
        if via == "write":
            assert done <= meta.get(f"last-{t}", 0) <= started


# ------------------------------------------------------------------------ exit and atexit


@pytest.mark.timeout(30)
def test_close_from_an_atexit_hook_commits_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    code = f"""
import atexit, threading
from cluster._store import Row, SQLiteStore

store = SQLiteStore({str(path)!r})
store.open()
atexit.register(store.close)
store.write([Row("main", 0, "pending", {{}})])
first = threading.Event()

def spin():  # still writing when the interpreter exits
    n = 0
    while True:
        n += 1
        try:
            store.write([Row(f"bg{{n}}", n, "pending", {{}})])
        except RuntimeError:
            return
        first.set()

threading.Thread(target=spin, daemon=True).start()
first.wait()
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0 and done.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.db"]
    found = reopen_ids(path)
    assert "main" in found and "bg1" in found
