"""Child processes for tests/test_store.py: ``python _store_child.py MODE PATH [ARGS]``.

Each reports through stdout, one line per event, written with ``os.write`` so that
lines from several threads never interleave and nothing waits in a buffer:

- ``hold PATH``: open the store, write one row ``held``, print ``ready <pid>``, then
  keep the store until stdin closes (or the process is killed).
- ``write PATH SEED``: open the store, print ``ready``, then three threads write until
  the process is killed. Before each ``write()`` a thread prints ``try T N ID...`` and
  after it returns ``ack T N ID...``: the write puts rows ``ID...`` and the thread's
  counter row ``counter-T`` with ``{"n": N}``, in one call.
- ``enqueue PATH SEED THREADS``: as ``write``, with ``THREADS`` threads handing their
  rows over by ``enqueue()`` then ``wait()`` (half of them with their text encoded),
  printing ``ack`` once ``wait`` returns; no meta.
- ``fork-exit PATH``: open the store, write ``r1``, fork. The child tries to write
  (prints ``child-refused``), closes the store, drops it, and exits through a normal
  interpreter shutdown. The parent then prints ``wal-kept`` and ``main-unchanged`` if the
  child left its log and its database file alone, writes ``r2``, prints ``ack r2`` and
  kills itself with SIGKILL (so only the write-ahead log can hold ``r2``).
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import signal
import sys
import threading

from cluster._store import Row, SQLiteStore, dumps


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def hold(path: str) -> None:
    store = SQLiteStore(path)
    store.open()
    store.write([Row("held", 1, "pending", {"by": os.getpid()})])
    say(f"ready {os.getpid()}")
    sys.stdin.read()  # until the parent closes our stdin
    store.close()


def write(path: str, seed: int, via: str = "write", count: int = 3) -> None:
    store = SQLiteStore(path)
    store.open()
    say("ready")

    def writer(t: int) -> None:
        rng = random.Random(seed * 10 + t)
        n = 0
        while True:
            n += 1
            ids = [f"{t}.{n}.{j}" for j in range(rng.randint(1, 3))]
            rows = [
                Row(id_, n, "pending", {"t": t, "n": n, "pad": "x" * rng.randint(0, 300)})
                for id_ in ids
            ]
            rows.append(Row(f"counter-{t}", 0, "counter", {"n": n}))
            say(f"try {t} {n} {' '.join(ids)}")
            if via == "write":
                store.write(rows, meta={f"last-{t}": n})
            else:
                if n % 2:
                    rows = [Row(r.id, r.seq, r.state, r.doc, dumps(r.doc)) for r in rows]
                store.wait(store.enqueue(rows))
            say(f"ack {t} {n} {' '.join(ids)}")

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(count)]
    for thread in threads:
        thread.start()
    threading.Event().wait()  # until killed


def fork_exit(path: str) -> None:
    store = SQLiteStore(path)
    store.open()
    store.write([Row("r1", 1, "pending", {})])
    with open(path, "rb") as f:
        main_before = hashlib.sha256(f.read()).hexdigest()
    pid = os.fork()
    if pid == 0:
        try:
            store.write([Row("from-child", 2, "pending", {})])
        except RuntimeError:
            say("child-refused")
        store.close()
        del store
        gc.collect()
        sys.exit(0)  # a normal shutdown: finalizers run, module globals are cleared
    _, status = os.waitpid(pid, 0)
    say(f"child-exit {os.waitstatus_to_exitcode(status)}")
    if os.path.exists(path + "-wal"):
        say("wal-kept")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() == main_before:
            say("main-unchanged")
    store.write([Row("r2", 3, "pending", {})])
    say("ack r2")
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "hold":
        hold(target)
    elif mode == "write":
        write(target, int(sys.argv[3]))
    elif mode == "enqueue":
        write(target, int(sys.argv[3]), "enqueue", int(sys.argv[4]))
    elif mode == "fork-exit":
        fork_exit(target)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
