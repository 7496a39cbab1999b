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
from typing import TYPE_CHECKING

import psycopg
import pytest
import uvicorn
from test_review_api import MODEL_VERSION, concepts_like, seed_item, seed_users

from harmonia.config import Settings

if TYPE_CHECKING:
    from playwright.sync_api import Page
from harmonia.review.api import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions"]
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
            expect(page.locator("#nav")).to_be_hidden()  # [hidden] wins over the nav's display rule
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
            expect(page.locator("#message")).to_contain_text(f"approve: E11.9 → MAPS_TO {diabetes[1]['concept_id']}")
            expect(page.locator("#queue-list li")).to_have_count(1)
            expect(page.locator("#i-code")).to_have_text("K76.6")
            # None of the suggestions fit: search for the concept and choose it.
            page.keyboard.press("/")
            page.keyboard.type("portal hypertension")
            page.keyboard.press("Enter")
            row = page.locator(".search-result", has_text=str(portal["concept_id"])).first
            expect(row).to_be_visible(timeout=60_000)  # the first search loads the embedding model
            row.locator("button.choose").click()
            expect(page.locator("#message")).to_contain_text(f"correct: K76.6 → MAPS_TO {portal['concept_id']}")
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


def log_in(page: Page, server: str, token: str, who: str) -> None:
    from playwright.sync_api import expect

    page.goto(server)
    page.fill("#token", token)
    page.click("#login-button")
    expect(page.locator("#whoami")).to_contain_text(who)


@pytest.mark.slow
def test_two_reviewers_in_two_browsers_meet_a_conflict_and_lose_nothing(server: str, conn: psycopg.Connection) -> None:
    from playwright.sync_api import expect, sync_playwright

    from harmonia.store import users as user_store

    tokens = seed_users(conn)
    second = user_store.add_user(conn, "second-reviewer", "reviewer")[1]
    diabetes = concepts_like(conn, "%diabetes mellitus%")
    seed_item(conn, "E11.9", "Type 2 diabetes mellitus", diabetes, confidence=0.42)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            a = browser.new_context().new_page()
            b = browser.new_context().new_page()
            errors: list[str] = []
            for page in (a, b):
                page.on("pageerror", lambda e: errors.append(str(e)))
            log_in(a, server, tokens["reviewer"], "reviewer-user")
            log_in(b, server, second, "second-reviewer")
            for page in (a, b):
                expect(page.locator("#i-code")).to_have_text("E11.9")
            # A holds the key down: one decision, not one per key repeat.
            a.keyboard.down("1")
            a.keyboard.down("1")
            a.keyboard.up("1")
            expect(a.locator("#message")).to_contain_text("approve: E11.9")
            # B decides on what they saw: the page says so and shows the current map; nothing is overwritten.
            b.keyboard.press("2")
            expect(b.locator("#message")).to_contain_text("conflict")
            expect(b.locator("#i-map")).to_contain_text(str(diabetes[0]["concept_id"]))
            expect(b.locator("#i-map")).to_contain_text("reviewer-user")
            assert conn.execute("SELECT omop_concept_id FROM harmonia.concept_map").fetchone()[0] == \
                diabetes[0]["concept_id"]
            # Now B decides on the current version: a correction, kept with A's approval in the history.
            b.keyboard.press("2")
            expect(b.locator("#message")).to_contain_text("correct: E11.9")
            assert errors == []
        finally:
            browser.close()
    history = conn.execute("SELECT action, u.name FROM harmonia.concept_map_history h "
                           "JOIN harmonia.users u ON u.id = h.reviewer_id ORDER BY h.id").fetchall()
    assert history == [("approve", "reviewer-user"), ("correct", "second-reviewer")]


@pytest.mark.slow
def test_one_to_many_with_a_maps_to_value_target_by_keyboard_alone(server: str, conn: psycopg.Connection) -> None:
    from playwright.sync_api import expect, sync_playwright

    from harmonia.store import mapping

    tokens = seed_users(conn)
    hb = concepts_like(conn, "Hemoglobin [Mass/volume] in Blood", 1, "LOINC")
    seed_item(conn, "HBPOS", "haemoglobin test positive", hb + concepts_like(conn, "Leukocytes%", 2, "LOINC"),
              vocab="LAB")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page()
            log_in(page, server, tokens["reviewer"], "reviewer-user")
            expect(page.locator("#i-code")).to_have_text("HBPOS")
            kb = page.keyboard
            kb.press("a")
            kb.press("1")                       # the first suggestion as MAPS_TO
            kb.press("e")                       # EQUAL -> EQUIVALENT
            kb.press("e")                       # -> WIDER
            kb.press("/")
            kb.type("9191")                     # "Positive", by its concept id
            kb.press("Enter")
            expect(page.locator(".search-result").first).to_contain_text("Positive", timeout=60_000)
            kb.press("Escape")                  # leave the search box
            kb.press("r")
            kb.press("1")                       # the first search result as a second target
            kb.press("m")                       # MAPS_TO -> MAPS_TO_VALUE
            expect(page.locator(".draft-target")).to_have_count(2)
            expect(page.locator(".draft-target").nth(1)).to_contain_text("MAPS_TO_VALUE 9191")
            kb.press("c")
            kb.type("value from the result")
            kb.press("Escape")
            kb.press("Enter")
            expect(page.locator("#message")).to_contain_text("MAPS_TO_VALUE 9191")
        finally:
            browser.close()
    m = mapping.get_state(conn, ("HBPOS", "LAB"))
    assert m is not None and m.status == "APPROVED" and m.comment == "value from the result"
    assert [(t.concept_id, t.mapping_type, t.equivalence) for t in m.targets] == [
        (hb[0]["concept_id"], "MAPS_TO", "WIDER"), (9191, "MAPS_TO_VALUE", "EQUAL")]


@pytest.mark.slow
def test_usagi_import_review_export_round_trip(server: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from harmonia.export import import_usagi

    tokens = seed_users(conn)
    header = ("sourceCode,sourceName,sourceFrequency,sourceAutoAssignedConceptIds,ADD_INFO:unit,matchScore,"
              "mappingStatus,equivalence,statusSetBy,statusSetOn,conceptId,conceptName,domainId,mappingType,"
              "comment,createdBy,createdOn,assignedReviewer")
    text = "\n".join([header,
                      "PLT,platelets,50,3007461;3024929,10*9/L,0.8,UNCHECKED,UNREVIEWED,,,3007461,,,MAPS_TO,"
                      "check units,usagi,1764500000000,",
                      "HB,haemoglobin,80,3000963,g/dL,0.9,APPROVED,EQUAL,ann,1764600000000,3000963,,,MAPS_TO,,"
                      "ann,1764500000000,", ""])
    import_usagi(conn, tmp_path / "lab.csv", "LAB", text=text)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(accept_downloads=True)
            log_in(page, server, tokens["reviewer"], "reviewer-user")
            expect(page.locator("#i-code")).to_have_text("PLT")
            expect(page.locator("#i-map")).to_contain_text("UNCHECKED")
            expect(page.locator("#comment")).to_have_value("check units")
            page.keyboard.press("2")            # the second auto-assigned concept
            expect(page.locator("#message")).to_contain_text("PLT → MAPS_TO 3024929")
            expect(page.locator("#progress")).to_contain_text("LAB: 1/1 decided")
            with page.expect_download() as dl:
                page.click("#export-usagi")
            path = tmp_path / "usagi.csv"
            dl.value.save_as(path)
        finally:
            browser.close()
    with open(path, newline="") as fh:
        rows = {r["sourceCode"]: r for r in csv.DictReader(fh)}
    assert rows["PLT"]["conceptId"] == "3024929" and rows["PLT"]["mappingStatus"] == "APPROVED"
    assert rows["PLT"]["statusSetBy"] == "reviewer-user" and rows["PLT"]["comment"] == "check units"
    assert rows["PLT"]["ADD_INFO:unit"] == "10*9/L" and rows["PLT"]["sourceFrequency"] == "50"
    assert rows["HB"]["statusSetBy"] == "ann" and rows["HB"]["statusSetOn"] == "1764600000000"
