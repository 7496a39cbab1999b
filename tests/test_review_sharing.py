"""A review two people can share (the review API and service against the real embedded PostgreSQL): stale decisions
get 409 with the current state, repeated ones change nothing, concurrent ones never both win, claims keep two
reviewers apart until they expire, the queue is most-frequent first with progress, IGNORE and undo, a domain
conflict asks for confirmation, several targets with mapping types, and a flagged code leaves the exports."""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from test_review_api import auth, concepts_like, history_rows, seed_item, seed_users

from harmonia import db
from harmonia.config import Settings
from harmonia.review import service as svc
from harmonia.review.api import create_app
from harmonia.store import mapping

HB, POSITIVE, GDL, CRF, T2DM = 3000963, 9191, 8713, 32809, 201826


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def tokens(conn: psycopg.Connection) -> dict[str, str]:
    t = seed_users(conn)
    from harmonia.store import users as user_store

    t["second"] = user_store.add_user(conn, "second-reviewer", "reviewer")[1]
    return t


@pytest.fixture
def diabetes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return concepts_like(conn, "%diabetes mellitus%")


@pytest.fixture
def labs(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return concepts_like(conn, "Leukocytes%", 3, "LOINC")


def test_stale_decision_gets_409_with_the_current_state_and_repeats_change_nothing(
        client: TestClient, conn: psycopg.Connection, tokens: dict[str, str], diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes)
    first, second = auth(tokens["reviewer"]), auth(tokens["second"])
    seen = client.get(f"/api/review/items/{a}", headers=second).json()["version"]  # both look at version 0
    r = client.post(f"/api/review/items/{a}/approve", json={"rank": 1, "version": 0}, headers=first)
    assert r.status_code == 200 and r.json()["version"] == 1
    # The second reviewer decides on what they saw: refused, with what is there now; nothing is overwritten.
    r = client.post(f"/api/review/items/{a}/approve", json={"rank": 2, "version": seen}, headers=second)
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["reason"] == "stale" and "reviewer-user" in body["detail"]
    assert body["current"]["version"] == 1 and body["current"]["map"]["omop_concept_id"] == diabetes[0]["concept_id"]
    assert body["current"]["map"]["status_set_by"] == "reviewer-user"
    # The first reviewer's key pressed twice: the same decision again is a no-op, not a second history row.
    r = client.post(f"/api/review/items/{a}/approve", json={"rank": 1, "version": 0}, headers=first)
    assert r.status_code == 200 and r.json()["action"] == "unchanged"
    # A request id makes any repeat a no-op, even of a decision that would change the map.
    body = {"concept_id": diabetes[3]["concept_id"], "version": 1, "request_id": "req-7"}
    assert client.post(f"/api/review/items/{a}/choose", json=body, headers=first).json()["action"] == "correct"
    r = client.post(f"/api/review/items/{a}/choose", json=body, headers=first)
    assert r.status_code == 200 and r.json()["repeated"] is True and r.json()["version"] == 2
    assert [h[0] for h in history_rows(conn, "E11.9")] == ["approve", "correct"]


def test_concurrent_decisions_on_one_item_never_both_win(settings: Settings, conn: psycopg.Connection,
                                                         diabetes: list[dict[str, Any]]) -> None:
    tokens = seed_users(conn)
    assert tokens
    ids = [r[0] for r in conn.execute("SELECT id FROM harmonia.users WHERE role <> 'reader' ORDER BY id")]
    items = [seed_item(conn, f"C{i}", f"code {i}", diabetes) for i in range(12)]
    outcomes: list[tuple[int, int, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(ids))

    def work(user_id: int, rank: int) -> None:
        with db.connect(settings.database, autocommit=True) as c:
            barrier.wait()
            for item in items:
                try:
                    svc.decide(c, item, user_id, "approve", rank=rank, version=0)
                    out = "ok"
                except svc.Conflict as exc:
                    out = exc.reason
                with lock:
                    outcomes.append((item, user_id, out))

    threads = [threading.Thread(target=work, args=(u, i + 1)) for i, u in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for item in items:
        got = sorted(o[2] for o in outcomes if o[0] == item)
        assert got == ["ok", "stale"], (item, got)
    # One history row per item, and the map holds the winner's choice.
    per_item = dict(conn.execute("SELECT source_code, count(*) FROM harmonia.concept_map_history GROUP BY 1"))
    assert set(per_item.values()) == {1} and len(per_item) == len(items)


def test_claims_frequency_order_and_progress(client: TestClient, conn: psycopg.Connection, tokens: dict[str, str],
                                             diabetes: list[dict[str, Any]]) -> None:
    for code, freq in (("A", 5), ("B", 900), ("C", None), ("D", 40), ("E", 41)):
        seed_item(conn, code, f"code {code}", diabetes, frequency=freq)
    first, second = auth(tokens["reviewer"]), auth(tokens["second"])
    codes = [i["source_code"] for i in client.get("/api/review/items", headers=first).json()["items"]]
    assert codes == ["B", "E", "D", "A", "C"]  # most frequent first, unknown frequency last
    r = client.post("/api/review/claim", json={"n": 2}, headers=first)
    assert r.status_code == 200
    mine = r.json()["item_ids"]
    r = client.post("/api/review/claim", json={"n": 2}, headers=second)
    theirs = r.json()["item_ids"]
    assert not set(mine) & set(theirs)
    listed = client.get("/api/review/items", params={"available": True}, headers=second).json()["items"]
    assert [i["source_code"] for i in listed] == ["D", "A", "C"]  # not what the first reviewer holds
    assert {i["claimed_by"] for i in listed if i["id"] in theirs} == {"second-reviewer"}
    assert client.post("/api/review/claim", json={"n": 1}, headers=auth(tokens["reader"])).status_code == 403
    # A claim expires: then the other reviewer can take it.
    client.post("/api/review/release", headers=first)
    r = client.post("/api/review/claim", json={"n": 5, "ttl_s": 0.2}, headers=first)
    assert len(r.json()["item_ids"]) == 3
    time.sleep(0.3)
    assert len(client.post("/api/review/claim", json={"n": 5}, headers=second).json()["item_ids"]) == 5
    # Progress: decided / total per source set.
    b = next(i for i in listed if i["source_code"] == "D")["id"]
    client.post(f"/api/review/items/{b}/ignore", json={"version": 0}, headers=second)
    p = client.get("/api/review/progress", headers=first).json()
    assert p["sets"] == [{"source_vocab": "ICD10", "total": 5, "decided": 1, "open": 4, "flagged": 0}]
    # An admin assigns items; the assignee sees them as theirs, others do not get them.
    ids = [i["id"] for i in client.get("/api/review/items", headers=first).json()["items"]][:2]
    client.post("/api/review/release", headers=second)
    r = client.post("/api/review/assign", json={"item_ids": ids, "reviewer": "second-reviewer"},
                    headers=auth(tokens["admin"]))
    assert r.json() == {"assigned": 2}
    assert client.post("/api/review/assign", json={"item_ids": ids, "reviewer": "x"},
                       headers=first).status_code == 403
    mine = client.get("/api/review/items", params={"mine": True}, headers=second).json()["items"]
    assert sorted(i["id"] for i in mine) == sorted(ids)
    assert not set(client.post("/api/review/claim", json={"n": 5}, headers=first).json()["item_ids"]) & set(ids)


def test_ignore_undo_and_flag_take_codes_out_of_the_exports(client: TestClient, conn: psycopg.Connection,
                                                            tokens: dict[str, str],
                                                            diabetes: list[dict[str, Any]]) -> None:
    a = seed_item(conn, "E11.9", "Type 2 diabetes", diabetes)
    b = seed_item(conn, "Z99", "unused", diabetes)
    h = auth(tokens["reviewer"])

    def exported(fmt: str) -> set[str]:
        text = client.get(f"/api/export/{fmt}", headers=h).text
        return {r["sourceCode" if fmt == "usagi" else "source_code"] for r in csv.DictReader(io.StringIO(text))}

    r = client.post(f"/api/review/items/{b}/ignore", json={"version": 0, "comment": "retired code"}, headers=h)
    assert r.status_code == 200 and r.json()["map"]["status"] == "IGNORED"
    assert r.json()["item"]["status"] == "resolved"
    assert client.post(f"/api/review/items/{a}/approve", json={"rank": 1, "version": 0}, headers=h).is_success
    assert exported("usagi") == exported("stcm") == {"E11.9"}
    # Flagging an approved code takes it out of the approved set and the exports.
    r = client.post(f"/api/review/items/{a}/flag", json={"version": 1, "note": "second look"}, headers=h)
    assert r.status_code == 200 and r.json()["map"]["status"] == "FLAGGED"
    assert r.json()["map"]["omop_concept_id"] == diabetes[0]["concept_id"]  # its target stays for the second look
    assert exported("usagi") == exported("stcm") == set()
    assert client.get("/api/maps", headers=h).json()["total"] == 0
    assert client.get("/api/maps", params={"status": "FLAGGED"}, headers=h).json()["total"] == 1
    # Undo the flag: approved again, item resolved; undo the approval: no map, item open.
    r = client.post("/api/review/undo", headers=h)
    assert r.status_code == 200 and r.json()["undone"] == "flag"
    back = mapping.get_state(conn, ("E11.9", "ICD10"))
    assert back is not None and back.status == "APPROVED"
    assert exported("stcm") == {"E11.9"}
    r = client.post("/api/review/undo", headers=h)
    assert r.json()["undone"] == "approve" and r.json()["item"]["status"] == "open"
    assert mapping.get_state(conn, ("E11.9", "ICD10")) is None
    r = client.post("/api/review/undo", headers=h)
    assert r.json()["undone"] == "ignore" and mapping.get_state(conn, ("Z99", "ICD10")) is None
    assert client.post("/api/review/undo", headers=h).status_code == 409  # nothing left
    # Undo never overwrites someone else's later change.
    assert client.post(f"/api/review/items/{a}/approve", json={"rank": 1, "version": 0}, headers=h).is_success
    assert client.post(f"/api/review/items/{a}/choose", json={"concept_id": diabetes[1]["concept_id"],
                                                            "version": 1}, headers=auth(tokens["second"])).is_success
    r = client.post("/api/review/undo", headers=h)
    assert r.status_code == 409 and r.json()["reason"] == "changed"
    actions = [x[0] for x in history_rows(conn, "E11.9")]
    assert actions == ["approve", "flag", "undo", "undo", "approve", "correct"]


def test_domain_conflict_asks_for_confirmation_and_unfit_targets_are_refused(
        client: TestClient, conn: psycopg.Connection, tokens: dict[str, str], labs: list[dict[str, Any]]) -> None:
    w = seed_item(conn, "WBC", "WBC count", labs, vocab="LAB")
    p = seed_item(conn, "PLT", "Platelet count", labs, vocab="LAB")
    h = auth(tokens["reviewer"])
    r = client.post(f"/api/review/items/{p}/choose", json={"concept_id": CRF, "version": 0}, headers=h)
    assert r.status_code == 422 and "Type Concept" in r.json()["detail"]  # "Case Report Form" is never a target
    r = client.post(f"/api/review/items/{w}/choose", json={"concept_id": T2DM, "version": 0}, headers=h)
    assert r.status_code == 409 and r.json()["reason"] == "domain_conflict"
    assert "Condition" in r.json()["detail"] and "Measurement" in r.json()["detail"]
    assert mapping.get_state(conn, ("WBC", "LAB")) is None
    r = client.post(f"/api/review/items/{w}/choose", json={"concept_id": T2DM, "version": 0, "confirm": True},
                    headers=h)
    assert r.status_code == 200 and r.json()["map"]["omop_concept_id"] == T2DM


def test_one_code_several_targets_with_mapping_types(client: TestClient, conn: psycopg.Connection,
                                                     tokens: dict[str, str], labs: list[dict[str, Any]]) -> None:
    i = seed_item(conn, "HBPOS", "haemoglobin, positive", labs, vocab="LAB")
    h = auth(tokens["reviewer"])
    targets = [{"concept_id": HB, "mapping_type": "MAPS_TO", "equivalence": "WIDER"},
               {"concept_id": POSITIVE, "mapping_type": "MAPS_TO_VALUE", "equivalence": "EQUAL"}]
    r = client.post(f"/api/review/items/{i}/targets", json={"version": 0, "targets": targets,
                                                            "comment": "value from the result"}, headers=h)
    assert r.status_code == 200, r.text
    m = r.json()["map"]
    assert [(t["concept_id"], t["mapping_type"], t["equivalence"]) for t in m["targets"]] == [
        (HB, "MAPS_TO", "WIDER"), (POSITIVE, "MAPS_TO_VALUE", "EQUAL")]
    assert m["comment"] == "value from the result" and m["omop_concept_id"] == HB
    bad = [({"concept_id": GDL, "mapping_type": "MAPS_TO_VALUE"}, "not a MAPS_TO_VALUE target"),
           ({"concept_id": HB, "mapping_type": "MAPS_TO_UNIT"}, "needs a Unit"),
           ({"concept_id": HB, "mapping_type": "MAPS_TO"}, "already a MAPS_TO target")]
    for extra, why in bad:
        r = client.post(f"/api/review/items/{i}/targets", json={"version": 1, "targets": [targets[0], extra]},
                        headers=h)
        assert r.status_code == 422 and why in r.json()["detail"], r.text
    r = client.post(f"/api/review/items/{i}/targets", json={"version": 1, "targets": [targets[1]]}, headers=h)
    assert r.status_code == 422 and "at least one MAPS_TO" in r.json()["detail"]
    usagi = list(csv.DictReader(io.StringIO(client.get("/api/export/usagi", headers=h).text)))
    assert [(x["conceptId"], x["mappingType"], x["equivalence"]) for x in usagi] == [
        (str(HB), "MAPS_TO", "WIDER"), (str(POSITIVE), "MAPS_TO_VALUE", "EQUAL")]
    stcm = list(csv.DictReader(io.StringIO(client.get("/api/export/stcm", headers=h).text)))
    assert [x["target_concept_id"] for x in stcm] == [str(HB)]  # STCM holds the MAPS_TO targets
