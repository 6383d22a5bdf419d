"""cluster: an in-process priority task cluster.

Run a script's CPU and I/O jobs on a pool of worker threads, in order of start
time and priority, with timeouts, retries with backoff and jitter, result
caching, callbacks, subscriber queues and cancellation by id::

    from cluster import Cluster

    with Cluster(workers=4) as c:
        handle = c.add_task(pow, 2, 10).with_priority(5).with_retry(2).submit()
        print(handle.result())
"""

from typing import TYPE_CHECKING, Any

from ._background import Attachment, Intermittent, Lifecycle, LifecycleContext
from ._backoff import ExponentialBackoff, FixedBackoff, LinearBackoff, RetryMode
from ._builder import TaskBuilder, TaskHandle
from ._cluster import Cluster
from ._completion import as_completed
from ._errors import (
    ClusterError,
    ClusterStoppedError,
    DuplicateTaskError,
    QueueFullError,
    RetryAfter,
    StopRetrying,
    StopTimeoutError,
    StoreError,
    StoreLockedError,
    StoreWriteError,
    TaskCancelledError,
    TaskInterruptedError,
    TaskNotFoundError,
    TaskTimeoutError,
    UnknownTaskTypeError,
    WorkerCrashedError,
)
from ._events import Observer
from ._futures import Executor
from ._group import TaskGroup
from ._task import (
    ClusterStats,
    DeadLetter,
    ExecutorStats,
    NameStats,
    Result,
    TaskContext,
    TaskInfo,
    TaskState,
    current,
)
from ._validate import UNLIMITED

if TYPE_CHECKING:
    from ._dask import DaskExecutor
    from ._durable import UNAVAILABLE, StoredError
    from ._process import ProcessExecutor
    from ._store import SQLiteStore

#: Names whose modules pull in more of the standard library: loaded on first use.
_LAZY = {
    "DaskExecutor": "_dask",  # needs the dask extra: ImportError naming it without
    "ProcessExecutor": "_process",
    "SQLiteStore": "_store",
    "StoredError": "_durable",
    "UNAVAILABLE": "_durable",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"cluster.{module}"), name)


__all__ = [
    "UNAVAILABLE",
    "UNLIMITED",
    "Attachment",
    "Cluster",
    "ClusterError",
    "ClusterStats",
    "ClusterStoppedError",
    "DaskExecutor",
    "DeadLetter",
    "DuplicateTaskError",
    "Executor",
    "ExecutorStats",
    "ExponentialBackoff",
    "FixedBackoff",
    "Intermittent",
    "Lifecycle",
    "LifecycleContext",
    "LinearBackoff",
    "NameStats",
    "Observer",
    "ProcessExecutor",
    "QueueFullError",
    "Result",
    "RetryAfter",
    "RetryMode",
    "SQLiteStore",
    "StopRetrying",
    "StopTimeoutError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "StoredError",
    "TaskBuilder",
    "TaskCancelledError",
    "TaskContext",
    "TaskGroup",
    "TaskHandle",
    "TaskInfo",
    "TaskInterruptedError",
    "TaskNotFoundError",
    "TaskState",
    "TaskTimeoutError",
    "UnknownTaskTypeError",
    "WorkerCrashedError",
    "as_completed",
    "current",
]
