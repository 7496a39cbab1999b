"""End to end in a real browser: Debian's Chromium driven by Playwright against uvicorn serving the review app.
Log in with a token, approve a suggestion with the keyboard, choose another concept through search, and find both
in the exported Usagi CSV."""

from __future__ import annotations

import csv
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import uvicorn
from test_review_api import MODEL_VERSION, concepts_like, seed_item, seed_users

from harmonia.config import Settings
from harmonia.review.api import create_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium; .ci/run installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_review_in_chromium(server: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    tokens = seed_users(conn)
    diabetes = concepts_like(conn, "%diabetes mellitus%")
    portal = concepts_like(conn, "portal hypertension", 1)[0]
    seed_item(conn, "E11.9", "Type 2 diabetes mellitus", diabetes, confidence=0.42)
    seed_item(conn, "K76.6", "Portal hypertension", diabetes, confidence=0.13)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions"])
        try:
            page = browser.new_page(accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            # A wrong token is refused; the right one opens the queue.
            page.fill("#token", "wrong")
            page.click("#login-button")
            expect(page.locator("#login-error")).to_contain_text("not accepted")
            page.fill("#token", tokens["reviewer"])
            page.click("#login-button")
            expect(page.locator("#whoami")).to_have_text("reviewer-user (reviewer)")
            expect(page.locator("#queue-list li")).to_have_count(2)
            expect(page.locator("#i-code")).to_have_text("E11.9")
            # The model, its version and the confidence behind the suggestions are in view.
            expect(page.locator("#i-model")).to_contain_text(MODEL_VERSION)
            expect(page.locator("#i-model")).to_contain_text("confidence 0.420")
            expect(page.locator("#candidates tbody tr")).to_have_count(5)
            page.screenshot(path=tmp_path / "review-page.png", full_page=True)  # kept for a look when it fails
            # j / k move through the queue.
            page.keyboard.press("j")
            expect(page.locator("#i-code")).to_have_text("K76.6")
            page.keyboard.press("k")
            expect(page.locator("#i-code")).to_have_text("E11.9")
            # "2" approves the second suggestion; the item leaves the queue and the next one shows.
            page.keyboard.press("2")
            expect(page.locator("#message")).to_contain_text(f"approve: E11.9 → {diabetes[1]['concept_id']}")
            expect(page.locator("#queue-list li")).to_have_count(1)
            expect(page.locator("#i-code")).to_have_text("K76.6")
            # None of the suggestions fit: search for the concept and choose it.
            page.keyboard.press("/")
            page.keyboard.type("portal hypertension")
            page.keyboard.press("Enter")
            row = page.locator(".search-result", has_text=str(portal["concept_id"])).first
            expect(row).to_be_visible(timeout=60_000)  # the first search loads the embedding model
            row.locator("button.choose").click()
            expect(page.locator("#message")).to_contain_text(f"correct: K76.6 → {portal['concept_id']}")
            expect(page.locator("#queue-count")).to_have_text("queue empty")
            # Both decisions are in the export downloaded from the page.
            with page.expect_download() as dl:
                page.click("#export-usagi")
            path = tmp_path / "usagi.csv"
            dl.value.save_as(path)
            assert dl.value.suggested_filename == "usagi.csv"
            with open(path, newline="") as fh:
                rows = {r["sourceCode"]: r for r in csv.DictReader(fh)}
            assert rows["E11.9"]["conceptId"] == str(diabetes[1]["concept_id"])
            assert rows["K76.6"]["conceptId"] == str(portal["concept_id"])
            assert rows["E11.9"]["statusSetBy"] == rows["K76.6"]["statusSetBy"] == "reviewer-user"
            # The maps tab lists both.
            page.click("#tab-maps")
            expect(page.locator("#maps-count")).to_have_text("2 approved map(s)")
            assert errors == []
        finally:
            browser.close()
    history = conn.execute("SELECT source_code, action FROM harmonia.concept_map_history ORDER BY id").fetchall()
    assert history == [("E11.9", "approve"), ("K76.6", "correct")]
