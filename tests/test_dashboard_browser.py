"""The dashboard in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``,
``.ci/install-debian-packages``) driven by Playwright.

It loads the page, sees a running task appear, sees a dead letter, clicks its
Resurrect button and sees it run again (the dead letter leaves, the task is
running, then the counters and the per-name table show it succeeded), filters the
tasks by state, checks that a task named like markup stays text (no script of
it runs), clears the rest with "Clear all", and fails on any script error or
Content-Security-Policy violation. A screenshot goes to
``tests/artifacts/dashboard.png``.

Skipped, with the reason, only if Playwright is not installed or Chromium cannot
be started (never ``playwright install``: it downloads a browser of its own).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import WAIT, wait_until

from cluster import Cluster

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
UI_WAIT_MS = 15_000  # the page polls once a second; a loaded machine gets slack

XSS = "<img src=x onerror=\"window.__xss='name'\">"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run .ci/install-debian-packages chromium")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        except Exception as exc:  # the reason Chromium would not start, whatever it is
            pytest.skip(f"Chromium cannot be started: {exc}")
        try:
            yield b
        finally:
            b.close()


def hold(started: threading.Event, release: threading.Event) -> str:
    started.set()
    release.wait(WAIT * 6)
    return "held"


def comes_back(gate: threading.Event, started: threading.Event, release: threading.Event) -> str:
    """Fails until ``gate`` is set; then runs until ``release``."""
    if not gate.is_set():
        raise ConnectionError("the import server is down")
    started.set()
    release.wait(WAIT * 6)
    return "imported"


def broken(message: str) -> None:
    raise ValueError(message)


@pytest.mark.timeout(120)
def test_dashboard_in_a_browser(browser: Any) -> None:
    expect = sync_api.expect
    c = Cluster(workers=3)
    c.run()
    release = threading.Event()
    try:
        url = c.serve()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning")
                else None
            ),
        )
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("live", timeout=UI_WAIT_MS)

        # A running task appears.
        started = threading.Event()
        c.add_task(hold, started, release).with_id("report-7").with_name("reports.build").with_tags(
            "nightly"
        ).submit()
        assert started.wait(WAIT)
        row = page.locator('#tasks tbody tr[data-id="report-7"]')
        expect(row.locator("td.state")).to_have_text("running", timeout=UI_WAIT_MS)
        expect(row).to_contain_text("reports.build")
        expect(page.locator('[data-counter="running"] .value')).to_have_text("1")

        # Some history: finished tasks, and a dead letter whose name is markup.
        for i in range(4):
            assert c.add_task(pow, 2, i).with_name("math.pow").submit().result(WAIT) == 2**i
        xss = c.add_task(broken, XSS).with_id("xss-1").with_name(XSS).submit()
        assert xss.wait(WAIT) is not None

        # A dead letter, resurrected from the page, runs again.
        gate, again, done = threading.Event(), threading.Event(), threading.Event()
        first = c.add_task(comes_back, gate, again, release).with_id("import-42")
        first.with_name("imports.load").on_complete(lambda *_: done.set()).submit()
        assert done.wait(WAIT)
        letter = page.locator('#dead-letters tbody tr[data-id="import-42"]')
        expect(letter).to_contain_text(
            "ConnectionError: the import server is down", timeout=UI_WAIT_MS
        )
        expect(page.locator('#dead-letters tbody tr[data-id="xss-1"]')).to_contain_text(XSS)
        gate.set()
        letter.locator('button[data-action="resurrect"]').click()
        expect(page.locator("#message")).to_have_text("resurrected import-42", timeout=UI_WAIT_MS)
        expect(letter).to_have_count(0, timeout=UI_WAIT_MS)
        assert again.wait(WAIT), "the resurrected task did not run"
        revived = page.locator('#tasks tbody tr[data-id="import-42"] td.state')
        expect(revived).to_have_text("running", timeout=UI_WAIT_MS)

        # Filter by state.
        page.select_option("#filter-state", "running")
        page.click('#task-filter button[type="submit"]')
        expect(page.locator("#tasks tbody tr")).to_have_count(2, timeout=UI_WAIT_MS)
        expect(page.locator("#tasks-range")).to_have_text("1\u20132 of 2")

        # The markup stayed text everywhere: no script of it ran.
        expect(page.locator('#names tbody tr[data-name="math.pow"]')).to_contain_text(
            "4", timeout=UI_WAIT_MS
        )
        assert page.evaluate("window.__xss") is None
        assert page.locator("#dead-letters img").count() == 0

        ARTIFACTS.mkdir(exist_ok=True)  # (written whole, then renamed: `make test` runs
        shot = ARTIFACTS / f"dashboard-{os.getpid()}.png"  # every Python's suite at once)
        page.screenshot(path=str(shot), full_page=True)
        os.replace(shot, ARTIFACTS / "dashboard.png")

        # Once released, the resurrected task succeeds: the counters and names say so.
        release.set()
        expect(page.locator('[data-counter="running"] .value')).to_have_text(
            "0", timeout=UI_WAIT_MS
        )
        expect(page.locator('[data-counter="succeeded"] .value')).to_have_text("6")
        names = page.locator('#names tbody tr[data-name="imports.load"] td')
        expect(names.nth(3)).to_have_text("1", timeout=UI_WAIT_MS)  # succeeded
        assert wait_until(lambda: c.stats_by_name()["imports.load"].succeeded == 1)

        # "Clear all" (after its confirm dialog) forgets the rest.
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#dl-clear-all")
        expect(page.locator("#message")).to_have_text(
            "cleared 1 dead letter(s)", timeout=UI_WAIT_MS
        )
        expect(page.locator("#dead-letters tbody")).to_contain_text("no dead letters")
        assert c.dead_letters() == []
        assert problems == [], problems
    finally:
        release.set()
        c.stop(timeout=WAIT)


@pytest.mark.timeout(120)
def test_the_page_says_when_the_cluster_is_gone(browser: Any) -> None:
    expect = sync_api.expect
    c = Cluster(workers=1)
    c.run()
    url = c.serve()
    page = browser.new_page()
    page.goto(url)
    expect(page.locator("#status")).to_contain_text("live", timeout=UI_WAIT_MS)
    c.stop()
    expect(page.locator("#status")).to_contain_text("disconnected", timeout=UI_WAIT_MS)
