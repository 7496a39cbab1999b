"""Lexical and hybrid retrieval against the real embedded PostgreSQL (sample vocabulary, bundled model)."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from harmonia.paths import sample_dir
from harmonia.retrieval import make_retriever
from harmonia.retrieval.hybrid import FusionWeights, HybridRetriever, Pool, fuse
from harmonia.retrieval.lexical import LexicalRetriever
from harmonia.retrieval.vector import VectorRetriever
from harmonia.vocabulary import load_vocabulary
from tests.conftest import make_settings

T2DM = "Type 2 diabetes mellitus"


def _id(conn: psycopg.Connection, name: str) -> int:
    return conn.execute("SELECT concept_id FROM vocab.concept WHERE concept_name = %s AND standard_concept = 'S' "
                        "AND invalid_reason IS NULL", (name,)).fetchone()[0]


@pytest.mark.parametrize("query", [T2DM, "type 2 diabetes melitus", "diabetis mellitus type 2",
                                   "mellitus, diabetes, type 2"])
def test_lexical_finds_exact_and_near_exact_names(conn, settings, query: str) -> None:
    target = _id(conn, T2DM)
    cands = LexicalRetriever.from_settings(conn, None, settings).search(query, 10)
    ids = [c.concept_id for c in cands]
    assert target in ids[:3], [c.concept_name for c in cands[:5]]
    if query == T2DM:
        assert ids[0] == target and cands[0].scores["name"] == pytest.approx(1.0)
    assert all(c.scores["lexical"] == c.similarity for c in cands)
    assert [c.similarity for c in cands] == sorted((c.similarity for c in cands), reverse=True)


def test_lexical_finds_synonyms_with_their_boost(conn, settings) -> None:
    target = _id(conn, T2DM)
    conn.execute("INSERT INTO vocab.concept_synonym VALUES (%s, 'Adult onset sugar sickness', 4180186)", (target,))
    cands = LexicalRetriever.from_settings(conn, None, settings).search("adult-onset sugar sickness", 5)
    assert cands[0].concept_id == target
    assert cands[0].scores["synonym"] == pytest.approx(1.0)
    assert cands[0].similarity == pytest.approx(settings.retrieval.boost_synonym)


def test_lexical_only_returns_valid_standard_concepts_of_configured_vocabularies(conn, fresh_db, tmp_path) -> None:
    s = make_settings(fresh_db, tmp_path, vocabularies=["LOINC"])
    cands = LexicalRetriever.from_settings(conn, None, s).search("hemoglobin", 20)
    assert len(cands) == 20 and {c.vocabulary_id for c in cands} == {"LOINC"}
    rows = conn.execute("SELECT standard_concept, invalid_reason FROM vocab.concept WHERE concept_id = ANY(%s)",
                        ([c.concept_id for c in cands],)).fetchall()
    assert set(rows) == {("S", None)}
    # a concept that stops being valid disappears from lexical results
    conn.execute("UPDATE vocab.concept SET invalid_reason = 'D' WHERE concept_id = %s", (cands[0].concept_id,))
    assert cands[0].concept_id not in [c.concept_id for c in
                                       LexicalRetriever.from_settings(conn, None, s).search("hemoglobin", 50)]


def test_lexical_works_without_public_in_search_path(conn, settings) -> None:
    conn.execute("SET search_path = pg_catalog")
    cands = LexicalRetriever.from_settings(conn, None, settings).search(T2DM, 5)
    assert cands[0].concept_name == T2DM


def test_lexical_index_survives_a_vocabulary_reload(conn, settings) -> None:
    load_vocabulary(conn, sample_dir() / "vocab", progress=False)
    names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'vocab'")}
    assert {"concept_name_trgm_idx", "concept_synonym_trgm_idx"} <= names
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT 1 FROM vocab.concept c WHERE vocab.lexnorm('diabetes') OPERATOR(public.<%) "
        "vocab.lexnorm(c.concept_name) AND c.standard_concept = 'S' AND c.invalid_reason IS NULL"))
    assert "concept_name_trgm_idx" in plan
    assert LexicalRetriever.from_settings(conn, None, settings).search(T2DM, 1)[0].concept_name == T2DM


def test_make_retriever_dispatches_on_mode(conn, fresh_db, tmp_path, embedder) -> None:
    kinds = {m: type(make_retriever(conn, embedder, make_settings(fresh_db, tmp_path, retrieval_mode=m)))
             for m in ("vector", "lexical", "hybrid")}
    assert kinds == {"vector": VectorRetriever, "lexical": LexicalRetriever, "hybrid": HybridRetriever}


def test_hybrid_is_deterministic_fuses_and_respects_filters(conn, fresh_db, tmp_path, embedder) -> None:
    s = make_settings(fresh_db, tmp_path, retrieval_mode="hybrid")
    r = make_retriever(conn, embedder, s)
    queries = ["diabetis melitus type 2", "P -Alaninaminotransferase"]
    first = r.search_many(queries)
    again = r.search_many(queries)
    assert [[(c.concept_id, c.similarity) for c in x] for x in first] == \
           [[(c.concept_id, c.similarity) for c in x] for x in again]
    assert all(len(x) == 50 for x in first)
    top = first[0][0]
    assert top.concept_id == _id(conn, T2DM)
    assert {"vector", "lexical", "rrf"} <= set(top.scores) and 0.0 <= top.similarity <= 1.0
    assert [c.similarity for c in first[1]] == sorted((c.similarity for c in first[1]), reverse=True)
    meas = r.search("P -Alaninaminotransferase", 20, domains=["Measurement"])
    assert meas and {c.domain_id for c in meas} == {"Measurement"}
    loinc = r.search("diabetes", 20, vocabularies=["LOINC"])
    assert loinc and {c.vocabulary_id for c in loinc} == {"LOINC"}
    # a purely lexical weighting ranks like the lexical generator
    lex_only = HybridRetriever.from_settings(conn, embedder, s, weights=FusionWeights(vector=0.0, lexical=1.0))
    lex = LexicalRetriever.from_settings(conn, None, s).search("diabetis melitus type 2", 5)
    assert [c.concept_id for c in lex_only.search("diabetis melitus type 2", 5)] == [c.concept_id for c in lex]


def test_the_lexical_query_on_a_second_connection_changes_no_score(conn, fresh_db, tmp_path, embedder) -> None:
    """retrieval_parallel runs the lexical query on a side connection and scores the vector candidates lexically
    meanwhile; every pool must hold exactly the numbers the sequential path computes."""
    queries = ["diabetis melitus type 2", "P -Alaninaminotransferase", "fracture of neck of femur"]
    pools = {}
    for parallel in (True, False):
        s = make_settings(fresh_db, tmp_path, retrieval_mode="hybrid", retrieval_parallel=parallel)
        with HybridRetriever.from_settings(conn, embedder, s) as r:
            pools[parallel] = r.pools(queries)
            assert (r._side is not None) == parallel  # the parallel path did run
    for a, b in zip(pools[True], pools[False], strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        for field in ("vector", "name", "synonym", "memory"):
            assert getattr(a, field).tolist() == pytest.approx(getattr(b, field).tolist(), abs=1e-9), field
        assert a.lexical_order == b.lexical_order and a.vector_order == b.vector_order
    assert any(p.name.max() > 0.5 for p in pools[True])


def test_fuse_breaks_ties_by_concept_id_and_weights_move_the_order() -> None:
    pool = Pool(ids=np.array([5, 7, 9, 11]), vector=np.array([0.9, 0.9, 0.2, 0.5]),
                name=np.array([0.1, 0.1, 0.9, 0.5]), synonym=np.zeros(4))
    vec = [cid for cid, _, _ in fuse(pool, FusionWeights(vector=1.0, lexical=0.0), 4)]
    assert vec == [5, 7, 11, 9]
    lex = [cid for cid, _, _ in fuse(pool, FusionWeights(vector=0.0, lexical=1.0), 4)]
    assert lex == [9, 11, 5, 7]
    both = fuse(pool, FusionWeights(vector=0.5, lexical=0.5), 2)
    assert [cid for cid, _, _ in both] == [5, 7]  # 5, 7 and 9 all fuse to 0.5: ties go to the lower id
    assert both[0][1] == pytest.approx(0.5)
    syn = Pool(ids=np.array([1, 2]), vector=np.array([0.5, 0.5]), name=np.array([0.2, 0.0]),
               synonym=np.array([0.0, 1.0]))
    assert [c for c, _, _ in fuse(syn, FusionWeights(vector=0, lexical=1, boost_synonym=0.1), 2)] == [1, 2]
    assert [c for c, _, _ in fuse(syn, FusionWeights(vector=0, lexical=1, boost_synonym=0.8), 2)] == [2, 1]


def test_code_kinship_is_the_shared_code_prefix_share() -> None:
    from harmonia.retrieval.hybrid import code_kinship

    assert code_kinship("L66.1", "L66.9") == pytest.approx(0.75)  # dots ignored: L661 vs L669
    assert code_kinship("L66.1", "L66") == pytest.approx(0.75)
    assert code_kinship("L66.1", "M66.1") == 0 and code_kinship("", "A") == 0
