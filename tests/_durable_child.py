"""Child processes of the durable-task tests: ``python _durable_child.py MODE PATH ...``.

Every line it writes on stdout is one JSON object, written whole with ``os.write``
(lines of several threads never interleave, nothing waits in a buffer), so a parent
that SIGKILLs it knows exactly what it had reported.

``serve PATH WORKERS [cpu]``
    Opens ``Cluster(workers=WORKERS, store=PATH)`` (with ``cpu``: and a
    ``ProcessExecutor(1)`` named ``"cpu"``) and registers every type of
    ``_durable_tasks.TYPES`` (an error opening it: ``{"open_error": ..., "type": ...}``,
    exit 0), reports ``{"ready": pid}``, then runs one command per stdin line (JSON)
    and answers each with ``{"re": op, ...}``:
    ``run``; ``submit`` with a ``spec`` (see ``build``) → ``ack`` (the id) or
    ``refused``; ``submit_all`` with ``specs``; ``info``, ``cancel`` or
    ``reprioritize`` (to ``priority``) of an ``id``; ``dead`` (the dead letters);
    ``wait`` for an ``id``; ``resurrect`` of ``ids``; ``stop`` (graceful, then exit).
    Tasks report ``{"ev": ...}`` lines as they run.

``crash PATH SEED``
    Submits a workload chosen by ``SEED`` (plain, delayed, failing with retries,
    long-running, repeating, cached, in ``submit_all`` batches) on a running
    cluster, reporting ``{"ack": id, "kind": ..., ...}`` after each submit returned
    and ``{"res": id, "ok": ..., ...}`` for each Result delivered (per run for a
    repeating task), until the parent kills it. ``{"submitted": n}`` once all are in.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _durable_tasks

from cluster import (
    Cluster,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    RetryMode,
    TaskBuilder,
)


def say(**event: Any) -> None:
    """One JSON line on stdout."""
    os.write(1, (json.dumps(event, sort_keys=True, default=repr) + "\n").encode())


def error_name(error: BaseException | None) -> str | None:
    """What the parent compares errors by: the class name (a StoredError's original one)."""
    if error is None:
        return None
    type_name = getattr(error, "type_name", "")
    return str(type_name).rpartition(":")[2] if type_name else type(error).__name__


_BACKOFFS: dict[str, Callable[..., Callable[[int], float]]] = {
    "fixed": FixedBackoff,
    "linear": LinearBackoff,
    "exponential": ExponentialBackoff,
}

_ERRORS: dict[str, type[BaseException]] = {
    "OSError": OSError,
    "ValueError": ValueError,
    "KeyError": KeyError,
}


def build(c: Cluster, spec: dict[str, Any]) -> TaskBuilder[Any]:
    """The builder ``spec`` describes: ``type``, ``args``, ``kwargs`` and each option."""
    b = c.add_task(spec["type"], *spec.get("args", ()), **spec.get("kwargs", {}))
    if "id" in spec:
        b.with_id(spec["id"])
    if "priority" in spec:
        b.with_priority(spec["priority"])
    if "start" in spec:
        b.with_start_time(datetime.fromisoformat(spec["start"]))
    if "delay" in spec:
        b.with_delay(spec["delay"])
    if "timeout" in spec:
        b.with_timeout(spec["timeout"])
    if "retries" in spec:
        b.with_retry(spec["retries"])
    if "backoff" in spec:
        kind, *params = spec["backoff"]
        b.with_backoff(_BACKOFFS[kind](*params))
    if "jitter" in spec:
        b.with_jitter(spec["jitter"])
    if "mode" in spec:
        b.with_retry_mode(RetryMode[spec["mode"]])
    for errors, retries in spec.get("rules", ()):
        b.with_retry_rule(*(_ERRORS[e] for e in errors), retries=retries)
    if "ttl" in spec:
        b.with_cache(spec["ttl"])
    if "name" in spec:
        b.with_name(spec["name"])
    if "tags" in spec:
        b.with_tags(*spec["tags"])
    if "key" in spec:
        b.with_key(spec["key"])
    if "executor" in spec:
        b.with_executor(spec["executor"])
    if "repeat" in spec:
        b.repeat(**spec["repeat"])
    if spec.get("callables"):  # options that do not survive a restart
        b.with_backoff(lambda n: 0.01 * n)
        b.retry_if(lambda error: True)
        b.on_complete(lambda task_id, value, error: None)
        b.on_failure(lambda task_id, error: None)
    return b


def open_cluster(path: str, workers: int, process: bool = False) -> Cluster:
    executors: dict[str, Any] = {}
    if process:
        from cluster import ProcessExecutor

        executors["cpu"] = ProcessExecutor(1)
    c = Cluster(workers=workers, store=path, executors=executors)
    for name, fn in _durable_tasks.TYPES.items():
        c.register(name, fn)
    return c


# ----------------------------------------------------------------------------- serve


def info_doc(c: Cluster, task_id: str) -> dict[str, Any]:
    i = c.info(task_id)
    return {
        "id": i.id,
        "state": i.state.value,
        "attempts": i.attempts,
        "priority": i.priority,
        "value": i.value,
        "error": error_name(i.error),
        "name": i.name,
        "tags": list(i.tags),
        "key": i.key,
        "runs": i.runs,
        "next_run_at": None if i.next_run_at is None else i.next_run_at.timestamp(),
        "start_at": None if i.start_at is None else i.start_at.timestamp(),
    }


def serve(path: str, workers: int, process: bool) -> None:
    _durable_tasks.REPORT_FD = 1
    try:
        c = open_cluster(path, workers, process)
    except Exception as exc:
        say(open_error=str(exc), type=type(exc).__name__)
        return
    say(ready=os.getpid())
    # What this child submitted: "wait" reads a handle, which holds its Result even
    # once the task ended and was purged (a subscription made after that would not
    # find it: a fast task can end before the parent's "wait" arrives).
    submitted: dict[str, Any] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "run":
                c.run()
                say(re=op, unrecovered=[[b.id, b.reason] for b in c.unrecovered])
            elif op == "submit":
                handle = build(c, cmd["spec"]).submit()
                submitted[handle.id] = handle
                say(re=op, ack=handle.id)
            elif op == "submit_all":
                handles = c.submit_all([build(c, spec) for spec in cmd["specs"]])
                submitted.update((h.id, h) for h in handles)
                say(re=op, ack=[h.id for h in handles])
            elif op == "info":
                say(re=op, info=info_doc(c, cmd["id"]))
            elif op == "dead":
                dead = [
                    {"id": d.id, "error": error_name(d.error), "attempts": d.attempts}
                    for d in c.dead_letters()
                ]
                say(re=op, dead=dead)
            elif op == "wait":
                timeout = cmd.get("timeout", 10)
                held = submitted.get(cmd["id"])
                if held is None:  # recovered from the store: still queued or running
                    result = c.subscribe(cmd["id"]).get(timeout=timeout)
                else:
                    result = held.wait(timeout)
                    if result is None:
                        raise TimeoutError(f"{cmd['id']} did not end within {timeout} s")
                say(re=op, ok=result.ok, value=result.value, error=error_name(result.error))
            elif op == "cancel":
                say(re=op, cancelled=c.cancel_task(cmd["id"]))
            elif op == "reprioritize":
                say(re=op, done=c.reprioritize(cmd["id"], cmd["priority"]))
            elif op == "resurrect":
                say(re=op, ack=[h.id for h in c.resurrect(*cmd["ids"])])
            elif op == "stop":
                c.stop(timeout=10)
                say(re=op)
                return
        except Exception as exc:
            say(re=op, refused=f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- crash


def workload(seed: int) -> list[list[dict[str, Any]]]:
    """The submits of seed ``seed``: each item one ``submit`` (a one-spec list) or one
    ``submit_all`` batch. Every spec has an id and a ``kind``."""
    rng = random.Random(seed)
    items: list[list[dict[str, Any]]] = []
    n = 0

    def spec() -> dict[str, Any]:
        nonlocal n
        n += 1
        kind = rng.choices(
            ["plain", "delayed", "flaky", "fail", "long", "repeat"],
            weights=[6, 3, 3, 1, 2, 1],
        )[0]
        s: dict[str, Any] = {"id": f"s{seed}-{n}", "kind": kind, "priority": rng.randint(0, 3)}
        if kind == "plain":
            s.update(type="echo", args=[n])
        elif kind == "delayed":
            s.update(type="echo", args=[n], delay=round(rng.uniform(0.01, 0.4), 3))
        elif kind == "flaky":
            failures = rng.randint(1, 3)
            s.update(type="flaky", args=[failures], retries=rng.randint(failures - 1, 4))
            s["backoff"] = ["fixed", round(rng.uniform(0.0, 0.1), 3)]
        elif kind == "fail":
            s.update(type="fail", args=[f"no {n}"], retries=rng.randint(0, 1))
        elif kind == "long":
            s.update(type="sleep", args=[round(rng.uniform(0.05, 0.4), 3)], retries=1)
        else:
            s.update(type="echo", args=[n], repeat={"every": 0.05, "count": 3}, retries=1)
        if rng.random() < 0.5:
            s["ttl"] = 3600
        return s

    for _ in range(rng.randint(15, 60)):
        if rng.random() < 0.15:
            items.append([spec() for _ in range(rng.randint(2, 6))])
        else:
            items.append([spec()])
    return items


def crash(path: str, seed: int) -> None:
    rng = random.Random(seed ^ 0x5EED)
    _durable_tasks.REPORT_FD = 1
    c = open_cluster(path, rng.randint(1, 3))
    c.run()
    watchers: list[threading.Thread] = []

    def delivered(task_id: str, value: Any, error: BaseException | None) -> None:
        say(res=task_id, ok=error is None, value=value, error=error_name(error))

    def watch_series(handle: Any) -> None:
        for result in handle.results():
            say(
                res=handle.id,
                ok=result.ok,
                value=result.value,
                error=error_name(result.error),
                run=result.run,
            )

    submitted = 0
    for item in workload(seed):
        builders = []
        for s in item:
            b = build(c, s)
            if "repeat" not in s:
                b.on_complete(delivered)
            builders.append(b)
        handles = [builders[0].submit()] if len(builders) == 1 else c.submit_all(builders)
        for s, handle in zip(item, handles, strict=True):
            say(ack=handle.id, kind=s["kind"], ttl=s.get("ttl"), batch=len(item))
            if "repeat" in s:
                watcher = threading.Thread(target=watch_series, args=(handle,), daemon=True)
                watcher.start()
                watchers.append(watcher)
        submitted += len(item)
    say(submitted=submitted)
    threading.Event().wait()  # until killed


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "serve":
        workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        serve(path, workers, process=sys.argv[4:5] == ["cpu"])
    elif mode == "crash":
        crash(path, int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
