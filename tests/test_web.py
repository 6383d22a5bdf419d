"""SPEC §17 ``Cluster.serve()`` over plain HTTP (``http.client``, real sockets).

Every route; paging with totals; filters; ``Accept`` negotiation with q-values;
the POSTs (resurrect, clear) and every way one is refused — no token, a wrong one,
another ``Origin``, a cross-site fetch, a form body, a foreign ``Host`` (DNS
rebinding) — with nothing changed; 405s and 400s; escaping of user data; the server
stopping with the cluster; and a client that is not on loopback, from a network
namespace of the test's own (skipped, with the reason, where one cannot be made).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from _helpers import WAIT, wait_until
from _web_helpers import Reply, call, post, token_of

import cluster.web
from cluster import Cluster, ClusterStoppedError

parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client")

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture
def clusters() -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for c in made:
        c.cancel()


@pytest.fixture
def new_cluster(clusters: list[Cluster]) -> Callable[..., Cluster]:
    def make(**options: Any) -> Cluster:
        options.setdefault("workers", 2)
        c = Cluster(**options)
        clusters.append(c)
        c.run()
        return c

    return make


@pytest.fixture
def served(new_cluster: Callable[..., Cluster]) -> tuple[Cluster, str]:
    c = new_cluster()
    return c, c.serve()


def ok(value: object = 1) -> object:
    return value


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def flaky(gate: threading.Event) -> str:
    """Fails until ``gate`` is set: a dead letter that a resurrect can bring back."""
    if not gate.is_set():
        raise RuntimeError("not yet")
    return "done"


def dead(c: Cluster, count: int, *, name: str = "broken", prefix: str = "dl") -> list[str]:
    """``count`` dead letters named ``name`` (ids ``prefix-0``...), oldest first."""
    ids = []
    for i in range(count):
        h = c.add_task(fail, f"failure {i}").with_id(f"{prefix}-{i}").with_name(name).submit()
        assert h.wait(WAIT) is not None
        ids.append(h.id)
    assert wait_until(lambda: c.stats().dead_letters >= count)
    return ids


def port_closed(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# ---------------------------------------------------------------------- the page


def test_page_is_html_with_the_token_and_nothing_from_elsewhere(
    served: tuple[Cluster, str],
) -> None:
    _, url = served
    reply = call(url, "/")
    assert reply.status == 200
    assert reply.content_type == "text/html; charset=utf-8"
    page = reply.text
    assert '<meta name="cluster-token" content="' in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    csp = reply.headers["Content-Security-Policy"]
    nonce = csp.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'<script nonce="{nonce}">' in page
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_each_page_gets_a_fresh_nonce_and_the_same_token(served: tuple[Cluster, str]) -> None:
    _, url = served
    first, second = call(url, "/"), call(url, "/")
    assert first.headers["Content-Security-Policy"] != second.headers["Content-Security-Policy"]
    assert token_of(url) == token_of(url)


def test_each_server_has_its_own_token(served: tuple[Cluster, str]) -> None:
    c, url = served
    other = c.serve()
    assert other != url
    dead(c, 1)
    refused = post(other, "/dead-letters/clear", {}, token=token_of(url))
    assert refused.status == 403
    assert c.stats().dead_letters == 1


def test_head_answers_without_a_body(served: tuple[Cluster, str]) -> None:
    _, url = served
    reply = call(url, "/api/stats", "HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert int(reply.headers["Content-Length"]) > 0


def test_unknown_path_is_404(served: tuple[Cluster, str]) -> None:
    _, url = served
    reply = call(url, "/nope")
    assert reply.status == 404
    assert "error" in reply.json()


# ---------------------------------------------------------------------- stats


@pytest.mark.timeout(30)
def test_api_stats_is_cluster_stats(served: tuple[Cluster, str]) -> None:
    c, url = served
    assert c.add_task(ok).submit().result(WAIT) == 1
    dead(c, 1)
    assert c.wait_idle(WAIT)
    got = call(url, "/api/stats").json()
    s = c.stats()
    assert got["submitted"] == s.submitted == 2
    assert (got["succeeded"], got["failed"], got["dead_letters"]) == (1, 1, 1)
    assert got["workers"] == s.workers
    assert got["executors"]["threads"] == {"capacity": 2, "running": 0, "queued": 0}


@pytest.mark.timeout(30)
def test_api_names_is_stats_by_name(served: tuple[Cluster, str]) -> None:
    c, url = served
    assert c.add_task(ok).with_name("good").submit().result(WAIT) == 1
    dead(c, 2, name="bad")
    got = call(url, "/api/names").json()["names"]
    assert got == {
        "bad": {
            "active": 0,
            "dead": 2,
            "succeeded": 0,
            "failed": 2,
            "cancelled": 0,
            "timed_out": 0,
        },
        "good": {
            "active": 0,
            "dead": 0,
            "succeeded": 1,
            "failed": 0,
            "cancelled": 0,
            "timed_out": 0,
        },
    }


# ---------------------------------------------------------------------- tasks


@pytest.mark.timeout(30)
def test_api_tasks_gives_each_task_as_info_does(served: tuple[Cluster, str]) -> None:
    c, url = served
    done = c.add_task(ok, {"a": [1, 2]}).with_id("done").with_tags("t1", "t2").with_cache(60)
    assert done.submit().result(WAIT) == {"a": [1, 2]}
    broken = c.add_task(fail, "<b>bad</b>").with_id("broken").with_key("k").submit()
    assert broken.wait(WAIT) is not None
    odd = c.add_task(ok, object()).with_id("odd").with_cache(60).submit()
    assert odd.wait(WAIT) is not None
    got = call(url, "/api/tasks").json()
    assert got["total"] == 3 and got["offset"] == 0 and got["limit"] == 100
    by_id = {t["id"]: t for t in got["tasks"]}
    assert [t["id"] for t in got["tasks"]] == ["odd", "broken", "done"]  # newest first
    info = c.info("done")
    t = by_id["done"]
    assert t["state"] == "succeeded"
    assert t["value"] == {"a": [1, 2]}
    assert t["tags"] == ["t1", "t2"]
    assert t["name"] == info.name == "ok"
    assert datetime.fromisoformat(t["submitted_at"]) == info.submitted_at
    assert datetime.fromisoformat(t["finished_at"]) == info.finished_at
    assert t["error"] is None
    b = by_id["broken"]
    assert b["state"] == "failed" and b["key"] == "k"
    assert b["error"] == {"type": "ValueError", "message": "<b>bad</b>"}
    assert by_id["odd"]["value"]["repr"].startswith("<object object at")
    fields = {f for f in info.__dataclass_fields__}  # every TaskInfo field is carried over
    assert set(t) == fields


@pytest.mark.timeout(30)
def test_api_tasks_pages_with_a_total(clusters: list[Cluster]) -> None:
    c = Cluster(workers=1)  # never run: every task stays queued
    clusters.append(c)
    url = c.serve()
    ids = [c.add_task(ok).with_id(f"t{i:02d}").submit().id for i in range(25)]
    first = call(url, "/api/tasks?limit=10").json()
    assert first["total"] == 25
    assert [t["id"] for t in first["tasks"]] == ids[::-1][:10]
    last = call(url, "/api/tasks?limit=10&offset=20").json()
    assert last["total"] == 25
    assert [t["id"] for t in last["tasks"]] == ids[4::-1]
    beyond = call(url, "/api/tasks?limit=10&offset=100").json()
    assert beyond == {"total": 25, "limit": 10, "offset": 100, "tasks": []}
    none = call(url, "/api/tasks?limit=0").json()
    assert none["total"] == 25 and none["tasks"] == []


@pytest.mark.timeout(30)
def test_api_tasks_filters_by_state_name_tag_and_key(served: tuple[Cluster, str]) -> None:
    c, url = served
    gate = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(WAIT)

    try:
        c.add_task(hold).with_id("runner").with_name("holder").with_tags("slow").submit()
        assert started.wait(WAIT)
        c.add_task(ok).with_id("later").with_tags("slow", "x").with_delay(3600).submit()
        c.add_task(ok).with_id("keyed").with_key("k1").with_delay(3600).submit()
        dead(c, 2, name="broken")

        def ids(query: str) -> tuple[int, list[str]]:
            got = call(url, "/api/tasks?" + query).json()
            return got["total"], [t["id"] for t in got["tasks"]]

        assert ids("state=running") == (1, ["runner"])
        assert ids("state=delayed") == (2, ["keyed", "later"])
        assert ids("state=failed") == (2, ["dl-1", "dl-0"])
        assert ids("state=running,failed&limit=2") == (3, ["dl-1", "dl-0"])
        assert ids("name=holder") == (1, ["runner"])
        assert ids("name=broken&limit=1&offset=1") == (2, ["dl-0"])
        assert ids("tag=slow") == (2, ["later", "runner"])
        assert ids("tag=slow&state=delayed") == (1, ["later"])
        assert ids("key=k1") == (1, ["keyed"])
        assert ids("name=nobody") == (0, [])
        assert ids("state=&name=&tag=") == (5, ["dl-1", "dl-0", "keyed", "later", "runner"])
    finally:
        gate.set()


@pytest.mark.parametrize(
    "query",
    [
        "limit=-1",
        "limit=abc",
        "limit=1001",
        "limit=1.5",
        "offset=-3",
        "offset=%EF%BC%91",  # a fullwidth digit: not ASCII
        "state=bogus",
        "state=running,nope",
        "colour=red",
        "limit=1&limit=2",
    ],
)
def test_api_tasks_bad_query_is_400(served: tuple[Cluster, str], query: str) -> None:
    _, url = served
    reply = call(url, "/api/tasks?" + query)
    assert reply.status == 400
    assert reply.json()["error"]


def test_a_page_with_a_query_it_does_not_take_is_400(served: tuple[Cluster, str]) -> None:
    _, url = served
    assert call(url, "/api/stats?x=1").status == 400


@pytest.mark.timeout(30)
def test_a_running_task_is_listed_as_running(served: tuple[Cluster, str]) -> None:
    c, url = served
    gate = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(WAIT)

    try:
        c.add_task(hold).with_id("live").submit()
        assert started.wait(WAIT)
        got = call(url, "/api/tasks?state=running").json()
        assert [(t["id"], t["state"], t["attempts"]) for t in got["tasks"]] == [
            ("live", "running", 1)
        ]
        assert got["tasks"][0]["started_at"] is not None
    finally:
        gate.set()


# ---------------------------------------------------------------------- dead letters


@pytest.mark.timeout(30)
def test_dead_letters_json_pages_with_a_total(served: tuple[Cluster, str]) -> None:
    c, url = served
    ids = dead(c, 5)
    got = call(url, "/dead-letters?limit=2&offset=1").json()
    assert got["total"] == 5 and got["limit"] == 2 and got["offset"] == 1
    assert [d["id"] for d in got["dead_letters"]] == [ids[3], ids[2]]
    letter = got["dead_letters"][0]
    assert letter["name"] == "broken"
    assert letter["error"] == {"type": "ValueError", "message": "failure 3"}
    assert "Traceback" in letter["error_text"] and "failure 3" in letter["error_text"]
    assert letter["attempts"] == 1
    assert datetime.fromisoformat(letter["failed_at"]) >= datetime.fromisoformat(
        letter["submitted_at"]
    )


@pytest.mark.timeout(30)
def test_dead_letters_filter_by_name_with_its_total(served: tuple[Cluster, str]) -> None:
    c, url = served
    dead(c, 3, name="a", prefix="a")
    dead(c, 2, name="b", prefix="b")
    got = call(url, "/dead-letters?name=a&limit=2").json()
    assert got["total"] == 3
    assert [d["id"] for d in got["dead_letters"]] == ["a-2", "a-1"]
    assert call(url, "/dead-letters?name=zzz").json()["total"] == 0


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("text/html", "text/html"),
        (BROWSER_ACCEPT, "text/html"),
        ("text/html;q=0.5, application/json;q=0.9", "application/json"),
        ("application/json;q=0.5, text/html;q=0.9", "text/html"),
        ("text/*", "text/html"),
        ("text/*;q=0.2, application/*;q=0.3", "application/json"),
        ("application/json;q=0, */*", "text/html"),
        ("text/html;q=0.8, */*;q=0.8", "application/json"),  # a tie: the first offer
        ("text/html; level=1; q=0.4, application/json; q=0.3", "text/html"),
        ("garbage, text/html;q=0.1", "text/html"),
    ],
)
def test_dead_letters_follow_accept_with_q_values(
    served: tuple[Cluster, str], accept: str | None, expected: str
) -> None:
    c, url = served
    dead(c, 1)
    headers = {} if accept is None else {"Accept": accept}
    reply = call(url, "/dead-letters", headers=headers)
    assert reply.status == 200
    assert reply.content_type.split(";")[0] == expected
    assert reply.headers["Vary"] == "Accept"
    if expected == "text/html":
        assert '<table id="dead-letters">' in reply.text and "dl-0" in reply.text
    else:
        assert reply.json()["total"] == 1


@pytest.mark.parametrize("accept", ["image/png", "text/html;q=0, application/json;q=0"])
def test_dead_letters_refuse_what_cannot_be_served(
    served: tuple[Cluster, str], accept: str
) -> None:
    _, url = served
    reply = call(url, "/dead-letters", headers={"Accept": accept})
    assert reply.status == 406


def test_dead_letters_format_parameter_overrides_accept(served: tuple[Cluster, str]) -> None:
    _, url = served
    html = call(url, "/dead-letters?format=html", headers={"Accept": "application/json"})
    assert html.content_type.startswith("text/html")
    as_json = call(url, "/dead-letters?format=json", headers={"Accept": "text/html"})
    assert as_json.json()["dead_letters"] == []
    assert call(url, "/dead-letters?format=xml").status == 400


@pytest.mark.timeout(30)
def test_dead_letters_html_pages_with_links(served: tuple[Cluster, str]) -> None:
    c, url = served
    dead(c, 3)
    page = call(url, "/dead-letters?limit=1&offset=1", headers={"Accept": "text/html"}).text
    assert "2\u20132 of 3" in page
    assert 'href="/dead-letters?limit=1&amp;offset=0"' in page
    assert 'href="/dead-letters?limit=1&amp;offset=2"' in page


@pytest.mark.timeout(30)
def test_user_data_is_escaped_in_html(served: tuple[Cluster, str]) -> None:
    c, url = served
    evil = "<script>alert(1)</script>"
    message = '<img src=x onerror="alert(2)">'
    h = c.add_task(fail, message).with_id(evil).with_name(evil).with_tags(evil).submit()
    assert h.wait(WAIT) is not None
    page = call(url, "/dead-letters", headers={"Accept": "text/html"}).text
    assert evil not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    dashboard = call(url, "/").text
    assert evil not in dashboard  # the page holds no data: its script fills it in as text
    api = call(url, "/api/tasks")
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    assert api.json()["tasks"][0]["name"] == evil  # JSON carries it as it is
    assert b"<script>" not in api.body  # (and \\u-escaped: never sniffable as HTML)


# ---------------------------------------------------------------------- POSTs


@pytest.mark.timeout(30)
def test_resurrect_runs_the_dead_letter_again(served: tuple[Cluster, str]) -> None:
    c, url = served
    gate = threading.Event()
    ends: queue.SimpleQueue[tuple[str, object, BaseException | None]] = queue.SimpleQueue()
    builder = c.add_task(flaky, gate).with_id("again").with_name("flaky")
    builder.on_complete(lambda tid, value, error: ends.put((tid, value, error)))
    builder.submit()
    first = ends.get(timeout=WAIT)
    assert isinstance(first[2], RuntimeError)
    assert wait_until(lambda: [d.id for d in c.dead_letters()] == ["again"])
    gate.set()
    reply = post(url, "/dead-letters/resurrect", {"ids": ["again"]}, token=token_of(url))
    assert reply.status == 200
    assert reply.json() == {"resurrected": ["again"]}
    assert ends.get(timeout=WAIT) == ("again", "done", None)  # same call, same callback
    assert c.dead_letters() == []
    assert call(url, "/dead-letters").json()["total"] == 0
    assert c.stats_by_name()["flaky"].succeeded == 1


@pytest.mark.timeout(30)
def test_resurrect_of_an_unknown_id_is_404_and_all_or_none(served: tuple[Cluster, str]) -> None:
    c, url = served
    ids = dead(c, 1)
    reply = post(url, "/dead-letters/resurrect", {"ids": [ids[0], "nope"]}, token=token_of(url))
    assert reply.status == 404
    assert "nope" in reply.json()["error"]
    assert [d.id for d in c.dead_letters()] == ids


@pytest.mark.timeout(30)
def test_resurrect_of_an_id_taken_again_is_409(served: tuple[Cluster, str]) -> None:
    c, url = served
    ids = dead(c, 1)
    c.add_task(ok).with_id(ids[0]).with_delay(3600).submit()
    reply = post(url, "/dead-letters/resurrect", {"ids": ids}, token=token_of(url))
    assert reply.status == 409
    assert c.stats().dead_letters == 1


@pytest.mark.timeout(30)
def test_clear_forgets_the_given_ids(served: tuple[Cluster, str]) -> None:
    c, url = served
    ids = dead(c, 3)
    reply = post(url, "/dead-letters/clear", {"ids": [ids[0], "unknown"]}, token=token_of(url))
    assert reply.status == 200
    assert reply.json() == {"cleared": 1}
    assert sorted(d.id for d in c.dead_letters()) == ids[1:]


@pytest.mark.timeout(30)
def test_clear_without_ids_forgets_all(served: tuple[Cluster, str]) -> None:
    c, url = served
    dead(c, 3)
    token = token_of(url)
    assert post(url, "/dead-letters/clear", {"ids": []}, token=token).json() == {"cleared": 0}
    assert c.stats().dead_letters == 3  # an empty list is no ids, not "all"
    assert post(url, "/dead-letters/clear", {}, token=token).json() == {"cleared": 3}
    assert c.dead_letters() == []


def _refused(c: Cluster, url: str, reply: Reply, status: int = 403) -> None:
    assert reply.status == status, reply.body
    assert reply.json()["error"]
    assert c.stats().dead_letters == 2, "a refused POST changed something"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/dead-letters/clear", "/dead-letters/resurrect"])
@pytest.mark.parametrize(
    ("token", "headers"),
    [
        (None, {}),
        ("wrong", {}),
        ("", {}),
        ("RIGHT", {"Origin": "http://evil.example"}),
        ("RIGHT", {"Origin": "null"}),
        ("RIGHT", {"Origin": "http://127.0.0.1:1"}),  # same host, another port
        ("RIGHT", {"Origin": "https://127.0.0.1:PORT"}),  # another scheme
        ("RIGHT", {"Sec-Fetch-Site": "cross-site"}),
        ("RIGHT", {"Host": "evil.example:PORT"}),  # DNS rebinding
    ],
    ids=[
        "no-token",
        "wrong-token",
        "empty-token",
        "foreign-origin",
        "null-origin",
        "other-port-origin",
        "other-scheme-origin",
        "cross-site-fetch",
        "foreign-host",
    ],
)
def test_a_post_that_fails_a_check_is_403_and_changes_nothing(
    served: tuple[Cluster, str], path: str, token: str | None, headers: dict[str, str]
) -> None:
    c, url = served
    ids = dead(c, 2)
    port = str(urlsplit(url).port)
    real = token_of(url)
    sent = {k: v.replace("PORT", port) for k, v in headers.items()}
    reply = post(url, path, {"ids": ids}, token=real if token == "RIGHT" else token, headers=sent)
    _refused(c, url, reply)


@pytest.mark.timeout(30)
def test_a_post_from_the_page_itself_passes(served: tuple[Cluster, str]) -> None:
    c, url = served
    ids = dead(c, 2)
    origin = url.rstrip("/")
    reply = post(
        url,
        "/dead-letters/clear",
        {"ids": ids[:1]},
        token=token_of(url),
        headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"},
    )
    assert reply.status == 200
    assert c.stats().dead_letters == 1


@pytest.mark.timeout(30)
def test_a_form_body_is_refused_with_415(served: tuple[Cluster, str]) -> None:
    c, url = served
    dead(c, 2)
    reply = call(
        url,
        "/dead-letters/clear",
        "POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Cluster-Token": token_of(url),
        },
        body=b"ids=dl-0",
    )
    _refused(c, url, reply, 415)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"ids": "dl-0"}', b'{"ids": [1]}', b'{"ids": [], "all": true}', b""],
)
def test_a_bad_post_body_is_400(served: tuple[Cluster, str], body: bytes) -> None:
    c, url = served
    dead(c, 2)
    headers = {"Content-Type": "application/json", "X-Cluster-Token": token_of(url)}
    reply = call(url, "/dead-letters/clear", "POST", headers=headers, body=body)
    _refused(c, url, reply, 400)


def test_resurrect_needs_ids(served: tuple[Cluster, str]) -> None:
    _, url = served
    assert post(url, "/dead-letters/resurrect", {}, token=token_of(url)).status == 400


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/dead-letters/resurrect"),
        ("GET", "/dead-letters/clear"),
        ("POST", "/api/stats"),
        ("POST", "/dead-letters"),
        ("DELETE", "/dead-letters"),
        ("PUT", "/dead-letters/clear"),
    ],
)
def test_a_method_a_route_does_not_take_is_405(
    served: tuple[Cluster, str], method: str, path: str
) -> None:
    c, url = served
    dead(c, 1)
    headers = {"Content-Type": "application/json", "X-Cluster-Token": token_of(url)}
    reply = call(url, path, method, headers=headers, body=b"{}")
    assert reply.status == 405
    assert reply.headers["Allow"]
    assert c.stats().dead_letters == 1


# ---------------------------------------------------------------------- Host and clients


def test_a_foreign_host_header_is_refused_even_for_the_page(served: tuple[Cluster, str]) -> None:
    _, url = served
    port = urlsplit(url).port
    for host in (f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "127.0.0.1:1", "[::1"):
        reply = call(url, "/", headers={"Host": host})
        assert reply.status == 403, host
        assert "cluster-token" not in reply.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert call(url, "/", headers={"Host": host}).status == 200, host


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_serves_on_ipv6_loopback(new_cluster: Callable[..., Cluster]) -> None:
    url = new_cluster().serve("::1")
    assert url.startswith("http://[::1]:")
    assert call(url, "/api/stats").status == 200


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv4_mapped_loopback_client_counts_as_loopback(
    new_cluster: Callable[..., Cluster],
) -> None:
    c = new_cluster()
    url = cluster.web.serve(c, "::", 0, allow_remote=False)  # dual stack: ::ffff:127.0.0.1
    port = urlsplit(url).port
    assert call(f"http://127.0.0.1:{port}/", "/api/stats").status == 200


class Netns:
    """A network namespace of the test's own, joined to this one by a veth pair: a
    client there has a non-loopback address, and its traffic never leaves the machine."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"cwtest{tag}"
        self.here = f"cwh{tag}"
        self.there = f"cwt{tag}"
        # A private /30 picked from the test's own id: used only between the two ends.
        third = int(tag[:2], 16)
        self.host_ip = f"10.213.{third}.1"
        self.peer_ip = f"10.213.{third}.2"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def __enter__(self) -> Netns:
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self.here, "type", "veth", "peer", "name", self.there)
            self._ip("link", "set", self.there, "netns", self.name)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.here)
            self._ip("link", "set", self.here, "up")
            self._ip("-n", self.name, "addr", "add", f"{self.peer_ip}/30", "dev", self.there)
            self._ip("-n", self.name, "link", "set", self.there, "up")
            self._ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ip("netns", "del", self.name)  # takes the veth pair with it
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ip("link", "del", self.here)

    def get_status(self, url: str) -> int:
        """GET ``url`` from inside the namespace; the HTTP status."""
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            "    print(urllib.request.urlopen(sys.argv[1], timeout=10).status)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code)\n"
        )
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code, url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())


@pytest.fixture
def netns() -> Iterator[Netns]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): cannot make a client with a non-loopback address")
    if os.geteuid() != 0:
        pytest.skip("making a network namespace needs root (CAP_NET_ADMIN)")
    ns = Netns()
    try:
        ns.__enter__()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.decode().strip()}")
    try:
        yield ns
    finally:
        ns.__exit__()


@pytest.mark.timeout(60)
def test_a_client_that_is_not_on_loopback_is_refused_by_default(
    new_cluster: Callable[..., Cluster], netns: Netns
) -> None:
    c = new_cluster()
    url = cluster.web.serve(c, "0.0.0.0", 0, allow_remote=False)
    port = urlsplit(url).port
    assert netns.get_status(f"http://{netns.host_ip}:{port}/api/stats") == 403
    assert call(f"http://127.0.0.1:{port}/", "/api/stats").status == 200


@pytest.mark.timeout(60)
def test_asking_for_a_non_loopback_host_serves_other_clients(
    new_cluster: Callable[..., Cluster], netns: Netns
) -> None:
    c = new_cluster()
    url = c.serve("0.0.0.0")
    port = urlsplit(url).port
    assert netns.get_status(f"http://{netns.host_ip}:{port}/api/stats") == 200


@pytest.mark.timeout(60)
def test_the_default_host_is_not_reachable_from_elsewhere(
    new_cluster: Callable[..., Cluster], netns: Netns
) -> None:
    c = new_cluster()
    port = urlsplit(c.serve()).port
    code = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", code, netns.host_ip, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.strip() == "ConnectionRefusedError", done.stdout + done.stderr


# ---------------------------------------------------------------------- /metrics


@pytest.mark.timeout(30)
def test_metrics_parse_and_agree_with_stats(served: tuple[Cluster, str]) -> None:
    c, url = served
    for _ in range(3):
        assert c.add_task(ok).with_name("good").submit().result(WAIT) == 1
    dead(c, 2)
    assert c.wait_idle(WAIT)
    reply = call(url, "/metrics")
    assert reply.status == 200
    assert reply.content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in parser.text_string_to_metric_families(reply.text)}
    s = c.stats()
    [submitted] = families["cluster_tasks_submitted"].samples
    assert submitted.value == s.submitted == 5
    finished = {x.labels["state"]: x.value for x in families["cluster_tasks_finished"].samples}
    assert finished == {"succeeded": 3, "failed": 2, "cancelled": 0, "timed_out": 0}
    runs = {
        x.labels["name"]: x.value
        for x in families["cluster_task_run_seconds"].samples
        if x.name.endswith("_count")
    }
    assert runs == {"good": 3, "broken": 2}  # serve() started the histograms


# ---------------------------------------------------------------------- life cycle


@pytest.mark.timeout(30)
def test_the_server_stops_with_the_cluster() -> None:
    c = Cluster(workers=1)
    c.run()
    url = c.serve()
    assert call(url, "/api/stats").status == 200
    c.stop()
    assert port_closed(url)


@pytest.mark.timeout(30)
def test_the_server_stops_when_the_cluster_is_cancelled() -> None:
    c = Cluster(workers=1)
    url = c.serve()  # before run(): the dashboard shows the queue
    c.add_task(ok).submit()
    assert call(url, "/api/stats").json()["queued"] == 1
    c.cancel()
    assert port_closed(url)


@pytest.mark.timeout(30)
def test_the_server_stops_at_the_end_of_a_with_block() -> None:
    with Cluster(workers=1) as c:
        url = c.serve()
        assert call(url, "/").status == 200
    assert port_closed(url)


@pytest.mark.timeout(30)
def test_the_server_stays_up_while_a_graceful_stop_drains() -> None:
    c = Cluster(workers=1)
    c.run()
    url = c.serve()
    gate = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(WAIT)

    c.add_task(hold).submit()
    assert started.wait(WAIT)
    stopper = threading.Thread(target=c.stop)
    stopper.start()
    try:
        assert wait_until(lambda: "stopping" in repr(c))
        assert call(url, "/api/stats").json()["running"] == 1
    finally:
        gate.set()
        stopper.join(WAIT)
    assert port_closed(url)


@pytest.mark.timeout(30)
def test_the_server_stops_when_the_cluster_is_collected() -> None:
    c = Cluster(workers=1)
    c.run()
    url = c.serve()
    del c
    gc.collect()
    assert wait_until(lambda: port_closed(url))


def test_serve_on_a_stopped_cluster_raises() -> None:
    c = Cluster(workers=1)
    c.stop()
    with pytest.raises(ClusterStoppedError):
        c.serve()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"port": -1}, ValueError, "port"),
        ({"port": 70000}, ValueError, "port"),
        ({"port": "80"}, TypeError, "port"),
        ({"port": True}, TypeError, "port"),
        ({"host": 127}, TypeError, "host"),
    ],
)
def test_serve_checks_its_arguments(
    new_cluster: Callable[..., Cluster], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        new_cluster().serve(**kwargs)


def test_web_serve_checks_allow_remote_and_cluster(new_cluster: Callable[..., Cluster]) -> None:
    with pytest.raises(TypeError, match="allow_remote"):
        cluster.web.serve(new_cluster(), allow_remote="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cluster"):
        cluster.web.serve(object())  # type: ignore[arg-type]


def test_a_port_in_use_raises_oserror(new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster()
    port = urlsplit(c.serve()).port
    assert port is not None
    with pytest.raises(OSError):
        c.serve(port=port)


@pytest.mark.timeout(30)
def test_requests_in_parallel_are_served(served: tuple[Cluster, str]) -> None:
    c, url = served
    dead(c, 3)
    replies: list[int] = []
    lock = threading.Lock()

    def get() -> None:
        for _ in range(5):
            status = call(url, "/dead-letters").status
            with lock:
                replies.append(status)

    threads = [threading.Thread(target=get) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert replies == [200] * 40, replies
    assert time.monotonic() - start < WAIT * 2


def test_json_is_strict_json(served: tuple[Cluster, str]) -> None:
    c, url = served
    c.add_task(ok, float("nan")).with_id("nan").with_cache(60).submit().wait(WAIT)
    body = call(url, "/api/tasks").body
    assert json.loads(body)["tasks"][0]["value"] == "nan"  # JSON has no NaN literal
    assert b"NaN" not in body
