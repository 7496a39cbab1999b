"""`harmonia bench curate | run | calibrate` end to end on a private copy of the sample database."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.domain import SourceTargets
from harmonia.groundtruth import part_of, read_set, write_set
from harmonia.paths import sample_dir
from harmonia.store import calibration as cal_store
from harmonia.store import concepts as concept_store
from harmonia.store import vocab as vocab_store

runner = CliRunner()


@pytest.fixture
def env(fresh_db: str, tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "harmonia.toml"
    cfg.write_text("")
    return {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(tmp_path / "data"),
            "HARMONIA_CONFIG": str(cfg)}


def invoke(env: dict[str, str], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def test_curate_from_maps_to_and_usagi(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "sets"
    lab = sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz"
    r = invoke(env, "bench", "curate", "--seed", "3", "--per-vocab", "30", "--out", str(out), "--usagi", str(lab))
    assert r.exit_code == 0, r.output
    dev, test = read_set(out / "maps_to.dev.csv"), read_set(out / "maps_to.test.csv")
    assert not {x.source_concept_id for x in dev} & {x.source_concept_id for x in test}
    for part, rows in (("dev", dev), ("test", test)):
        assert all(part_of(x.source_concept_id, 3) == part for x in rows)
        per_vocab = {v: sum(x.source_vocab == v for x in rows) for v in {x.source_vocab for x in rows}}
        assert per_vocab["ICD10"] == 30 and max(per_vocab.values()) == 30 and len(per_vocab) > 3
    summary = json.loads((out / "maps_to.summary.json").read_text())
    assert summary["test"]["same_name"] == sum(x.same_name for x in test) > 0
    assert summary["dev"]["multi_target"] == sum(len(x.targets) > 1 for x in dev)
    # the ground truth is the vocabulary's: every target is a 'Maps to' target of that source
    with psycopg.connect(env["HARMONIA_DATABASE_URL"]) as conn:
        truth: dict[int, set[int]] = {}
        for e in vocab_store.maps_to_edges(conn):
            truth.setdefault(e.source_concept_id, set()).add(e.target_concept_id)
    assert all(set(x.targets) == truth[x.source_concept_id] for x in dev + test)
    # the external set: grouped per code, split on "vocab:code"
    lab_dev, lab_test = read_set(out / "finomop_lab.dev.csv"), read_set(out / "finomop_lab.test.csv")
    assert len(lab_dev) + len(lab_test) == 1914  # distinct source codes in the file, all targets in the sample
    assert not {x.source_code for x in lab_dev} & {x.source_code for x in lab_test}
    assert all(part_of(f"finomop_lab:{x.source_code}", 3) == "test" for x in lab_test)
    assert any(len(x.targets) > 1 for x in lab_dev + lab_test)
    # same seed, same files
    r2 = invoke(env, "bench", "curate", "--seed", "3", "--per-vocab", "30", "--out", str(tmp_path / "again"))
    assert r2.exit_code == 0
    assert (tmp_path / "again" / "maps_to.test.csv").read_bytes() == (out / "maps_to.test.csv").read_bytes()


def test_curate_bad_usagi_names_the_problem(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sourceCode,sourceName,conceptId\n1,x,12\n2,y,twelve\n")
    r = invoke(env, "bench", "curate", "--out", str(tmp_path / "o"), "--usagi", str(bad))
    assert r.exit_code == 1 and "line 3" in r.output and "conceptId" in r.output
    assert not (tmp_path / "o" / "bad.dev.csv").exists()


def _exact_name_rows(env: dict[str, str], n: int = 8) -> list[SourceTargets]:
    """Sources whose text is a standard concept's own (unique) name: retrieval should rank it first."""
    with psycopg.connect(env["HARMONIA_DATABASE_URL"]) as conn:
        edges = vocab_store.maps_to_edges(conn, ["ICD10"])
        targets = concept_store.get_concepts(conn, sorted({e.target_concept_id for e in edges}))
    names: dict[str, list[int]] = {}
    for cid, c in targets.items():
        names.setdefault(c.concept_name.casefold(), []).append(cid)
    unique = sorted(((cid, c) for cid, c in targets.items() if len(names[c.concept_name.casefold()]) == 1
                     and len(c.concept_name) > 25), key=lambda ic: ic[0])[:n]
    return [SourceTargets(f"S{i}", "TEST", c.concept_name, [cid], source_domain=c.domain_id,
                          target_names=[c.concept_name], same_name=True)
            for i, (cid, c) in enumerate(unique)]


def test_run_gates_and_calibrate(env: dict[str, str], tmp_path: Path) -> None:
    good = _exact_name_rows(env)
    assert len(good) == 8
    good_set = write_set(good, tmp_path / "good.csv")
    # the same texts, each credited with another row's concept: everything is wrong
    bad_set = write_set([SourceTargets(r.source_code, r.source_vocab, r.source_text, good[(i + 1) % len(good)].targets,
                                       source_domain=r.source_domain) for i, r in enumerate(good)],
                        tmp_path / "bad.csv")
    runs = tmp_path / "runs"
    r = invoke(env, "bench", "run", str(good_set), "--reranker", "none", "--out", str(runs), "--gate", "dev",
               "--no-progress")
    assert r.exit_code == 0, r.output
    assert "gate dev passed" in r.output
    res = json.loads((runs / "good.none.json").read_text())
    assert res["rows"] == 8 and res["overall"]["top1"] == 1.0 and res["overall"]["recall"] == 1.0
    assert res["overall"]["mrr"] == 1.0 and res["rows_per_s"] > 0 and "llm" not in res
    assert res["same_name_rows"] == 8 and res["overall_excluding_same_name"]["n"] == 0
    assert res["per_vocab"]["TEST"]["n"] == 8 and sum(a["n"] for a in res["per_domain"].values()) == 8
    row = res["rows_detail"][0]
    assert row["hit1"] and row["top5"][0] == row["targets"][0] and 0 < row["confidence"] <= 1
    assert "| **overall** | 8 | 1.000 | 1.000 | 1.000 | 1.000 |" in (runs / "good.none.md").read_text()
    # nothing was persisted
    with psycopg.connect(env["HARMONIA_DATABASE_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM harmonia.concept_map").fetchone()[0] == 0

    r = invoke(env, "bench", "run", str(bad_set), "--reranker", "none", "--out", str(runs), "--gate", "hard",
               "--no-progress", "--max-rows", "5")
    assert r.exit_code == 3
    assert "gate hard FAILED" in r.output and "top-1 0.000 < 0.50" in r.output and "top-5" in r.output
    bad_res = json.loads((runs / "bad.none.json").read_text())
    assert bad_res["rows"] == 5 and bad_res["overall"]["top1"] == 0.0
    assert bad_res["same_name_rows"] == 0 and bad_res["overall_excluding_same_name"]["n"] == 5
    r = invoke(env, "bench", "run", str(good_set), "--exclude-same-name", "--no-progress")
    assert r.exit_code == 1 and "no rows to run" in r.output
    # the same run with gates lowered in configuration passes
    lowered = {**env, "HARMONIA_BENCH_GATE_HARD_TOP1": "0", "HARMONIA_BENCH_GATE_HARD_TOP5": "0"}
    assert invoke(lowered, "bench", "run", str(bad_set), "--out", str(runs), "--gate", "hard",
                  "--no-progress").exit_code == 0

    # calibration: 8 rows are too few to fit a calibrator; a clear error, nothing stored
    r = invoke(env, "bench", "calibrate", str(runs / "good.none.json"), "--target", "0.98")
    assert r.exit_code == 1 and "too few to fit a calibrator" in r.output


def test_calibrate_stores_the_calibrator_and_per_kind_thresholds(env: dict[str, str], tmp_path: Path) -> None:
    good = _exact_name_rows(env, 40)
    # diagnosis-kind rows (ICD10): 40 right, 20 credited with another row's concept (wrong); and a local set
    rows = [SourceTargets(f"D{i}", "ICD10", r.source_text, r.targets if i < 40 else good[(i + 1) % 40].targets,
                          source_domain=r.source_domain) for i, r in enumerate(good + good[:20])]
    rows += [SourceTargets(f"L{i}", "local", r.source_text, r.targets) for i, r in enumerate(good[:10])]
    runs = tmp_path / "runs"
    r = invoke(env, "bench", "run", str(write_set(rows, tmp_path / "mix.dev.csv")), "--reranker", "none", "--out",
               str(runs), "--no-progress")
    assert r.exit_code == 0, r.output
    res = json.loads((runs / "mix.dev.none.json").read_text())
    assert all(x["reason"] == "uncalibrated" and x["action"] == "review" for x in res["rows_detail"])
    assert res["rows_detail"][0]["calibration"]["kind"] == "diagnosis"
    assert set(res["rows_detail"][0]["calibration"]["evidence"]) >= {"sem1", "exact_name", "agree_lex"}
    r = invoke(env, "bench", "calibrate", str(runs / "mix.dev.none.json"), "--no-write")
    assert r.exit_code == 0, r.output
    assert not (Path(env["HARMONIA_DATA_DIR"]) / "calibration" / "none.json").exists()
    r = invoke(env, "bench", "calibrate", str(runs / "mix.dev.none.json"), "--check", str(runs / "mix.dev.none.json"))
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    # 60 diagnosis rows cannot certify 0.98 (149 right rows at least); the local set is never calibrated as a kind
    assert "| diagnosis | 60 | none |" in out and "too few calibration rows" in out
    assert "unknown: 10 rows of sets without a declared kind" in out
    assert "mix.dev.none.json, diagnosis: 0 of 60 auto-approved" in out
    cal = json.loads((Path(env["HARMONIA_DATA_DIR"]) / "calibration" / "none.json").read_text())
    doc = json.loads((runs / "mix.dev.none.calibration.json").read_text())
    assert doc["calibrator"]["hash"] == cal["hash"] and doc["kinds"]["diagnosis"]["choice"]["threshold"] is None
    assert (runs / "mix.dev.none.diagnosis.calibration.png").read_bytes()[:4] == b"\x89PNG"
    with psycopg.connect(env["HARMONIA_DATABASE_URL"]) as conn:
        stored = cal_store.thresholds_for(conn, "none", cal["hash"])
    assert [(t.kind, t.source_vocab, t.threshold, t.calibration_rows, t.origin) for t in stored] == [
        ("diagnosis", "", None, 60, "bench")]


def test_run_rejects_bad_input(env: dict[str, str], tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text("source_code,source_vocab,source_text,target_concept_ids\nA,V,fever,\n")
    r = invoke(env, "bench", "run", str(p), "--no-progress")
    assert r.exit_code == 1 and "line 2: empty target_concept_ids" in r.output
    r = invoke(env, "bench", "run", str(p), "--gate", "easy")
    assert r.exit_code == 1 and "--gate 'easy'" in r.output
    r = invoke(env, "bench", "calibrate", str(p))
    assert r.exit_code == 1 and "cannot read a bench run result" in r.output


# ------------------------------------------------------------------------------------------- the LLM cache


@pytest.fixture
def llm_stub(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[dict[str, str], Any]]:
    """The real LLM reranker and SDK client, talking to a local stub server in Anthropic's wire format that ranks
    the first retrieved candidate first."""
    from tests.llm_stubs import AnthropicStub, good_input, user_payload

    stub = AnthropicStub(("fn", lambda req: ("tool", good_input([user_payload(req)[1][0]["id"]], 0.9))))
    key = tmp_path / "key.txt"
    key.write_text("sk-test-not-a-real-key\n")
    yield {**env, "HARMONIA_LLM_PROVIDER": "anthropic", "HARMONIA_LLM_BASE_URL": stub.base_url,
           "HARMONIA_LLM_API_KEY_FILE": str(key), "HARMONIA_LLM_MAX_RETRIES": "0"}, stub
    stub.close()


def test_llm_run_is_cached_and_no_cache_asks_again(env: dict[str, str], tmp_path: Path,
                                                   llm_stub: tuple[dict[str, str], Any]) -> None:
    llm_env, stub = llm_stub
    rows = _exact_name_rows(env, 4)
    path = write_set(rows, tmp_path / "llm.csv")
    runs = tmp_path / "runs"
    args = ["bench", "run", str(path), "--reranker", "llm", "--out", str(runs), "--no-progress", "--concurrency", "2"]
    r = invoke(llm_env, *args)
    assert r.exit_code == 0, r.output
    first = json.loads((runs / "llm.llm.json").read_text())
    assert len(stub.requests) == 4
    u = first["llm"]
    assert u["calls"] == 4 and u["rows_from_cache"] == 0
    assert (u["input_tokens"], u["output_tokens"]) == (4 * 1500, 4 * 120)  # the stub's reported usage
    assert u["cost_per_1k_rows"] == pytest.approx((1500 * 3.0 + 120 * 15.0) / 1e6 * 1000)
    assert first["overall"]["top1"] == 1.0 and "LLM anthropic/" in (runs / "llm.llm.md").read_text()
    # a re-run costs nothing: every row comes from the cache, with the same answers
    r = invoke(llm_env, *args)
    assert r.exit_code == 0, r.output
    again = json.loads((runs / "llm.llm.json").read_text())
    assert len(stub.requests) == 4
    assert again["llm"]["rows_from_cache"] == 4 and again["llm"]["calls"] == 0 and again["llm"]["cost"] == 0
    assert [x["top5"] for x in again["rows_detail"]] == [x["top5"] for x in first["rows_detail"]]
    # --no-cache asks the provider again
    r = invoke(llm_env, *args, "--no-cache")
    assert r.exit_code == 0, r.output
    assert len(stub.requests) == 8
    assert json.loads((runs / "llm.llm.json").read_text())["llm"]["rows_from_cache"] == 0


def test_csv_columns_are_documented_ones(tmp_path: Path) -> None:
    path = write_set([SourceTargets("A", "V", "t", [2, 3], source_concept_id=1, source_domain="D",
                                    target_names=["x", "y"], same_name=False)], tmp_path / "x.csv")
    with open(path, newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row == {"source_concept_id": "1", "source_code": "A", "source_vocab": "V", "source_text": "t",
                   "source_domain": "D", "target_concept_ids": "2;3", "target_names": "x;y", "same_name": "0"}
