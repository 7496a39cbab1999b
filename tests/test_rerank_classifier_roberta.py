"""The classifier on a RoBERTa-architecture base (issue 20 point 5): a tiny RoBERTa checkpoint built offline (random
weights, a byte-level BPE tokenizer trained on the sample's concept names with `tokenizers`), trained by
`harmonia reranker train --base-model DIR` and used to rerank through the pipeline, against a real embedded
PostgreSQL. What a biomedical RoBERTa (BioMed-RoBERTa, RoBERTa-base-PM-M3-Voc, ...) goes through, at toy size."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.domain import SourceTerm
from harmonia.groundtruth import part_of
from harmonia.paths import sample_dir
from harmonia.pipeline.run import Pipeline
from harmonia.rerank.classifier.reranker import ClassifierReranker
from harmonia.store import vocab as vocab_store
from tests.conftest import make_settings


def concept_names(limit: int = 8000) -> list[str]:
    """The first `limit` concept names of the bundled Athena sample (what the tokenizer learns its merges from)."""
    raw = gzip.decompress((sample_dir() / "vocab" / "CONCEPT.csv.gz").read_bytes()).decode()
    reader = csv.DictReader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [row["concept_name"] for _, row in zip(range(limit), reader, strict=False)]


def build_tiny_roberta(out: Path) -> Path:
    """A RoBERTa masked-LM checkpoint as a hub download has it (config.json, weights, vocab.json + merges.txt),
    with random weights and 2 layers of width 32."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(concept_names(), vocab_size=2000, min_frequency=2, special_tokens=specials)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))  # vocab.json, merges.txt: the files a RoBERTa tokenizer is made of
    tok = RobertaTokenizerFast(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"),
                               model_max_length=128)
    tok.save_pretrained(out)
    # Positions start at padding_idx + 1 in RoBERTa, hence 128 + 2.
    cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    RobertaForMaskedLM(cfg).save_pretrained(out)
    return out


@pytest.mark.slow
def test_tiny_roberta_trains_through_the_cli_and_reranks_in_the_pipeline(
        conn: psycopg.Connection, fresh_db: str, tmp_path: Path) -> None:
    base = build_tiny_roberta(tmp_path / "tiny-roberta")
    assert json.loads((base / "config.json").read_text())["model_type"] == "roberta"
    data = tmp_path / "data"
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    r = CliRunner().invoke(app, ["--database-url", fresh_db, "reranker", "train", "--base-model", str(base),
                                 "--max-steps", "6", "--epochs", "0", "--layers", "1", "--batch-size", "8",
                                 "--max-sources", "60", "--holdout", "0.5", "--max-length", "48",
                                 "--hard-negatives", "2", "--source-vocab", "ICD10", "--no-reviews"], env=env)
    assert r.exit_code == 0, r.output
    assert "trained 6 steps" in r.output and "checkpoint classifier:" in r.output
    run_dir = (data / "reranker" / "latest").resolve()
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["base_model"] == str(base) and card["steps"] == 6 and card["layers"] == 1
    model_cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert model_cfg["model_type"] == "roberta" and model_cfg["architectures"] == ["RobertaForSequenceClassification"]
    assert model_cfg["num_hidden_layers"] == 1  # --layers cut the base's 2 layers to 1
    assert card["holdout_metrics"]["sources"] == 30  # half of the 60 sources: the stacker's and card's figures
    assert card["kinds"]["kinds"]["diagnosis"]["sources"] == 30 and (run_dir / "kinds.json").exists()
    assert "kind diagnosis: 30 held-out sources" in r.output

    # Rerank ICD10 test-part sources with it, end to end: retrieval on the real database, the RoBERTa cross-encoder,
    # the router; every code gets a ranking of the retrieved candidates.
    # every kind ranked: 6 steps on random weights earn no kind of their own (kinds.json), which would keep
    # retrieval order
    s = make_settings(fresh_db, data, reranker="classifier", classifier_max_length=48, classifier_kinds=["*"])
    edges = [e for e in vocab_store.maps_to_edges(conn, ["ICD10"]) if part_of(e.source_concept_id) == "test"][:5]
    terms = [SourceTerm(e.source_code, e.source_vocab, e.source_text) for e in edges]
    with Pipeline.from_settings(conn, s) as pipe:
        assert isinstance(pipe.reranker, ClassifierReranker)
        assert pipe.reranker.model_version == f"classifier:{card['checkpoint_hash']}"
        decisions = pipe.decide(terms)
    for d in decisions:
        assert not d.error, d.error
        retrieved = {c.concept_id for c in d.candidates}
        ranked = [x["concept_id"] for x in d.ranking]
        assert len(retrieved) == s.retrieval.top_k and 1 <= len(ranked) <= s.rerank.top_n
        assert set(ranked) <= retrieved
        scores = [x["score"] for x in d.ranking]
        assert scores == sorted(scores, reverse=True) and all(0.0 <= x <= 1.0 for x in scores)
