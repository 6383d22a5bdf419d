"""Plain HTTP against a dashboard: ``http.client``, so every header is the test's own."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

TOKEN_META = re.compile(r'<meta name="cluster-token" content="([^"]+)">')


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        assert self.content_type.startswith("application/json"), self.content_type
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def call(
    url: str,
    path: str,
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request to the server at ``url`` (``http://host:port/``)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def token_of(url: str) -> str:
    """The token the dashboard page carries, read as a browser would."""
    reply = call(url, "/")
    assert reply.status == 200, reply.body
    found = TOKEN_META.search(reply.text)
    assert found, "the page has no cluster-token meta tag"
    return found.group(1)


def post(
    url: str,
    path: str,
    payload: object,
    *,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """A JSON POST, with ``token`` in ``X-Cluster-Token`` (None: without it)."""
    sent = {"Content-Type": "application/json"}
    if token is not None:
        sent["X-Cluster-Token"] = token
    sent.update(headers or {})
    return call(url, path, "POST", headers=sent, body=json.dumps(payload).encode())
