"""The benchmark's pure parts: curation, usage/cost, calibration, gates (no database needed)."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest

from harmonia.config import BenchmarkSettings, LLMSettings
from harmonia.domain import MapsToEdge
from harmonia.evaluation.calibrate import (
    CalibrationError,
    CoveragePoint,
    calibrate_runs,
    check_run,
    plot,
    precision_coverage,
    reliability,
)
from harmonia.evaluation.curate import curate_maps_to, curate_usagi, split_balanced
from harmonia.evaluation.run import check_gate, markdown, usage_summary
from harmonia.groundtruth import group_edges, part_of, read_usagi_truth

# ------------------------------------------------------------------------------------------------ curation


def _pairs(n_icd: int = 300, n_other: int = 40) -> list[MapsToEdge]:
    """Synthetic 'Maps to' edges: every 7th ICD10 source has two targets."""
    out: list[tuple[int, str, str, str, str, int]] = []
    for i in range(n_icd):
        sid = 1000 + i
        out.append((sid, f"A{i:03d}", "ICD10", f"disease {i}", "Condition", 5000 + i))
        if i % 7 == 0:
            out.append((sid, f"A{i:03d}", "ICD10", f"disease {i}", "Condition", 9000 + i))
    for i in range(n_other):
        out.append((2000 + i, f"L{i}", "LAB", f"lab {i}", "Measurement", 6000 + i))
    return [MapsToEdge(*p) for p in out]


def test_split_no_source_in_both_parts_and_follows_the_shared_rule() -> None:
    rows = group_edges(_pairs())
    parts = split_balanced(rows, seed=5, per_vocab=None)
    dev = {r.source_concept_id for r in parts["dev"]}
    test = {r.source_concept_id for r in parts["test"]}
    assert not dev & test
    assert len(dev) + len(test) == len(rows)
    assert all(part_of(r.source_concept_id, 5) == "test" for r in parts["test"])
    assert all(part_of(r.source_concept_id, 5) == "dev" for r in parts["dev"])
    # another seed gives another split; the same seed the same one
    assert {r.source_concept_id for r in split_balanced(rows, seed=6, per_vocab=None)["test"]} != test
    assert [r.source_concept_id for r in split_balanced(rows, seed=5, per_vocab=None)["test"]] == \
        [r.source_concept_id for r in parts["test"]]


def test_split_is_balanced_per_source_vocabulary() -> None:
    rows = group_edges(_pairs(300, 40))
    parts = split_balanced(rows, seed=1, per_vocab=25)
    for p in ("dev", "test"):
        vocabs = [r.source_vocab for r in parts[p]]
        assert vocabs.count("ICD10") == 25
        assert vocabs.count("LAB") == min(25, sum(part_of(2000 + i, 1) == p for i in range(40))) > 0
    # a bigger sample only adds rows (a source never changes part)
    big = split_balanced(rows, seed=1, per_vocab=60)
    assert {r.source_concept_id for r in parts["test"]} <= {r.source_concept_id for r in big["test"]} | \
        {r.source_concept_id for r in big["dev"]}
    assert not {r.source_concept_id for r in parts["test"]} & {r.source_concept_id for r in big["dev"]}


def test_same_name_sources_are_counted_separately() -> None:
    pairs = [MapsToEdge(1, "X1", "ICD10", "Asthma", "Condition", 10),
             MapsToEdge(2, "X2", "ICD10", "Gout  of knee", "Condition", 11),
             MapsToEdge(3, "X3", "ICD10", "Something else", "Condition", 12)]
    cs = curate_maps_to(pairs, {10: "asthma", 11: "Gout of knee", 12: "Other"}, seed=3, per_vocab=None)
    rows = cs.parts["dev"] + cs.parts["test"]
    assert sorted(r.source_code for r in rows if r.same_name) == ["X1", "X2"]
    assert cs.summary["dev"]["same_name"] + cs.summary["test"]["same_name"] == 2
    assert cs.summary["sources_available"] == 3


def _usagi(tmp_path: Path, text: str, gz: bool = True) -> Path:
    p = tmp_path / ("lab.usagi.csv.gz" if gz else "lab.usagi.csv")
    data = text.encode()
    p.write_bytes(gzip.compress(data) if gz else data)
    return p


USAGI = """sourceCode,sourceName,sourceFrequency,conceptId,conceptName,domainId,mappingStatus
1,P -Sodium,10,3000001,Sodium,Measurement,APPROVED
1,P -Sodium,10,3000002,Sodium in blood,Measurement,APPROVED
2,B -Hemoglobin,5,3000003,Hemoglobin,Measurement,APPROVED
3,U -Thing,1,3000004,Thing,Measurement,UNCHECKED
4,X -Unmapped,1,0,,Measurement,APPROVED
5,fP -Gone,1,3999999,Gone,Measurement,APPROVED
"""


def test_usagi_truth_groups_per_code_and_keeps_approved_only(tmp_path: Path) -> None:
    rows = read_usagi_truth(_usagi(tmp_path, USAGI))
    by_code = {r.source_code: r for r in rows}
    assert set(by_code) == {"1", "2", "5"}  # 3 not approved, 4 mapped to 0
    assert by_code["1"].targets == [3000001, 3000002]
    assert by_code["1"].source_vocab == "lab"  # named after the file
    assert by_code["1"].split_key == "lab:1"
    assert by_code["2"].source_domain == "Measurement"
    cs = curate_usagi(_usagi(tmp_path, USAGI), {3000001: "Sodium", 3000002: "Sodium in blood",
                                                3000003: "Hemoglobin"}, seed=2, per_vocab=None)
    kept = cs.parts["dev"] + cs.parts["test"]
    assert {r.source_code for r in kept} == {"1", "2"}
    assert cs.summary["rows_dropped_no_valid_target"] == 1 and cs.summary["targets_dropped_not_in_vocabulary"] == 1
    for r in kept:
        assert r in cs.parts[part_of(f"lab:{r.source_code}", 2)]


def test_usage_summary_excludes_cache_hits_from_cost() -> None:
    s = LLMSettings(price_input_per_mtok=3.0, price_output_per_mtok=15.0)
    usages = [{"input_tokens": 1000, "output_tokens": 100, "calls": 1},
              {"input_tokens": 3000, "output_tokens": 300, "calls": 1},
              {"input_tokens": 1000, "output_tokens": 100, "cache_hit": True, "calls": 0},
              {}]
    u = usage_summary(usages, 4, s)
    assert u["rows_from_cache"] == 1
    assert (u["input_tokens"], u["output_tokens"]) == (4000, 400)
    assert u["cost"] == pytest.approx((4000 * 3 + 400 * 15) / 1e6)
    assert u["cost_per_1k_rows"] == pytest.approx(u["cost"] * 250)
    assert u["input_tokens_per_1k_rows"] == 1_000_000


def _result(top1: float, top5: float) -> dict:
    agg = {"n": 10, "top1": top1, "top5": top5, "mrr": 0.5, "recall": 0.9}
    return {"set": "s.csv", "reranker": "none", "model_version": "none", "rows": 10, "rows_per_s": 5.0,
            "retrieval_top_k": 50, "overall": agg, "per_vocab": {"ICD10": agg}, "per_domain": {"Condition": agg}}


def test_gates() -> None:
    s = BenchmarkSettings()
    assert check_gate(_result(0.60, 0.85), "dev", s) == []
    failed = check_gate(_result(0.59, 0.90), "dev", s)
    assert len(failed) == 1 and "top-1 0.590 < 0.60" in failed[0]
    assert len(check_gate(_result(0.55, 0.80), "dev", s)) == 2
    assert check_gate(_result(0.55, 0.80), "hard", s) == []
    assert "top-5" in check_gate(_result(0.55, 0.70), "hard", s)[0]
    assert check_gate(_result(0.9, 0.9), "dev", BenchmarkSettings(gate_dev_top1=0.95)) != []
    with pytest.raises(ValueError, match="unknown gate"):
        check_gate(_result(1, 1), "easy", s)
    md = markdown(_result(0.5, 0.8))
    assert "| **overall** | 10 | 0.500 | 0.800 | 0.500 | 0.900 |" in md and "vocab ICD10" in md


# --------------------------------------------------------------------------------------------- calibration


def test_precision_coverage_on_synthetic_scores(tmp_path: Path) -> None:
    # 20 rows at confidences 0.05..1.00; the top 8 (>= 0.65) are all right, then 1 in 2 are right below.
    conf = [round(0.05 * i, 2) for i in range(1, 21)]
    ok = [c >= 0.65 or i % 2 == 0 for i, c in enumerate(conf)]
    points = precision_coverage(conf, ok, total=25)  # 5 more rows never approvable (errors, no match)
    assert [p.threshold for p in points] == sorted(conf)
    by_t = {p.threshold: p for p in points}
    assert by_t[0.65].approved == 8 and by_t[0.65].precision == 1.0 and by_t[0.65].share == pytest.approx(8 / 25)
    assert by_t[0.6].precision == pytest.approx(8 / 9)
    for p in points:
        expected = sum(o for c, o in zip(conf, ok, strict=True) if c >= p.threshold) / sum(c >= p.threshold
                                                                                           for c in conf)
        assert p.precision == pytest.approx(expected)
    rel = reliability(conf, ok)
    assert sum(b["n"] for b in rel) == 20 and rel[-1]["accuracy"] == 1.0
    png = plot(points, rel, CoveragePoint(0.65, 8, 8 / 25, 1.0), 0.98, tmp_path / "cal.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(n: int, vocab: str, kind: str, seed: int, version: str = "none") -> dict:
    """A `bench run` result whose rows carry evidence: the first choice is right when it is an exact name match
    or (otherwise) with a probability rising with its similarity."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sem = float(rng.uniform(0.5, 1.0))
        exact = float(rng.random() < 0.3)
        right = bool(exact or rng.random() < (sem - 0.5) * 1.6)
        ev = {"sem1": sem, "sem_margin": 0.05, "exact_name": exact, "agree_vec": 1.0, "domain_fit": 1.0,
              "log_len": math.log1p(10 + i % 30)}
        rows.append({"source_code": f"{vocab}{i}", "source_vocab": vocab, "hit1": right, "top5": [1],
                     "reason": "uncalibrated", "confidence": sem,
                     "calibration": {"kind": kind, "evidence": ev, "raw_confidence": sem}})
    rows.append({"source_code": "ERR", "source_vocab": vocab, "hit1": False, "top5": [1], "reason": "provider_error",
                 "confidence": 0.99, "calibration": {"kind": kind}})  # a fault: never approvable, no evidence
    return {"set": f"{vocab}.dev.csv", "reranker": "none", "model_version": version, "rows_detail": rows}


def test_calibrate_runs_per_kind_and_never_the_unknown_kind() -> None:
    runs = [_run(3000, "ICD10", "diagnosis", 1), _run(300, "local", "unknown", 2)]
    cal = calibrate_runs(runs, target=0.98)
    assert cal.reranker_version == "none" and set(cal.kinds) == {"diagnosis"} and "unknown" in cal.skipped
    d = cal.kinds["diagnosis"]
    assert d.rows == 3001 and d.approvable == 3000  # the fault counts in the coverage, never as approvable
    # the longest text of each kind, the text_too_long guard's yardstick
    assert cal.calibrator.fitted_on["text_len"] == {"diagnosis": 39, "unknown": 39}
    c = d.choice
    assert c.threshold is not None and c.bound >= 0.98 and c.rows >= 149
    stored = {t.kind: t for t in cal.stored()}
    assert stored["diagnosis"].threshold == c.threshold and stored["diagnosis"].calibrator_hash == \
        cal.calibrator.hash and stored["diagnosis"].coverage == pytest.approx(c.rows / 3001)
    # on fresh rows of the same kind the calibration approves with at least the target's precision
    check = check_run(_run(3000, "ICD10", "diagnosis", 9), cal.calibrator, {"diagnosis": c.threshold})
    assert check["diagnosis"]["approved"] > 300
    assert check["diagnosis"]["right"] / check["diagnosis"]["approved"] >= 0.97
    # fewer rows: a higher threshold or none
    small = calibrate_runs([_run(400, "ICD10", "diagnosis", 1)], target=0.98).kinds["diagnosis"].choice
    assert small.threshold is None or small.threshold >= c.threshold
    # runs of different reranker versions, or without evidence, are refused
    with pytest.raises(CalibrationError, match="different rerankers"):
        calibrate_runs([_run(100, "ICD10", "diagnosis", 1), _run(100, "ICD10", "diagnosis", 2, "llm:x")])
    old = _run(100, "ICD10", "diagnosis", 1)
    del old["rows_detail"][5]["calibration"]
    with pytest.raises(CalibrationError, match="row 6 has no evidence"):
        calibrate_runs([old])




def test_calibration_leaves_out_the_rows_the_reranker_trained_on() -> None:
    """A classifier is surer of its own training sources than of new codes: rows it trained on must not calibrate
    it. Here its training rows are all right at any confidence; left in, they would certify a lower threshold."""
    fresh = _run(1500, "ICD10", "diagnosis", 3, "classifier:abc")
    trained = _run(1500, "ICD10T", "diagnosis", 4, "classifier:abc")
    for r in trained["rows_detail"][:-1]:
        r["hit1"], r["trained_on"] = True, True
    fresh["reranker_training_sources"] = trained["reranker_training_sources"] = 1500
    alone = calibrate_runs([fresh], target=0.98)
    both = calibrate_runs([fresh, trained], target=0.98)
    assert both.calibrator.fitted_on["left_out_trained_on"] == 1500 and "trained_on" in both.skipped
    assert both.calibrator.fitted_on["rows"] == alone.calibrator.fitted_on["rows"] == 1500
    assert alone.kinds["diagnosis"].choice.threshold is not None
    assert both.kinds["diagnosis"].choice.threshold == alone.kinds["diagnosis"].choice.threshold
    # and what the same rows would have done had they been kept: a different (looser) calibration
    for r in trained["rows_detail"]:
        r.pop("trained_on", None)
    naive = calibrate_runs([fresh, trained], target=0.98)
    assert naive.calibrator.fitted_on["rows"] == 3000
    # a checkpoint that does not say what it trained on cannot be calibrated at all
    fresh["reranker_training_sources"] = "unknown"
    with pytest.raises(CalibrationError, match="does not record its training sources"):
        calibrate_runs([fresh])
