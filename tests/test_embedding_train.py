"""`harmonia embed train`: a tiny contrastive run on the real bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harmonia.embedding.model import Embedder, bundled_model_path
from harmonia.embedding.train import CHECKPOINT, TrainConfig, TrainError, make_batches, train, training_pairs
from harmonia.groundtruth import part_of
from harmonia.store import vocab as vocab_store

PAIRS = [("DM2", "Type 2 diabetes mellitus"), ("HTN", "Essential hypertension"), ("MI", "Myocardial infarction"),
         ("CKD", "Chronic kidney disease"), ("COPD", "Chronic obstructive lung disease"),
         ("UTI", "Urinary tract infectious disease"), ("CHF", "Congestive heart failure"),
         ("AF", "Atrial fibrillation")]


def _cos(e: Embedder, a: str, b: str) -> float:
    va, vb = e.encode_documents([a, b])
    return float(np.dot(va, vb))


@pytest.mark.slow
def test_tiny_run_gives_a_loadable_model_that_pulls_a_pair_closer(tmp_path) -> None:
    base = Embedder(name_or_path=str(bundled_model_path()))
    before = _cos(base, "DM2", "Type 2 diabetes mellitus")
    out = tmp_path / "ft"
    r = train(PAIRS, TrainConfig(base=str(bundled_model_path()), out=str(out), max_steps=6, batch_size=8, lr=1e-4,
                                 warmup_ratio=0.0), info={"maps_to_pairs": 8}, progress=False)
    assert r.steps == 6 and r.resumed_from == 0
    tuned = Embedder(name_or_path=str(out))
    assert tuned.key != base.key and tuned.dim == base.dim
    assert _cos(tuned, "DM2", "Type 2 diabetes mellitus") > before + 0.05
    card = json.loads((out / "harmonia_train.json").read_text())
    assert card["steps"] == 6 and card["pairs"] == 8 and card["base_model"] == str(bundled_model_path())
    assert "MultipleNegativesRankingLoss" in (out / "README.md").read_text()
    assert not (out / CHECKPOINT).exists()


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch) -> None:
    out = tmp_path / "ft"
    cfg = TrainConfig(base=str(bundled_model_path()), out=str(out), max_steps=4, batch_size=4, checkpoint_every=2)
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def crash_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(PAIRS, cfg, progress=False)
    assert (out / CHECKPOINT / "train_state.pt").exists() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    with pytest.raises(TrainError, match="same options"):
        train(PAIRS[:6], cfg, resume=True, progress=False)
    r = train(PAIRS, cfg, resume=True, progress=False)
    assert r.resumed_from == 2 and r.steps == 4
    assert Embedder(name_or_path=str(out)).encode_documents(["x"]).shape == (1, 384)


def test_batches_never_repeat_a_text() -> None:
    pairs = [("a", "T"), ("b", "T"), ("c", "U"), ("d", "V"), ("a", "W"), ("e", "X"), ("f", "Y")]
    for seed in range(5):
        batches = make_batches(pairs, 4, seed=seed)
        for b in batches:
            texts = [t for i in b for t in pairs[i]]
            assert len(texts) == len(set(texts))
        assert sorted(i for b in batches for i in b) == list(range(7))  # the clashing ones wait, none is lost


def test_training_pairs_come_from_the_dev_part_only(conn, settings) -> None:
    pairs, info = training_pairs(conn, settings.embedding.vocabularies)
    maps = vocab_store.maps_to_edges(conn)
    test_only = ({e.source_text for e in maps if part_of(e.source_concept_id) == "test"}
                 - {e.source_text for e in maps if part_of(e.source_concept_id) == "dev"})
    assert info["maps_to_pairs"] > 1000 and pairs
    assert not test_only & {a for a, _ in pairs}
    assert len(pairs) == len(set(pairs))


def test_mapping_files_and_reviews_add_only_dev_part_pairs(conn, settings, tmp_path) -> None:
    from harmonia.groundtruth import part_of
    from harmonia.store import concepts as concept_store

    a, b, c = concept_store.standard_concepts(conn, ["SNOMED"])[:3]
    assert part_of("LAB:G6") == "dev" and part_of("LAB:G1") == "test"
    usagi = tmp_path / "lab.usagi.csv"
    usagi.write_text("sourceCode,sourceName,conceptId,mappingStatus,sourceVocabularyId\n"
                     f"G6,dev lab name,{a.concept_id},APPROVED,LAB\nG1,test lab name,{b.concept_id},APPROVED,LAB\n")
    conn.execute("""INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id,
                        decided_by) VALUES ('L1', 'LOCAL', 'reviewed dev text', %s, 'reviewer'),
                        ('L3', 'LOCAL', 'reviewed test text', %s, 'reviewer')""", (c.concept_id, c.concept_id))
    pairs, info = training_pairs(conn, settings.embedding.vocabularies, extra_sets=[usagi])
    assert ("dev lab name", a.concept_name) in pairs and ("reviewed dev text", c.concept_name) in pairs
    assert not {"test lab name", "reviewed test text"} & {x for x, _ in pairs}
    assert info["mapping_file_pairs"] == 1 and info["review_pairs"] == 1
    without, info2 = training_pairs(conn, settings.embedding.vocabularies, include_reviews=False)
    assert ("reviewed dev text", c.concept_name) not in without and info2["review_pairs"] == 0
