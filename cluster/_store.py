"""The durable journal of a cluster: one SQLite file, written with group commit.

The cluster keeps every task in memory. This module only stores rows and reads them
back: it knows nothing of the scheduler. A row is a task id, its submission order
(``seq``), an opaque ``state`` string and a JSON ``doc`` with everything else.

File format (``PRAGMA application_id`` = ``APPLICATION_ID``, ``PRAGMA user_version`` = 2)::

    task(id TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
         doc TEXT NOT NULL,             -- doc: a JSON object, written by json, never pickle
         part INTEGER)                  -- NULL, or the part.id of the rest of the doc
    part(id INTEGER PRIMARY KEY NOT NULL, doc TEXT NOT NULL)  -- doc: a JSON object
    meta(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)   -- value: JSON

Shared parts (version 2): the keys that many rows have with the same values (the
cluster's: a task's type, executor and most of its options, some 250 bytes) may be
stored once, in ``part``, and referenced by the rows (``Row.part``). ``load()`` gives
every row its whole doc: the part's keys, then the row's own. A part no row refers to
any more is deleted at ``open()`` (when there are more than a few).

The journal runs in WAL mode with ``synchronous=FULL``: a commit is fsynced before
``write()`` returns, so a ``kill -9`` or a power loss afterwards loses nothing (if the
disk keeps what fsync reported written).

Group commit: a caller that finds the store idle commits its own change; changes
handed over while a commit is in flight wait and go, all together, into the next
transaction, which the writer thread runs (see ``SQLiteStore.write``).

What ``open()`` accepts:

- a missing file, a 0-byte file, or a SQLite database with no tables and no
  application id or version (what ``sqlite3.connect`` leaves behind): a new store;
- a store of this format at version ``FORMAT_VERSION``, or at an older version,
  which is upgraded in one transaction (see ``_MIGRATIONS``).

Anything else (random bytes, a truncated or damaged file, another application's
database, a newer version) raises ``ValueError`` naming the path, and the file is
left exactly as it was: it is inspected through a read-only connection (``immutable``
when no write-ahead log exists, so that not even a ``-wal`` or ``-shm`` file
appears) before anything writes to it.

Ownership: one ``SQLiteStore`` in one process owns a file at a time, through an
``fcntl.flock`` on the side file ``<path>.lock`` (which holds the owner's pid). The
kernel releases it when the owner dies, even by ``kill -9``. A second owner gets
``StoreLockedError``. A forked child inherits the parent's objects but owns
nothing: its ``write()``, ``load()`` and ``meta()`` raise ``RuntimeError``, and its
``close()`` does nothing. It never closes the inherited SQLite connection, since
closing it in a child checkpoints and deletes the parent's write-ahead log.

Locks: ``_cond`` guards the batch being filled, who commits, and the closing flag
(callers and the writer thread); ``_db_lock`` guards the connection and the committed
meta cache (whoever commits, ``load()`` and ``meta()``). No code holds both at once.
``_lifecycle`` serialises ``open()`` and ``close()``.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import fcntl
import gc
import json
import operator
import os
import pathlib
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import StoreError, StoreLockedError, StoreWriteError

__all__ = [
    "APPLICATION_ID",
    "FORMAT_VERSION",
    "BadRow",
    "Loaded",
    "Row",
    "SQLiteStore",
    "Ticket",
    "dumps",
]

#: ``PRAGMA application_id`` of every store file: the bytes ``b"clst"``.
APPLICATION_ID = 0x636C7374

#: The layout this module writes. Older layouts are upgraded by ``_MIGRATIONS``.
FORMAT_VERSION = 2

#: ``open()`` deletes the parts no row refers to when the file has more than these.
_SWEEP_PARTS = 64

_SQLITE_MAGIC = b"SQLite format 3\x00"

#: The longest the writer waits for more callers to join a commit (see ``_gather``).
_MAX_GATHER = 0.002
_GATHER_FRACTION = 0.5


@dataclass(frozen=True, slots=True)
class Row:
    """One task as stored: ``id`` (primary key), ``seq`` (submission order), ``state``, ``doc``.

    ``doc`` must be a JSON object: a ``dict`` of ``dict``, ``list``, ``tuple``, ``str``,
    ``int``, finite ``float``, ``bool`` and ``None``. It reads back as JSON does: a
    tuple becomes a list, a non-``str`` key a ``str``. ``NaN`` and infinities are
    refused by ``write()`` (JSON has no such numbers): store ``None`` for "no time".
    The fields are checked by ``write()``, not here (``load()`` makes many rows).

    ``text``, if given, is ``doc`` already encoded as one JSON object (what
    ``dumps(doc)`` returns): the store writes it as it is instead of encoding ``doc``
    again. The cluster gives it for the rows of its tasks, whose docs it encodes
    part by part; the store does not check that it matches ``doc``. Rows from
    ``load()`` have none. It is not compared by ``==``.

    ``part`` (only with ``text``): the JSON text of an object holding the rest of
    ``doc``, keys that ``text`` leaves out and that many rows share. It is stored once
    for all the rows that have the same text (see the module docstring), and ``load()``
    gives the row back with ``doc`` = the part's keys, then ``text``'s. Not compared.
    """

    id: str
    seq: int
    state: str
    doc: dict[str, Any]
    text: str | None = field(default=None, compare=False, repr=False)
    part: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class BadRow:
    """A stored row that cannot be read back, kept in the file and reported by ``load()``.

    ``id`` is the row's id (its ``repr`` if the stored id is not text), ``seq`` and
    ``state`` are ``None`` if they are not of their type, and ``reason`` says what is wrong.
    Deleting it takes ``write(deletes=[bad.id])`` (when the id is text).
    """

    id: str
    seq: int | None
    state: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Loaded:
    """What ``SQLiteStore.load()`` returns.

    ``rows``: every readable row, in ``(seq, id)`` order. ``bad``: the rows whose doc
    (or id, seq or state) does not decode, in the same order (those without a readable
    seq first); they stay in the file.
    ``bad_meta``: meta keys whose value does not decode, with the reason; ``meta()``
    leaves them out.
    """

    rows: list[Row]
    bad: list[BadRow] = field(default_factory=list)
    bad_meta: dict[str, str] = field(default_factory=dict)


# --- file layouts and upgrades -------------------------------------------------------

_SCHEMA_V1 = (
    "CREATE TABLE task (id TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL,"
    " state TEXT NOT NULL, doc TEXT NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
)

#: The columns of each table, by format version: what ``open()`` checks a file against.
#: Version 0 is the first released layout, kept so that its upgrade stays tested: the
#: state lived in the doc (``doc["state"]``), and ``task`` had no ``state`` column.
_LAYOUTS: dict[int, dict[str, frozenset[str]]] = {
    0: {"task": frozenset({"id", "seq", "doc"}), "meta": frozenset({"key", "value"})},
    1: {"task": frozenset({"id", "seq", "state", "doc"}), "meta": frozenset({"key", "value"})},
    2: {
        "task": frozenset({"id", "seq", "state", "doc", "part"}),
        "part": frozenset({"id", "doc"}),
        "meta": frozenset({"key", "value"}),
    },
}

_SCHEMA_V2 = (
    "CREATE TABLE task (id TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL,"
    " state TEXT NOT NULL, doc TEXT NOT NULL, part INTEGER)",
    "CREATE TABLE part (id INTEGER PRIMARY KEY NOT NULL, doc TEXT NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
)


def _upgrade_0_to_1(conn: sqlite3.Connection) -> None:
    """Version 0 -> 1: move ``doc["state"]`` into the new ``state`` column.

    A row whose doc is not a JSON object with a text ``state`` is copied as it is,
    with state ``""``: it is never dropped, and ``load()`` reports it if it is unreadable.
    """
    conn.execute(
        "CREATE TABLE task_v1 (id TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL,"
        " state TEXT NOT NULL, doc TEXT NOT NULL)"
    )
    conn.execute(
        "INSERT INTO task_v1 (id, seq, state, doc) SELECT id, seq,"
        " CASE WHEN ok THEN json_extract(doc, '$.state') ELSE '' END,"
        " CASE WHEN ok THEN json_remove(doc, '$.state') ELSE doc END"
        " FROM (SELECT id, seq, doc, CASE WHEN json_valid(doc) THEN json_type(doc) = 'object'"
        "       AND json_type(doc, '$.state') = 'text' ELSE 0 END AS ok FROM task)"
    )
    conn.execute("DROP TABLE task")
    conn.execute("ALTER TABLE task_v1 RENAME TO task")


def _upgrade_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: the ``part`` table, and ``task.part`` (NULL: the rows of version
    1 keep their whole docs, and read back as they did)."""
    conn.execute("ALTER TABLE task ADD COLUMN part INTEGER")
    conn.execute("CREATE TABLE part (id INTEGER PRIMARY KEY NOT NULL, doc TEXT NOT NULL)")


#: ``_MIGRATIONS[v]`` upgrades a file from version ``v`` to ``v + 1``. ``open()`` runs
#: every step from the file's version to ``FORMAT_VERSION`` in one transaction, then
#: sets ``user_version``. A version 2 adds: its layout to ``_LAYOUTS``, its step here,
#: its schema to ``_create``, ``FORMAT_VERSION = 2``, and a test that opens a file of
#: each older version (written by raw SQL in the test, as the v0 one is).
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _upgrade_0_to_1,
    _upgrade_1_to_2,
)


def _create(conn: sqlite3.Connection) -> None:
    """The tables of a new store, at ``FORMAT_VERSION``."""
    for statement in _SCHEMA_V2:
        conn.execute(statement)


def _sweep_parts(conn: sqlite3.Connection) -> None:
    """Delete the parts no row refers to, if there are more than ``_SWEEP_PARTS``
    (in ``open()``'s transaction: the store is ours, nothing else writes)."""
    (count,) = conn.execute("SELECT count(*) FROM part").fetchone()
    if count > _SWEEP_PARTS:
        conn.execute(
            "DELETE FROM part WHERE id NOT IN (SELECT part FROM task WHERE part IS NOT NULL)"
        )


_UPSERT = (
    "INSERT INTO task (id, seq, state, doc, part) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id)"
    " DO UPDATE SET seq = excluded.seq, state = excluded.state, doc = excluded.doc,"
    " part = excluded.part"
)
_PART_INSERT = "INSERT INTO part (id, doc) VALUES (?, ?)"
_DELETE = "DELETE FROM task WHERE id = ?"
_SELECT = "SELECT id, seq, state, doc, part FROM task"
# The last column: SQLite found the doc to be one JSON object (see _decode_rows).
_SELECT_CHECKED = (
    "SELECT id, seq, state, doc, part,"
    " typeof(doc) = 'text' AND substr(doc, 1, 1) = '{' AND json_valid(doc) FROM task"
)
_META_UPSERT = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_META_DELETE = "DELETE FROM meta WHERE key = ?"

# One encoder, made once (json.dumps with options builds a new encoder per call).
_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def _fast_dumps() -> Callable[[Any], str]:
    """``_encode`` without its per-call cost (a third of a small doc's): the C encoder
    that ``JSONEncoder.encode`` builds anew for each call, built once.

    It has no check for circular containers (JSONEncoder's, kept per call, is left
    stale by a failed call): a circular value raises ``RecursionError`` instead of
    ``ValueError``. Where the C encoder is missing, or does not give ``_encode``'s
    text, ``_encode`` itself.
    """
    from json import encoder

    make = getattr(encoder, "c_make_encoder", None)
    if make is None:
        return _encode

    def refuse(value: object) -> object:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    try:
        chunks = make(
            None, refuse, encoder.encode_basestring_ascii, None, ":", ",", False, False, False
        )
        join = "".join

        def dumps(value: Any) -> str:
            return join(chunks(value, 0))

        sample = {"a": [1, 2.5, None, True, "é\n"], "b": {"c": -1e18}, "d": []}
        if dumps(sample) != _encode(sample):
            return _encode
    except Exception:  # (another Python's C encoder, with another signature)
        return _encode
    return dumps


#: ``_encode``'s text, faster (see ``_fast_dumps``): for the docs the cluster encodes.
dumps: Callable[[Any], str] = _fast_dumps()


# --- forked children ----------------------------------------------------------------

#: Every store open in this process; a forked child disowns them all.
_OPEN: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """``os.register_at_fork`` hook: the child owns none of its parent's stores."""
    for store in list(_OPEN):
        store._disown()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: ``Py_IncRef`` through ctypes, loaded by the first ``open()`` (not in a forked child).
_incref: Callable[[object], None] | None = None
_KEPT: list[object] = []  # where it is missing: kept alive as long as this module is


def _load_incref() -> None:
    """Load ``_incref`` (ctypes is imported here, never in a forked child)."""
    global _incref
    if _incref is None:
        try:
            import ctypes

            function = ctypes.pythonapi.Py_IncRef
            function.argtypes = [ctypes.py_object]
            function.restype = None
            _incref = function
        except (ImportError, AttributeError):  # not CPython
            _incref = _KEPT.append


def _never_free(obj: object) -> None:
    """Keep ``obj`` alive until the process ends, past interpreter shutdown.

    Used in a forked child on the inherited connection: freeing it would run
    ``sqlite3_close``, which checkpoints and deletes the parent's write-ahead log.
    """
    # A reference nothing drops, not even the interpreter's shutdown.
    (_incref or _KEPT.append)(obj)


# --- group commit -------------------------------------------------------------------

_Put = tuple[str, int, str, str, str | None]  # (id, seq, state, doc as JSON text, part)


class _Batch:
    """The changes of every caller since the last commit, applied in one transaction.

    ``rows`` maps an id to its final row, or to ``None`` when its last change is a
    delete; ``meta`` maps a key to its JSON text, or ``None`` to delete it. Later calls
    overwrite earlier ones, which is the order SQLite would have applied them in.
    """

    __slots__ = ("done", "error", "meta", "rows", "threads", "waiters")

    def __init__(self) -> None:
        self.rows: dict[str, _Put | Row | None] = {}  # Row: from enqueue, not yet encoded
        self.meta: dict[str, str | None] = {}
        self.threads: set[int] = set()  # the callers' thread idents
        # One held lock per waiting caller, released once the batch is committed (or
        # failed): cheaper than an Event, which wraps the same in Python code.
        self.waiters: list[_thread.LockType] = []
        self.error: BaseException | None = None
        self.done = False  # set once committed (or failed), before the callers wake

    def release(self) -> None:
        """Wake every caller of the batch (its commit is done, or ``error`` is set)."""
        self.done = True
        for waiter in self.waiters:
            waiter.release()


class Ticket:
    """What ``SQLiteStore.enqueue`` returns: wait on it with ``SQLiteStore.wait``."""

    __slots__ = ("batch", "waiter")

    def __init__(self, batch: _Batch, waiter: _thread.LockType) -> None:
        self.batch = batch
        self.waiter = waiter


class SQLiteStore:
    """The durable journal of a cluster in one SQLite file (stdlib ``sqlite3`` only).

    ``SQLiteStore(path)`` only remembers the path; ``open()`` takes ownership of the
    file, ``load()`` reads every row back, ``write()`` commits changes, ``close()``
    releases the file. See the module docstring for the format and the guarantees.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        text = os.fspath(path)
        if not isinstance(text, str):
            raise TypeError("path must name a file as str, not bytes")
        if text in ("", ":memory:"):
            raise ValueError(f"path must name a file, got {text!r}")
        if text.startswith("file:"):
            raise ValueError(f"path must be a file path, not an SQLite URI: {text!r}")
        #: The path as given (error messages name it).
        self.path: pathlib.Path = pathlib.Path(text)
        self._pid = 0  # the process that opened the store; 0 while closed
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._lock_path = ""
        self._writer: threading.Thread | None = None
        # Guards _batch, _closing, _committing and the gathering statistics below.
        self._cond = threading.Condition(threading.Lock())
        self._batch: _Batch | None = None
        self._closing = False
        self._committing = False  # a thread is committing a batch taken from _batch
        self._gathering = False  # the writer thread waits in _gather for more callers
        self._gather_target = 0
        self._commit_time = 0.0  # seconds, a moving average of the last commits
        self._recent: set[int] = set()  # the caller threads of the last two commits
        self._previous: set[int] = set()  # those of the last one
        self._peak = 0  # the most caller threads in one of the last two commits
        # Guards _conn's use and _meta, the committed meta values as JSON text.
        self._db_lock = threading.Lock()
        self._meta: dict[str, str] = {}
        self._parts: dict[str, int] = {}  # the committed parts: JSON text -> part.id
        # Serialises open() and close() against each other.
        self._lifecycle = threading.Lock()

    def __repr__(self) -> str:
        status = "open" if self._conn is not None else "closed"
        return f"SQLiteStore({str(self.path)!r}, {status})"

    # --- open -----------------------------------------------------------------------

    def open(self) -> None:
        """Open or create the file and take ownership of it.

        Raises ``ValueError`` naming the path if the file is not a store of this format
        or is from a newer version (the file is left unchanged), ``StoreLockedError`` if
        another owner holds it, ``StoreError`` if it cannot be written (a read-only file
        or directory, a missing directory). An older version is upgraded in one
        transaction. ``RuntimeError`` if this store is already open.
        """
        with self._lifecycle:
            if self._conn is not None:
                raise RuntimeError(f"store {self._name} is already open")
            real = os.path.realpath(self.path)
            _precheck(real, self._name)
            self._lock_path = real + ".lock"
            self._lock_fd = _acquire(self._lock_path, self._name)
            self._pid = os.getpid()
            _OPEN.add(self)  # from now on a forked child disowns what we hold
            try:
                _load_incref()
                version = _inspect(real, self._name)
                conn = self._connect(real, version)
                try:
                    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                    parts = {text: id_ for id_, text in conn.execute("SELECT id, doc FROM part")}
                except BaseException:
                    conn.close()
                    raise
            except BaseException:
                _OPEN.discard(self)
                self._release()
                self._pid = 0
                raise
            self._conn = conn
            self._closing = self._committing = False
            self._batch = None
            self._commit_time = 0.0
            self._recent, self._previous, self._peak = set(), set(), 0
            self._meta = meta
            self._parts = parts
            self._writer = threading.Thread(
                target=self._run, name=f"cluster-store-writer {self.path.name}", daemon=True
            )
            self._writer.start()

    @property
    def _name(self) -> str:
        return str(self.path)

    def _connect(self, real: str, version: int | None) -> sqlite3.Connection:
        """The write connection, with the schema created or upgraded. ``version``: of the file."""
        directory = os.path.dirname(real)
        if os.path.exists(real) and not os.access(real, os.W_OK):
            raise StoreError(
                f"store {self._name} is read-only: cannot write to it", path=self._name
            )
        if not os.access(directory, os.W_OK):
            raise StoreError(
                f"store {self._name}: directory {directory} is not writable"
                " (SQLite creates its -wal and -shm files there)",
                path=self._name,
            )
        try:
            conn = sqlite3.connect(
                real, timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self._name}: {exc}", path=self._name) from exc
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"store {self._name}: SQLite refused WAL mode (journal_mode is {mode})",
                    path=self._name,
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Under our lock nobody else writes; check again what _inspect saw.
                found = _version_of(conn)
                if found != version:
                    raise ValueError(
                        f"store {self._name} changed while it was being opened"
                        f" (version {version} then {found})"
                    )
                if version is None:
                    _create(conn)
                else:
                    for step in _MIGRATIONS[version:]:
                        step(conn)
                    _sweep_parts(conn)
                if version != FORMAT_VERSION:
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot write to store {self._name}: {exc}", path=self._name) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    # --- read -----------------------------------------------------------------------

    def load(self) -> Loaded:
        """Every row, in ``(seq, id)`` order, with the unreadable ones aside (see ``Loaded``).

        Nothing is deleted: a bad row stays in the file. ``ValueError`` naming the path
        if the file turns out to be damaged, ``StoreError`` if it cannot be read.
        """
        conn = self._owned("load")
        # A load makes several containers per row, none in a cycle: with the collector
        # on, it would run hundreds of times over the growing heap (twice as slow).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with self._db_lock:
                try:
                    raw = conn.execute(_SELECT_CHECKED).fetchall()
                except sqlite3.OperationalError as exc:
                    if "no such function" not in str(exc):
                        raise
                    raw = [(*row, 0) for row in conn.execute(_SELECT)]  # no JSON functions
                part_texts = conn.execute("SELECT id, doc FROM part").fetchall()
                meta = dict(self._meta)
            rows, bad = _decode_rows(raw, _decode_parts(part_texts))
            del raw
            _make_old()
        except sqlite3.OperationalError as exc:  # an I/O error
            raise StoreError(f"cannot read store {self._name}: {exc}", path=self._name) from exc
        except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
            raise ValueError(f"store {self._name} is damaged: {exc}") from exc
        finally:
            if gc_was_enabled:
                gc.enable()
        bad_meta: dict[str, str] = {}
        for key, text in meta.items():
            try:
                _decode(text)
            except (ValueError, TypeError, RecursionError) as exc:
                bad_meta[str(key)] = f"value is not JSON: {exc}"
        return Loaded(rows, bad, bad_meta)

    def meta(self) -> dict[str, Any]:
        """The committed meta values (a fresh dict; an undecodable value is left out)."""
        self._owned("meta")
        with self._db_lock:
            items = list(self._meta.items())
        result: dict[str, Any] = {}
        for key, text in items:
            try:
                result[key] = _decode(text)
            except (ValueError, TypeError, RecursionError):
                continue  # reported by load().bad_meta
        return result

    def set_meta(self, **values: Any) -> None:
        """``write(meta=values)``: set each key (``None`` deletes it), committed on return."""
        self.write(meta=values)

    # --- write ----------------------------------------------------------------------

    def write(
        self,
        puts: Sequence[Row] = (),
        deletes: Sequence[str] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Upsert ``puts`` by id, delete ``deletes``, set ``meta``: one transaction, fsynced.

        Returns once the commit holding these changes is durable. Within one call the
        puts apply in order (a later put of an id wins), then the deletes; an id may not
        be in both. Calls are applied in the order they reach the store, so one thread's
        calls apply in call order. A meta value of ``None`` deletes the key.

        Concurrent callers share commits (group commit): while one commit is in flight,
        the changes of every caller that comes meanwhile are merged, and the writer
        thread commits them in one transaction when it ends. (A caller that finds the
        store idle, and no other thread writing of late, commits in its own thread.) If
        a commit fails, every caller in it gets ``StoreWriteError`` and none of its
        changes are applied; later writes work again once the cause is gone.

        ``TypeError``/``ValueError`` naming the argument for a bad row or value (nothing
        is written then); ``RuntimeError`` if the store is not open, is closing, or was
        opened by another process (a forked child).
        """
        self._owned("write")
        changes = _encode_puts(puts)
        removed = _check_deletes(deletes)
        meta_changes = _encode_meta(meta)
        if removed and changes:
            both = changes.keys() & set(removed)
            if both:
                raise ValueError(f"deletes: id {min(both)!r} is also in puts")
        if not changes and not removed and not meta_changes:
            return
        with self._cond:
            if self._closing or self._conn is None:
                raise RuntimeError(f"store {self._name} is closed")
            batch = self._batch
            if batch is None:
                batch = self._batch = _Batch()
            batch.threads.add(threading.get_ident())
            if changes:
                batch.rows.update(changes)
            for id_ in removed:
                batch.rows[id_] = None
            if meta_changes:
                batch.meta.update(meta_changes)
            if not self._committing and self._peak <= 1:
                # Nothing in flight, and no commit of late had callers from two threads:
                # commit here, sparing two thread switches. (When threads write at once,
                # the writer thread commits for them all, see _gather.)
                self._committing = True
                self._batch = None
                inline = True
            else:
                inline = False
                waiter = _thread.allocate_lock()
                waiter.acquire()
                batch.waiters.append(waiter)
                if not self._committing or (
                    self._gathering and len(batch.threads) >= self._gather_target
                ):
                    self._cond.notify_all()  # the writer thread: work, or a full batch
        if inline:
            self._commit_and_release(batch)
        else:
            waiter.acquire()  # released by the thread that commits the batch
        if batch.error is not None:
            if inline and not isinstance(batch.error, Exception):
                raise batch.error  # a KeyboardInterrupt during our own commit
            raise StoreWriteError(
                f"store {self._name}: commit failed, nothing of it was written: {batch.error}",
                path=self._name,
            ) from batch.error

    def enqueue(self, changes: Sequence[Row | str]) -> Ticket:
        """Hand changes to the writer without waiting for them, in order: a ``Row`` to
        upsert, or an id (``str``) to delete. No I/O here, and the docs are encoded by
        whoever commits. Safe to call under the caller's own lock
        (it takes only the store's): calls are applied in the order they are made, so a
        caller that enqueues under its lock gets its changes applied in its lock order.
        ``wait(ticket)`` returns once the commit holding them is durable.

        The caller is to ``wait(ticket)``: when only one thread writes of late, the
        writer thread is not woken here, and that ``wait`` commits the changes in the
        caller's thread (until then they go with any other commit, or at ``close()``).

        The rows must be well formed (``write`` checks them; this does not): the
        cluster builds them itself.
        """
        self._owned("enqueue")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        with self._cond:
            if self._closing or self._conn is None:
                raise RuntimeError(f"store {self._name} is closed")
            batch = self._batch
            if batch is None:
                batch = self._batch = _Batch()
            batch.threads.add(threading.get_ident())
            rows = batch.rows
            for change in changes:
                if isinstance(change, str):
                    rows[change] = None
                else:
                    rows[change.id] = change
            batch.waiters.append(waiter)
            if self._committing:
                if self._gathering and len(batch.threads) >= self._gather_target:
                    self._cond.notify_all()  # the writer thread: a full batch
            elif self._peak > 1:
                self._cond.notify_all()  # the writer thread commits for several threads
            # Else our wait() commits in this thread: waking the writer thread too would
            # cost a thread switch, and could take the commit from under us.
        return Ticket(batch, waiter)

    def wait(self, ticket: Ticket) -> None:
        """Block until the changes ``enqueue`` returned ``ticket`` for are committed
        (``StoreWriteError`` if that commit failed). If nobody is committing yet, the
        caller commits them itself (sparing two thread switches)."""
        batch = ticket.batch
        with self._cond:
            inline = self._batch is batch and not self._committing and self._peak <= 1
            if inline:
                self._committing = True
                self._batch = None
        if inline:
            self._commit_and_release(batch)
        ticket.waiter.acquire()
        if batch.error is not None:
            raise StoreWriteError(
                f"store {self._name}: commit failed, nothing of it was written: {batch.error}",
                path=self._name,
            ) from batch.error

    @staticmethod
    def settled(ticket: Ticket) -> bool:
        """Is the commit of ``ticket`` over (durable, or failed)? Never blocks."""
        return ticket.batch.done

    def _run(self) -> None:
        """The writer thread: commit the batches callers leave to it, until closed and drained.

        Callers leave a batch to this thread when a commit is in flight, or when one of
        the last two commits held callers from several threads: then it first gathers
        the threads of those commits into this one (see ``_gather``).
        """
        try:
            while True:
                with self._cond:
                    while self._batch is None or self._committing:
                        if self._closing and self._batch is None:
                            return  # closed, and nothing left
                        self._cond.wait()
                    self._committing = True
                    try:
                        expected = len(self._recent)
                        if (
                            self._peak > 1
                            and len(self._batch.threads) < expected
                            and not self._closing
                        ):
                            self._gather(expected)
                    except BaseException:
                        self._committing = False
                        raise
                    batch, self._batch = self._batch, None
                self._commit_and_release(batch)
        finally:
            # Only reached on close, or on a bug: then no caller may wait forever.
            with self._cond:
                self._closing = True
                pending, self._batch = self._batch, None
                self._cond.notify_all()
            if pending is not None:
                pending.error = RuntimeError("the store's writer thread stopped")
                pending.release()

    def _gather(self, expected: int) -> None:
        """Wait (``_cond`` held) a little for ``expected`` threads to join the batch.

        In a busy program the callers released by the last commit come straight back.
        A commit taken before they do holds only some of them, the next one the others,
        and so on. Waiting for them, up to half a commit time, fills each commit instead.
        """
        deadline = time.monotonic() + min(self._commit_time * _GATHER_FRACTION, _MAX_GATHER)
        self._gathering = True
        self._gather_target = expected
        try:
            while (
                self._batch is not None
                and len(self._batch.threads) < expected
                and not self._closing
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
        finally:
            self._gathering = False

    def _commit_and_release(self, batch: _Batch) -> None:
        """Commit ``batch`` (``_committing`` is ours), wake its callers, hand on the rest."""
        started = time.monotonic()
        try:
            self._commit(batch)
        except BaseException as exc:  # every caller of the batch gets it
            batch.error = exc
        finally:
            batch.release()
            elapsed = time.monotonic() - started
            with self._cond:
                self._committing = False
                self._commit_time += (elapsed - self._commit_time) / 8
                self._recent = self._previous | batch.threads
                self._peak = max(len(self._previous), len(batch.threads))
                self._previous = batch.threads
                if self._batch is not None or self._closing:
                    self._cond.notify_all()  # the writer thread, and close()

    def _commit(self, batch: _Batch) -> None:
        puts: list[tuple[str, int, str, str, int | None]] = []
        deletes: list[tuple[str]] = []
        plain: list[Row] = []  # handed over by enqueue() without text: encoded here
        known = self._parts  # (only the committing thread changes it, under _db_lock)
        new_parts: dict[str, int] = {}  # this commit's, added to ``known`` once committed
        next_part = 0
        for id_, row in batch.rows.items():
            if row is None:
                deletes.append((id_,))
                continue
            if isinstance(row, tuple):
                id_, seq, state, text, part = row
            elif row.text is not None:
                id_, seq, state, text, part = row.id, row.seq, row.state, row.text, row.part
            else:
                plain.append(row)
                continue
            if part is None:
                puts.append((id_, seq, state, text, None))
                continue
            ref = known.get(part)
            if ref is None:
                ref = new_parts.get(part)
                if ref is None:
                    if not next_part:
                        next_part = max(known.values(), default=0) + 1
                    ref = new_parts[part] = next_part
                    next_part += 1
            puts.append((id_, seq, state, text, ref))
        if plain:  # (by the committing thread)
            puts.extend((*put[:4], None) for put in _encode_puts(plain).values())
        meta_puts = [(key, text) for key, text in batch.meta.items() if text is not None]
        meta_deletes = [(key,) for key, text in batch.meta.items() if text is None]
        conn = self._conn
        assert conn is not None
        with self._db_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                if new_parts:
                    conn.executemany(_PART_INSERT, [(ref, t) for t, ref in new_parts.items()])
                if puts:
                    conn.executemany(_UPSERT, puts)
                if deletes:
                    conn.executemany(_DELETE, deletes)
                if meta_puts:
                    conn.executemany(_META_UPSERT, meta_puts)
                if meta_deletes:
                    conn.executemany(_META_DELETE, meta_deletes)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            known.update(new_parts)
            for key, value in batch.meta.items():
                if value is None:
                    self._meta.pop(key, None)
                else:
                    self._meta[key] = value

    # --- close ----------------------------------------------------------------------

    def close(self) -> None:
        """Commit what callers handed over, stop the writer thread, release the file.

        Idempotent, and safe from an ``atexit`` hook. In a forked child it only forgets
        the parent's store (see the module docstring).
        """
        if self._pid and self._pid != os.getpid():
            self._disown()
            return
        with self._lifecycle:
            if self._conn is None:
                return
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            writer = self._writer
            if writer is not None and writer is not threading.current_thread():
                writer.join()
            self._writer = None
            with self._cond:
                while self._committing:  # a caller's own commit, still in flight
                    self._cond.wait()
            with self._db_lock:
                conn, self._conn = self._conn, None
                conn.close()  # checkpoints the log and removes -wal and -shm
            _OPEN.discard(self)
            self._release()
            self._pid = 0

    def __enter__(self) -> SQLiteStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- ownership ------------------------------------------------------------------

    def _owned(self, action: str) -> sqlite3.Connection:
        """The connection, if this process opened the store and it is open."""
        pid = self._pid
        if pid and pid != os.getpid():
            raise RuntimeError(
                f"cannot {action} store {self._name} from process {os.getpid()}:"
                f" it was opened by process {pid} (a forked child must open its own store)"
            )
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"store {self._name} is not open")
        return conn

    def _disown(self) -> None:
        """In a forked child: forget the parent's store without touching its files.

        The lock fd is closed: the parent's copy keeps the lock (flock belongs to the
        open file description), and never unlocked here. The connection is kept alive
        forever, so that ``sqlite3_close`` never runs in this process. No lock is taken:
        another thread of the parent may have held one at the fork.
        """
        if self._pid == os.getpid() or self._pid == 0:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            _never_free(conn)
        self._writer = None
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        _OPEN.discard(self)

    def _release(self) -> None:
        """Remove the lock file and unlock (the owner only). Never raises."""
        fd, self._lock_fd = self._lock_fd, -1
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)  # while still locked: see _acquire
        with contextlib.suppress(OSError):
            os.close(fd)  # releases the flock


# --- opening, step by step --------------------------------------------------------


def _precheck(real: str, name: str) -> None:
    """Refuse, from its bytes alone, a file that cannot be a SQLite database."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        directory = os.path.dirname(real)
        if not os.path.isdir(directory):
            raise StoreError(
                f"cannot create store {name}: directory {directory} does not exist", path=name
            ) from None
        return
    if not os.path.isfile(real):
        raise ValueError(f"store {name} is not a regular file")
    wal = _size(real + "-wal")
    if st.st_size == 0:
        return  # a new store, unless a log holds its pages: _inspect decides
    try:
        with open(real, "rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise StoreError(f"cannot read store {name}: {exc}", path=name) from exc
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise ValueError(f"store {name} is not a SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"store {name} is not a valid SQLite database (page size {page_size})")
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid when the change counter matches "version valid for"; a
    # file with a log may be mid-checkpoint, with pages still only in the log.
    if header[24:28] == header[92:96] and not wal and st.st_size < pages * page_size:
        raise ValueError(
            f"store {name} is truncated: its header says {pages * page_size} bytes,"
            f" the file has {st.st_size}"
        )


def _size(path: str) -> int:
    """The size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _acquire(lock_path: str, name: str) -> int:
    """Lock ``lock_path`` (created if missing) and write our pid in it; return its fd.

    The lock file is removed by its owner while still locked. So after locking we check
    that the path still names the file we locked, else we locked a removed file: retry.
    """
    for _ in range(100):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            reason = {
                errno.EACCES: "the directory is not writable",
                errno.EPERM: "the directory is not writable",
                errno.EROFS: "the file system is read-only",
            }.get(exc.errno or 0, str(exc))
            raise StoreError(
                f"cannot open store {name}: cannot create its lock file {lock_path}: {reason}",
                path=name,
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            if pid == os.getpid():
                owner = f"another SQLiteStore in this process (pid {pid})"
            elif pid is not None:
                owner = f"process {pid}"
            else:
                owner = "another process"
            raise StoreLockedError(
                f"store {name} is in use by {owner} (lock file {lock_path})", path=name, pid=pid
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock store {name}: {exc}", path=name) from exc
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    raise StoreError(f"cannot lock store {name}: its lock file keeps changing", path=name)


def _read_pid(fd: int) -> int | None:
    """The pid an owner wrote in the lock file, if it is there yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _inspect(real: str, name: str) -> int | None:
    """The format version of the file (``None``: a new store), read without writing.

    ``ValueError`` if it is not a store of this format, is newer, or is damaged.
    """
    if _size(real) == 0 and not _size(real + "-wal"):
        return None
    # With no log, every page is in the main file, and an immutable connection reads it
    # without creating -wal or -shm. With a log (a crash), a read-only connection reads
    # it too; SQLite may have to create -shm for that, removed again if we refuse.
    with_log = bool(_size(real + "-wal") or _size(real + "-journal"))
    mode = "mode=ro" if with_log else "immutable=1"
    had_shm = os.path.exists(real + "-shm")
    refused = True
    try:
        try:
            uri = pathlib.Path(real).as_uri() + "?" + mode
            conn = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise ValueError(f"store {name} cannot be read as a SQLite database: {exc}") from exc
        try:
            version = _check_layout(conn, name)
            refused = False
            return version
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"store {name} is not a usable SQLite database: {exc}") from exc
        finally:
            conn.close()
    finally:
        if refused and with_log and not had_shm:
            with contextlib.suppress(OSError):
                os.unlink(real + "-shm")


_FOREIGN = -(2**40)  # what _version_of returns for another application's database


def _version_of(conn: sqlite3.Connection) -> int | None:
    """``user_version`` if the file is ours, ``None`` for an empty database, else ``_FOREIGN``."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app == APPLICATION_ID:
        return int(version)
    has_tables = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' LIMIT 1"
    ).fetchone()
    if app == 0 and version == 0 and has_tables is None:
        return None
    return _FOREIGN


def _check_layout(conn: sqlite3.Connection, name: str) -> int | None:
    """The file's format version (``None``: empty), after checking it is a sound store."""
    version = _version_of(conn)
    if version is None:
        return None
    if version == _FOREIGN:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        uv = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
            )
        ]
        listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise ValueError(
            f"store {name} is a SQLite database of another application, not a cluster store"
            f" (application_id {app:#x}, user_version {uv}, tables: {listed or 'none'})"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"store {name} has format version {version}, newer than this cluster reads"
            f" (up to {FORMAT_VERSION}); upgrade cluster to open it"
        )
    layout = _LAYOUTS.get(version)
    if layout is None:  # a negative user_version
        raise ValueError(f"store {name} has an unknown format version {version}")
    for table, columns in layout.items():
        found = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if found != columns:
            what = "is missing" if not found else f"has columns {sorted(found)}"
            raise ValueError(
                f"store {name} is damaged: format version {version} needs table {table}"
                f" with columns {sorted(columns)}, and it {what}"
            )
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        raise ValueError(f"store {name} is damaged: {'; '.join(problems)}")
    return version


# --- checking and encoding what callers hand over ---------------------------------


def _encode_puts(puts: Sequence[Row]) -> dict[str, _Put]:
    """Check ``puts`` and encode each doc, in the caller's thread: id -> its last row."""
    if isinstance(puts, Row) or not isinstance(puts, Iterable):
        raise TypeError(f"puts must be a sequence of Row, got {type(puts).__name__}")
    out: dict[str, _Put] = {}
    encode = _encode
    for i, row in enumerate(puts):
        if type(row) is not Row and not isinstance(row, Row):
            raise TypeError(f"puts[{i}] must be a Row, got {type(row).__name__}")
        id_, seq, state, doc = row.id, row.seq, row.state, row.doc
        if type(id_) is not str or not id_.isascii():
            _check_text(id_, f"puts[{i}].id")
        if type(seq) is not int:
            raise TypeError(f"puts[{i}].seq must be an int, got {type(seq).__name__}")
        if not -(2**63) <= seq < 2**63:
            raise ValueError(f"puts[{i}].seq must fit in 64 bits, got {seq}")
        if type(state) is not str or not state.isascii():
            _check_text(state, f"puts[{i}].state")
        if type(doc) is not dict:
            raise TypeError(f"puts[{i}].doc must be a dict, got {type(doc).__name__}")
        text = row.text
        if text is not None:  # encoded by the caller (the cluster's rows)
            if type(text) is not str:
                raise TypeError(f"puts[{i}].text must be a str, got {type(text).__name__}")
            part = row.part
            if part is not None and type(part) is not str:
                raise TypeError(f"puts[{i}].part must be a str, got {type(part).__name__}")
            out[id_] = (id_, seq, state, text, part)
            continue
        try:
            text = encode(doc)
        except TypeError as exc:
            raise TypeError(f"puts[{i}].doc (id {id_!r}) is not JSON-serializable: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise ValueError(
                f"puts[{i}].doc (id {id_!r}) cannot be stored as JSON: {exc}"
            ) from None
        out[id_] = (id_, seq, state, text, None)
    return out


def _check_text(value: object, name: str) -> None:
    """``value`` must be a str that SQLite can store (UTF-8: no lone surrogate)."""
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid text (lone surrogate): {value!r}") from None


def _check_deletes(deletes: Sequence[str]) -> Sequence[str]:
    """Check ``deletes`` (a sequence of str ids, not one str) and return it as a list."""
    if isinstance(deletes, (str, bytes)) or not isinstance(deletes, Iterable):
        raise TypeError(f"deletes must be a sequence of ids, got {type(deletes).__name__}")
    deletes = list(deletes)
    for i, id_ in enumerate(deletes):
        if type(id_) is not str or not id_.isascii():
            _check_text(id_, f"deletes[{i}]")
    return deletes


def _encode_meta(meta: Mapping[str, Any] | None) -> dict[str, str | None]:
    """Check ``meta`` and encode each value: key -> JSON text, or ``None`` to delete."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    out: dict[str, str | None] = {}
    for key, value in meta.items():
        _check_text(key, "meta key")
        if value is None:
            out[key] = None
            continue
        try:
            out[key] = _encode(value)
        except TypeError as exc:
            raise TypeError(f"meta[{key!r}] is not JSON-serializable: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"meta[{key!r}] cannot be stored as JSON: {exc}") from None
    return out


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off while a bulk of long-lived objects is made (as ``load()``
    does), then those objects moved to its oldest generation (``_make_old``).

    Recovering 100k tasks with it on ran three full collections over the growing heap:
    1.7 s of a 2.9 s ``run()``. The objects made here hold no garbage cycles; the
    program's own, if any, wait for the collector's next pass. As it was found after.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        _make_old()
    finally:
        if was_enabled:
            gc.enable()


def _make_old() -> None:
    """Move every object the collector tracks into its oldest generation, at no cost.

    The rows just loaded live as long as the cluster. Left young, they would be walked
    by the next young collection, and the next, and then by a full one (some 0.1 s
    each per 100k rows) before the collector learns that. ``gc.freeze()`` then
    ``gc.unfreeze()`` splices the young lists onto the old one instead. Young garbage
    cycles of the program, if any, then wait for the next full collection. Skipped
    when the program freezes objects itself (``unfreeze`` would thaw them).
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def _decode_parts(raw: list[tuple[Any, Any]]) -> dict[int, dict[str, Any] | str]:
    """The parts of ``SELECT id, doc FROM part``: id -> its object, or why it is unreadable."""
    parts: dict[int, dict[str, Any] | str] = {}
    for id_, text in raw:
        if type(id_) is not int:
            continue  # (no row refers to a part by a non-integer)
        if type(text) is not str:
            parts[id_] = f"its shared part {id_} is not text"
            continue
        try:
            value = _decode(text)
        except (ValueError, RecursionError) as exc:
            parts[id_] = f"its shared part {id_} is not JSON: {exc}"
            continue
        if type(value) is dict:
            parts[id_] = value
        else:
            parts[id_] = f"its shared part {id_} is a JSON {type(value).__name__}"
    return parts


_Raw = tuple[Any, Any, Any, Any, Any, Any]  # a row of _SELECT_CHECKED


def _decode_rows(
    raw: list[_Raw], parts: dict[int, dict[str, Any] | str] | None = None
) -> tuple[list[Row], list[BadRow]]:
    """Rows from ``_SELECT_CHECKED``'s tuples, sorted by ``(seq, id)``; the bad ones aside.

    ``parts``: the decoded ``part`` table (``_decode_parts``). A row with a part gets
    the part's keys, then its own (a new dict per row; the part's values are shared
    by every row of that part, not copied: the reader must not change them).

    The docs SQLite found to be JSON objects are decoded in one call, as one JSON
    array: a third faster than one call each, and the key strings are then shared by
    every doc (one ``"name"`` for all rows, not one per row). That is exact: each
    piece is a whole JSON value, and Python's JSON is a subset of what SQLite accepts
    (any extension makes the call fail), so a decoded array splits where the docs do.
    Should it fail anyway, every doc is decoded on its own.
    """
    parts = parts or {}
    rows: list[Row] = []
    bad: list[BadRow] = []
    checked: list[_Raw] = []
    rest: list[_Raw] = []
    for item in raw:
        if item[5] and type(item[0]) is str and type(item[1]) is int and type(item[2]) is str:
            checked.append(item)
        else:
            rest.append(item)
    values: list[Any] = []
    if checked:
        try:
            values = _decode("[" + ",".join([item[3] for item in checked]) + "]")
        except (ValueError, RecursionError):
            values = []
        if len(values) != len(checked) or not all(type(value) is dict for value in values):
            values = []
    append = rows.append
    if values:
        # Row(...) without the frozen dataclass's __init__ (a third of a row's cost
        # here): a new instance, its slots set through their descriptors.
        new, set_id, set_seq, set_state, set_doc, set_text, set_part = _ROW_MAKER
        for item, value in zip(checked, values, strict=True):
            part = item[4]
            if part is not None:
                shared = parts.get(part)
                if type(shared) is not dict or type(part) is not int:
                    _with_part(item, value, parts, rows, bad)
                    continue
                value = {**shared, **value}
            row = new(Row)
            set_id(row, item[0])
            set_seq(row, item[1])
            set_state(row, item[2])
            set_doc(row, value)
            set_text(row, None)
            set_part(row, None)
            append(row)
    else:
        rest = raw
    decode = _decode
    for item in rest:
        id_, seq, state, doc, part, _ = item
        if type(id_) is str and type(seq) is int and type(state) is str and type(doc) is str:
            try:
                value = decode(doc)
            except ValueError as exc:  # json.JSONDecodeError
                bad.append(BadRow(id_, seq, state, f"doc is not JSON: {exc}"))
                continue
            except RecursionError:
                bad.append(BadRow(id_, seq, state, "doc is nested too deeply"))
                continue
            if type(value) is not dict:
                bad.append(BadRow(id_, seq, state, f"doc is a JSON {type(value).__name__}"))
            elif part is None:
                append(Row(id_, seq, state, value))
            else:
                _with_part(item, value, parts, rows, bad)
        else:
            bad.append(_bad_columns(id_, seq, state, doc))
    rows.sort(key=_order)
    bad.sort(key=_bad_order)
    return rows, bad


#: ``object.__new__`` and the ``__set__`` of each of ``Row``'s slots, in field order.
_ROW_MAKER: tuple[Callable[..., Any], ...] = (
    object.__new__,
    *(Row.__dict__[name].__set__ for name in ("id", "seq", "state", "doc", "text", "part")),
)


def _with_part(
    item: _Raw,
    value: dict[str, Any],
    parts: dict[int, dict[str, Any] | str],
    rows: list[Row],
    bad: list[BadRow],
) -> None:
    """The row of ``item`` (its own doc decoded: ``value``) with its part's keys first."""
    part = item[4]
    shared = parts.get(part) if type(part) is int else None
    if type(shared) is dict:
        rows.append(Row(item[0], item[1], item[2], {**shared, **value}))
    else:
        reason = shared if type(shared) is str else f"its shared part {part!r} is missing"
        bad.append(BadRow(item[0], item[1], item[2], reason))


def _bad_columns(id_: object, seq: object, state: object, doc: object) -> BadRow:
    """A ``BadRow`` for a row whose columns are not of their types (raw SQL wrote it)."""
    shown = id_ if type(id_) is str else repr(id_)
    problems = [
        what
        for what, ok in (
            ("id is not text", type(id_) is str),
            ("seq is not an integer", type(seq) is int),
            ("state is not text", type(state) is str),
            ("doc is not text", type(doc) is str),
        )
        if not ok
    ]
    return BadRow(
        shown,
        seq if type(seq) is int else None,
        state if type(state) is str else None,
        "; ".join(problems),
    )


_order: Callable[[Row], tuple[int, str]] = operator.attrgetter("seq", "id")


def _bad_order(row: BadRow) -> tuple[int, str]:
    return (row.seq if row.seq is not None else -(2**63), row.id)
