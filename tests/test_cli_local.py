"""`harmonia train-local`: the recommended local configuration in one command, end to end on a copy of the sample
database (tiny step counts: the plumbing, not the quality)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.paths import sample_dir
from harmonia.store import memory as mem_store

runner = CliRunner()


@pytest.mark.slow
def test_train_local_builds_and_configures_the_recommended_pair(fresh_db: str, tmp_path: Path) -> None:
    cfg = tmp_path / "harmonia.toml"
    cfg.write_text('retrieval_mode = "vector"\n')  # left at vector: the command sets the retrieval it trains on
    data = tmp_path / "data"
    env = {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(data), "HARMONIA_CONFIG": str(cfg)}
    lab = sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz"
    args = ["train-local", "--embedder-base", "minilm", "--embedder-max-steps", "2", "--embedder-batch-size", "8",
            "--reranker-max-steps", "3", "--reranker-max-sources", "40", "--layers", "1", "--source-vocab", "ICD10",
            "--pairs-from", str(lab), "--pairs-kind", "labs", "--no-progress"]
    r = runner.invoke(app, args, env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    embedder, ce = data / "embedder" / "minilm-harmonia", data / "reranker" / "minilm-harmonia-ce"
    assert (embedder / "harmonia_train.json").exists() and (ce / "model_card.json").exists()
    assert json.loads((embedder / "harmonia_train.json").read_text())["mapping_file_pairs"] > 0  # the lab rows
    card = json.loads((ce / "model_card.json").read_text())
    assert card["options"]["layers"] == 1 and card["options"]["pairs_kind"] == "labs"
    assert card["retrieval_mode"] == "hybrid"  # its negatives and stacker come from the retrieval it will rerank
    # the cross-encoder mined its candidates with the new embedder, which has vectors and a memory of its own
    assert card["embedding_model_for_negatives"] == str(embedder)
    with psycopg.connect(fresh_db) as conn:
        key = conn.execute("SELECT model FROM vocab.embedding_model WHERE model LIKE %s",
                           (f"%{embedder.name}%",)).fetchone()
        assert key is not None
        n = conn.execute("SELECT count(*) FROM vocab.concept_embedding WHERE model = %s", key).fetchone()
        assert n is not None and n[0] > 20_000
        assert sum(mem_store.count(conn, key[0]).values()) > 6_000
    conf = tomllib.loads(cfg.read_text())
    assert conf["embedding_model"] == str(embedder) and conf["reranker"] == "classifier"
    assert conf["classifier_checkpoint"] == str(ce) and conf["retrieval_mode"] == "hybrid"
    assert "no threshold yet" in out  # nothing is auto-approved before a calibration
    # A second run keeps what is finished and points the configuration at the same pair.
    r = runner.invoke(app, args, env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert out.count("already trained") == 2 and "embedded 0 concepts" in out
    r = runner.invoke(app, ["reranker", "info"], env=env, catch_exceptions=False)
    assert r.exit_code == 0 and str(ce) in " ".join(r.output.split()), r.output


def test_train_local_refuses_an_unknown_base(fresh_db: str, tmp_path: Path) -> None:
    env = {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_CONFIG": ""}
    r = runner.invoke(app, ["train-local", "--embedder-base", str(tmp_path / "nowhere")], env=env)
    assert r.exit_code == 1 and "not mpnet, minilm or a local sentence-transformers folder" in r.output
    r = runner.invoke(app, ["train-local", "--wheels", str(tmp_path)], env=env)
    assert r.exit_code == 1 and "zip pieces" in r.output and "--embedder-base minilm" in " ".join(r.output.split())
