"""`harmonia retrieve tune`: Bayesian optimisation of the fusion weights on the development part only."""

from __future__ import annotations

import tomllib

import pytest
from typer.testing import CliRunner

from harmonia.domain import SourceTargets
from harmonia.groundtruth import part_of, write_set
from harmonia.retrieval.hybrid import FusionWeights, HybridRetriever
from harmonia.retrieval.tune import TuneError, dev_sources_from_csv, dev_sources_from_db, evaluate, precompute, tune
from harmonia.store import vocab as vocab_store


def test_tuning_reads_only_dev_sources_and_never_gets_worse(conn, settings, embedder, monkeypatch) -> None:
    test_texts = {e.source_text for e in vocab_store.maps_to_edges(conn) if part_of(e.source_concept_id) == "test"}
    seen: list[str] = []
    real = HybridRetriever.pools

    def spy(self, texts, **kw):
        seen.extend(texts)
        return real(self, texts, **kw)

    monkeypatch.setattr(HybridRetriever, "pools", spy)
    sources = dev_sources_from_db(conn, settings.embedding.vocabularies, limit=60, seed=3)
    assert len(sources) == 60 and all(part_of(r.source_concept_id) == "dev" for r in sources)
    pools = precompute(conn, embedder, settings, sources)
    assert sorted(seen) == sorted(r.source_text for r in sources)
    assert not (set(seen) - {r.source_text for r in sources}) and len(set(seen) & test_texts) <= len(
        {r.source_text for r in sources} & test_texts)  # a test source may share a dev source's name, no more
    r = tune(pools, settings.retrieval, trials=12, seed=1)
    assert all(part_of(k) == "dev" for k in r.source_keys) and len(r.source_keys) == 60
    assert r.after.mrr >= r.before.mrr and r.after.n == 60
    assert r.before == evaluate(pools, FusionWeights.of(settings.retrieval), settings.retrieval.top_k)
    again = tune(pools, settings.retrieval, trials=12, seed=1)
    assert again.weights == r.weights  # seeded TPE: same data, same weights


def test_test_part_sources_are_refused_or_skipped(conn, settings, embedder, tmp_path) -> None:
    edges = vocab_store.maps_to_edges(conn)
    test_src = next(e for e in edges if part_of(e.source_concept_id) == "test")
    dev_src = next(e for e in edges if part_of(e.source_concept_id) == "dev")
    rows = [SourceTargets(e.source_code, e.source_vocab, e.source_text, [e.target_concept_id],
                          source_concept_id=e.source_concept_id, source_domain=e.source_domain)
            for e in (test_src, dev_src)]
    with pytest.raises(TuneError, match="test-part"):
        precompute(conn, embedder, settings, rows)
    path = write_set(rows, tmp_path / "mixed.csv")
    assert [r.source_concept_id for r in dev_sources_from_csv(path)] == [dev_src.source_concept_id]
    write_set(rows[:1], tmp_path / "only_test.csv")
    with pytest.raises(TuneError, match="no development-part rows"):
        dev_sources_from_csv(tmp_path / "only_test.csv")


def test_cli_tune_writes_weights_to_the_config_file(fresh_db, tmp_path, monkeypatch) -> None:
    from harmonia.cli import app

    cfg = tmp_path / "harmonia.toml"
    cfg.write_text('reranker = "none"\n')
    monkeypatch.setenv("HARMONIA_DATABASE_URL", fresh_db)
    monkeypatch.setenv("HARMONIA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HARMONIA_CONFIG", str(cfg))
    res = CliRunner().invoke(app, ["retrieve", "tune", "--trials", "5", "--limit", "30"])
    assert res.exit_code == 0, res.output
    assert "before: MRR" in res.output and "after:  MRR" in res.output and "recall@50" in res.output
    doc = tomllib.loads(cfg.read_text())
    assert doc["reranker"] == "none"  # what else the file held is kept
    assert {"retrieval_weight_vector", "retrieval_weight_lexical", "retrieval_weight_rrf", "retrieval_rrf_k",
            "retrieval_boost_synonym"} <= set(doc)
    assert all(0 <= doc[k] <= 1 for k in ("retrieval_weight_vector", "retrieval_weight_lexical",
                                          "retrieval_weight_rrf")) and 1 <= doc["retrieval_rrf_k"] <= 100
