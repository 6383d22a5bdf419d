"""The dashboard: ``Cluster.serve()`` (SPEC §17), standard library only.

::

    url = c.serve()              # http://127.0.0.1:PORT/ (a free port), loopback only
    url = c.serve(port=8787)
    url = c.serve(host="0.0.0.0", port=8787)   # other machines too (see Security)

A daemon thread serves, until the cluster stops (``stop()`` returns or raises, or
``cancel()`` returns; also if the cluster is garbage collected):

============================  =========================================================
``GET /``                     the page: live counters, executors, the tasks (filter by
                              state, name, tag; paged), per-name stats, dead letters with
                              resurrect and clear. Plain HTML and one inline script that
                              polls the JSON below once a second; nothing from the network.
``GET /api/stats``            ``c.stats()`` as JSON (``executors`` nested).
``GET /api/names``            ``{"names": {name: c.stats_by_name()[name]}}`` (it scans
                              every task the cluster holds: the page asks every 5 s).
``GET /api/tasks``            ``?state=&name=&tag=&key=&limit=&offset=`` → ``{"total",
                              "limit", "offset", "tasks": [...]}``, each task as ``info()``
                              gives it; ``state`` may list several, comma-separated;
                              ``limit`` ≤ 1000 (default 100).
``GET /dead-letters``         ``?name=&limit=&offset=`` → ``{"total", "limit", "offset",
                              "dead_letters": [...]}``, or an HTML table, by ``Accept``
                              (q-values honoured; ``*/*`` or none: JSON; ``?format=html``
                              or ``json`` overrides; 406 if neither is acceptable).
``POST /dead-letters/resurrect``  ``{"ids": [...]}`` → ``{"resurrected": [...]}``; 404 for
                              an id that is not a dead letter, 409 for one taken again.
``POST /dead-letters/clear``  ``{"ids": [...]}``, or ``{}`` for all → ``{"cleared": n}``.
``GET /metrics``              ``cluster.metrics.prometheus_text(c)``.
============================  =========================================================

In the JSON, datetimes are ISO 8601 with their UTC offset, states their value
(``"timed_out"``), errors ``{"type", "message"}``; values and progress are JSON
when they are JSON types, else ``{"repr": "..."}`` (clipped). A bad query value
(an unknown parameter, ``limit=-1``, ``state=bogus``) is a 400 with
``{"error": "..."}``; a GET on a POST route (or the reverse) a 405.

Security:

* **Loopback by default.** A client that is not on loopback gets a 403, unless
  ``serve()`` was given a host that is not a loopback address (``allow_remote``
  says otherwise explicitly). There is no login: on a non-loopback host anyone who
  can reach the port can read the dashboard and, with the token the page carries,
  resurrect and clear — put it behind an authenticating proxy for that.
* **Every POST** needs the server's per-run token (``secrets.token_urlsafe(32)``,
  in the page as ``<meta name="cluster-token" content="...">``) in an
  ``X-Cluster-Token`` header, an ``Origin`` (when present) that is the server's own,
  and a JSON body; otherwise 403 (415 for another body type) and nothing changes.
* **DNS rebinding:** the ``Host`` header must name this server (an IP literal,
  ``localhost``, or the host given to ``serve()``), else 403; so a hostile site
  whose name resolves to 127.0.0.1 cannot read the page, nor so the token.
* Responses carry a Content-Security-Policy with per-response nonces (no other
  script runs), ``X-Frame-Options: DENY`` (no clickjacking of the buttons),
  ``nosniff`` and ``no-store``. All user data is escaped (``textContent`` in the
  script, ``html.escape`` on the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._validate import integer

if TYPE_CHECKING:
    from cluster import Cluster

__all__ = ["serve"]


def serve(
    cluster: Cluster,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool | None = None,
) -> str:
    """Serve ``cluster``'s dashboard on ``host:port`` (0: a free port) and return its URL.

    ``allow_remote``: serve clients that are not on loopback; default: only when
    ``host`` is not a loopback address. The server stops with the cluster. A stopped
    cluster: ClusterStoppedError. A port in use: OSError.
    """
    from cluster import Cluster

    from ._server import serve as start

    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {type(host).__name__}")
    port = integer(port, "port", minimum=0)
    if port > 65535:
        raise ValueError(f"port must be <= 65535, got {port}")
    if allow_remote is not None and not isinstance(allow_remote, bool):
        raise TypeError(f"allow_remote must be a bool or None, got {type(allow_remote).__name__}")
    return start(cluster, host, port, allow_remote)
