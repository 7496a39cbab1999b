"""Embedding ingest and vector retrieval against the real embedded PostgreSQL and the bundled model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import psycopg
import pytest

from harmonia.embedding.ingest import embed_concepts
from harmonia.embedding.model import Embedder, bundled_model_path
from harmonia.retrieval.base import RetrievalError
from harmonia.retrieval.vector import VectorRetriever
from harmonia.store import embeddings as emb_store


@pytest.fixture(scope="module")
def copied_model(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The bundled model under another path: a model key the template has no embeddings for."""
    path = tmp_path_factory.mktemp("models") / "minilm-copy"
    shutil.copytree(bundled_model_path(), path)
    return Embedder(name_or_path=str(path))


def _ucum_count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM vocab.concept WHERE vocabulary_id = 'UCUM' "
                        "AND standard_concept = 'S' AND invalid_reason IS NULL").fetchone()[0]


def test_every_small_batch_lands_and_resume_embeds_only_the_rest(conn, copied_model: Embedder) -> None:
    n = _ucum_count(conn)
    assert n > 900
    first = embed_concepts(conn, copied_model, vocabularies=["UCUM"], batch_size=37, progress=False, limit=300)
    assert (first.written, first.batches, first.total) == (300, 9, 300)
    rest = embed_concepts(conn, copied_model, vocabularies=["UCUM"], batch_size=37, progress=False)
    assert rest.todo == n - 300 and rest.written == n - 300 and rest.batches == -(-(n - 300) // 37)
    assert rest.total == n
    again = embed_concepts(conn, copied_model, vocabularies=["UCUM"], batch_size=37, progress=False)
    assert again.todo == 0 and again.total == n


def test_renamed_concept_is_re_embedded_and_removed_one_dropped(conn, copied_model: Embedder) -> None:
    embed_concepts(conn, copied_model, vocabularies=["UCUM"], batch_size=500, progress=False)
    ids = [r[0] for r in conn.execute("SELECT concept_id FROM vocab.concept_embedding WHERE model = %s "
                                      "ORDER BY concept_id LIMIT 2", (copied_model.key,))]
    before = conn.execute("SELECT embedding::text FROM vocab.concept_embedding WHERE concept_id = %s AND model = %s",
                          (ids[0], copied_model.key)).fetchone()[0]
    conn.execute("UPDATE vocab.concept SET concept_name = 'completely different name' WHERE concept_id = %s",
                 (ids[0],))
    conn.execute("UPDATE vocab.concept SET invalid_reason = 'D' WHERE concept_id = %s", (ids[1],))
    r = embed_concepts(conn, copied_model, vocabularies=["UCUM"], batch_size=500, progress=False)
    assert r.written == 1 and r.deleted == 1
    after = conn.execute("SELECT embedding::text FROM vocab.concept_embedding WHERE concept_id = %s AND model = %s",
                         (ids[0], copied_model.key)).fetchone()[0]
    assert after != before


def test_model_change_gets_its_own_embeddings_and_index(conn, copied_model: Embedder, embedder: Embedder) -> None:
    assert copied_model.key != embedder.key
    assert emb_store.count(conn, copied_model.key) == 0  # the template only has the bundled model's
    embed_concepts(conn, copied_model, vocabularies=["UCUM"], batch_size=500, progress=False)
    assert emb_store.count(conn, copied_model.key) == _ucum_count(conn)
    names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'concept_embedding'")}
    assert {emb_store.index_name(copied_model.key), emb_store.index_name(embedder.key)} <= names


def test_vectors_are_normalised_and_model_is_offline(embedder: Embedder) -> None:
    assert embedder.is_local and embedder.key.startswith("all-MiniLM-L6-v2@") and embedder.dim == 384
    v = embedder.encode_queries(["type 2 diabetes mellitus"])
    assert v.shape == (1, 384) and abs(float(np.linalg.norm(v[0])) - 1.0) < 1e-4


def test_bfloat16_encoder_gives_unit_float32_vectors_close_to_float32(embedder: Embedder) -> None:
    texts = ["Type 2 diabetes mellitus", "Hemoglobin A1c/Hemoglobin.total in Blood", "Fracture of neck of femur"]
    bf = Embedder(name_or_path=embedder.name_or_path, device="cpu", dtype="bfloat16")
    a, b = embedder.encode_documents(texts), bf.encode_documents(texts)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.all(np.sum(a * b, axis=1) > 0.99)
    assert bf.key == embedder.key  # the same model: its vectors are interchangeable


def test_bge_models_get_their_query_instruction() -> None:
    from harmonia.config import EmbeddingSettings, Settings

    bge = Settings(embedding=EmbeddingSettings(model="BAAI/bge-base-en-v1.5"))
    assert Embedder.from_settings(bge).query_prefix.startswith(
        "Represent this sentence")
    assert Embedder.from_settings(Settings()).query_prefix == ""


# ------------------------------------------------------------------------------------------------- retrieval


def test_top_k_rows_come_back_even_with_a_small_ef_search(conn, settings, embedder: Embedder) -> None:
    settings.retrieval.hnsw_ef_search = 10  # below k: the retriever raises it, else pgvector returns only 10-40 rows
    r = VectorRetriever.from_settings(conn, embedder, settings)
    cands = r.search("Essential hypertension", 50)
    assert len(cands) == 50
    assert len({c.concept_id for c in cands}) == 50
    assert cands[0].concept_name.lower() == "essential hypertension"
    sims = [c.similarity for c in cands]
    assert sims == sorted(sims, reverse=True)
    assert all(c.vocabulary_id in settings.embedding.vocabularies for c in cands)


def test_filters_by_domain_and_vocabulary(conn, settings, embedder: Embedder) -> None:
    r = VectorRetriever.from_settings(conn, embedder, settings)
    meas = r.search("hemoglobin in blood", 50, domains=["Measurement"])
    assert len(meas) == 50 and {c.domain_id for c in meas} == {"Measurement"}
    loinc = r.search("hemoglobin in blood", 20, vocabularies=["LOINC"])
    assert len(loinc) == 20 and {c.vocabulary_id for c in loinc} == {"LOINC"}


def test_works_when_search_path_lacks_public(fresh_db: str, settings, embedder: Embedder) -> None:
    with psycopg.connect(fresh_db, autocommit=True, options="-c search_path=vocab") as c:
        assert c.execute("SHOW search_path").fetchone()[0] == "vocab"
        with pytest.raises(psycopg.errors.UndefinedObject):
            c.execute("SELECT '[1,2]'::vector")  # unqualified, pgvector is out of reach ...
        cands = VectorRetriever.from_settings(c, embedder, settings).search("Asthma", 50)  # ... qualified, it all works
        assert len(cands) == 50 and "asthma" in cands[0].concept_name.lower()


def test_index_is_used_and_agrees_with_exact_search(conn, settings, embedder: Embedder) -> None:
    r = VectorRetriever.from_settings(conn, embedder, settings)
    queries = ["Acute myocardial infarction", "Fracture of neck of femur", "Glucose in serum",
               "Malignant neoplasm of breast", "Urinary tract infection", "Sodium in urine", "milligram per liter",
               "Chronic obstructive lung disease", "Iron deficiency anemia", "Pneumonia due to Streptococcus"]
    overlap = 0
    for q in queries:
        approx = {c.concept_id for c in r.search(q, 50)}
        exact = {c.concept_id for c in r.search(q, 50, exact=True)}
        overlap += len(approx & exact)
    assert overlap / (50 * len(queries)) >= 0.95
    vec = embedder.encode_queries(["Asthma"])[0]
    plan = "\n".join(r[0] for r in conn.execute(
        f"""EXPLAIN SELECT e.concept_id FROM vocab.concept_embedding e WHERE e.model = '{embedder.key}'
            ORDER BY (e.embedding::public.vector(384)) OPERATOR(public.<=>) '{emb_store.vector_literal(vec)}'
            ::public.vector(384) LIMIT 50"""))
    assert emb_store.index_name(embedder.key) in plan


def test_a_halfvec_index_replaces_the_float_one_and_keeps_its_results(conn, settings, embedder: Embedder) -> None:
    import dataclasses

    hs = dataclasses.replace(settings, retrieval=dataclasses.replace(settings.retrieval, hnsw_storage="halfvec"))
    queries = ["Acute myocardial infarction", "Glucose in serum", "Urinary tract infection", "milligram per liter",
               "Iron deficiency anemia", "Hypertensive heart disease"]
    before = VectorRetriever.from_settings(conn, embedder, settings)
    floats = {q: before.search(q, 50) for q in queries}
    # `harmonia embed` with the setting builds the halfvec index and drops the float one
    embed_concepts(conn, embedder, vocabularies=settings.embedding.vocabularies, progress=False,
                   retrieval=hs.retrieval)
    names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'vocab'")}
    assert emb_store.index_name(embedder.key, "halfvec") in names and emb_store.index_name(embedder.key) not in names
    half = VectorRetriever.from_settings(conn, embedder, hs)
    overlap = 0
    for q in queries:
        got = half.search(q, 50)
        overlap += len({c.concept_id for c in got} & {c.concept_id for c in floats[q]})
        # the similarity is computed in full precision whatever the index keeps
        by_id = {c.concept_id: c.similarity for c in floats[q]}
        assert all(abs(c.similarity - by_id[c.concept_id]) < 1e-6 for c in got if c.concept_id in by_id)
    assert overlap / (50 * len(queries)) >= 0.95
    vec = embedder.encode_queries(["Asthma"])[0]
    lit = emb_store.vector_literal(vec)
    plan = "\n".join(r[0] for r in conn.execute(
        f"""EXPLAIN SELECT e.concept_id FROM vocab.concept_embedding e WHERE e.model = '{embedder.key}'
            ORDER BY (e.embedding::public.halfvec(384)) OPERATOR(public.<=>) '{lit}'::public.halfvec(384) LIMIT 50"""))
    assert emb_store.index_name(embedder.key, "halfvec") in plan


def test_a_small_domain_searches_its_own_graph_and_follows_a_concept_that_moves(conn, settings,
                                                                               embedder: Embedder) -> None:
    import dataclasses

    indexed = emb_store.domain_indexes(conn, embedder.key)
    counts = dict(conn.execute("SELECT domain_id, count(*) FROM vocab.concept_embedding WHERE model = %s "
                               "GROUP BY 1", (embedder.key,)).fetchall())
    total = sum(counts.values())
    # "auto": every domain under a quarter of the vectors, and no other
    assert set(indexed) == {d for d, n in counts.items() if n < 0.25 * total} and "Measurement" in indexed
    r = VectorRetriever.from_settings(conn, embedder, settings)
    assert "Measurement" in r.indexed_domains
    for q, domains in (("Glucose [Mass/volume] in Serum or Plasma", ["Measurement"]),
                       ("Potassium in urine", ["Measurement", "Drug"]), ("amoxicillin 500 MG", ["Drug"])):
        got = r.search(q, 50, domains=domains)
        exact = r.search(q, 50, domains=domains, exact=True)
        assert len(got) == 50 and {c.domain_id for c in got} <= set(domains)
        assert [c.similarity for c in got] == sorted((c.similarity for c in got), reverse=True)
        assert len({c.concept_id for c in got} & {c.concept_id for c in exact}) >= 48
    lit = emb_store.vector_literal(embedder.encode_queries(["Sodium"])[0])
    plan = "\n".join(x[0] for x in conn.execute(
        f"""EXPLAIN SELECT e.concept_id FROM vocab.concept_embedding e WHERE e.model = '{embedder.key}'
            AND e.domain_id = 'Measurement' ORDER BY (e.embedding::public.vector(384)) OPERATOR(public.<=>)
            '{lit}'::public.vector(384) LIMIT 50"""))
    assert emb_store.domain_index_name(embedder.key, "vector", "Measurement") in plan
    # a new release moves a drug into Measurement: `harmonia embed` moves its row, the Measurement graph finds it
    cid, name = conn.execute("SELECT c.concept_id, c.concept_name FROM vocab.concept c JOIN vocab.concept_embedding e "
                             "ON e.concept_id = c.concept_id AND e.model = %s WHERE c.domain_id = 'Drug' "
                             "ORDER BY c.concept_id LIMIT 1", (embedder.key,)).fetchone()
    conn.execute("UPDATE vocab.concept SET domain_id = 'Measurement' WHERE concept_id = %s", (cid,))
    assert cid not in {c.concept_id for c in r.search(name, 10, domains=["Measurement"])}
    embed_concepts(conn, embedder, vocabularies=settings.embedding.vocabularies, progress=False,
                   retrieval=settings.retrieval)
    assert cid in {c.concept_id for c in r.search(name, 10, domains=["Measurement"])}
    # [] : no domain index; filtered searches fall back to the whole index and still return K rows
    none = dataclasses.replace(settings.retrieval, hnsw_domain_indexes=[])
    embed_concepts(conn, embedder, vocabularies=settings.embedding.vocabularies, progress=False, retrieval=none)
    assert emb_store.domain_indexes(conn, embedder.key) == {}
    names = {x[0] for x in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'vocab'")}
    assert emb_store.domain_index_name(embedder.key, "vector", "Measurement") not in names
    r = VectorRetriever.from_settings(conn, embedder, settings)
    assert not r.indexed_domains and len(r.search("Sodium", 50, domains=["Measurement"])) == 50


def test_an_unknown_index_storage_is_refused() -> None:
    from harmonia.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="'hnsw_storage': 'float16' is not vector or halfvec"):
        load_settings({"hnsw_storage": "float16"}, env={"HARMONIA_CONFIG": ""})


def test_retriever_without_embeddings_says_what_to_do(empty_db: str, tmp_path: Path, embedder: Embedder) -> None:
    from harmonia.store import migrations
    from tests.conftest import make_settings

    with psycopg.connect(empty_db, autocommit=True) as c:
        migrations.migrate(c)
        with pytest.raises(RetrievalError, match="run `harmonia embed` first"):
            VectorRetriever.from_settings(c, embedder, make_settings(empty_db, tmp_path))
