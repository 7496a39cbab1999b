"""A new vocabulary release end to end against the real embedded PostgreSQL: scripts/make_next_release.py builds a
next release of the bundled sample (upgraded, deprecated, non-standard, renamed, re-mapped and added concepts);
loading it beside the sample, the diff, the re-check of every map (reason, successor, review item, nothing else
touched, a reviewer's map never replaced), incremental re-embedding and the mapping memory following it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.pipeline.recheck import follow_memory, recheck
from harmonia.store import embeddings as emb_store
from harmonia.store import recheck as recheck_store
from harmonia.vocabulary import NoPreviousRelease, diff_releases, load_vocabulary

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def next_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("next") / "release"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_next_release.py"), "--out", str(out)],
                   check=True, capture_output=True)
    return out, json.loads((out / "manifest.json").read_text())


def _maps(conn: psycopg.Connection) -> dict[str, tuple]:
    """ICD10 code -> the map's row as the re-check could change it, and its targets."""
    rows = conn.execute(
        """SELECT m.source_code, m.status, m.version, m.decided_by, m.updated_at, m.vocab_release_id,
                  (SELECT array_agg(t.concept_id ORDER BY t.position) FROM harmonia.concept_map_target t
                    WHERE t.map_id = m.id)
           FROM harmonia.concept_map m WHERE m.source_vocab = 'ICD10'""").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def _code_of(conn: psycopg.Connection, concept_id: int) -> str:
    return conn.execute("SELECT concept_code FROM vocab.concept WHERE concept_id = %s", (concept_id,)).fetchone()[0]


def test_diff_reports_every_change_of_the_next_release(conn, next_release, tmp_path: Path) -> None:
    directory, m = next_release
    with pytest.raises(NoPreviousRelease):
        diff_releases(conn)  # the template loaded one release only
    r = load_vocabulary(conn, directory, progress=False)
    assert r.release_label == m["version"] and r.previous_release_id is not None
    d = diff_releases(conn)
    counts = d.concept_counts()
    upgraded = {int(k): v for k, v in m["upgraded"].items()}
    assert counts["added"] == len(m["added"]) + len(upgraded)
    assert counts["upgraded"] == len(upgraded) and counts["deprecated"] == len(m["deprecated"])
    assert counts["made_non_standard"] == len(m["non_standard"]) and counts["renamed"] == len(m["renamed"])
    assert counts["removed"] == counts["gone"] == counts["made_standard"] == 0
    by = {(c.change, c.concept_id): c for c in d.concepts}
    for old, new in upgraded.items():
        assert by[("upgraded", old)].successors == (new,)
    for c, target in m["non_standard"].items():
        assert by[("made_non_standard", int(c))].successors == (target,)
    assert {cid for (ch, cid) in by if ch == "renamed"} == set(m["renamed"])
    assert by[("renamed", m["renamed"][0])].new_value == by[("renamed", m["renamed"][0])].old_value + " (revised)"
    edges = {(e.change, e.source_concept_id, e.target_concept_id) for e in d.maps_to}
    for s, v in m["maps_to_changed"].items():
        assert ("removed", int(s), v["old"]) in edges and ("added", int(s), v["new"]) in edges
    assert d.maps_to_counts()["ICD10"]["added"] >= len(m["maps_to_changed"])

    # The same as a table in the terminal and as CSV / JSON files.
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}
    url = conn.info.dsn
    res = CliRunner().invoke(app, ["--database-url", url, "vocab", "diff", "--csv", str(tmp_path / "d.csv"),
                                   "--json", str(tmp_path / "d.json"), "--show", "3"], env=env)
    assert res.exit_code == 0, res.output
    assert "upgraded" in res.output and "ICD10" in res.output
    rows = list(csv.DictReader((tmp_path / "d.csv").read_text(encoding="utf-8").splitlines()))
    assert len(rows) == len(d.concepts) + len(d.maps_to)
    assert {r["successors"] for r in rows if r["change"] == "upgraded"} == {str(v) for v in upgraded.values()}
    j = json.loads((tmp_path / "d.json").read_text())
    assert j["concept_counts"] == counts and j["current"] == m["version"]


def test_recheck_flags_each_case_with_its_successor_and_touches_nothing_else(conn, next_release) -> None:
    directory, m = next_release
    n_maps = recheck_store.map_maps_to(conn, "ICD10")
    assert n_maps > 10_000
    # A reviewer's "no match" (concept 0, which is not standard) is not a target: never flagged.
    conn.execute("INSERT INTO harmonia.concept_map (source_code, source_vocab, omop_concept_id, decided_by) "
                 "VALUES ('nomatch', 'LOCAL', 0, 'reviewer')")
    by_target: dict[int, list[str]] = {}
    for code, target in conn.execute("SELECT source_code, omop_concept_id FROM harmonia.concept_map"):
        by_target.setdefault(target, []).append(code)
    upgraded = {int(k): v for k, v in m["upgraded"].items()}
    reviewed_target = sorted(t for t in upgraded if t in by_target)[0]
    reviewed_code = by_target[reviewed_target][0]
    conn.execute("UPDATE harmonia.concept_map SET decided_by = 'reviewer', reviewed_at = now() "
                 "WHERE source_code = %s AND source_vocab = 'ICD10'", (reviewed_code,))
    before = _maps(conn)

    load_vocabulary(conn, directory, progress=False)
    report = recheck(conn)

    after = _maps(conn)
    found = {f.source_code: f for f in recheck_store.findings_of(conn, report.release_id)}
    # Maps that are still right are not touched at all; flagged ones keep their targets (and who decided them).
    assert {c: v for c, v in after.items() if c not in found} == {c: v for c, v in before.items() if c not in found}
    for code in found:
        assert after[code][5] == before[code][5] and after[code][2] == before[code][2], code
        assert after[code][0] == ("INVALID_TARGET" if found[code].reason == "invalid_target" else "FLAGGED")
        assert after[code][1] == before[code][1] + 1
    expected: dict[str, tuple[str, str, tuple[int, ...] | None]] = {}
    for old, new in upgraded.items():
        for code in by_target.get(old, []):
            expected[code] = ("invalid_target", "upgraded", (new,))
    for old in m["deprecated"]:
        for code in by_target.get(old, []):
            expected[code] = ("invalid_target", "deprecated", None)  # the source's remaining 'Maps to', or none
    for old, target in m["non_standard"].items():
        for code in by_target.get(int(old), []):
            expected[code] = ("invalid_target", "non_standard", (target,))
    for v in m["maps_to_changed"].values():
        expected[v["source_code"]] = ("maps_to_changed", "maps_to_changed", (v["new"],))
    assert len(expected) >= 60
    assert set(found) == set(expected)  # renamed targets and every other map: no finding
    for code, (reason, detail, proposed) in expected.items():
        f = found[code]
        assert (f.reason, f.detail) == (reason, detail), code
        if proposed is not None:
            assert f.proposed[:1] == proposed, code
    assert found[reviewed_code].decided_by == "reviewer"
    assert found[reviewed_code].proposed_by == "Concept replaced by"
    assert report.maps_affected == report.new_findings == report.reviews_opened == len(expected)
    assert report.by_reason["invalid_target/upgraded"] == sum(1 for e in expected.values() if e[1] == "upgraded")

    # What a reviewer sees: the reason, the successor first, the current target last, both described.
    item = conn.execute("SELECT reason, status, candidates_json, proposal, priority, extra FROM "
                        "harmonia.review_queue WHERE source_code = %s AND source_vocab = 'ICD10'",
                        (reviewed_code,)).fetchone()
    reason, status, cands, proposal, priority, extra = item
    assert (reason, status, priority, extra) == ("invalid_target", "open", 1, {})
    assert cands[0]["concept_id"] == upgraded[reviewed_target] and cands[-1]["concept_id"] == reviewed_target
    rc = proposal["recheck"]
    assert "upgraded" in rc["summary"] and rc["current_target"].startswith(str(reviewed_target))
    assert rc["proposed_successor"].startswith(str(upgraded[reviewed_target]))
    assert rc["map_decided_by"] == "reviewer" and rc["proposed_concept_ids"] == [upgraded[reviewed_target]]
    history = conn.execute("SELECT action, old_concept_id, new_concept_id, old_status, new_status, actor "
                           "FROM harmonia.concept_map_history WHERE source_code = %s", (reviewed_code,)).fetchall()
    assert history == [("recheck", reviewed_target, reviewed_target, "APPROVED", "INVALID_TARGET", "recheck")]
    assert report.statuses == {"INVALID_TARGET": sum(1 for e in expected.values() if e[0] == "invalid_target"),
                               "FLAGGED": sum(1 for e in expected.values() if e[0] == "maps_to_changed")}
    assert conn.execute("SELECT count(*) FROM harmonia.review_queue").fetchone()[0] == len(expected)

    # Again: the same findings are counted, nothing is re-opened; a resolved item stays resolved.
    conn.execute("UPDATE harmonia.review_queue SET status = 'resolved' WHERE source_code = %s", (reviewed_code,))
    flagged = _maps(conn)
    again = recheck(conn)
    assert again.new_findings == again.reviews_opened == 0 and again.by_reason == report.by_reason
    assert _maps(conn) == flagged
    assert conn.execute("SELECT status FROM harmonia.review_queue WHERE source_code = %s",
                        (reviewed_code,)).fetchone()[0] == "resolved"

    res = CliRunner().invoke(app, ["--database-url", conn.info.dsn, "vocab", "recheck"],
                             env={"HARMONIA_CONFIG": ""})
    assert res.exit_code == 0, res.output
    assert "invalid_target" in res.output and "maps_to_changed" in res.output


def test_findings_without_successor_get_a_fresh_retrieval(conn, settings, next_release) -> None:
    from harmonia.pipeline.run import Pipeline

    directory, m = next_release
    recheck_store.map_maps_to(conn, "ICD10")
    load_vocabulary(conn, directory, progress=False)
    with Pipeline.from_settings(conn, settings) as pipe:
        report = recheck(conn, pipeline=pipe)
    bare = [f for f in recheck_store.findings_of(conn, report.release_id) if f.proposed_by == "retrieval"]
    assert bare and report.retrieved == len(bare)
    assert all(f.detail == "deprecated" and f.old_concept_id not in f.proposed for f in bare)
    # A proposal from retrieval is a valid standard concept; the map still points at its old target.
    valid = {r[0] for r in conn.execute("SELECT concept_id FROM vocab.concept WHERE concept_id = ANY(%s) AND "
                                        "standard_concept = 'S' AND invalid_reason IS NULL",
                                        ([x for f in bare for x in f.proposed],))}
    assert all(set(f.proposed) <= valid for f in bare)
    code = bare[0].source_code
    assert conn.execute("SELECT omop_concept_id FROM harmonia.concept_map WHERE source_code = %s",
                        (code,)).fetchone()[0] == bare[0].old_concept_id


def test_only_new_and_renamed_concepts_are_re_embedded(conn, settings, embedder, next_release) -> None:
    from harmonia.embedding.ingest import embed_concepts

    directory, m = next_release
    vocabularies = settings.embedding.vocabularies
    key = embedder.key
    before = emb_store.count(conn, key)
    gone = [*map(int, m["upgraded"]), *m["deprecated"], *map(int, m["non_standard"])]
    embedded_gone = conn.execute("SELECT count(*) FROM vocab.concept_embedding WHERE model = %s "
                                 "AND concept_id = ANY(%s)", (key, gone)).fetchone()[0]
    load_vocabulary(conn, directory, progress=False)
    r = embed_concepts(conn, embedder, vocabularies=vocabularies, progress=False, retrieval=settings.retrieval)
    changed = [*m["added"], *m["upgraded"].values(), *m["renamed"]]
    in_scope = {row[0] for row in conn.execute(
        "SELECT concept_id FROM vocab.concept WHERE concept_id = ANY(%s) AND standard_concept = 'S' "
        "AND invalid_reason IS NULL AND (%s::text[] IS NULL OR vocabulary_id = ANY(%s))",
        (changed, vocabularies, vocabularies))}
    assert len(in_scope) >= 80
    assert sorted(r.embedded_ids) == sorted(in_scope)
    renamed = set(m["renamed"]) & in_scope
    assert r.changed == len(renamed) and r.new == len(in_scope) - len(renamed)
    assert embedded_gone >= len(gone) - 5 and r.deleted == embedded_gone and r.total == before + r.new - r.deleted
    left = conn.execute("SELECT count(*) FROM vocab.concept_embedding WHERE model = %s AND concept_id = ANY(%s)",
                        (key, gone)).fetchone()[0]
    assert left == 0
    again = embed_concepts(conn, embedder, vocabularies=vocabularies, progress=False, retrieval=settings.retrieval)
    assert again.todo == 0 and again.deleted == 0


def test_mapping_memory_follows_the_release(conn, embedder, next_release) -> None:
    directory, m = next_release
    emb_store.register_model(conn, embedder.key, embedder.name_or_path, embedder.dim)
    old_up, successor = next(iter(m["upgraded"].items()))
    deprecated = m["deprecated"][0]
    src, moved = next(iter(m["maps_to_changed"].items()))
    keep = m["renamed_mapped"][0]
    rows = [("LOCAL", "a", "LOCAL:a", "upgraded target", [int(old_up), keep], "file"),
            ("LOCAL", "b", "LOCAL:b", "deprecated target", [deprecated], "review"),
            ("ICD10", moved["source_code"], src, "re-mapped source", [moved["old"]], "vocabulary"),
            ("LOCAL", "c", "LOCAL:c", "untouched", [keep], "file")]
    vec = np.zeros(embedder.dim, dtype=np.float32)
    vec[0] = 1.0
    with conn.cursor().copy("COPY vocab.mapping_memory (model, source_vocab, source_code, source_key, source_text, "
                            "targets, origin, embedding) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "text", "text", "text", "int4[]", "text", "bytea"])
        emb_store.copy_rows(copy, [(embedder.key, *r, vec) for r in rows])
    load_vocabulary(conn, directory, progress=False)
    f = follow_memory(conn)
    assert (f.repointed, f.dropped) == (2, 1)
    got = dict(conn.execute("SELECT source_code, targets FROM vocab.mapping_memory WHERE model = %s",
                            (embedder.key,)).fetchall())
    assert got == {"a": sorted([successor, keep]), moved["source_code"]: [moved["new"]], "c": [keep]}
    assert follow_memory(conn) == type(f)(0, 0)


def test_benchmark_sets_record_the_release_they_were_curated_from(conn, next_release) -> None:
    from harmonia.evaluation.curate import curate_maps_to_from_db

    first = curate_maps_to_from_db(conn, seed=1, per_vocab=50, vocabularies=["ICD10"])
    r = load_vocabulary(conn, next_release[0], progress=False)
    second = curate_maps_to_from_db(conn, seed=1, per_vocab=50, vocabularies=["ICD10"])
    assert first.summary["vocab_release"]["id"] == r.previous_release_id
    assert second.summary["vocab_release"] == {"id": r.release_id, "label": next_release[1]["version"],
                                               "content_sha256": second.summary["vocab_release"]["content_sha256"]}
    assert len(second.summary["vocab_release"]["content_sha256"]) == 64


def test_vocab_upgrade_command_does_it_all(fresh_db: str, tmp_path: Path, next_release) -> None:
    directory, m = next_release
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}
    with psycopg.connect(fresh_db, autocommit=True) as c:
        recheck_store.map_maps_to(c, "ICD10")
    res = CliRunner().invoke(app, ["--database-url", fresh_db, "vocab", "upgrade", str(directory),
                                   "--no-progress"], env=env)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert f"loaded release {m['version']}" in out
    assert "embeddings: " in out and "left the index" in out and "mapping memory: " in out
    assert "invalid_target" in out and "fresh retrieve + rerank" in out and "renamed" in out
    res = CliRunner().invoke(app, ["--database-url", fresh_db, "vocab", "status"], env=env)
    assert m["version"] in res.output and "re-checked: 20" in res.output
