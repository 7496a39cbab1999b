"""The BM25 lexical generator (harmonia.retrieval.bm25) against the real embedded PostgreSQL and a real Tantivy
index on disk: build, search, filters, the trigram score kept, and an index of another release never searched."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.config import ConfigError
from harmonia.retrieval import bm25
from harmonia.retrieval.lexical import LexicalRetriever
from harmonia.store import lexical as lex_store
from harmonia.store import release as release_store
from harmonia.vocabulary import load_vocabulary
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parent.parent
T2DM = "Type 2 diabetes mellitus"


def _id(conn: psycopg.Connection, name: str) -> int:
    return conn.execute("SELECT concept_id FROM vocab.concept WHERE concept_name = %s AND standard_concept = 'S' "
                        "AND invalid_reason IS NULL", (name,)).fetchone()[0]


@pytest.fixture
def bm25_settings(fresh_db: str, tmp_path: Path):
    return make_settings(fresh_db, tmp_path, retrieval_lexical_generator="bm25")


def test_build_then_search_finds_names_and_synonyms_with_the_trigram_score(conn, bm25_settings) -> None:
    target = _id(conn, T2DM)
    conn.execute("INSERT INTO vocab.concept_synonym VALUES (%s, 'Adult onset sugar sickness', 4180186)", (target,))
    report = bm25.build_index(conn, bm25_settings)
    stamp = release_store.current_stamp(conn)
    assert stamp and report.path.name.startswith(f"release-{stamp[0]}-")
    assert report.documents == conn.execute(
        "SELECT (SELECT count(*) FROM vocab.concept WHERE standard_concept = 'S' AND invalid_reason IS NULL) + "
        "(SELECT count(*) FROM vocab.concept_synonym s JOIN vocab.concept c USING (concept_id) "
        " WHERE c.standard_concept = 'S' AND c.invalid_reason IS NULL)").fetchone()[0]
    r = LexicalRetriever.from_settings(conn, None, bm25_settings)
    assert r.bm25 is not None and r.bm25.index_for(conn) is not None
    cands = r.search(T2DM, 10)
    assert cands[0].concept_id == target and cands[0].scores["name"] == pytest.approx(1.0)
    # the same numbers as the pg_trgm generator gives that concept
    trgm = {c.concept_id: c for c in lex_store.lexical_search(conn, T2DM, 10)}
    assert cands[0].scores == pytest.approx(trgm[target].scores)
    assert [c.similarity for c in cands] == sorted((c.similarity for c in cands), reverse=True)
    syn = r.search("adult-onset sugar sickness", 5)  # only the synonym has these words
    assert syn[0].concept_id == target and syn[0].scores["synonym"] == pytest.approx(1.0)


def test_a_word_no_name_contains_is_searched_by_its_trigrams(conn, bm25_settings) -> None:
    """A Finnish-style compound ("Alaninaminotransferase") matches no indexed word; its trigrams still find
    "Alanine aminotransferase ..." as pg_trgm would, while known words are searched as words only."""
    report = bm25.build_index(conn, bm25_settings)
    ix = bm25.Bm25Index(report.path)
    assert ix.unknown_words(["alaninaminotransferase", "plasma", "alt"]) == ["alaninaminotransferase"]
    alt = _id(conn, "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma")
    assert ix.search("alanine aminotransferase", 50) and alt in ix.search("P -Alaninaminotransferase", 50)
    r = LexicalRetriever.from_settings(conn, None, bm25_settings)
    got = [c.concept_id for c in r.search("Alaninaminotransferase plasma", 20)]
    trgm = [c.concept_id for c in lex_store.lexical_search(conn, "Alaninaminotransferase plasma", 20)]
    assert alt in got and alt in trgm
    # an index written before the gram field (format 1) is never searched: pg_trgm answers until it is rebuilt
    stamp = json.loads((report.path / bm25.STAMP).read_text())
    (report.path / bm25.STAMP).write_text(json.dumps({k: v for k, v in stamp.items() if k != "format"}))
    with pytest.raises(bm25.IndexMissing, match="format 1"):
        bm25.Bm25Index.for_release(bm25_settings, release_store.current_stamp(conn))


def test_filters_by_domain_and_vocabulary_and_validity(conn, fresh_db, tmp_path) -> None:
    s = make_settings(fresh_db, tmp_path, retrieval_lexical_generator="bm25", vocabularies=["LOINC"])
    bm25.build_index(conn, s)
    r = LexicalRetriever.from_settings(conn, None, s)
    cands = r.search("hemoglobin", 20)
    assert len(cands) == 20 and {c.vocabulary_id for c in cands} == {"LOINC"}
    s2 = make_settings(fresh_db, tmp_path, retrieval_lexical_generator="bm25")
    r2 = LexicalRetriever.from_settings(conn, None, s2)
    by_domain = r2.search("fracture of femur", 30, domains=["Condition"])
    assert by_domain and {c.domain_id for c in by_domain} == {"Condition"}
    assert {c.domain_id for c in r2.search("fracture of femur", 30, domains=["Procedure"])} <= {"Procedure"}
    # the index still holds a concept deprecated after the build; the SQL re-score drops it
    conn.execute("UPDATE vocab.concept SET invalid_reason = 'D' WHERE concept_id = %s", (cands[0].concept_id,))
    assert cands[0].concept_id not in [c.concept_id for c in r.search("hemoglobin", 50)]


def test_a_filter_that_keeps_nearly_everything_does_not_read_deeper(conn, bm25_settings) -> None:
    """Filters apply after the index, so a narrow one reads twice as deep; the configured vocabularies, named on
    every search, keep nearly every document and must not double the re-score's work."""
    report = bm25.build_index(conn, bm25_settings)
    ix = bm25.Bm25Index(report.path)
    everything = [r[0] for r in conn.execute("SELECT DISTINCT vocabulary_id FROM vocab.concept WHERE "
                                             "standard_concept = 'S' AND invalid_reason IS NULL")]
    assert ix.share("vocabulary", everything) == pytest.approx(1.0)
    loinc = ix.share("vocabulary", ["LOINC"])
    assert 0 < loinc < bm25.LOOSE_FILTER
    assert ix.share("domain", ["Measurement", "Condition"]) == pytest.approx(
        ix.share("domain", ["Measurement"]) + ix.share("domain", ["Condition"]))
    assert len(ix.search("fracture", 7)) == 7
    assert len(ix.search("fracture", 7, vocabularies=everything)) == 7
    assert len(ix.search("fracture", 7, vocabularies=["LOINC"])) == 7 * bm25.FILTERED_DEPTH
    assert len(ix.search("fracture", 7, domains=["Condition"], vocabularies=everything)) == 7 * bm25.FILTERED_DEPTH


def test_no_index_falls_back_to_trigram(conn, bm25_settings, caplog) -> None:
    r = LexicalRetriever.from_settings(conn, None, bm25_settings)
    with caplog.at_level(logging.WARNING, logger="harmonia.retrieval.bm25"):
        got = r.search("hemoglobin A1c", 20)
    want = lex_store.lexical_search(conn, "hemoglobin A1c", 20, vocabularies=bm25_settings.embedding.vocabularies,
                                    threshold=r.threshold)
    assert [c.concept_id for c in got] == [c.concept_id for c in want] and got
    assert "run `harmonia vocab index`" in caplog.text


def test_an_index_of_another_release_is_never_searched(conn, bm25_settings, tmp_path, caplog) -> None:
    old = bm25.build_index(conn, bm25_settings)
    r = LexicalRetriever.from_settings(conn, None, bm25_settings)
    assert r.bm25 is not None and r.bm25.index_for(conn) is not None
    out = tmp_path / "next"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_next_release.py"), "--out", str(out)],
                   check=True, capture_output=True)
    renamed = json.loads((out / "manifest.json").read_text())["renamed"][0]
    name = conn.execute("SELECT concept_name FROM vocab.concept WHERE concept_id = %s", (renamed,)).fetchone()[0]
    load_vocabulary(conn, out, progress=False)
    with caplog.at_level(logging.WARNING, logger="harmonia.retrieval.bm25"):
        assert r.bm25.index_for(conn) is None  # the same retriever sees the new release at once
        got = r.search(f"{name} (revised)", 5)
    assert "no BM25 index of release" in caplog.text
    assert renamed in [c.concept_id for c in got]  # served by pg_trgm meanwhile, from the new release
    new = bm25.build_index(conn, bm25_settings)
    assert new.path != old.path and not old.path.exists()
    ix = r.bm25.index_for(conn)
    assert ix is not None and ix.stamp == release_store.current_stamp(conn)
    got = r.search(f"{name} (revised)", 5)
    assert got[0].concept_id == renamed and "(revised)" in got[0].concept_name


def test_vocab_load_builds_the_index_when_bm25_is_chosen(fresh_db, tmp_path) -> None:
    out = tmp_path / "next"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_next_release.py"), "--out", str(out)],
                   check=True, capture_output=True)
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path / "data"),
           "HARMONIA_RETRIEVAL_LEXICAL_GENERATOR": "bm25"}
    res = CliRunner().invoke(app, ["--database-url", fresh_db, "vocab", "load", str(out), "--no-progress",
                                   "--no-recheck"], env=env)
    assert res.exit_code == 0, res.output
    assert "BM25 lexical index" in res.output
    s = make_settings(fresh_db, tmp_path / "data", retrieval_lexical_generator="bm25")
    with psycopg.connect(fresh_db, autocommit=True) as c:
        stamp = release_store.current_stamp(c)
        assert stamp is not None
        assert bm25.Bm25Index.for_release(s, stamp).stamp == stamp


def test_unknown_generator_is_a_config_error(fresh_db, tmp_path) -> None:
    with pytest.raises(ConfigError, match="retrieval_lexical_generator"):
        make_settings(fresh_db, tmp_path, retrieval_lexical_generator="elastic")
