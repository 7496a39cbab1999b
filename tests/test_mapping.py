"""The mapping system of record (harmonia.store.mapping, migration 100) against the real embedded PostgreSQL: today's
rows move without loss, targets carry mapping type and equivalence with a foreign key, the version refuses a stale
change, history records every change, and writers that know only omop_concept_id still get one target."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from harmonia.domain import Concept
from harmonia.paths import resource_dir
from harmonia.store import mapping
from harmonia.store import migrations as mig
from harmonia.store.mapping import MapState, StaleVersion, Target

CONCEPTS = [  # id, name, domain, vocabulary, class, standard, code, invalid
    (0, "No matching concept", "Metadata", "None", "Undefined", None, "No matching concept", None),
    (201826, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "S", "44054006", None),
    (4193704, "Type 2 diabetes mellitus without complication", "Condition", "SNOMED", "Clinical Finding", "S",
     "313436004", None),
    (3000963, "Hemoglobin [Mass/volume] in Blood", "Measurement", "LOINC", "Lab Test", "S", "718-7", None),
    (4181412, "Low", "Meas Value", "SNOMED", "Qualifier Value", "S", "62482003", None),
    (8713, "gram per deciliter", "Unit", "UCUM", "Unit", "S", "g/dL", None),
    (32817, "EHR", "Type Concept", "Type Concept", "Type Concept", "S", "OMOP4976890", None),
    (45576876, "Type 2 diabetes mellitus", "Condition", "ICD10", "ICD10 code", None, "E11", None),
]


@pytest.fixture
def legacy_db(empty_db: str, tmp_path: Path) -> str:
    """A database migrated as it was before migration 100, with maps, a no-match and history in the old shape."""
    old = tmp_path / "migrations"
    old.mkdir()
    for p in sorted(resource_dir("migrations").glob("*.sql")):
        if int(p.name.split("_")[0]) < 100:
            shutil.copy(p, old / p.name)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        mig.migrate(conn, old)
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO vocab.concept (concept_id, concept_name, domain_id, vocabulary_id,
                                   concept_class_id, standard_concept, concept_code, valid_start_date,
                                   valid_end_date, invalid_reason)
                               VALUES (%s, %s, %s, %s, %s, %s, %s, '1970-01-01', '2099-12-31', %s)""", CONCEPTS)
        uid = conn.execute("INSERT INTO harmonia.users (name) VALUES ('ann') RETURNING id").fetchone()[0]
        conn.execute(
            """INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id, confidence,
                   decided_by, model_version, candidate_ranking_json)
               VALUES ('E11', 'ICD10', 'Type 2 diabetes', 201826, 0.97, 'auto', 'm1',
                       '{"source_frequency": 40, "ranked": [{"concept_id": 201826}, {"concept_id": 4193704}]}')""")
        conn.execute(
            """INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id, decided_by,
                   reviewer_id, reviewed_at, equivalence)
               VALUES ('X1', 'ICD10', 'gibberish', 0, 'reviewer', %s, '2026-11-01 10:00+00', 'EQUAL'),
                      ('HB', 'LAB', 'haemoglobin', 3000963, 'reviewer', %s, '2026-11-02 10:00+00', 'WIDER')""",
            (uid, uid))
        conn.execute("""INSERT INTO harmonia.review_queue (source_code, source_vocab, reason, status)
                        VALUES ('HB', 'LAB', 'low_confidence', 'flagged')""")
        conn.execute("""INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, new_concept_id)
                        VALUES ('E11', 'ICD10', 'auto_approve', 201826)""")
    return empty_db


def test_migration_moves_todays_rows_without_loss(legacy_db: str) -> None:
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        before = conn.execute("SELECT source_code, omop_concept_id, confidence, decided_by, reviewer_id, reviewed_at, "
                              "model_version, candidate_ranking_json FROM harmonia.concept_map ORDER BY 1").fetchall()
        assert [v.split("_")[0] for v in mig.migrate(conn)] >= ["100"]
        after = conn.execute("SELECT source_code, omop_concept_id, confidence, decided_by, reviewer_id, reviewed_at, "
                             "model_version, candidate_ranking_json FROM harmonia.concept_map ORDER BY 1").fetchall()
        assert after == before  # nothing of what was there changed
        e11 = mapping.get_state(conn, ("E11", "ICD10"))
        assert e11 is not None and e11.status == "APPROVED" and e11.version == 1
        assert [(t.concept_id, t.mapping_type, t.equivalence) for t in e11.targets] == [(201826, "MAPS_TO", "EQUAL")]
        assert e11.status_set_by == "harmonia" and e11.source_frequency == 40
        assert e11.auto_concept_ids == [201826, 4193704]
        x1 = mapping.get_state(conn, ("X1", "ICD10"))
        assert x1 is not None and x1.targets == [] and x1.equivalence == "UNMATCHED" and x1.primary == 0
        assert x1.status_set_by == "ann" and x1.status == "APPROVED"
        hb = mapping.get_state(conn, ("HB", "LAB"))
        # A flagged code is not approved any more (it was exported as approved before).
        assert hb is not None and hb.status == "FLAGGED" and hb.targets[0].equivalence == "WIDER"
        assert hb.targets[0].created_by == "ann"
        assert mapping.history(conn, "E11", "ICD10")[0]["new_status"] == "APPROVED"
        # The targets' foreign key into the vocabulary is a real one.
        defs = {r[0] for r in conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                           "WHERE conrelid = 'harmonia.concept_map_target'::regclass")}
        assert "FOREIGN KEY (concept_id) REFERENCES vocab.concept(concept_id)" in defs
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO harmonia.concept_map_target (map_id, position, concept_id) VALUES (%s, 5, 999)",
                         (e11.id,))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE harmonia.concept_map SET status = 'DONE' WHERE source_code = 'E11'")


def test_writers_that_know_one_target_keep_working(legacy_db: str) -> None:
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        mig.migrate(conn)
        # An insert of the old shape gets one MAPS_TO target; an update of omop_concept_id moves it.
        conn.execute("""INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id)
                        VALUES ('E11.9', 'ICD10', 'T2DM', 4193704)""")
        s = mapping.get_state(conn, ("E11.9", "ICD10"))
        assert s is not None and [(t.concept_id, t.mapping_type) for t in s.targets] == [(4193704, "MAPS_TO")]
        conn.execute("UPDATE harmonia.concept_map SET omop_concept_id = 201826 WHERE source_code = 'E11.9'")
        s = mapping.get_state(conn, ("E11.9", "ICD10"))
        assert s is not None and [t.concept_id for t in s.targets] == [201826]
        conn.execute("UPDATE harmonia.concept_map SET omop_concept_id = 0 WHERE source_code = 'E11.9'")
        s = mapping.get_state(conn, ("E11.9", "ICD10"))
        assert s is not None and s.targets == []


def test_write_map_versions_targets_and_history(legacy_db: str) -> None:
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        mig.migrate(conn)
        key = ("HB2", "LAB")
        new = MapState("HB2", "LAB", "haemoglobin low", status="APPROVED", status_set_by="ann",
                       targets=[Target(3000963, "MAPS_TO", "EQUAL"), Target(4181412, "MAPS_TO_VALUE", "EQUAL")])
        with conn.transaction():
            s1 = mapping.write_map(conn, new, expected_version=0, action="approve", actor="ann")
        assert s1.version == 1 and s1.primary == 3000963
        assert [(t.mapping_type, t.domain_id) for t in s1.targets] == [("MAPS_TO", "Measurement"),
                                                                        ("MAPS_TO_VALUE", "Meas Value")]
        assert conn.execute("SELECT omop_concept_id FROM harmonia.concept_map WHERE source_code = 'HB2'"
                            ).fetchone()[0] == 3000963
        # A change made on version 0 again is stale: StaleVersion carries the current state; nothing is written.
        with pytest.raises(StaleVersion) as err, conn.transaction():
            mapping.write_map(conn, new, expected_version=0, action="approve", actor="bob")
        assert err.value.current is not None and err.value.current.version == 1
        with conn.transaction():
            s2 = mapping.set_status(conn, key, "INVALID_TARGET", actor="recheck", note="concept deprecated")
        assert s2.version == 2 and [t.concept_id for t in s2.targets] == [3000963, 4181412]
        h = mapping.history(conn, "HB2", "LAB")
        assert [(x["action"], x["old_status"], x["new_status"], x["version"], x["actor"]) for x in h] == [
            ("approve", None, "APPROVED", 1, "ann"), ("status_invalid_target", "APPROVED", "INVALID_TARGET", 2,
                                                      "recheck")]
        assert h[1]["old_state"]["targets"][1]["mapping_type"] == "MAPS_TO_VALUE"
        # Undo's building block: the state before, restored.
        back = s2.restored(h[1]["old_state"])
        with conn.transaction():
            s3 = mapping.write_map(conn, back, expected_version=2, action="undo", actor="ann")
        assert s3.status == "APPROVED" and s3.version == 3
        with conn.transaction():
            gone = mapping.delete_map(conn, key, expected_version=3, action="revoke", actor="ann")
        assert gone is not None and mapping.get_state(conn, key) is None
        assert conn.execute("SELECT count(*) FROM harmonia.concept_map_target t WHERE t.map_id = %s",
                            (s1.id,)).fetchone()[0] == 0
        assert mapping.history(conn, "HB2", "LAB")[-1]["new_state"] is None


def test_target_rules() -> None:
    def problem(concept_id: int, mapping_type: str) -> str | None:
        row = next(c for c in CONCEPTS if c[0] == concept_id)
        return mapping.target_problem(_concept(row), concept_id, mapping_type)

    assert problem(201826, "MAPS_TO") is None
    assert problem(4181412, "MAPS_TO_VALUE") is None and problem(201826, "MAPS_TO_VALUE") is None
    assert problem(8713, "MAPS_TO_UNIT") is None
    assert "Unit" in (problem(201826, "MAPS_TO_UNIT") or "")
    assert "not a MAPS_TO target" in (problem(4181412, "MAPS_TO") or "")
    assert "not a MAPS_TO target" in (problem(32817, "MAPS_TO") or "")  # a Type Concept is never a target
    assert "not a valid standard" in (problem(45576876, "MAPS_TO") or "")
    assert "no targets" in (problem(0, "MAPS_TO") or "")
    assert "does not exist" in (mapping.target_problem(None, 5, "MAPS_TO") or "")
    assert "mapping type" in (problem(201826, "MAPS_TO_DOSE") or "")


def _concept(row: tuple) -> Concept:
    return Concept(concept_id=row[0], concept_name=row[1], domain_id=row[2], vocabulary_id=row[3],
                                 concept_class_id=row[4], standard_concept=row[5], concept_code=row[6],
                                 invalid_reason=row[7])


def test_router_sends_additional_targets_to_review_and_keeps_them(conn: psycopg.Connection) -> None:
    from harmonia.domain import AdditionalTarget, Candidate, RankedCandidate, RerankResult, SourceTerm
    from harmonia.pipeline.route import route

    def cand(cid: int, name: str, domain: str) -> Candidate:
        return Candidate(cid, name, domain, "LOINC", "Lab Test", str(cid), 0.9)

    cands = [cand(3000963, "Hemoglobin [Mass/volume] in Blood", "Measurement"), cand(9191, "Positive", "Meas Value")]
    term = SourceTerm("HBPOS", "LAB", "haemoglobin positive")
    plain = RerankResult([RankedCandidate(3000963, 0.99)], 0.99, "m")
    assert route(term, cands, plain, threshold=0.9).action == "approve"
    # The same sure first choice with a further target the calibration never saw: review, never approved.
    extra = RerankResult([RankedCandidate(3000963, 0.99)], 0.99, "m", equivalence="WIDER", additional=[
        AdditionalTarget(9191, "MAPS_TO_VALUE", "EQUAL", "the result"), AdditionalTarget(12345, "MAPS_TO_VALUE")])
    d = route(term, cands, extra, threshold=0.9)
    assert (d.action, d.reason) == ("review", "additional_targets")
    assert [a.concept_id for a in d.additional] == [9191]  # only candidates
    with conn.transaction():
        assert mapping.record_decision(conn, d) == "review"
    prop = conn.execute("SELECT proposal FROM harmonia.review_queue WHERE source_code = 'HBPOS'").fetchone()[0]
    assert prop == {"equivalence": "WIDER", "additional": [
        {"concept_id": 9191, "mapping_type": "MAPS_TO_VALUE", "equivalence": "EQUAL", "rationale": "the result",
         "concept_name": "Positive", "domain_id": "Meas Value", "vocabulary_id": "LOINC"}]}
    # Persisted as approved (a caller that approves anyway), every target is stored.
    d.action, d.concept_id = "approve", 3000963
    conn.execute("DELETE FROM harmonia.review_queue")
    with conn.transaction():
        assert mapping.record_decision(conn, d) == "approved"
    s = mapping.get_state(conn, ("HBPOS", "LAB"))
    assert s is not None and [(t.concept_id, t.mapping_type, t.equivalence) for t in s.targets] == [
        (3000963, "MAPS_TO", "WIDER"), (9191, "MAPS_TO_VALUE", "EQUAL")]
