"""The mapping memory against the real embedded PostgreSQL, the sample vocabulary and the bundled model."""

from __future__ import annotations

import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.domain import SourceTargets
from harmonia.retrieval.hybrid import FusionWeights, HybridRetriever
from harmonia.retrieval.memory import build_memory
from harmonia.retrieval.tune import precompute
from harmonia.store import memory as mem_store
from tests.conftest import make_settings

QUERY = "Excessive vomiting in pregnancy"
TARGET = "Hyperemesis gravidarum"


def _id(conn: psycopg.Connection, name: str) -> int:
    return conn.execute("SELECT concept_id FROM vocab.concept WHERE concept_name = %s AND standard_concept = 'S' "
                        "AND invalid_reason IS NULL", (name,)).fetchone()[0]


def _remember(conn, settings, embedder, target: int) -> None:
    maps = [SourceTargets("HG1", "LOCAL", "Excessive vomiting in pregnancy, unspecified", [target], origin="review"),
            SourceTargets("X2", "LOCAL", "Fracture of femur", [_id(conn, "Fracture of femur")], origin="file")]
    r = build_memory(conn, embedder, settings, maps, progress=False)
    assert r.rows == 2 and r.by_origin == {"review": 1, "file": 1}


def test_hybrid_finds_a_target_only_the_memory_knows_and_never_a_source_s_own_map(conn, settings, embedder) -> None:
    target = _id(conn, TARGET)
    r = HybridRetriever.from_settings(conn, embedder, settings)
    assert target not in [c.concept_id for c in r.search(QUERY, 50)]  # neither name nor trigrams find it
    _remember(conn, settings, embedder, target)
    weights = FusionWeights(vector=0.8, lexical=0.1, rrf=0.1, boost_memory=0.95)
    r = HybridRetriever.from_settings(conn, embedder, settings, weights=weights)
    cands = r.search(QUERY, 50)
    hit = next(c for c in cands if c.concept_id == target)
    assert cands.index(hit) < 5 and hit.scores["memory"] > 0.8
    assert hit.scores["semantic"] == pytest.approx(max(hit.scores["vector"], 0.95 * hit.scores["memory"]))
    assert hit.evidence == {"memory_source": "Excessive vomiting in pregnancy, unspecified"}
    # The neighbours' votes go along for rerankers that learn from them: one remembered source maps here, the
    # nearest one; a concept no remembered source maps to has none.
    assert hit.scores["memory_count"] == 1 and hit.scores["memory_rank"] == 1
    assert hit.scores["memory_votes"] == pytest.approx(hit.scores["memory"])
    assert hit.scores["memory_top"] == pytest.approx(hit.scores["memory"])
    femur = _id(conn, "Fracture of femur")
    other = next(c for c in cands if c.concept_id not in (target, femur))
    assert other.scores["memory_count"] == 0 and other.scores["memory_rank"] == 0 and other.scores["memory_votes"] == 0
    # Code kinship: only with the query's code known, and only with remembered codes of its own vocabulary.
    assert hit.scores["memory_code"] == 0
    kin = r.search_many([QUERY], 50, source_keys=[("HG9", "LOCAL")])[0]
    assert next(c for c in kin if c.concept_id == target).scores["memory_code"] == pytest.approx(2 / 3)
    other_vocab = r.search_many([QUERY], 50, source_keys=[("HG9", "ICD10")])[0]
    assert next(c for c in other_vocab if c.concept_id == target).scores["memory_code"] == 0
    # The pipeline keeps that evidence with the ranking a reviewer sees.
    from harmonia.domain import SourceTerm
    from harmonia.pipeline.run import Pipeline
    from harmonia.rerank import make_reranker

    pipe = Pipeline(r, make_reranker(settings), settings.router, settings.rerank)
    d = pipe.decide([SourceTerm("Q1", "LOCAL", QUERY)])[0]
    shown = next(x for x in d.ranking if x["concept_id"] == target)
    assert shown["evidence"]["memory_source"].startswith("Excessive vomiting")
    # The remembered source itself gets no help from its own row (leave-one-out): only the other row is there.
    own = r.search_many([QUERY], 50, source_keys=[("HG1", "LOCAL")])[0]
    assert target not in [c.concept_id for c in own]
    hits = mem_store.search(conn, embedder.key, r.dim, embedder.encode_queries([QUERY])[0], 5,
                            exclude=[("HG1", "LOCAL")])
    assert [(h.source_vocab, h.source_code) for h in hits] == [("LOCAL", "X2")]
    # boost 0 switches the memory off in the fusion: the target keeps only its own (low) cosine
    off = HybridRetriever.from_settings(conn, embedder, settings,
                                        weights=FusionWeights(vector=0.8, lexical=0.1, rrf=0.1))
    ranked = [c.concept_id for c in off.search(QUERY, 200)]
    assert target not in ranked[:50]


def test_remembered_targets_pass_the_same_filters(conn, settings, embedder) -> None:
    target = _id(conn, TARGET)
    _remember(conn, settings, embedder, target)
    r = HybridRetriever.from_settings(conn, embedder, settings,
                                      weights=FusionWeights(vector=0.8, lexical=0.1, boost_memory=0.95))
    assert target in [c.concept_id for c in r.search(QUERY, 50)]
    assert target not in [c.concept_id for c in r.search(QUERY, 50, domains=["Measurement"])]
    conn.execute("UPDATE vocab.concept SET invalid_reason = 'D' WHERE concept_id = %s", (target,))
    assert target not in [c.concept_id for c in r.search(QUERY, 50)]


def test_rebuild_replaces_the_memory_whole(conn, settings, embedder) -> None:
    _remember(conn, settings, embedder, _id(conn, TARGET))
    one = [SourceTargets("Z9", "LOCAL", "Type 2 diabetes", [_id(conn, "Type 2 diabetes mellitus")], origin="file")]
    build_memory(conn, embedder, settings, one, progress=False)
    assert mem_store.count(conn, embedder.key) == {"file": 1}
    n_idx = conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = %s",
                         (mem_store.index_name(embedder.key),)).fetchone()[0]
    assert n_idx == 1


def test_tuning_pools_leave_each_source_s_own_mapping_out(conn, settings, embedder) -> None:
    from harmonia.retrieval.tune import dev_sources_from_db

    row = dev_sources_from_db(conn, settings.embedding.vocabularies, limit=1, seed=3)[0]
    own = SourceTargets(row.source_code, row.source_vocab, row.source_text, row.targets,
                        source_concept_id=row.source_concept_id, origin="vocabulary")
    build_memory(conn, embedder, settings, [own], progress=False)
    (_, pool), = precompute(conn, embedder, settings, [row])
    assert not pool.memory.any()  # its own row is the only one, and it is left out
    other = HybridRetriever.from_settings(conn, embedder, settings).pool(row.source_text, embedder.encode_queries(
        [row.source_text])[0])
    assert other.memory.max() == pytest.approx(1.0, abs=1e-3)  # without the key it would have found itself


def test_cli_memory_build(conn, fresh_db, tmp_path) -> None:
    # Keep the 'Maps to' of 120 ICD10 codes (about half of them dev) so the command runs in seconds.
    conn.execute("""DELETE FROM vocab.concept_relationship WHERE relationship_id = 'Maps to' AND concept_id_1 NOT IN
                    (SELECT concept_id FROM vocab.concept WHERE vocabulary_id = 'ICD10'
                     ORDER BY concept_id LIMIT 120)""")
    env = {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_CONFIG": ""}
    res = CliRunner().invoke(app, ["memory", "build", "--no-progress"], env=env)
    assert res.exit_code == 0, res.output
    s = make_settings(fresh_db, tmp_path)
    from harmonia.embedding.model import Embedder

    counts = mem_store.count(conn, Embedder.from_settings(s).key)
    assert 20 < counts["vocabulary"] < 120 and "remembered sources" in res.output
    res = CliRunner().invoke(app, ["memory", "build", "--no-progress", "--pairs-from", str(tmp_path / "no.csv")],
                             env=env)
    assert res.exit_code != 0


def test_none_reranker_confidence_is_the_semantic_score_not_the_fused_one() -> None:
    from harmonia.domain import Candidate, SourceTerm
    from harmonia.rerank.base import NoneReranker

    term = SourceTerm("X1", "LOCAL", "anything")
    fused = Candidate(1, "a", "Condition", "SNOMED", "Disorder", "1", 0.98, scores={"semantic": 0.71})
    r = NoneReranker().rerank(term, [fused])
    assert r.confidence == pytest.approx(0.71) and r.ranked[0].score == pytest.approx(0.98)
    plain = Candidate(2, "b", "Condition", "SNOMED", "Disorder", "2", 0.83)  # vector retrieval: the cosine
    assert NoneReranker().rerank(term, [plain]).confidence == pytest.approx(0.83)
