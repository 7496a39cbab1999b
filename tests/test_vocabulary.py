"""The Athena loader against a real embedded PostgreSQL: formats, gzip, bad rows, atomic reloads."""

from __future__ import annotations

import gzip
from pathlib import Path

import psycopg
import pytest

from harmonia.paths import sample_dir
from harmonia.store import migrations
from harmonia.vocabulary import VocabLoadError, load_vocabulary
from tests.athena_files import concept_row, write_vocab


@pytest.fixture
def vconn(empty_db: str):
    with psycopg.connect(empty_db, autocommit=True) as c:
        migrations.migrate(c)
        yield c


def _names(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT concept_id, concept_name FROM vocab.concept").fetchall())


def test_loads_plain_and_gzip_with_optional_files(vconn, tmp_path: Path) -> None:
    rows = [concept_row(1, "Asthma"), concept_row(2, "Essential hypertension"),
            concept_row(3, 'Name with "quotes", tabs\\backslash', std="")]
    plain = write_vocab(tmp_path / "plain", rows, ["1\t2\tIs a\t19700101\t20991231\t"],
                        extra={"VOCABULARY": "vocabulary_id\tvocabulary_name\tvocabulary_reference\t"
                                             "vocabulary_version\tvocabulary_concept_id\n"
                                             "SNOMED\tSNOMED CT\t\tv1\t44819097\n"})
    r = load_vocabulary(vconn, plain, progress=False)
    assert r.rows["concept"] == 3 and r.rows["concept_relationship"] == 1 and r.rows["vocabulary"] == 1
    assert "CONCEPT_SYNONYM" in r.missing
    names = _names(vconn)
    assert names[3] == 'Name with "quotes", tabs\\backslash'
    # empty fields are NULL, dates parsed from YYYYMMDD
    std, start = vconn.execute("SELECT standard_concept, valid_start_date::text FROM vocab.concept "
                               "WHERE concept_id = 3").fetchone()
    assert std is None and start == "1970-01-01"

    gz = write_vocab(tmp_path / "gz", [concept_row(10, "Fever")], gz=True)
    load_vocabulary(vconn, gz, progress=False)
    assert _names(vconn) == {10: "Fever"}  # a reload replaces the vocabulary


@pytest.mark.parametrize(("bad_row", "expected"), [
    ("4\tToo few fields\tCondition", "line 3: 3 fields, expected 10"),
    (concept_row(4, "x").replace("19700101", "1970-01-01"), "line 3: field valid_start_date='1970-01-01'"),
    (concept_row(4, "x").replace("4\t", "four\t", 1), "line 3: field concept_id='four' is not an integer"),
    (concept_row(4, ""), "line 3: field concept_name is empty"),
    (concept_row(4, "x").replace("19700101", "20231345"), "line 3: date/time field value out of range"),
])
def test_malformed_row_names_file_and_line_and_keeps_old_vocabulary(vconn, tmp_path, bad_row, expected) -> None:
    load_vocabulary(vconn, write_vocab(tmp_path / "good", [concept_row(1, "Asthma")]), progress=False)
    bad = write_vocab(tmp_path / "bad", [concept_row(2, "Cough"), bad_row])
    with pytest.raises(VocabLoadError) as exc:
        load_vocabulary(vconn, bad, progress=False)
    assert "CONCEPT.csv" in str(exc.value) and expected in str(exc.value)
    assert _names(vconn) == {1: "Asthma"}  # the failed load left the old vocabulary intact
    assert vconn.execute("SELECT to_regnamespace('vocab_staging')").fetchone()[0] is None


def test_invalid_utf8_is_reported_by_line(vconn, tmp_path: Path) -> None:
    d = write_vocab(tmp_path / "v", [concept_row(1, "Asthma")])
    with open(d / "CONCEPT.csv", "ab") as fh:
        fh.write(concept_row(2, "Caf\xe9").encode("latin-1") + b"\n")
    with pytest.raises(VocabLoadError, match=r"CONCEPT.csv line 3: not valid UTF-8"):
        load_vocabulary(vconn, d, progress=False)


def test_missing_concept_file_and_unknown_column(vconn, tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    with pytest.raises(VocabLoadError, match="CONCEPT.csv .* is required"):
        load_vocabulary(vconn, tmp_path / "none", progress=False)
    d = write_vocab(tmp_path / "col", [], extra={"CONCEPT_SYNONYM": "concept_id\tsynonym\tlanguage_concept_id\n"})
    with pytest.raises(VocabLoadError, match=r"CONCEPT_SYNONYM.csv line 1: unknown column"):
        load_vocabulary(vconn, d, progress=False)


def test_reload_keeps_foreign_keys_and_keeps_concepts_that_maps_reference(vconn, tmp_path: Path) -> None:
    load_vocabulary(vconn, write_vocab(tmp_path / "a", [concept_row(1, "Asthma"), concept_row(2, "Cough")]),
                    progress=False)
    vconn.execute("INSERT INTO harmonia.concept_map (source_code, source_vocab, omop_concept_id) "
                  "VALUES ('J45', 'ICD10', 1)")
    # A release without concept 1, which a map points at: loaded, concept 1 kept and marked gone (the key holds).
    r = load_vocabulary(vconn, write_vocab(tmp_path / "b", [concept_row(2, "Cough")]), progress=False)
    assert r.kept == 1
    assert _names(vconn) == {1: "Asthma", 2: "Cough"}
    assert vconn.execute("SELECT invalid_reason FROM vocab.concept WHERE concept_id = 1").fetchone()[0] == "D"
    assert vconn.execute("SELECT concept_id FROM vocab.concept_kept WHERE release_id = %s",
                         (r.release_id,)).fetchall() == [(1,)]
    # A concept nothing references is not kept.
    load_vocabulary(vconn, write_vocab(tmp_path / "c", [concept_row(1, "Asthma (disorder)")]), progress=False)
    assert _names(vconn) == {1: "Asthma (disorder)"}
    # The concept map's foreign key points at the new table.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        vconn.execute("INSERT INTO harmonia.concept_map (source_code, source_vocab, omop_concept_id) "
                      "VALUES ('R05', 'ICD10', 2)")
    idx = {r[0] for r in vconn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'vocab' "
                                       "AND tablename = 'concept'")}
    assert {"concept_pkey", "concept_vocab_code_idx", "concept_standard_idx", "concept_name_trgm_idx"} <= idx
    # The replaced release stays readable beside the current one.
    assert dict(vconn.execute("SELECT concept_id, concept_name FROM vocab_prev.concept").fetchall()) == {
        1: "Asthma", 2: "Cough"}


def test_release_identity_and_what_records_it(vconn, tmp_path: Path) -> None:
    vocabulary = ("vocabulary_id\tvocabulary_name\tvocabulary_reference\tvocabulary_version\tvocabulary_concept_id\n"
                  "None\tOMOP Standardized Vocabularies\t\tv5.0 30-AUG-24\t44819096\n"
                  "SNOMED\tSNOMED CT\t\t2024-03-01\t44819097\n")
    a = load_vocabulary(vconn, write_vocab(tmp_path / "a", [concept_row(1, "Asthma")],
                                           extra={"VOCABULARY": vocabulary}), progress=False)
    assert a.release_label == "v5.0 30-AUG-24" and a.previous_release_id is None
    vconn.execute("INSERT INTO harmonia.concept_map (source_code, source_vocab, omop_concept_id) "
                  "VALUES ('J45', 'ICD10', 1)")
    # Without VOCABULARY the label is a hash of the rows: the same rows, plain or gzip, read the same.
    b = load_vocabulary(vconn, write_vocab(tmp_path / "b", [concept_row(1, "Asthma"), concept_row(2, "Cough")]),
                        progress=False)
    c = load_vocabulary(vconn, write_vocab(tmp_path / "c", [concept_row(1, "Asthma"), concept_row(2, "Cough")],
                                           gz=True), progress=False)
    assert b.release_label.startswith("sha256:") and b.release_label == c.release_label
    assert b.previous_release_id == a.release_id and c.previous_release_id == b.release_id
    current = vconn.execute("SELECT id, versions FROM vocab.release WHERE is_current").fetchall()
    assert current == [(c.release_id, {})]
    assert vconn.execute("SELECT versions ->> 'SNOMED' FROM vocab.release WHERE id = %s",
                         (a.release_id,)).fetchone()[0] == "2024-03-01"
    # The map records the release it was made against; changing its target records the current one.
    assert vconn.execute("SELECT vocab_release_id FROM harmonia.concept_map").fetchone()[0] == a.release_id
    vconn.execute("UPDATE harmonia.concept_map SET omop_concept_id = 2")
    assert vconn.execute("SELECT vocab_release_id FROM harmonia.concept_map").fetchone()[0] == c.release_id
    vconn.execute("INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action) "
                  "VALUES ('J45', 'ICD10', 'correct')")
    assert vconn.execute("SELECT vocab_release_id FROM harmonia.concept_map_history").fetchone()[0] == c.release_id


def test_failed_load_keeps_the_current_release(vconn, tmp_path: Path) -> None:
    good = load_vocabulary(vconn, write_vocab(tmp_path / "a", [concept_row(1, "Asthma")]), progress=False)
    bad = write_vocab(tmp_path / "bad", [concept_row(2, "Cough")], ["2\t1\tMaps to\t19700101\tnot a date\t"])
    with pytest.raises(VocabLoadError, match="CONCEPT_RELATIONSHIP.csv line 2"):
        load_vocabulary(vconn, bad, progress=False)
    assert _names(vconn) == {1: "Asthma"}
    assert vconn.execute("SELECT id FROM vocab.release WHERE is_current").fetchall() == [(good.release_id,)]
    assert vconn.execute("SELECT count(*) FROM vocab.release").fetchone()[0] == 1


def test_bundled_sample_loads(vconn) -> None:
    r = load_vocabulary(vconn, sample_dir() / "vocab", progress=False)
    assert r.rows["concept"] == 55294 and r.rows["concept_relationship"] == 75434
    assert r.rows["concept_synonym"] == 0  # header-only file is accepted
    maps_to = vconn.execute("SELECT count(*) FROM vocab.concept_relationship WHERE relationship_id = 'Maps to'"
                            ).fetchone()[0]
    assert maps_to == 25720


def test_gzip_header_only_and_crlf(vconn, tmp_path: Path) -> None:
    d = tmp_path / "crlf"
    d.mkdir()
    with gzip.open(d / "CONCEPT.csv.gz", "wb") as fh:
        fh.write(b"concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\t"
                  b"concept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason\r\n")
        fh.write((concept_row(5, "Rash") + "\r\n").encode())
    r = load_vocabulary(vconn, d, progress=False)
    assert r.rows["concept"] == 1 and _names(vconn) == {5: "Rash"}
