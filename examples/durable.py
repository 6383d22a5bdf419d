"""Durable tasks survive ``kill -9``: run this script twice.

    python examples/durable.py --crash   # queues 10 invoices, dies by SIGKILL mid-way
    python examples/durable.py           # the invoices not yet sent are sent now

The tasks live in ``jobs.db`` (in the current directory): a task type registered by
name (``@c.register``) with JSON arguments is committed to disk before ``submit()``
returns. When the cluster opens the file again, every task comes back: those still
queued run, the one that was running when the process died is retried (its attempt
counts), and the ones already sent come back as cached Results. The invoice that was
being sent at the crash is sent again, so real task code should be idempotent.
Delete ``jobs.db`` to start over.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from cluster import Cluster, TaskState

INVOICES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crash", action="store_true", help="kill -9 this process mid-way")
    parser.add_argument("--store", default="jobs.db", help="the task store (default: jobs.db)")
    options = parser.parse_args()

    c = Cluster(workers=1, store=options.store)

    def send_invoice(number: int, amount: int) -> dict[str, float]:
        time.sleep(0.05)  # talking to the mail server...
        print(f"sent invoice {number} ({amount} EUR)", flush=True)
        if options.crash and number == 4:
            print("the process dies now (SIGKILL): run the script again", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return {"number": number, "sent_at": time.time()}

    c.register("send_invoice", send_invoice)  # a task type that survives restarts

    c.run()  # the stored tasks come back here
    stored = {info.id for info in c.tasks(name="send_invoice", limit=INVOICES)}
    missing = [n for n in range(1, INVOICES + 1) if f"invoice-{n}" not in stored]
    if missing:
        c.submit_all(
            c.add_task("send_invoice", n, 100 * n)
            .with_id(f"invoice-{n}")
            .with_retry(3)
            .with_cache(ttl=3600)  # keep each Result (in jobs.db too) for an hour
            for n in missing
        )
        print(f"queued invoices {missing[0]}..{missing[-1]} in {options.store}", flush=True)
    else:
        print(f"found {len(stored)} invoices in {options.store}", flush=True)

    for n in range(1, INVOICES + 1):
        c.subscribe(f"invoice-{n}").get()  # at once for those sent before
    sent = c.tasks(name="send_invoice", state=TaskState.SUCCEEDED, limit=INVOICES)
    c.stop()
    if len(sent) == INVOICES:
        print(f"all {INVOICES} invoices sent", flush=True)
    else:
        print(f"{len(sent)} of {INVOICES} invoices sent; see c.dead_letters()", flush=True)


if __name__ == "__main__":
    main()
