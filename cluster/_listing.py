"""The ordered index behind ``Cluster.tasks()``: O(log n + page) per page, at no cost to
a cluster that is never listed.

Entries are keyed by submission order (``seq``): every task the cluster holds (live,
cached) and every dead letter. The index is brought up to date *when it is read*,
never on the hot paths:

* new tasks are found at the end of the scheduler's ``tasks`` dict, whose insertion
  order is submission order (each submit appends; a reused id is a new insertion);
* tasks that left the dict since the last read are logged by the scheduler, but only
  when they were indexed (``seq <= upto``), so a cluster nobody lists logs nothing;
  if that log grows past half the index, the index is dropped and rebuilt on the
  next read instead (a cluster listed once and then never again keeps no log).

``sortedcontainers.SortedList`` holds the seqs, with one more per name, tag and key
for the filters: a page is a positional slice, from the newest. A state filter has
no index of its own (states change on every transition): it scans from the newest
and stops once the page is full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from sortedcontainers import SortedList

__all__ = ["Listing", "fn_name"]


def fn_name(fn: object) -> str:
    """A callable's default task name: its ``__qualname__`` (a partial's function's)."""
    name = getattr(fn, "__qualname__", None)
    if type(name) is str:
        return name
    func = getattr(fn, "func", None)  # functools.partial
    if func is not None and func is not fn:
        return fn_name(func)
    return type(fn).__qualname__


class Entry:
    """What the index knows of one task or dead letter: fixed after it is indexed."""

    __slots__ = ("item", "key", "name", "seq", "tags")

    def __init__(self, seq: int, item: Any, name: str, tags: tuple[str, ...], key: str | None):
        self.seq = seq
        self.item = item  # the Task, or the DeadLetter record
        self.name = name
        self.tags = tags
        self.key = key


class Listing:
    """The lazily maintained index (guarded by the cluster lock, like the scheduler)."""

    def __init__(self) -> None:
        self.upto = 0  #: highest seq of a task indexed; the scheduler logs removals <= it
        self.removed: list[int] = []  #: seqs of indexed tasks that left the scheduler
        #: A reader is indexing a snapshot outside the lock (``Runtime._index_in_bulk``):
        #: ``upto`` already covers it, so the others wait, and the log is never reset.
        self.building = False
        self.generation = 0  #: bumped by ``reset`` (a bulk build of an older one is void)
        self._all: SortedList = SortedList()
        self._entries: dict[int, Entry] = {}
        self._by: dict[tuple[str, str], SortedList] = {}  # ("name"|"tag"|"key", value)

    def reset(self) -> None:
        """Forget everything (rebuilt on the next read)."""
        self.generation += 1
        self.upto = 0
        self.removed = []
        self._all = SortedList()
        self._entries = {}
        self._by = {}

    def note_removed(self, seq: int) -> None:
        """An indexed task left the scheduler (called under the lock, rarely)."""
        self.removed.append(seq)
        if len(self.removed) > 64 and 2 * len(self.removed) > len(self._all) and not self.building:
            self.reset()  # cheaper to rebuild than to replay (and bounded memory)

    # -- maintenance ----------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Index ``entry`` (a task newly held, or a dead letter)."""
        old = self._entries.get(entry.seq)
        if old is not None:
            self._drop(old)
        self._entries[entry.seq] = entry
        self._all.add(entry.seq)
        for field in self._fields(entry):
            index = self._by.get(field)
            if index is None:
                index = self._by[field] = SortedList()
            index.add(entry.seq)

    def add_many(self, entries: list[Entry]) -> None:
        """Index many entries at once (a catch-up): one sort per index, not one
        insertion per entry (the first listing of a million tasks)."""
        if len(entries) < 64:
            for entry in entries:
                self.add(entry)
            return
        known = self._entries
        fresh: list[Entry] = []
        for entry in entries:
            old = known.get(entry.seq)
            if old is not None:
                self._drop(old)
            known[entry.seq] = entry
            fresh.append(entry)
        self._all.update([entry.seq for entry in fresh])
        grouped: dict[tuple[str, str], list[int]] = {}
        for entry in fresh:
            seq = entry.seq
            group = grouped.get(("name", entry.name))
            if group is None:
                group = grouped[("name", entry.name)] = []
            group.append(seq)
            for tag in entry.tags:
                grouped.setdefault(("tag", tag), []).append(seq)
            if entry.key is not None:
                grouped.setdefault(("key", entry.key), []).append(seq)
        by = self._by
        for field, seqs in grouped.items():
            index = by.get(field)
            if index is None:
                by[field] = SortedList(seqs)
            else:
                index.update(seqs)

    def __len__(self) -> int:
        return len(self._entries)

    def merge(self, part: Listing) -> None:
        """Take in the entries of ``part`` (built outside the lock from a snapshot)."""
        if not self._entries:
            self._all, self._entries, self._by = part._all, part._entries, part._by
        else:
            self.add_many(list(part._entries.values()))

    def discard(self, seq: int) -> None:
        """Forget the entry of ``seq`` if it is indexed."""
        entry = self._entries.pop(seq, None)
        if entry is not None:
            self._drop(entry, popped=True)

    def _drop(self, entry: Entry, popped: bool = False) -> None:
        if not popped:
            del self._entries[entry.seq]
        self._all.discard(entry.seq)
        for field in self._fields(entry):
            index = self._by.get(field)
            if index is not None:
                index.discard(entry.seq)
                if not index:
                    del self._by[field]

    @staticmethod
    def _fields(entry: Entry) -> Iterator[tuple[str, str]]:
        yield ("name", entry.name)
        for tag in entry.tags:
            yield ("tag", tag)
        if entry.key is not None:
            yield ("key", entry.key)

    def entry(self, seq: int) -> Entry | None:
        """The entry of ``seq``."""
        return self._entries.get(seq)

    # -- reading --------------------------------------------------------------------

    def page(
        self,
        *,
        name: str | None,
        tag: str | None,
        key: str | None,
        accept: Callable[[Entry], bool] | None,
        limit: int,
        offset: int,
    ) -> tuple[int, list[Entry]]:
        """(total matching, the page of entries), newest first.

        The smallest of the indexes that the filters name is walked; other filters
        and ``accept`` (the state filter) are checked per entry.
        """
        candidates: list[SortedList] = [self._all]
        wanted = [("name", name), ("tag", tag), ("key", key)]
        for field in wanted:
            if field[1] is not None:
                index = self._by.get(field)  # type: ignore[arg-type]
                if index is None:
                    return 0, []
                candidates.append(index)
        index = min(candidates, key=len)  # (a filter's index is a subset of _all)
        checks = [(f, v) for f, v in wanted if v is not None]
        assert all(v is not None for _, v in checks)
        if accept is None and len(checks) <= 1:  # the index is exactly the answer
            total = len(index)
            seqs = index.islice(
                max(0, total - offset - limit), max(0, total - offset), reverse=True
            )
            return total, [self._entries[s] for s in seqs]
        matched = 0
        page: list[Entry] = []
        for seq in index.irange(reverse=True):
            entry = self._entries[seq]
            if not self._matches(entry, checks) or (accept is not None and not accept(entry)):
                continue
            if offset <= matched < offset + limit:
                page.append(entry)
            matched += 1
        return matched, page

    @staticmethod
    def _matches(entry: Entry, checks: list[tuple[str, str]]) -> bool:
        for field, value in checks:
            if field == "name" and entry.name != value:
                return False
            if field == "tag" and value not in entry.tags:
                return False
            if field == "key" and entry.key != value:
                return False
        return True

    def newest(self, limit: int) -> list[Entry]:
        """The newest ``limit`` entries."""
        return [self._entries[s] for s in islice(self._all.irange(reverse=True), limit)]
