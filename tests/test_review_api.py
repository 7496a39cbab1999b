"""API tests for the review service against the real embedded PostgreSQL: auth matrix, FK and uniqueness,
history, no match, flag, revoke, enqueue and exports. The helpers at the top are shared with the browser test."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from harmonia.cli import app as cli_app
from harmonia.config import Settings
from harmonia.review import service as svc
from harmonia.review.api import create_app
from harmonia.store import mapping
from harmonia.store import users as user_store

MODEL_VERSION = "llm:stub-model@prompt-3f2a9c"


def concepts_like(conn: psycopg.Connection, pattern: str, n: int = 5, vocabulary: str = "SNOMED"
                  ) -> list[dict[str, Any]]:
    rows = conn.execute(
        """SELECT concept_id, concept_name, domain_id, vocabulary_id, concept_class_id, concept_code FROM vocab.concept
           WHERE standard_concept = 'S' AND invalid_reason IS NULL AND concept_name ILIKE %s AND vocabulary_id = %s
           ORDER BY concept_id LIMIT %s""", (pattern, vocabulary, n)).fetchall()
    assert len(rows) == n, f"sample vocabulary has fewer than {n} concepts like {pattern}"
    keys = ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "concept_code")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def seed_item(conn: psycopg.Connection, code: str, text: str, candidates: list[dict[str, Any]],
              confidence: float = 0.55, vocab: str = "ICD10", frequency: int | None = 12) -> int:
    ranking = [{**c, "similarity": 0.8 - i / 20, "score": round(0.9 - i / 10, 4),
                "rationale": f"because {c['concept_name']} fits rank {i + 1}"} for i, c in enumerate(candidates)]
    mapping.enqueue_review(conn, code, vocab, text, frequency, {"site": "lab-a"}, ranking, confidence, MODEL_VERSION,
                           "low_confidence", None)
    return conn.execute("SELECT id FROM harmonia.review_queue WHERE source_code = %s AND source_vocab = %s",
                        (code, vocab)).fetchone()[0]


def version_of(client: TestClient, item_id: int, token: str) -> int:
    """The version a reviewer sees on the item (0: the code has no map yet)."""
    return client.get(f"/api/review/items/{item_id}", headers=auth(token)).json()["version"]


def seed_users(conn: psycopg.Connection) -> dict[str, str]:
    """One user per role; returns role -> token."""
    return {role: user_store.add_user(conn, f"{role}-user", role)[1] for role in user_store.ROLES}


# ---------------------------------------------------------------------------------------------------- tests


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def tokens(conn: psycopg.Connection) -> dict[str, str]:
    return seed_users(conn)


@pytest.fixture
def diabetes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return concepts_like(conn, "%diabetes mellitus%")


def map_rows(conn: psycopg.Connection, code: str) -> list[tuple]:
    return conn.execute("""SELECT omop_concept_id, decided_by, u.name, reviewed_at IS NOT NULL, confidence
                           FROM harmonia.concept_map m LEFT JOIN harmonia.users u ON u.id = m.reviewer_id
                           WHERE source_code = %s""", (code,)).fetchall()


def history_rows(conn: psycopg.Connection, code: str) -> list[tuple]:
    return conn.execute("""SELECT action, old_concept_id, new_concept_id, u.name, note
                           FROM harmonia.concept_map_history h LEFT JOIN harmonia.users u ON u.id = h.reviewer_id
                           WHERE source_code = %s ORDER BY h.id""", (code,)).fetchall()


def item_status(conn: psycopg.Connection, item_id: int) -> tuple:
    return conn.execute("""SELECT q.status, u.name FROM harmonia.review_queue q
                           LEFT JOIN harmonia.users u ON u.id = q.resolved_by WHERE q.id = %s""",
                        (item_id,)).fetchone()


def test_auth_matrix(client: TestClient, conn: psycopg.Connection, tokens: dict[str, str],
                     diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes without complications", diabetes)
    b = seed_item(conn, "E10.9", "Type 1 diabetes without complications", diabetes)
    approve = {"rank": 1, "version": 0}
    for headers in ({}, auth("not-a-token"), {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = client.get("/api/review/items", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert client.post(f"/api/review/items/{a}/approve", json=approve, headers=headers).status_code == 401
    assert client.get("/api/review/items", headers=auth(tokens["reader"])).json()["total"] == 2
    r = client.post(f"/api/review/items/{a}/approve", json=approve, headers=auth(tokens["reader"]))
    assert r.status_code == 403 and "reader" in r.json()["detail"]
    for path in (f"/api/review/items/{a}/no-match", f"/api/review/items/{a}/flag", f"/api/review/items/{a}/ignore"):
        assert client.post(path, json={"version": 0}, headers=auth(tokens["reader"])).status_code == 403
    assert map_rows(conn, "E11.9") == [] and history_rows(conn, "E11.9") == []
    assert client.post(f"/api/review/items/{a}/approve", json=approve, headers=auth(tokens["reviewer"])).is_success
    assert client.post(f"/api/review/items/{b}/approve", json=approve, headers=auth(tokens["admin"])).is_success
    assert map_rows(conn, "E11.9")[0][2] == "reviewer-user" and map_rows(conn, "E10.9")[0][2] == "admin-user"
    # A disabled user's token stops working at once; the stored hash is not the token.
    assert user_store.disable_user(conn, "reviewer-user")
    assert client.get("/api/me", headers=auth(tokens["reviewer"])).status_code == 401
    stored = [r[0] for r in conn.execute("SELECT token_hash FROM harmonia.api_token").fetchall()]
    assert user_store.hash_token(tokens["admin"]) in stored and tokens["admin"] not in stored
    # The page shell itself is public (it asks for a token); the OpenAPI docs list the routes.
    assert "Log in" in client.get("/").text
    assert "/api/review/items/{item_id}/approve" in client.get("/openapi.json").json()["paths"]


def test_list_filters_and_pagination(client: TestClient, conn: psycopg.Connection, tokens: dict[str, str],
                                     diabetes: list[dict[str, Any]]) -> None:
    loinc = concepts_like(conn, "%glucose%", 5, "LOINC")
    assert loinc[0]["domain_id"] != diabetes[0]["domain_id"]
    seed_item(conn, "E11.9", "Type 2 diabetes", diabetes, confidence=0.40)
    seed_item(conn, "GLU", "glucose, plasma", loinc, confidence=0.70, vocab="LAB")
    c = seed_item(conn, "E10.9", "Type 1 diabetes", diabetes, confidence=0.90)
    h = auth(tokens["reader"])

    def codes(**params: Any) -> list[str]:
        r = client.get("/api/review/items", params=params, headers=h)
        assert r.status_code == 200, r.text
        return [i["source_code"] for i in r.json()["items"]]

    assert codes() == ["E11.9", "GLU", "E10.9"]
    assert codes(source_vocab="LAB") == ["GLU"]
    assert codes(domain=diabetes[0]["domain_id"]) == ["E11.9", "E10.9"]
    assert codes(min_confidence=0.5) == ["GLU", "E10.9"]
    assert codes(min_confidence=0.5, max_confidence=0.8) == ["GLU"]
    page = client.get("/api/review/items", params={"limit": 1, "offset": 1}, headers=h).json()
    assert page["total"] == 3 and [i["source_code"] for i in page["items"]] == ["GLU"]
    client.post(f"/api/review/items/{c}/no-match", json={"version": 0}, headers=auth(tokens["reviewer"]))
    assert codes() == ["E11.9", "GLU"]
    assert codes(status="resolved") == ["E10.9"]
    assert codes(status=["open", "resolved"]) == ["E11.9", "GLU", "E10.9"]
    facets = client.get("/api/review/facets", headers=h).json()
    assert facets["source_vocab"] == ["ICD10", "LAB"]
    for bad in ({"status": "done"}, {"min_confidence": 2}, {"limit": 0}, {"offset": -1}):
        r = client.get("/api/review/items", params=bad, headers=h)
        assert r.status_code == 422, bad


def test_show_item_has_top5_scores_rationales_and_source(client: TestClient, conn: psycopg.Connection,
                                                         tokens: dict[str, str],
                                                         diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes, confidence=0.4321)
    r = client.get(f"/api/review/items/{a}", headers=auth(tokens["reader"]))
    assert r.status_code == 200
    item = r.json()
    assert [c["concept_id"] for c in item["candidates"]] == [c["concept_id"] for c in diabetes]
    assert item["candidates"][0]["score"] == 0.9 and item["candidates"][1]["rationale"].startswith("because")
    assert item["model_version"] == MODEL_VERSION and item["confidence"] == pytest.approx(0.4321)
    assert item["source_frequency"] == 12 and item["extra"] == {"site": "lab-a"} and item["map"] is None
    assert client.get("/api/review/items/999999", headers=auth(tokens["reader"])).status_code == 404
    # Ids beyond bigint are bad input too: 422, not a 500 from the database.
    huge = "/api/review/items/99999999999999999999999"
    assert client.get(huge, headers=auth(tokens["reader"])).status_code == 422
    assert client.post(huge + "/flag", json={"version": 0}, headers=auth(tokens["reviewer"])).status_code == 422


def test_approve_then_correct_updates_the_one_map_and_keeps_history(
        client: TestClient, conn: psycopg.Connection, tokens: dict[str, str], diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes, confidence=0.61)
    h = auth(tokens["reviewer"])
    c1, c2 = diabetes[0]["concept_id"], diabetes[1]["concept_id"]
    r = client.post(f"/api/review/items/{a}/approve", json={"rank": 1, "version": 0}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "approve" and r.json()["map"]["omop_concept_id"] == c1
    assert r.json()["version"] == 1
    assert map_rows(conn, "E11.9") == [(c1, "reviewer", "reviewer-user", True, Decimal("0.6100"))]
    assert item_status(conn, a) == ("resolved", "reviewer-user")
    # A second decision on the same code updates the one row: a correction.
    r = client.post(f"/api/review/items/{a}/approve", json={"concept_id": c2, "note": "more specific", "version": 1},
                    headers=h)
    assert r.status_code == 200 and r.json()["action"] == "correct"
    assert map_rows(conn, "E11.9") == [(c2, "reviewer", "reviewer-user", True, None)]
    outside = concepts_like(conn, "%portal hypertension%", 1)[0]["concept_id"]
    r = client.post(f"/api/review/items/{a}/choose", json={"concept_id": outside, "version": 2},
                    headers=auth(tokens["admin"]))
    assert r.status_code == 200 and r.json()["action"] == "correct"
    assert map_rows(conn, "E11.9") == [(outside, "reviewer", "admin-user", True, None)]
    assert history_rows(conn, "E11.9") == [
        ("approve", None, c1, "reviewer-user", None), ("correct", c1, c2, "reviewer-user", "more specific"),
        ("correct", c2, outside, "admin-user", None)]
    shown = client.get(f"/api/review/items/{a}", headers=h).json()
    assert shown["map"]["omop_concept_id"] == outside and len(shown["history"]) == 3


def test_reviewer_corrects_an_auto_approved_map(client: TestClient, conn: psycopg.Connection,
                                               tokens: dict[str, str], diabetes: list[dict[str, Any]]) -> None:
    from harmonia.domain import Decision, SourceTerm

    term = SourceTerm("E11.9", "ICD10", "Type 2 diabetes")
    c1, c3 = diabetes[0]["concept_id"], diabetes[2]["concept_id"]
    auto = Decision(term=term, action="approve", concept_id=c1, confidence=0.97, model_version="auto-model",
                    ranking=[], reason="approved")
    assert mapping.record_decision(conn, auto) == "approved"
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes)
    assert version_of(client, a, tokens["reviewer"]) == 1
    r = client.post(f"/api/review/items/{a}/approve", json={"rank": 3, "version": 1}, headers=auth(tokens["reviewer"]))
    assert r.status_code == 200 and r.json()["action"] == "correct"
    assert map_rows(conn, "E11.9") == [(c3, "reviewer", "reviewer-user", True, None)]
    assert [x[:3] for x in history_rows(conn, "E11.9")] == [("auto_approve", None, c1), ("correct", c1, c3)]


def test_unknown_or_unfit_concepts_get_422_and_write_nothing(
        client: TestClient, conn: psycopg.Connection, tokens: dict[str, str], diabetes: list[dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes)
    h = auth(tokens["reviewer"])
    non_standard = conn.execute("SELECT concept_id FROM vocab.concept WHERE vocabulary_id = 'ICD10' "
                                "AND standard_concept IS NULL LIMIT 1").fetchone()[0]
    cases = [
        ("choose", {"concept_id": 999_999_999}, "does not exist"),
        ("choose", {"concept_id": non_standard}, "not a valid standard concept"),
        ("choose", {"concept_id": 2**40}, "concept_id"),
        ("choose", {"concept_id": "abc"}, "concept_id"),
        ("choose", {}, "concept_id"),
        ("approve", {"concept_id": 999_999_999}, "not one of"),
        ("approve", {"rank": 6}, "has 5 suggestion"),
        ("approve", {}, "needs rank or concept_id"),
        # rank 1 with candidate 3's id: refused, never silently candidate 1
        ("approve", {"rank": 1, "concept_id": diabetes[2]["concept_id"]}, "not"),
        ("choose", {"concept_id": 0}, "no targets"),
    ]
    for action, body, reason in cases:
        r = client.post(f"/api/review/items/{a}/{action}", json={"version": 0, **body}, headers=h)
        assert r.status_code == 422, (action, body, r.text)
        assert reason in r.text, (reason, r.text)
    # The FK is the last line: with the pre-check bypassed, its violation is still a 422, not a 500.
    monkeypatch.setattr(svc, "check_concept", lambda known, concept_id, mapping_type="MAPS_TO": {})
    r = client.post(f"/api/review/items/{a}/choose", json={"concept_id": 999_999_998, "version": 0}, headers=h)
    assert r.status_code == 422 and "foreign key" in r.json()["detail"]
    assert client.post("/api/review/items/424242/choose", json={"concept_id": 5, "version": 0},
                       headers=h).status_code == 404
    # Every decision carries the version it was made on.
    r = client.post(f"/api/review/items/{a}/approve", json={"rank": 1}, headers=h)
    assert r.status_code == 422 and "version" in r.text
    assert map_rows(conn, "E11.9") == [] and history_rows(conn, "E11.9") == []
    assert item_status(conn, a) == ("open", None)


def test_no_match_flag_and_revoke(client: TestClient, conn: psycopg.Connection, tokens: dict[str, str],
                                  diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "X1", "gibberish", diabetes)
    b = seed_item(conn, "X2", "unsure", diabetes)
    h = auth(tokens["reviewer"])
    r = client.post(f"/api/review/items/{a}/no-match", json={"note": "not a clinical term", "version": 0}, headers=h)
    assert r.status_code == 200 and r.json()["action"] == "no_match"
    # No match: no targets, equivalence UNMATCHED (omop_concept_id mirrors it as 0).
    assert r.json()["map"]["targets"] == [] and r.json()["map"]["equivalence"] == "UNMATCHED"
    assert map_rows(conn, "X1") == [(0, "reviewer", "reviewer-user", True, None)]
    assert history_rows(conn, "X1") == [("no_match", None, 0, "reviewer-user", "not a clinical term")]
    # Flagging a code gives it the status FLAGGED (a map without targets when it had none).
    r = client.post(f"/api/review/items/{b}/flag", json={"version": 0}, headers=h)
    assert r.status_code == 200 and item_status(conn, b) == ("flagged", None)
    assert r.json()["map"]["status"] == "FLAGGED"
    assert history_rows(conn, "X2") == [("flag", None, 0, "reviewer-user", None)]
    flagged = client.get("/api/review/items", params={"status": "flagged"}, headers=h).json()
    assert [i["id"] for i in flagged["items"]] == [b]
    # Revoke: the map goes, the history says so, the item reopens.
    maps = client.get("/api/maps", headers=auth(tokens["reader"])).json()
    assert maps["total"] == 1 and maps["items"][0]["omop_concept_id"] == 0
    map_id = maps["items"][0]["id"]
    assert client.post(f"/api/maps/{map_id}/revoke", json={"version": 1},
                       headers=auth(tokens["reader"])).status_code == 403
    assert client.post(f"/api/maps/{map_id}/revoke", json={"version": 7}, headers=h).status_code == 409
    r = client.post(f"/api/maps/{map_id}/revoke", json={"note": "wrong", "version": 1}, headers=h)
    assert r.status_code == 200 and r.json()["reopened_item_id"] == a
    assert map_rows(conn, "X1") == [] and item_status(conn, a) == ("open", None)
    assert history_rows(conn, "X1")[-1] == ("revoke", 0, None, "reviewer-user", "wrong")
    assert client.post(f"/api/maps/{map_id}/revoke", json={"version": 1}, headers=h).status_code == 404
    hist = client.get("/api/history", params={"source_code": "X1", "source_vocab": "ICD10"}, headers=h).json()
    assert [x["action"] for x in hist] == ["no_match", "revoke"]


def test_exports_hold_reviewer_maps(client: TestClient, conn: psycopg.Connection, tokens: dict[str, str],
                                    diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes, confidence=0.5)
    b = seed_item(conn, "K76.6", "Portal hypertension", diabetes)
    outside = concepts_like(conn, "portal hypertension", 1)[0]
    h = auth(tokens["reviewer"])
    assert client.post(f"/api/review/items/{a}/approve", json={"rank": 1, "version": 0,
                                                               "comment": "=HYPERLINK(\"x\")"}, headers=h).is_success
    assert client.post(f"/api/review/items/{b}/choose", json={"concept_id": outside["concept_id"], "version": 0},
                       headers=h).is_success
    r = client.get("/api/export/usagi", headers=auth(tokens["reader"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "usagi.csv" in r.headers["content-disposition"]
    rows = {x["sourceCode"]: x for x in csv.DictReader(io.StringIO(r.text))}
    assert rows["E11.9"]["conceptId"] == str(diabetes[0]["concept_id"])
    assert rows["E11.9"]["statusSetBy"] == "reviewer-user" and float(rows["E11.9"]["matchScore"]) == 0.5
    assert rows["E11.9"]["sourceAutoAssignedConceptIds"] == ";".join(str(c["concept_id"]) for c in diabetes)
    assert rows["E11.9"]["sourceFrequency"] == "12" and rows["E11.9"]["ADD_INFO:site"] == "lab-a"
    # The reviewer's comment is kept, and a cell a spreadsheet would evaluate is defused.
    assert rows["E11.9"]["comment"] == "'=HYPERLINK(\"x\")" and rows["E11.9"]["equivalence"] == "EQUAL"
    assert rows["K76.6"]["conceptId"] == str(outside["concept_id"]) and rows["K76.6"]["mappingStatus"] == "APPROVED"
    r = client.get("/api/export/stcm", params={"source_vocab": "ICD10"}, headers=h)
    stcm = {x["source_code"]: x for x in csv.DictReader(io.StringIO(r.text))}
    assert stcm["K76.6"]["target_concept_id"] == str(outside["concept_id"])
    assert stcm["K76.6"]["target_vocabulary_id"] == "SNOMED" and stcm["E11.9"]["source_vocabulary_id"] == "ICD10"
    assert client.get("/api/export/xml", headers=h).status_code == 422
    assert client.get("/api/export/usagi").status_code == 401


def test_concept_search_uses_the_retriever(client: TestClient, conn: psycopg.Connection,
                                           tokens: dict[str, str]) -> None:
    h = auth(tokens["reader"])
    target = concepts_like(conn, "portal hypertension", 1)[0]
    r = client.get("/api/concepts/search", params={"q": "portal hypertension", "k": 5}, headers=h)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5 and results[0]["concept_id"] == target["concept_id"]
    r = client.get("/api/concepts/search", params={"q": str(target["concept_id"]), "k": 3}, headers=h)
    assert r.json()["results"][0]["concept_name"] == target["concept_name"]
    assert client.get("/api/concepts/search", params={"q": ""}, headers=h).status_code == 422
    assert client.get("/api/concepts/search", params={"q": "x"}).status_code == 401
    assert client.get(f"/api/concepts/{target['concept_id']}", headers=h).json()["domain_id"] == "Condition"
    assert client.get("/api/concepts/999999999", headers=h).status_code == 404


def test_enqueue_source_codes(client: TestClient, conn: psycopg.Connection, tokens: dict[str, str]) -> None:
    terms = [{"source_code": "L1", "source_vocab": "LAB", "source_text": "sodium, serum", "source_frequency": 3},
             {"source_code": "L2", "source_vocab": "LAB", "source_text": "potassium", "extra": {"unit": "mmol/L"}}]
    h = auth(tokens["reviewer"])
    assert client.post("/api/source-queue", json={"terms": terms}, headers=auth(tokens["reader"])).status_code == 403
    r = client.post("/api/source-queue", json={"terms": terms}, headers=h)
    assert r.status_code == 200 and r.json()["new"] == 2
    assert client.post("/api/source-queue", json={"terms": terms}, headers=h).json() == \
        {"new": 0, "duplicate": 2, "ids": []}
    rows = conn.execute("SELECT source_code, state, extra FROM harmonia.source_queue ORDER BY id").fetchall()
    assert rows == [("L1", "pending", {}), ("L2", "pending", {"unit": "mmol/L"})]
    r = client.post("/api/source-queue", json={"terms": [{**terms[0], "source_code": ""}]}, headers=h)
    assert r.status_code == 422 and "source_code" in r.text
    assert client.post("/api/source-queue", json={"terms": []}, headers=h).status_code == 422


def test_codes_enqueued_through_the_api_are_never_auto_approved_uncalibrated(
        client: TestClient, conn: psycopg.Connection, tokens: dict[str, str], settings: Settings) -> None:
    """The API's way in is the source queue; the workers route what it holds with the one router: with no
    calibration for the reranker, nothing is approved, even a code whose name is a concept's own."""
    from harmonia.pipeline.worker import Worker

    terms = [{"source_code": "I10", "source_vocab": "ICD10", "source_text": "Essential hypertension"},
             {"source_code": "L9", "source_vocab": "LAB", "source_text": "sodium, serum"}]
    assert client.post("/api/source-queue", json={"terms": terms}, headers=auth(tokens["reviewer"])).is_success
    w = Worker.from_settings(settings, drain=True)
    stats = w.run()
    w.close()
    assert (stats.claimed, stats.approved, stats.in_review) == (2, 0, 2)
    assert conn.execute("SELECT count(*) FROM harmonia.concept_map").fetchone()[0] == 0
    assert {r[0] for r in conn.execute("SELECT reason FROM harmonia.review_queue")} == {"uncalibrated"}


def test_user_cli_prints_token_once_and_stores_hash(fresh_db: str, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}

    def run(*args: str):
        return runner.invoke(cli_app, ["--database-url", fresh_db, *args], env=env)

    r = run("user", "add", "alice", "--role", "reader")
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("hmn_") and len(token) > 30
    r = run("user", "add", "alice")
    assert r.exit_code == 1 and "already exists" in r.output
    r = run("user", "add", "bob", "--role", "boss")
    assert r.exit_code == 1 and "unknown role" in r.output
    r = run("user", "list")
    assert r.exit_code == 0 and "alice" in r.output and "reader" in r.output and token not in r.output
    with psycopg.connect(fresh_db) as conn:
        assert user_store.user_by_token(conn, token)["name"] == "alice"
        r = run("user", "add", "alice", "--role", "reviewer", "--rotate")
        new = r.stdout.strip().splitlines()[-1]
        assert user_store.user_by_token(conn, token) is None
        assert user_store.user_by_token(conn, new)["role"] == "reviewer"


def test_serve_command_starts_the_service(fresh_db: str, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", "from harmonia.cli import main; main()", "--database-url",
                             fresh_db, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "harmonia serve did not answer within 60 s"
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["info"]["title"] == "Harmonia review service"
        assert httpx.get(f"http://127.0.0.1:{port}/api/review/items").status_code == 401
        assert "review.js" in httpx.get(f"http://127.0.0.1:{port}/").text
        assert httpx.get(f"http://127.0.0.1:{port}/static/review.js").status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)
