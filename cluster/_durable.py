"""Durable tasks (SPEC §14): registered task types, and a task as a row of the store.

A durable task is one whose function is a registered type (``Cluster.register``) on
a cluster with a store. Its arguments are JSON (checked at ``add_task``), and so is
everything the store keeps of it: nothing is ever unpickled from disk. Its row is
written at every transition that a restart must know of (submitted, an attempt
started, waiting to retry, a run ended, terminal, dead letter), and read back once,
when the cluster runs again (``decode``).

What survives a restart with the task: priority, start time, submission order,
attempts and interrupts, per-rule retry counts, timeout, retry budget, the built-in
backoff strategies, jitter, retry mode, rules by exception class (stored by their
import path), TTL, repeat schedules and where a series stands, name, tags, key,
executor, a cached Result (its value if it is JSON; else "unavailable") and a dead
letter. What does not: a callable option (a custom backoff, ``retry_if``, callbacks).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ._backoff import ExponentialBackoff, FixedBackoff, LinearBackoff, RetryMode
from ._clock import Clock
from ._durable_ids import DEAD_PREFIX
from ._errors import ClusterError
from ._policy import RetryCounts, RetryRule
from ._repeat import Repeat
from ._store import Row, dumps
from ._task import DEFAULT_OPTIONS, Options, Series, Task, TaskState
from ._validate import UNLIMITED

__all__ = [
    "UNAVAILABLE",
    "Durable",
    "OptionsCache",
    "StoredError",
    "check_json",
    "decode_doc",
    "encode",
    "encode_submitted",
]

#: The doc's own version (``doc["v"]``). Version 1 (a store of format 1 holds them,
#: and they still read): every key in the row; ``opts`` has ``name``, ``tags``, ``key``.
#: Version 2: ``type``, ``executor`` and ``opts`` are the row's shared part
#: (``Row.part``, stored once for every task that has the same ones), and ``name``,
#: ``tags`` and ``key``, which tasks often have each their own, are the row's own keys;
#: a row leaves out the keys that have their default (``_DEFAULTS``; ``name``: the type).
FORMAT = 2
_FORMATS = (1, 2)

#: The keys a version 2 doc leaves out when they have these values (ints: ``0``, never
#: ``False`` or ``0.0``, whose JSON differs).
_DEFAULTS: dict[str, Any] = {
    "args": [],
    "kwargs": {},
    "tags": [],
    "key": None,
    "priority": 0,
    "attempts": 0,
    "interrupts": 0,
    "counts": None,
}

#: How many times a task may be interrupted (it was running when its process ended)
#: before it ends as a dead letter instead of being retried: a task that crashes the
#: process every time must not crash every restart.
MAX_INTERRUPTS = 3


class _Unavailable:
    """The value of a durable task's cached Result after a restart, when the value was
    not JSON (it was delivered in the process that computed it only)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<value unavailable after a restart>"

    def __reduce__(self) -> str:
        return "UNAVAILABLE"


#: See ``_Unavailable``.
UNAVAILABLE = _Unavailable()


class StoredError(ClusterError):
    """The error of a durable task read back after a restart (exceptions are not
    stored, only their type, message and traceback text)."""

    def __init__(self, message: str, *, type_name: str = "", text: str = "") -> None:
        super().__init__(message)
        #: ``module:QualifiedName`` of the original exception (``builtins:ValueError``)
        self.type_name = type_name
        self.text = text  #: its formatted traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (_stored, (str(self), self.type_name, self.text))


def _stored(message: str, type_name: str, text: str) -> StoredError:
    return StoredError(message, type_name=type_name, text=text)


class Durable:
    """What a durable task carries (``Options.durable``): its type and JSON arguments."""

    __slots__ = ("args", "interrupts", "kind", "kwargs", "part", "prefix", "recorded", "static")

    def __init__(self, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.kind = kind  #: the registered type's name
        self.args = args
        self.kwargs = kwargs
        self.interrupts = 0  #: times it was running when its process ended
        self.static: dict[str, Any] | None = None  # the doc's fixed part, made once
        # ... and its JSON text without the closing brace (made with it; None: it is
        # not JSON after all, and the store's own encoding of the doc reports it).
        self.prefix: str | None = None
        self.part: str | None = None  # the JSON text of the doc's shared part (made with it)
        #: Its end is committed (or never will be): until then the task is terminal in
        #: memory only, and ``done()``, ``wait()`` and subscribers do not see it yet.
        #: Set only under the cluster lock (after the commit: ``Runtime.after_lock``);
        #: ``ended()`` reads it without the lock: False -> True once, never back.
        self.recorded = False

    def again(self) -> Durable:
        """The same call, as a new task (a resurrect)."""
        return Durable(self.kind, self.args, self.kwargs)


def check_json(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """TypeError naming the argument that is not JSON (at ``add_task``)."""
    for i, arg in enumerate(args, 1):
        if not _is_json(arg):
            raise TypeError(
                f"argument {i} ({type(arg).__name__}) of a durable task must be JSON-serializable"
            )
    for name, arg in kwargs.items():
        if not _is_json(arg):
            raise TypeError(
                f"keyword argument {name!r} ({type(arg).__name__}) of a durable task must "
                "be JSON-serializable"
            )


def _is_json(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------------- encoding


def _wall(clock: Clock, mono: float | None) -> float | None:
    """The stored form of monotonic time ``mono``: epoch seconds (JSON has no infinity:
    ``None`` for "never", -1e18 for "always due")."""
    if mono is None or not math.isfinite(mono):
        return None if mono is None or mono > 0 else -1e18
    # Float arithmetic, not a datetime: it was a third of what encoding a row cost.
    return clock.to_epoch(mono)


def _mono(clock: Clock, wall: float | None) -> float | None:
    """``_wall``'s inverse (``None`` stays ``None``)."""
    if wall is None:
        return None
    return clock.from_epoch(wall)


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _backoff_doc(strategy: Callable[[int], float] | None) -> dict[str, Any] | None:
    if strategy is None:
        return None
    if type(strategy) is FixedBackoff:
        return {"kind": "fixed", "delay": strategy.delay}
    if type(strategy) is LinearBackoff:
        return {"kind": "linear", "base": strategy.base, "step": strategy.step,
                "max": strategy.max}  # fmt: skip
    if type(strategy) is ExponentialBackoff:
        return {"kind": "exponential", "base": strategy.base,
                "multiplier": strategy.multiplier, "max": strategy.max}  # fmt: skip
    return {"kind": "custom"}  # a callable: it does not survive a restart


def _opts_doc(opts: Options) -> dict[str, Any]:
    """The doc of a task's options (``doc["opts"]``), but ``name``, ``tags`` and ``key``
    (the row's own keys: see ``FORMAT``)."""
    repeat = opts.repeat
    return {
        "timeout": opts.timeout,
        "retries": "unlimited" if opts.retries == UNLIMITED else opts.retries,
        "backoff": _backoff_doc(opts.backoff),
        "jitter": opts.jitter,
        "mode": opts.retry_mode.value,
        "rules": [
            {
                "errors": [_path(e) for e in rule.errors],
                "retries": "unlimited" if rule.retries == UNLIMITED else rule.retries,
                "backoff": _backoff_doc(rule.backoff),
            }
            for rule in opts.rules
        ],
        "ttl": opts.ttl,
        "repeat": None
        if repeat is None
        else {
            "every": repeat.every,
            "cron": repeat.cron,
            "count": repeat.count,
            "until": None if repeat.until is None else repeat.until.isoformat(),
            "stop_on_error": repeat.stop_on_error,
        },
    }


#: The shared part of a doc that tasks of one type, executor and options have (the
#: part's doc and its JSON text, see ``FORMAT``), by a key of those values. Tasks are
#: mostly submitted in many copies of a few builders, so each part is built and
#: encoded once instead of once per task.
_SHARED: dict[tuple[object, ...], tuple[dict[str, Any], str]] = {}
_MAX_SHARED = 1024  # past that, new parts are built and not kept


def _shared(kind: str, executor: str, opts: Options) -> tuple[dict[str, Any], str]:
    """See ``_SHARED``. A repeating task's part is not kept (each series is its own)."""
    timeout, jitter, ttl = opts.timeout, opts.jitter, opts.ttl
    key = None
    if opts.repeat is None:
        # The numbers' types too: 1 == 1.0 as keys, and their JSON differs. The
        # strategies are compared by identity (they define no ``__eq__``).
        key = (kind, executor, opts.retries, opts.backoff, opts.retry_mode, opts.rules,
               timeout, type(timeout), jitter, type(jitter), ttl, type(ttl))  # fmt: skip
        try:
            part = _SHARED.get(key)
        except TypeError:  # an unhashable custom backoff, say
            key = part = None
        if part is not None:
            return part
    doc = {"type": kind, "executor": executor, "opts": _opts_doc(opts)}
    part = (doc, dumps(doc))
    if key is not None and len(_SHARED) < _MAX_SHARED:
        _SHARED[key] = part
    return part


def _static(task: Task, clock: Clock) -> tuple[dict[str, Any], str | None, str | None]:
    """The part of a task's doc that never changes after submit (its shared part's keys
    included), the JSON text of its own keys without the closing brace, and the
    shared part's text (``None``, ``None`` if it is not JSON: the store reports it)."""
    opts = task.opts
    spec: Durable = opts.durable  # type: ignore[assignment]
    executor = task.lane.name if task.lane is not None else "threads"
    submitted = _wall(clock, task.submitted_at)
    args, kwargs = spec.args, spec.kwargs
    name, tags, key = opts.name, opts.tags, opts.key
    # The doc's own fixed keys, those with their default left out (see FORMAT).
    own: dict[str, Any] = {"v": FORMAT}
    if args:
        own["args"] = list(args)
    if kwargs:
        own["kwargs"] = kwargs
    own["submitted"] = submitted
    if name != spec.kind:
        own["name"] = name
    if tags:
        own["tags"] = list(tags)
    if key is not None:
        own["key"] = key
    prefix: str | None
    part: str | None
    try:
        shared, part = _shared(spec.kind, executor, opts)
        if len(own) == 2:  # (the common task: no arguments, its type's name, no labels)
            prefix = f'{{"v":{FORMAT},"submitted":{dumps(submitted)}'
        else:
            prefix = dumps(own)[:-1]
    except (TypeError, ValueError, RecursionError):  # arguments changed since add_task
        shared = {"type": spec.kind, "executor": executor, "opts": _opts_doc(opts)}
        prefix = part = None
    return {**shared, **own}, prefix, part


def encode(task: Task, clock: Clock, state: str | None = None) -> Row:
    """The row of durable ``task`` as it stands (called under the cluster lock); a
    dead letter's row (state ``"dead"``) has its own row id.

    The row carries its doc's JSON text, made part by part: its shared part
    (``Row.part``: type, executor, options) is encoded once per builder's options
    (``_SHARED``), its own fixed keys once per task (``Durable.prefix``), and only
    what changes is encoded here (``Row.text``: the doc without the shared part's
    keys, as the encoder writes it). (Encoding each doc whole was most of a durable
    submit's Python work.)
    """
    opts = task.opts
    spec: Durable = opts.durable  # type: ignore[assignment]
    static = spec.static
    if static is None:
        static, spec.prefix, spec.part = _static(task, clock)
        spec.static = static
    # The changing part, in the doc's key order (after the fixed part's keys).
    priority, attempts, interrupts = task.priority, task.attempts, spec.interrupts
    start = _wall(clock, task.start)
    counts = opts.counts
    # (Each int key is left out when it is the int 0: see _DEFAULTS.)
    dynamic: dict[str, Any] = {}
    if priority != 0 or type(priority) is not int:
        dynamic["priority"] = priority
    dynamic["start"] = start
    if attempts != 0 or type(attempts) is not int:
        dynamic["attempts"] = attempts
    if interrupts != 0 or type(interrupts) is not int:
        dynamic["interrupts"] = interrupts
    if counts is not None:
        dynamic["counts"] = {"rules": counts.rules, "default": counts.default}
    series = opts.series
    if series is not None:
        dynamic["series"] = {
            "first": _wall(clock, series.first),
            "last_due": _wall(clock, series.last_due),
            "run": series.run,
        }
    if opts.last_error is not None:
        dynamic["last_error"] = _error_doc(opts.last_error)
    task_state = task.state
    succeeded = task_state is TaskState.SUCCEEDED
    value: str | None = None  # a result's JSON: encoding it is the check that it is JSON
    if task_state in _ENDED:
        dynamic["finished"] = _wall(clock, task.finished_at)
        if opts.ttl is not None and task.finished_at is not None:
            dynamic["expires"] = _wall(clock, task.finished_at + opts.ttl)
        if succeeded:
            try:
                value = dumps(task.value)
            except (TypeError, ValueError, RecursionError):
                value = None
        elif task_state is TaskState.CANCELLED:
            dynamic["cancelled"] = task._error  # the reason
        else:
            dynamic["error"] = _error_doc(task.error)  # type: ignore[arg-type]
    text = None
    prefix = spec.prefix
    if prefix is None:
        pass  # the store encodes the doc itself (and reports what is not JSON)
    elif len(dynamic) == 1 and (start is None or type(start) is float):
        # The common row (queued: only its start), as the encoder writes it: the repr
        # of a float is JSON's own.
        when = "null" if start is None else float.__repr__(start)
        text = f'{prefix},"start":{when}}}'
    elif (
        len(dynamic) == 1 + (priority != 0) + (attempts != 0) + (interrupts != 0)
        and type(priority) is int
        and type(attempts) is int
        and type(interrupts) is int
        and (start is None or type(start) is float)
    ):
        # A row of a running or prioritised task, as the encoder writes it: the reprs
        # of int and float are JSON's own.
        when = "null" if start is None else float.__repr__(start)
        pieces = [prefix]
        if priority:
            pieces.append(f',"priority":{priority}')
        pieces.append(f',"start":{when}')
        if attempts:
            pieces.append(f',"attempts":{attempts}')
        if interrupts:
            pieces.append(f',"interrupts":{interrupts}')
        pieces.append("}")
        text = "".join(pieces)
    else:
        try:
            tail = dumps(dynamic)
        except (TypeError, ValueError, RecursionError):
            tail = None
        if tail is not None:
            if succeeded:  # the last key, spliced in
                end = '{"unavailable":true}' if value is None else f'{{"json":{value}}}'
                tail = f'{tail[:-1]},"value":{end}}}'
            text = f"{prefix},{tail[1:]}"
    if succeeded:
        dynamic["value"] = {"unavailable": True} if value is None else {"json": task.value}
    state = state or task_state._value_
    row_id = task.id if state != "dead" else DEAD_PREFIX + task.id  # type: ignore[operator]
    part = spec.part if text is not None else None
    return Row(row_id, task.seq, state, {**static, **dynamic}, text, part)  # type: ignore[arg-type]


def encode_submitted(tasks: list[Task], clock: Clock) -> list[Row]:
    """The rows of durable ``tasks`` just reserved for a submit (``submit_all``; under
    the cluster lock): ``[encode(task, clock) for task in tasks]``, the same rows, with
    the per-task work of the common task done in one loop.

    The common task: a first submit (no fixed part made yet), no attempt, interrupt,
    retry count, series or error, a float or no start, its state queued or delayed,
    no tags and no key. Its doc is its shared part's keys, ``v``, ``args`` and
    ``kwargs`` when not empty, ``submitted``, ``name`` when not its type's, and
    ``start``. Any other task goes through ``encode``.
    """
    rows: list[Row] = []
    append = rows.append
    to_epoch = clock.to_epoch
    head = f'{{"v":{FORMAT}'
    pending, delayed = TaskState.PENDING, TaskState.DELAYED
    # The previous common task's shared part, and what it was made of: a task whose
    # options hold the very same objects has the same part (copies of one builder).
    last: tuple[object, ...] = ()
    shared: dict[str, Any] = {}
    part = ""
    for task in tasks:
        opts = task.opts
        spec: Durable = opts.durable  # type: ignore[assignment]
        mono = task.start
        state = task.state
        submitted_at = task.submitted_at
        if (
            spec.static is not None
            or task.attempts
            or spec.interrupts
            or opts.counts is not None
            or opts.series is not None
            or opts.last_error is not None
            or opts.tags
            or opts.key is not None
            or opts.repeat is not None
            or type(task.priority) is not int
            or (state is not pending and state is not delayed)
            or type(mono) is not float
            or not math.isfinite(mono)
            or type(submitted_at) is not float
            or not math.isfinite(submitted_at)
        ):
            append(encode(task, clock))
            continue
        kind = spec.kind
        lane = task.lane
        made = (kind, lane, opts.timeout, opts.retries, opts.backoff, opts.jitter,
                opts.retry_mode, opts.rules, opts.ttl)  # fmt: skip
        if len(last) != len(made) or any(a is not b for a, b in zip(made, last, strict=True)):
            executor = lane.name if lane is not None else "threads"
            try:
                shared, part = _shared(kind, executor, opts)
            except (TypeError, ValueError, RecursionError):  # (encode reports it)
                last = ()
                append(encode(task, clock))
                continue
            last = made
        args, kwargs, name = spec.args, spec.kwargs, opts.name
        submitted = to_epoch(submitted_at)
        start = to_epoch(mono)
        if not args and not kwargs and name == kind:
            static = {**shared, "v": FORMAT, "submitted": submitted}
            prefix = f'{head},"submitted":{float.__repr__(submitted)}'
        else:
            own: dict[str, Any] = {"v": FORMAT}
            pieces = [head]
            try:
                if args:
                    own["args"] = list(args)
                    pieces.append(f',"args":{dumps(args)}')
                if kwargs:
                    own["kwargs"] = kwargs
                    pieces.append(f',"kwargs":{dumps(kwargs)}')
                own["submitted"] = submitted
                pieces.append(f',"submitted":{float.__repr__(submitted)}')
                if name != kind:
                    own["name"] = name
                    pieces.append(f',"name":{dumps(name)}')
            except (TypeError, ValueError, RecursionError):  # (encode reports it)
                append(encode(task, clock))
                continue
            static = {**shared, **own}
            prefix = "".join(pieces)
        spec.static = static
        spec.prefix = prefix
        spec.part = part
        priority = task.priority
        if priority:
            doc = {**static, "priority": priority, "start": start}
            text = f'{prefix},"priority":{priority},"start":{float.__repr__(start)}}}'
        else:
            doc = {**static, "start": start}
            text = f'{prefix},"start":{float.__repr__(start)}}}'
        append(Row(task.id, task.seq, state._value_, doc, text, part))  # type: ignore[arg-type]
    return rows


#: The states a task ends in (a tuple: members are compared by identity, no hashing).
_ENDED = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT)


def _error_doc(error: BaseException) -> dict[str, str]:
    import traceback

    if isinstance(error, StoredError):
        return {"type": error.type_name, "message": str(error), "text": error.text}
    try:
        text = "".join(traceback.format_exception(error))
        message = str(error)
    except Exception:  # a __str__ that raises: the type is still worth keeping
        text = message = f"<{type(error).__name__}>"
    return {"type": _path(type(error)), "message": message, "text": text}


# ---------------------------------------------------------------------- decoding


class BadDoc(ValueError):
    """A row whose doc cannot become a task (kept aside with this reason)."""


#: The strategies decoded so far, by their doc's values: they are immutable (see
#: ``_backoff._Strategy``), so every recovered task with the same one shares it
#: instead of building its own (most share the default ``FixedBackoff(0)``).
_STRATEGIES: dict[tuple[object, ...], Callable[[int], float]] = {}
_MAX_STRATEGIES = 256  # past that, new ones are built and not kept


def _backoff_of(doc: dict[str, Any] | None) -> Callable[[int], float] | None:
    if doc is None:
        return None
    kind = doc.get("kind")
    values: tuple[Any, ...]
    if kind == "fixed":
        values = (doc["delay"],)
    elif kind == "linear":
        values = (doc["base"], doc["step"], doc["max"])
    elif kind == "exponential":
        values = (doc["base"], doc["multiplier"], doc["max"])
    else:
        return None  # custom: gone with its process
    # Only floats (what encode writes) are looked up: 1 == 1.0 == True as keys, and a
    # stored ``true`` must still be refused by the strategy's own checks.
    plain = all(type(value) is float or value is None for value in values)
    key = (kind, *values)
    strategy = _STRATEGIES.get(key) if plain else None
    if strategy is None:
        if kind == "fixed":
            strategy = FixedBackoff(*values)
        elif kind == "linear":
            strategy = LinearBackoff(*values)  # (base, step, max)
        else:
            strategy = ExponentialBackoff(*values)  # (base, multiplier, max)
        if plain and len(_STRATEGIES) < _MAX_STRATEGIES:
            _STRATEGIES[key] = strategy
    return strategy


def _class_of(path: str) -> type[BaseException]:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise BadDoc(f"{path} is not an exception class")
    return obj


def _count(value: object) -> int:
    return UNLIMITED if value == "unlimited" else int(value)  # type: ignore[call-overload]


def stored_error(doc: dict[str, Any] | None) -> StoredError | None:
    """The StoredError of an error doc."""
    if doc is None:
        return None
    type_name = str(doc.get("type", ""))
    short = type_name.rpartition(":")[2] or "Error"
    return StoredError(
        f"{short}: {doc.get('message', '')}", type_name=type_name, text=str(doc.get("text", ""))
    )


#: ``RetryMode(value)`` without the enum's call machinery (a dict lookup per row).
_MODES = {mode.value: mode for mode in RetryMode}


#: ``decode_doc``'s ``cache``: the options of a shared part, decoded once: the id of
#: the part's ``opts`` dict -> (that dict, kept alive so the id stays its own; the
#: Options made of it, without name, tags, key or per-task state).
OptionsCache = dict[int, tuple[dict[str, Any], Options]]
_MAX_CACHED = 1024  # distinct option sets per recovery; past that, each is decoded


def _options_of(o: dict[str, Any]) -> Options:
    """Options from a doc's ``opts`` (a copy of the defaults, the stored values over
    them), without the name, tags and key."""
    opts = DEFAULT_OPTIONS.copy()
    opts.timeout = o["timeout"]
    opts.retries = _count(o["retries"])
    backoff = _backoff_of(o["backoff"])
    if backoff is not None:
        opts.backoff = backoff
    opts.jitter = float(o["jitter"])
    mode = o["mode"]
    opts.retry_mode = _MODES.get(mode) or RetryMode(mode)
    opts.rules = tuple(
        RetryRule(
            tuple(_class_of(path) for path in rule["errors"]),
            _count(rule["retries"]),
            _backoff_of(rule["backoff"]),
        )
        for rule in o["rules"]
    )
    opts.ttl = o["ttl"]
    repeat = o["repeat"]
    if repeat is not None:
        until = repeat["until"]
        opts.repeat = Repeat(
            repeat["every"],
            cron=repeat["cron"],
            count=repeat["count"],
            until=None if until is None else datetime.fromisoformat(until),
            stop_on_error=repeat["stop_on_error"],
        )
    return opts


#: How many keys the doc of a plain queued task has (format 2): its part's ``type``,
#: ``executor`` and ``opts``, then ``v``, ``submitted`` and ``start``; every other key
#: has its default and is left out (see ``_DEFAULTS``).
_PLAIN_KEYS = 6


def _decode_plain(
    row: Row,
    task_id: str,
    doc: dict[str, Any],
    fn: Callable[..., Any],
    kind: str,
    clock: Clock,
    lanes: dict[str, Any],
    cache: OptionsCache,
) -> Task | None:
    """``decode_doc`` of a doc with only the plain keys (``_PLAIN_KEYS``), or None when
    it is not one (``decode_doc`` then reads it the long way, and reports it)."""
    try:
        o = doc["opts"]
        submitted = doc["submitted"]
        start = doc["start"]
        executor = doc["executor"]
    except KeyError:
        return None
    cached = cache.get(id(o))
    lane = lanes.get(executor)
    if (
        cached is None
        or cached[0] is not o
        or cached[1].repeat is not None
        or lane is None
        or (type(submitted) is not float and submitted is not None)
        or (type(start) is not float and start is not None)
    ):
        return None
    from_epoch = clock.from_epoch
    task = Task(fn, (), {})
    task.id = task_id
    task.seq = row.seq
    task.submitted_at = None if submitted is None else from_epoch(submitted)  # type: ignore[assignment]
    task.start = math.inf if start is None else from_epoch(start)
    opts = cached[1].copy()
    opts.name = kind
    opts.durable = Durable(kind, (), {})
    task.opts = opts
    task.lane = lane
    return task


def decode_doc(
    row: Row,
    registry: dict[str, Callable[..., Any]],
    clock: Clock,
    lanes: dict[str, Any],
    cache: OptionsCache | None = None,
) -> Task:
    """A task from its row (state, times and series restored); BadDoc if it cannot be.

    ``cache`` (one per recovery): the rows of a shared part share one ``opts`` dict
    (see ``SQLiteStore.load``), decoded into Options once and copied for each task.
    """
    doc = row.doc
    task_id = row.id[len(DEAD_PREFIX) :] if row.id.startswith(DEAD_PREFIX) else row.id
    version = doc.get("v")
    if version not in _FORMATS or type(version) is not int:
        raise BadDoc(f"doc format {version!r} is not one of {', '.join(map(str, _FORMATS))}")
    kind = doc.get("type")
    fn = registry.get(kind)  # type: ignore[arg-type]
    if fn is None:
        raise BadDoc(f"task type {kind!r} is not registered")
    from_epoch = clock.from_epoch
    if version == 2 and len(doc) == _PLAIN_KEYS and cache is not None:
        task = _decode_plain(row, task_id, doc, fn, kind, clock, lanes, cache)  # type: ignore[arg-type]
        if task is not None:
            return task
    get = doc.get
    try:
        if version == 2:  # (the keys with their default are left out: see FORMAT)
            args = tuple(get("args", ()))
            kwargs = dict(get("kwargs", ()))
            priority = get("priority", 0)
            attempts = get("attempts", 0)
        else:
            args = tuple(doc["args"])
            kwargs = dict(doc["kwargs"])
            priority = doc["priority"]
            attempts = doc["attempts"]
        o = doc["opts"]
        task = Task(fn, args, kwargs)
        task.id = task_id
        task.seq = row.seq
        task.priority = priority if type(priority) is int else int(priority)
        submitted = doc["submitted"]
        task.submitted_at = None if submitted is None else from_epoch(submitted)  # type: ignore[assignment]
        start = doc["start"]
        task.start = math.inf if start is None else from_epoch(start)
        task.attempts = attempts if type(attempts) is int else int(attempts)
        # A copy of the defaults (slots set one by one, as a builder's copy is), then
        # the stored options over them: made once per shared part, then copied.
        cached = None if cache is None else cache.get(id(o))
        if cached is not None and cached[0] is o:
            opts = cached[1].copy()
        else:
            template = _options_of(o)
            if cache is not None and len(cache) < _MAX_CACHED:
                cache[id(o)] = (o, template)
            opts = template.copy()
        if version == 2:
            opts.name = get("name", kind)
            tags = get("tags")
            if tags:
                opts.tags = tuple(tags)
            opts.key = get("key")
        else:
            opts.name = o["name"]
            opts.tags = tuple(o["tags"])
            opts.key = o["key"]
        if opts.repeat is not None:
            s = doc.get("series") or {}
            first = _mono(clock, s.get("first")) or task.start
            series = opts.series = Series(first)
            series.last_due = _mono(clock, s.get("last_due")) or first
            series.run = int(s.get("run", 0))
        counts = get("counts")
        if counts is not None:
            opts.counts = RetryCounts(list(counts["rules"]), int(counts["default"]))
        last_error = get("last_error")
        if last_error is not None:
            opts.last_error = stored_error(last_error)
        spec = opts.durable = Durable(kind, args, kwargs)  # type: ignore[arg-type]
        interrupts = get("interrupts", 0)
        spec.interrupts = interrupts if type(interrupts) is int else int(interrupts)
        task.opts = opts
        executor = get("executor", "threads")
        lane = lanes.get(executor)
        if lane is None:
            raise BadDoc(f"executor {executor!r} is not one of this cluster's")
        task.lane = lane
        if "finished" in doc:
            task.finished_at = _mono(clock, doc["finished"])
            if "value" in doc:
                value = doc["value"]
                task.value = value.get("json", UNAVAILABLE)
            reason = doc.get("cancelled")
            task._error = stored_error(doc.get("error")) if reason is None else str(reason)
            spec.recorded = True  # read from the file: its end is durable
    except BadDoc:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as exc:
        raise BadDoc(f"{type(exc).__name__}: {exc}") from None
    return task


def expires_at(row: Row, clock: Clock) -> float | None:
    """When a stored cached Result expires (monotonic), or None."""
    return _mono(clock, row.doc.get("expires"))
