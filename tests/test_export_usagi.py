"""Usagi in and out (harmonia/export.py, `harmonia import usagi`, `harmonia export`) against the real embedded
PostgreSQL and the bundled vocabulary: every column of a save file is kept, a file exported, imported into an empty
database and exported again is identical, bad files are refused whole, and STCM follows the CDM's rules."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import TEMPLATE_DB, create_database, drop_database
from typer.testing import CliRunner

from harmonia import db
from harmonia.cli import app as cli_app
from harmonia.export import UsagiError, export_csv, import_usagi
from harmonia.store import mapping

HEADER = ["sourceCode", "sourceName", "sourceFrequency", "sourceAutoAssignedConceptIds", "ADD_INFO:unit",
          "ADD_INFO:site", "matchScore", "mappingStatus", "equivalence", "statusSetBy", "statusSetOn", "conceptId",
          "conceptName", "domainId", "mappingType", "comment", "createdBy", "createdOn", "assignedReviewer"]
T2DM, HB, PLT, POSITIVE, GDL, CRF, ICD10_E119 = 201826, 3000963, 3007461, 9191, 8713, 32809, 45561952


def row(code: str, name: str, concept: int, *, status: str = "APPROVED", eq: str = "EQUAL", mtype: str = "MAPS_TO",
        freq: str = "10", auto: str = "", unit: str = "", site: str = "north", score: str = "0.87",
        by: str = "ann", on: str = "1764600000000", comment: str = "", reviewer: str = "",
        created_by: str = "ann", created_on: str = "1764500000000") -> list[str]:
    return [code, name, freq, auto, unit, site, score, status, eq, by, on, str(concept), "", "", mtype, comment,
            created_by, created_on, reviewer]


def usagi_text(rows: list[list[str]], header: list[str] = HEADER) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


SAVE_FILE = [
    row("E11", "Type 2 diabetes", T2DM, auto=f"{T2DM};4193704", comment="checked against the chart"),
    # one code, two targets: the measurement and its value ('Maps to value'), each with its own equivalence
    row("HBPOS", "haemoglobin positive", HB, eq="WIDER", unit="g/dL"),
    row("HBPOS", "haemoglobin positive", POSITIVE, eq="EQUAL", mtype="MAPS_TO_VALUE", unit="g/dL",
        created_by="bob", created_on="1764500001000"),
    row("HBU", "haemoglobin g/dl", HB, eq="EQUAL", unit="g/dL"),
    row("HBU", "haemoglobin g/dl", GDL, eq="EQUAL", mtype="MAPS_TO_UNIT", unit="g/dL"),
    row("PLT", "platelets", PLT, status="UNCHECKED", eq="UNREVIEWED", by="", on="", auto=f"{PLT};3024929",
        reviewer="bob"),
    row("UNK", "gibberish", 0, eq="UNMATCHED", score="", freq="-1", comment="=HYPERLINK(\"http://x\")"),
    row("SKIP", "not in use", 0, status="IGNORED", eq="UNREVIEWED"),
    row("FLG", "unsure", T2DM, status="FLAGGED", eq="INEXACT", comment="ask the lab"),
    row("OLD", "old diabetes code", ICD10_E119, eq="EQUAL"),  # not a standard concept (any more)
]


@pytest.fixture
def other_db(pg_server: db.EmbeddedServer, template_db: str) -> Iterator[str]:
    """A second, empty database (the sample vocabulary, no maps) to import an export into."""
    name = f"u_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=TEMPLATE_DB)
    yield url
    drop_database(pg_server, name)


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_import_keeps_every_column_and_fills_the_review_queue(conn: psycopg.Connection, tmp_path: Path) -> None:
    s = import_usagi(conn, tmp_path / "finlab.csv", "FINLAB", text=usagi_text(SAVE_FILE))
    assert (s.rows, s.codes, s.imported, s.targets, s.invalid_target) == (10, 8, 8, 8, 1)
    assert s.by_status == {"APPROVED": 4, "UNCHECKED": 1, "IGNORED": 1, "FLAGGED": 1, "INVALID_TARGET": 1}
    hb = mapping.get_state(conn, ("HBPOS", "FINLAB"))
    assert hb is not None and hb.status == "APPROVED" and hb.status_set_by == "ann"
    assert [(t.concept_id, t.mapping_type, t.equivalence, t.created_by) for t in hb.targets] == [
        (HB, "MAPS_TO", "WIDER", "ann"), (POSITIVE, "MAPS_TO_VALUE", "EQUAL", "bob")]
    assert hb.extra == {"unit": "g/dL", "site": "north"} and hb.source_frequency == 10 and hb.match_score == 0.87
    assert round(hb.status_set_at.timestamp() * 1000) == 1764600000000
    unk = mapping.get_state(conn, ("UNK", "FINLAB"))
    assert unk is not None and unk.targets == [] and unk.equivalence == "UNMATCHED" and unk.source_frequency is None
    assert unk.comment == '=HYPERLINK("http://x")'
    old = mapping.get_state(conn, ("OLD", "FINLAB"))
    assert old is not None and old.status == "INVALID_TARGET"
    assert "not a valid standard concept" in (mapping.history(conn, "OLD", "FINLAB")[0]["note"] or "")
    # The work continues in Harmonia: unchecked, flagged and invalid codes are review items with suggestions.
    items = {r[0]: r[1:] for r in conn.execute(
        "SELECT source_code, status, reason, candidates_json -> 0 ->> 'concept_id' FROM harmonia.review_queue")}
    assert items == {"PLT": ("open", "imported", str(PLT)), "FLG": ("flagged", "imported", str(T2DM)),
                     "OLD": ("open", "invalid_target", None)}
    plt = mapping.get_state(conn, ("PLT", "FINLAB"))
    assert plt is not None and plt.assigned_reviewer == "bob" and plt.auto_concept_ids == [PLT, 3024929]


def test_round_trip_is_identical(conn: psycopg.Connection, other_db: str, tmp_path: Path) -> None:
    import_usagi(conn, tmp_path / "a.csv", "FINLAB", text=usagi_text(SAVE_FILE))
    first = export_csv(conn, "usagi", statuses=None)
    rows = rows_of(first)
    assert list(rows[0]) == HEADER[:4] + ["ADD_INFO:site", "ADD_INFO:unit"] + HEADER[6:]
    by_code: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_code.setdefault(r["sourceCode"], []).append(r)
    assert [r["mappingType"] for r in by_code["HBU"]] == ["MAPS_TO", "MAPS_TO_UNIT"]
    assert by_code["HBU"][1]["domainId"] == "Unit" and by_code["HBPOS"][1]["conceptName"] == "Positive"
    assert by_code["UNK"][0]["conceptId"] == "0" and by_code["UNK"][0]["conceptName"] == "Unmapped"
    assert by_code["UNK"][0]["comment"].startswith("'=")  # a spreadsheet shows it, never runs it
    assert by_code["SKIP"][0]["mappingStatus"] == "IGNORED" and by_code["FLG"][0]["comment"] == "ask the lab"
    # The default export is the approved set: flagged, ignored, unchecked and invalid codes are not in it.
    approved = {r["sourceCode"] for r in rows_of(export_csv(conn, "usagi"))}
    assert approved == {"E11", "HBPOS", "HBU", "UNK"}
    with psycopg.connect(other_db, autocommit=True) as other:
        import_usagi(other, tmp_path / "first.csv", "FINLAB", text=first)
        second = export_csv(other, "usagi", statuses=None)
    assert second == first


def test_round_trip_of_harmonia_decisions_through_the_cli(conn: psycopg.Connection, fresh_db: str, other_db: str,
                                                          tmp_path: Path) -> None:
    """Maps Harmonia made (an auto-approval, a review item not yet decided) survive export -> import -> export."""
    from harmonia.domain import Decision, SourceTerm

    term = SourceTerm("I10", "ICD10", "Essential hypertension", source_frequency=7, extra={"ward": "+3"})
    mapping.record_decision(conn, Decision(term=term, action="approve", concept_id=320128, confidence=0.9731,
                                           model_version="m@1", ranking=[], reason="approved"))
    mapping.enqueue_review(conn, "E11", "ICD10", "T2DM", None, {}, [
        {"concept_id": T2DM, "concept_name": "Type 2 diabetes mellitus", "domain_id": "Condition",
         "vocabulary_id": "SNOMED", "concept_class_id": "Disorder", "concept_code": "44054006", "similarity": 0.9,
         "score": 0.8, "rationale": ""}], 0.61, "m@1", "low_confidence", None)
    runner = CliRunner()
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    r = runner.invoke(cli_app, ["--database-url", fresh_db, "export", "--format", "usagi", "--status", "all",
                                "-o", str(first)], env=env)
    assert r.exit_code == 0, r.output
    rows = {x["sourceCode"]: x for x in rows_of(first.read_text())}
    assert rows["I10"]["ADD_INFO:ward"] == "'+3" and rows["E11"]["mappingStatus"] == "UNCHECKED"
    r = runner.invoke(cli_app, ["--database-url", other_db, "import", "usagi", str(first), "--source-vocab",
                                "ICD10"], env=env)
    assert r.exit_code == 0, r.output
    assert "imported 2" in r.output
    r = runner.invoke(cli_app, ["--database-url", other_db, "export", "--format", "usagi", "--status", "all",
                                "-o", str(second)], env=env)
    assert r.exit_code == 0, r.output
    assert second.read_text() == first.read_text()
    # Importing again skips what is mapped; --replace overwrites (with history).
    r = runner.invoke(cli_app, ["--database-url", other_db, "import", "usagi", str(first), "--source-vocab",
                                "ICD10"], env=env)
    assert r.exit_code == 0 and "skipped (already mapped) 2" in " ".join(r.output.split())


def test_bad_files_are_refused_whole_naming_the_line(conn: psycopg.Connection, tmp_path: Path) -> None:
    bad = SAVE_FILE[:2] + [
        row("X1", "x", 999_999_999),
        row("X2", "x", HB, mtype="MAPS_TO_DOSE"),
        row("X3", "x", HB, eq="SAME"),
        row("X4", "x", HB, status="DONE"),
        row("HBPOS", "haemoglobin positive", PLT, status="FLAGGED"),
        row("X5", "x", int("7"), freq="many"),
    ]
    with pytest.raises(UsagiError) as err:
        import_usagi(conn, tmp_path / "bad.csv", "FINLAB", text=usagi_text(bad))
    msg = str(err.value)
    for expected in ("line 4: conceptId 999999999 does not exist", "line 5: mappingType 'MAPS_TO_DOSE'",
                     "line 6: equivalence 'SAME'", "line 7: mappingStatus 'DONE'",
                     "line 8: mappingStatus of source code 'HBPOS' differs from line 3's",
                     "line 9: sourceFrequency 'many'"):
        assert expected in msg, msg
    assert conn.execute("SELECT count(*) FROM harmonia.concept_map").fetchone()[0] == 0
    with pytest.raises(UsagiError, match="lacks column 'conceptId'"):
        import_usagi(conn, tmp_path / "x.csv", "FINLAB", text="sourceCode,sourceName\nA,b\n")
    with pytest.raises(UsagiError, match="line 3: conceptId 0 .unmapped. and a target"):
        import_usagi(conn, tmp_path / "x.csv", "FINLAB", text=usagi_text([row("A", "a", HB), row("A", "a", 0)]))
    with pytest.raises(UsagiError, match="no MAPS_TO target"):
        import_usagi(conn, tmp_path / "x.csv", "FINLAB", text=usagi_text([row("A", "a", GDL, mtype="MAPS_TO_UNIT")]))


def test_stcm_writes_every_maps_to_target_within_the_cdm_rules(conn: psycopg.Connection, tmp_path: Path) -> None:
    long_name = "=cmd|' /C calc'!A0 " + "x" * 5000
    import_usagi(conn, tmp_path / "a.csv", "FINLAB", text=usagi_text(SAVE_FILE + [
        row("LONG", long_name, HB), row("LONG", long_name, T2DM)]))
    # An ICD10 code that is itself a vocabulary concept gets its source_concept_id.
    import_usagi(conn, tmp_path / "b.csv", "ICD10", text=usagi_text([row("E11.9", "T2DM w/o compl.", T2DM)]))
    rows = rows_of(export_csv(conn, "stcm"))
    got = [(r["source_code"], r["target_concept_id"]) for r in rows]
    # Every MAPS_TO target of approved codes; values, units, no-match, flagged, ignored and invalid are not.
    assert sorted(got) == sorted([("E11", str(T2DM)), ("HBPOS", str(HB)), ("HBU", str(HB)), ("LONG", str(HB)),
                                  ("LONG", str(T2DM)), ("E11.9", str(T2DM))])
    by = {(r["source_code"], r["target_concept_id"]): r for r in rows}
    assert by[("E11.9", str(T2DM))]["source_concept_id"] == str(ICD10_E119)
    assert by[("E11", str(T2DM))]["source_concept_id"] == "0"
    long_row = by[("LONG", str(HB))]
    assert len(long_row["source_code_description"]) <= 255
    assert long_row["source_code_description"].startswith("'=cmd")
    assert all(not v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())
    assert long_row["valid_start_date"] == "2025-12-01" and long_row["valid_end_date"] == "2099-12-31"
    assert long_row["invalid_reason"] == "" and long_row["target_vocabulary_id"] == "LOINC"
