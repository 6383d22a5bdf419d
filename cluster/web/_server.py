"""The HTTP server behind ``Cluster.serve()``: standard library only.

One ``ThreadingHTTPServer`` per ``serve()`` call: its accept loop runs on a daemon
thread, each connection on a daemon thread of its own (HTTP/1.0, one request per
connection, so no idle keep-alive connection outlives the server). The server holds
the cluster by a weak reference and reads it through the public API only.

Every request, before anything else:

* the client must be on loopback, unless remote clients are allowed (they are when
  ``serve()`` was given a host that is not a loopback address);
* its ``Host`` header, when present, must name this server: an IP literal,
  ``localhost`` (or ``*.localhost``), the host that ``serve()`` was given, or this
  machine's name when bound to every interface — with this server's port. That is
  what stops DNS rebinding (a hostile page whose domain resolves to 127.0.0.1
  would otherwise be "same origin" and could read the token off the page).

Every POST then needs the token in ``X-Cluster-Token``, an ``Origin`` (when
present) equal to this server's own origin as the ``Host`` names it, no
``Sec-Fetch-Site`` other than ``same-origin``/``none``, and a JSON body
(``Content-Type: application/json``, which a cross-site form cannot send). A
refusal is a 403 and changes nothing.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import selectors
import socket
import socketserver
import threading
import weakref
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from cluster import (
    ClusterStoppedError,
    DuplicateTaskError,
    QueueFullError,
    TaskNotFoundError,
    TaskState,
)
from cluster.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cluster.metrics import instrument, prometheus_text

from ._encode import record_json
from ._negotiate import choose
from ._page import dashboard_html, dead_letters_html

if TYPE_CHECKING:
    from cluster import Cluster

__all__ = ["DashboardServer", "is_loopback"]

log = logging.getLogger("cluster.web")

#: Largest ``limit`` a listing accepts.
MAX_LIMIT = 1000
#: Largest POST body, in bytes.
MAX_BODY = 1 << 20
#: Seconds a connection may take to send its request.
REQUEST_TIMEOUT = 30.0

_STATES = {s.value: s for s in TaskState}
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"
_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


def is_loopback(address: str) -> bool:
    """True for a loopback client address (``127.0.0.0/8``, ``::1``, and IPv4-mapped
    ``::ffff:127.x.y.z``)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _host_is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return is_loopback(str(ipaddress.ip_address(host)))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


class HTTPError(Exception):
    """A request refused: its status and the message of the JSON error body."""

    def __init__(self, status: HTTPStatus, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Response:
    """What a route answers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes,
        content_type: str,
        status: HTTPStatus = HTTPStatus.OK,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.status = status
        self.headers = headers


_HTML_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def _json(obj: object, status: HTTPStatus = HTTPStatus.OK) -> Response:
    # ASCII, and <, >, & escaped too (they occur only inside strings): no byte of a
    # response can be read as markup, even by a client that sniffs.
    body = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return Response(body.translate(_HTML_SAFE).encode("ascii"), _JSON, status)


# ---------------------------------------------------------------------- query strings


def _query(raw: str, allowed: frozenset[str]) -> dict[str, str]:
    """The query's parameters (each at most once, all of them known); empty values
    count as absent, as an empty filter field of a form does."""
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, max_num_fields=len(allowed) + 4)
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "too many query parameters") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise HTTPError(
                HTTPStatus.BAD_REQUEST, f"unknown query parameter {key!r} (known: {known})"
            )
        if key in out:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"query parameter {key!r} given twice")
        if value != "":
            out[key] = value
    return out


def _int(params: dict[str, str], key: str, default: int, maximum: int) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer >= 0, got {raw!r}")
    value = int(raw)
    if value > maximum:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be <= {maximum}, got {value}")
    return value


def _states(raw: str | None) -> frozenset[TaskState] | None:
    if raw is None:
        return None
    states = set()
    for part in raw.split(","):
        state = _STATES.get(part.strip())
        if state is None:
            known = ", ".join(_STATES)
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"state must be one of {known} (or several, comma-separated), got {part!r}",
            )
        states.add(state)
    return frozenset(states)


# ---------------------------------------------------------------------- the server


class DashboardServer(ThreadingHTTPServer):
    """One dashboard: the listening socket, its accept loop, its token and policy."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, cluster: Cluster, host: str, port: int, allow_remote: bool | None) -> None:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        bind: tuple[str, int] = (str(address[0]), int(address[1]))
        self.address_family = family
        self.requested_host = host
        loopback = _host_is_loopback(host) if host else False
        self.allow_remote = not loopback if allow_remote is None else bool(allow_remote)
        #: The per-run secret every POST must carry (the page has it in a meta tag).
        self.token = secrets.token_urlsafe(32)
        self.cluster_ref: weakref.ref[Cluster] = weakref.ref(cluster)
        super().__init__(bind, Handler)
        self.port: int = self.server_address[1]
        self.names = self._own_names(host)
        display = host if host and host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in display:
            display = f"[{display}]"
        self.url = f"http://{display}:{self.port}/"
        # _closed is guarded by _close_lock; the wake pair ends the accept loop at once.
        self._close_lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._loop, name=f"cluster-web:{self.port}", daemon=True
        )

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup; dual-stack for ``::``."""
        if self.address_family == socket.AF_INET6:
            with contextlib.suppress(OSError, AttributeError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.requested_host
        self.server_port = self.server_address[1]

    def _own_names(self, host: str) -> frozenset[str]:
        """Host names (besides IP literals and ``localhost``) that address this server."""
        names = set()
        if host:
            names.add(host.lower())
        if not host or host in ("0.0.0.0", "::") or not _host_is_loopback(host):
            with contextlib.suppress(OSError):
                names.add(socket.gethostname().lower())
        return frozenset(names)

    def start(self) -> None:
        """Start the accept loop."""
        self._thread.start()

    def _loop(self) -> None:
        self.timeout = 0  # handle_request() below is only called once a client is waiting
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = selector.select()
                with self._close_lock:
                    if self._closed:
                        return
                for key, _ in events:
                    if key.fileobj is self.socket:
                        self.handle_request()

    def close(self) -> None:
        """Stop accepting, close the port (idempotent; requests in flight finish)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self.server_close()
        self._wake_r.close()
        self._wake_w.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log what a connection's handler raised (instead of printing it)."""
        log.exception("dashboard request from %s failed", client_address)

    # -- access ---------------------------------------------------------------------

    def host_allowed(self, header: str) -> bool:
        """True if a ``Host`` header value names this server (see the module docstring)."""
        hostname, port = _split_host(header)
        if hostname is None or port != self.port:
            return False
        try:
            ipaddress.ip_address(hostname)
            return True  # an IP literal: no rebinding through a name
        except ValueError:
            pass
        if hostname == "localhost" or hostname.endswith(".localhost"):
            return True
        return hostname in self.names


def _split_host(header: str) -> tuple[str | None, int | None]:
    """(host name or IP, port) of a ``Host``/``Origin`` authority, lower case."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None, None
        hostname, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None, None
        port_text = rest[1:] if rest else ""
    else:
        hostname, _, port_text = value.partition(":")
    if not hostname:
        return None, None
    if not port_text:
        return hostname, 80
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None, None
    return hostname, int(port_text)


# ---------------------------------------------------------------------- requests


#: A route: (the request, the cluster, the raw query string) -> the response.
Route = Callable[["Handler", "Cluster", str], Response]


class Handler(BaseHTTPRequestHandler):
    """One request: access checks, then its route."""

    server: DashboardServer
    server_version = "cluster-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the ``cluster.web`` logger at DEBUG, not to stderr."""
        log.debug("%s %s", self.address_string(), format % args)

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        try:
            response = self._respond(method)
        except HTTPError as exc:
            response = _json({"error": exc.message}, exc.status)
            response.headers = exc.headers
        except Exception:
            log.exception("dashboard: %s %s failed", method, self.path)
            response = _json({"error": "internal error (logged)"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._send(response, head=method == "HEAD")

    def _respond(self, method: str) -> Response:
        server = self.server
        if not server.allow_remote and not is_loopback(str(self.client_address[0])):
            raise HTTPError(HTTPStatus.FORBIDDEN, "only loopback clients are served")
        host = self.headers.get("Host")
        if host is not None and not server.host_allowed(host):
            raise HTTPError(HTTPStatus.FORBIDDEN, f"unknown Host {host!r}")
        parts = urlsplit(self.path)
        route = _ROUTES.get(parts.path)
        if route is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {parts.path!r}")
        allowed, handler = route
        effective = "GET" if method == "HEAD" else method
        if effective not in allowed:
            allow = ", ".join(sorted({*allowed, "HEAD"} if "GET" in allowed else allowed))
            raise HTTPError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} is not allowed here (allowed: {allow})",
                (("Allow", allow),),
            )
        if effective == "POST":
            self._check_post(host)
        cluster = server.cluster_ref()
        if cluster is None:
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "the cluster is gone")
        return handler(self, cluster, parts.query)

    def _check_post(self, host: str | None) -> None:
        token = self.headers.get("X-Cluster-Token")
        if token is None or not hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self.server.token.encode("ascii")
        ):
            raise HTTPError(HTTPStatus.FORBIDDEN, "missing or wrong X-Cluster-Token")
        origin = self.headers.get("Origin")
        if origin is not None:
            expected = None if host is None else f"http://{host.strip().lower()}"
            if origin.strip().lower() != expected:
                raise HTTPError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin!r}")
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() not in ("same-origin", "none"):
            raise HTTPError(HTTPStatus.FORBIDDEN, f"cross-site request (Sec-Fetch-Site: {site})")

    def read_json_body(self) -> dict[str, Any]:
        """The POST body: a JSON object (415/411/413/400 otherwise)."""
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != _JSON:
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if not (length_text.isascii() and length_text.isdigit()):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _send(self, response: Response, head: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in _SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in response.headers:
            self.send_header(name, value)
        if not any(name == "Content-Security-Policy" for name, _ in response.headers):
            self.send_header(
                "Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"
            )
        self.end_headers()
        if not head:
            self.wfile.write(response.body)


# ---------------------------------------------------------------------- routes


def _csp(nonce: str) -> tuple[str, str]:
    return (
        "Content-Security-Policy",
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    )


def _page(handler: Handler, c: Cluster, query: str) -> Response:
    _query(query, frozenset())
    nonce = secrets.token_urlsafe(16)
    body = dashboard_html(handler.server.token, nonce).encode("utf-8")
    return Response(body, _HTML, headers=(_csp(nonce),))


def _stats(handler: Handler, c: Cluster, query: str) -> Response:
    _query(query, frozenset())
    return _json(record_json(c.stats()))


def _names(handler: Handler, c: Cluster, query: str) -> Response:
    _query(query, frozenset())
    return _json({"names": {name: record_json(s) for name, s in c.stats_by_name().items()}})


_TASK_PARAMS = frozenset({"state", "name", "tag", "key", "limit", "offset"})


def _tasks(handler: Handler, c: Cluster, query: str) -> Response:
    q = _query(query, _TASK_PARAMS)
    states = _states(q.get("state"))
    limit = _int(q, "limit", 100, MAX_LIMIT)
    offset = _int(q, "offset", 0, 1 << 62)
    name, tag, key = q.get("name"), q.get("tag"), q.get("key")
    page = c.tasks(state=states, name=name, tag=tag, key=key, limit=limit, offset=offset)
    if len(page) < limit and (page or offset == 0):
        total = offset + len(page)  # the page reached the end: no second scan for the total
    else:
        total = c.count_tasks(state=states, name=name, tag=tag, key=key)
        if page:  # (tasks may come and go between the two calls)
            total = max(total, offset + len(page))
    return _json(
        {
            "total": total,
            "limit": limit,
            "offset": offset,
            "tasks": [record_json(info) for info in page],
        }
    )


_DEAD_PARAMS = frozenset({"name", "limit", "offset", "format"})
_DEAD_OFFERS = (_JSON, "text/html")


def _dead_letters(handler: Handler, c: Cluster, query: str) -> Response:
    q = _query(query, _DEAD_PARAMS)
    limit = _int(q, "limit", 100, MAX_LIMIT)
    offset = _int(q, "offset", 0, 1 << 62)
    name = q.get("name")
    fmt = q.get("format")
    if fmt is None:
        chosen = choose(handler.headers.get("Accept"), _DEAD_OFFERS)
        if chosen is None:
            raise HTTPError(
                HTTPStatus.NOT_ACCEPTABLE,
                "this page is served as application/json or text/html",
                (("Vary", "Accept"),),
            )
    elif fmt in ("json", "html"):
        chosen = _JSON if fmt == "json" else "text/html"
    else:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"format must be json or html, got {fmt!r}")
    if name is None:
        page = c.dead_letters(limit=limit, offset=offset)
        total = c.stats().dead_letters
        if page:
            total = max(total, offset + len(page))
    else:  # one call: the page and its total agree (dead letters are bounded in number)
        every = c.dead_letters(name=name, limit=max(1, c.stats().dead_letters) + MAX_LIMIT)
        total, page = len(every), every[offset : offset + limit]
    data = {
        "total": total,
        "limit": limit,
        "offset": offset,
        "dead_letters": [record_json(d) for d in page],
    }
    vary = ("Vary", "Accept")
    if chosen == _JSON:
        response = _json(data)
        response.headers = (vary,)
        return response
    nonce = secrets.token_urlsafe(16)
    body = dead_letters_html(data, name, handler.server.token, nonce).encode("utf-8")
    return Response(body, _HTML, headers=(vary, _csp(nonce)))


def _ids(body: dict[str, Any], required: bool) -> tuple[str, ...] | None:
    unknown = set(body) - {"ids"}
    if unknown:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown fields in the body: {sorted(unknown)}")
    if "ids" not in body:
        if required:
            raise HTTPError(HTTPStatus.BAD_REQUEST, 'the body must be {"ids": [...]}')
        return None
    ids = body["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HTTPError(HTTPStatus.BAD_REQUEST, '"ids" must be a list of task ids (strings)')
    return tuple(ids)


def _resurrect(handler: Handler, c: Cluster, query: str) -> Response:
    _query(query, frozenset())
    ids = _ids(handler.read_json_body(), required=True)
    assert ids is not None
    if not ids:
        return _json({"resurrected": []})
    try:
        handles = c.resurrect(*ids)
    except TaskNotFoundError as exc:
        raise HTTPError(HTTPStatus.NOT_FOUND, _message(exc)) from None
    except DuplicateTaskError as exc:
        raise HTTPError(HTTPStatus.CONFLICT, _message(exc)) from None
    except (ClusterStoppedError, QueueFullError) as exc:
        raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, _message(exc)) from None
    except ValueError as exc:
        raise HTTPError(HTTPStatus.BAD_REQUEST, _message(exc)) from None
    return _json({"resurrected": [h.id for h in handles]})


def _clear(handler: Handler, c: Cluster, query: str) -> Response:
    _query(query, frozenset())
    ids = _ids(handler.read_json_body(), required=False)
    if ids is None:
        cleared = c.clear_dead_letters()  # no "ids": every dead letter
    elif not ids:
        cleared = 0  # (an empty list forgets nothing; clear_dead_letters() would be all)
    else:
        cleared = c.clear_dead_letters(*ids)
    return _json({"cleared": cleared})


def _metrics(handler: Handler, c: Cluster, query: str) -> Response:
    _query(query, frozenset())
    return Response(prometheus_text(c).encode("utf-8"), METRICS_CONTENT_TYPE)


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text)


_ROUTES: dict[str, tuple[frozenset[str], Route]] = {
    "/": (frozenset({"GET"}), _page),
    "/api/stats": (frozenset({"GET"}), _stats),
    "/api/names": (frozenset({"GET"}), _names),
    "/api/tasks": (frozenset({"GET"}), _tasks),
    "/dead-letters": (frozenset({"GET"}), _dead_letters),
    "/dead-letters/resurrect": (frozenset({"POST"}), _resurrect),
    "/dead-letters/clear": (frozenset({"POST"}), _clear),
    "/metrics": (frozenset({"GET"}), _metrics),
}


def serve(cluster: Cluster, host: str, port: int, allow_remote: bool | None) -> str:
    """Start a dashboard for ``cluster``; see ``cluster.web.serve``."""
    server = DashboardServer(cluster, host, port, allow_remote)
    instrument(cluster)  # the histograms count from the first serve() on
    stop = weakref.finalize(cluster, server.close)  # also if the cluster is collected
    try:
        cluster.on_stop(stop)
    except ClusterStoppedError:
        stop()
        raise
    server.start()
    log.info("dashboard of %r at %s", cluster, server.url)
    return server.url
