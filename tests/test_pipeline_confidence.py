"""The calibrator (evidence -> P(first choice right)) and the certified thresholds, on synthetic evidence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from harmonia.domain import Candidate, RankedCandidate, RerankResult, SourceTerm
from harmonia.pipeline import confidence
from harmonia.pipeline.thresholds import choose_threshold, cp_lower, min_rows_for


def synthetic(n: int, seed: int = 0) -> tuple[list[dict[str, float]], list[bool], list[str]]:
    """Rows whose truth is a logistic function of agreement, similarity and name match; one useless feature
    (log_len) and one whose naive weight would come out negative (mem_code: anti-correlated here by design)."""
    rng = np.random.default_rng(seed)
    rows, ok, kinds = [], [], []
    for _ in range(n):
        agree = rng.integers(0, 2, 3)
        sem = rng.uniform(0.4, 1.0)
        exact = float(rng.random() < 0.15)
        z = -6.0 + 7.0 * sem + 1.2 * agree.sum() + 2.5 * exact
        right = bool(rng.random() < 1 / (1 + math.exp(-z)))
        rows.append({"sem1": sem, "sem_margin": rng.normal(0.05, 0.02), "agree_vec": float(agree[0]),
                     "agree_lex": float(agree[1]), "agree_mem": float(agree[2]), "exact_name": exact,
                     "log_len": rng.uniform(2, 4), "mem_code": float(not right and rng.random() < 0.5),
                     "domain_fit": 1.0, "lex1": sem * 0.8, "mem_share": float(agree[2]), "margin": 0.1})
        ok.append(right)
        kinds.append("diagnosis" if rng.random() < 0.7 else "labs")
    return rows, ok, kinds


def test_bounds_and_rows_needed() -> None:
    assert min_rows_for(0.98) == 149 and min_rows_for(0.95) == 59
    assert cp_lower(149, 149) >= 0.98 > cp_lower(148, 148)
    assert cp_lower(0, 10) == 0.0 and cp_lower(5, 10) < 0.5 < cp_lower(9, 10)


def test_more_agreement_gives_a_higher_probability_and_signs_hold() -> None:
    rows, ok, kinds = synthetic(3000)
    cal = confidence.fit(rows, ok, kinds, "none")
    # mem_code is anti-correlated with being right in this data: a signed feature with the wrong sign is dropped
    assert "mem_code" not in cal.features and "sem1" in cal.features
    for f, w in zip(cal.features, cal.coef, strict=True):
        assert w * confidence.EVIDENCE[f] >= 0, f
    base = {"sem1": 0.8, "sem_margin": 0.05, "agree_vec": 0.0, "agree_lex": 0.0, "agree_mem": 0.0,
            "exact_name": 0.0, "log_len": 3.0, "mem_code": 0.0, "domain_fit": 1.0, "lex1": 0.64, "mem_share": 0.0,
            "margin": 0.1}
    p = [cal.probability(base | {k: 1.0 for k in ("agree_vec", "agree_lex", "agree_mem")[:n]}, "diagnosis")
         for n in range(4)]
    assert p == sorted(p) and p[3] - p[0] > 0.2
    # monotone in the similarity: a grid never goes down
    grid = [cal.probability(base | {"sem1": s}, "diagnosis") for s in np.linspace(0.3, 1.0, 15)]
    assert all(b >= a for a, b in zip(grid, grid[1:], strict=False))
    # an unseen kind gets the baseline, not an error
    assert 0.0 < cal.probability(base, "never-seen") < 1.0


def test_calibrator_is_plain_json_with_a_stable_hash(tmp_path: Path) -> None:
    rows, ok, kinds = synthetic(800, seed=1)
    cal = confidence.fit(rows, ok, kinds, "classifier")
    path = confidence.save(cal, tmp_path)
    assert path == tmp_path / "calibration" / "classifier.json"
    doc = json.loads(path.read_text())
    assert doc["hash"] == cal.hash and doc["type"] == "logistic"
    again = confidence.load(tmp_path, "classifier")
    assert again is not None and again.hash == cal.hash
    assert np.allclose(again.probabilities(rows[:50], kinds[:50]), cal.probabilities(rows[:50], kinds[:50]))
    assert confidence.load(tmp_path, "llm") is None
    doc["coef"] = doc["coef"][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(confidence.CalibratorError, match="differ in length"):
        confidence.load(tmp_path, "classifier")
    # a refit on other rows is another calibrator: another hash
    rows2, ok2, kinds2 = synthetic(800, seed=2)
    assert confidence.fit(rows2, ok2, kinds2, "classifier").hash != cal.hash


def test_a_well_covered_kind_gets_a_model_of_its_own(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    # Diagnoses: the margin decides. Labs (many rows too): the margin says nothing, the name match decides. One
    # shared weight per feature blurs both; a model per kind ranks each kind's rows by what matters there.
    rng = np.random.default_rng(11)
    rows, ok, kinds = [], [], []
    for i in range(3000):
        kind = "diagnosis" if i % 3 else "labs"
        margin, exact = rng.uniform(0, 1), float(rng.random() < 0.5)
        z = (8 * margin - 4) if kind == "diagnosis" else (4 * exact - 2)
        rows.append({"margin": margin, "exact_name": exact, "sem1": rng.uniform(0.5, 1)})
        ok.append(bool(rng.random() < 1 / (1 + math.exp(-z))))
        kinds.append(kind)
    rows += [{"margin": rng.uniform(0, 1), "exact_name": 0.0, "sem1": 0.7} for _ in range(60)]
    ok += [bool(rng.random() < 0.5) for _ in range(60)]
    kinds += ["drugs"] * 60  # too few rows for a model of its own
    cal = confidence.fit(rows, ok, kinds, "none")
    shared = confidence.fit(rows, ok, kinds, "none", own_kinds=False)
    assert sorted(cal.own) == ["diagnosis", "labs"] and not shared.own
    diag = [i for i, k in enumerate(kinds) if k == "diagnosis"]
    y = [ok[i] for i in diag]
    auc_own = roc_auc_score(y, cal.probabilities([rows[i] for i in diag], ["diagnosis"] * len(diag)))
    auc_shared = roc_auc_score(y, shared.probabilities([rows[i] for i in diag], ["diagnosis"] * len(diag)))
    assert auc_own > auc_shared + 0.02, (auc_own, auc_shared)
    # a kind without its own model is scored by the pooled one, exactly as without per-kind models
    drugs = [rows[i] for i, k in enumerate(kinds) if k == "drugs"]
    pooled_only = confidence.Calibrator.from_json({**cal.to_json(), "own": {}})
    assert np.allclose(cal.probabilities(drugs, ["drugs"] * 60), pooled_only.probabilities(drugs, ["drugs"] * 60))
    # stored as plain JSON with the per-kind models inside; they are part of the hash
    again = confidence.load(tmp_path, "none") if confidence.save(cal, tmp_path) else None
    assert again is not None and again.hash == cal.hash and sorted(again.own) == ["diagnosis", "labs"]
    assert np.allclose(again.probabilities(rows[:90], kinds[:90]), cal.probabilities(rows[:90], kinds[:90]))
    assert shared.hash != cal.hash


def test_cross_fit_scores_each_source_without_itself() -> None:
    rows, ok, kinds = synthetic(600, seed=3)
    # a feature that memorises the label: in-sample it would look perfect; out of fold it cannot, because the
    # row's own group never trains the model that scores it (each source appears twice, once per row)
    groups = [f"s{i // 2}" for i in range(600)]
    oof = confidence.cross_fit(rows, ok, kinds, groups, "none", folds=5)
    assert oof.shape == (600,) and ((oof > 0) & (oof < 1)).all()
    in_sample = confidence.fit(rows, ok, kinds, "none").probabilities(rows, kinds)
    assert not np.allclose(oof, in_sample)
    with pytest.raises(ValueError, match="all 3 rows are right"):
        confidence.fit(rows[:3], [True] * 3, kinds[:3], "none")


def test_fewer_calibration_rows_give_a_higher_threshold_or_none() -> None:
    rng = np.random.default_rng(7)
    conf = rng.beta(5, 1.2, 20000)
    right = rng.random(20000) < conf  # calibrated: P(right) = confidence
    big = choose_threshold(conf, right, target=0.95)
    mid = choose_threshold(conf[:2000], right[:2000], target=0.95)
    small = choose_threshold(conf[:300], right[:300], target=0.95)
    tiny = choose_threshold(conf[:50], right[:50], target=0.95)
    assert big.threshold is not None
    assert mid.threshold is None or mid.threshold >= big.threshold
    assert small.threshold is None or small.threshold >= (mid.threshold or big.threshold)
    assert tiny.threshold is None and "too few calibration rows" in tiny.reason  # 59 rows needed at best
    for c in (big, mid):
        if c.threshold is None:
            continue
        assert c.bound >= 0.95 and c.correct / c.rows >= c.bound
        sel = conf[:c.calibration_rows] >= c.threshold
        assert c.rows == int(sel.sum()) and c.coverage == pytest.approx(sel.mean())
    # the bound's promise on fresh rows from the same source
    fresh_conf = rng.beta(5, 1.2, 50000)
    fresh_right = rng.random(50000) < fresh_conf
    assert big.threshold is not None
    assert fresh_right[fresh_conf >= big.threshold].mean() >= 0.95


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    # 1000 confident rows all right, then 300 at lower confidence all wrong, then 600 all right at even lower
    # confidence: a scan for the lowest passing threshold over the pooled rows would end below the bad block
    # (1600 of 1900 right is not enough there, but a looser target would); the fixed sequence stops in it.
    conf = np.concatenate([np.linspace(0.999, 0.99, 1000), np.linspace(0.989, 0.98, 300),
                           np.linspace(0.979, 0.9, 600)])
    right = np.concatenate([np.ones(1000), np.zeros(300), np.ones(600)]).astype(bool)
    c = choose_threshold(conf, right, target=0.98)
    assert c.threshold is not None and 0.98 < c.threshold <= 0.99 and 1000 <= c.rows < 1030
    assert c.bound >= 0.98 and c.correct == 1000
    # a calibrator that promises more than it delivers at the start of the sequence certifies nothing
    bad = choose_threshold(conf, ~right, target=0.98)
    assert bad.threshold is None and "lower bound below 0.98" in bad.reason


def test_the_walk_starts_above_where_an_overconfident_calibrator_would_fail() -> None:
    # 600 rows the calibrator calls near-certain, 8 errors among the first 644 but only 3 among the first 494: read
    # at face value the probabilities start the walk at 644 rows (bound 0.978, nothing certified); with their
    # errors doubled the start is higher, passes, and the walk goes down from there.
    conf = np.concatenate([np.linspace(0.99995, 0.995, 600), np.linspace(0.995, 0.5, 2400)])
    right = np.ones(3000, dtype=bool)
    right[[100, 250, 400]] = False
    right[500:505] = False
    right[700:] = np.arange(2300) % 3 > 0
    face_value = choose_threshold(conf, right, target=0.98, start_error_factor=1.0)
    assert face_value.threshold is None and "636 of 644 right" in face_value.reason
    c = choose_threshold(conf, right, target=0.98)
    assert c.threshold is not None and c.bound >= 0.98 and 479 <= c.rows < 500 and c.rows - c.correct == 3


def test_evidence_of_a_decision() -> None:
    term = SourceTerm("E11.9", "ICD10", "Type 2 diabetes mellitus")
    cands = [Candidate(1, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "1", 0.9,
                       scores={"semantic": 0.95, "vector": 0.95, "lexical": 1.0, "memory_votes": 2.0,
                               "memory_code": 0.75}),
             Candidate(2, "Diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "2", 0.7,
                       scores={"semantic": 0.85, "vector": 0.85, "lexical": 0.6, "memory_votes": 1.0}),
             Candidate(3, "Glucose measurement", "Measurement", "LOINC", "Lab Test", "3", 0.5,
                       scores={"semantic": 0.6, "vector": 0.6, "lexical": 0.2})]
    res = RerankResult([RankedCandidate(1, 0.9), RankedCandidate(2, 0.7)], 0.95, "none")
    ev = confidence.evidence(term, cands, res, ("Condition",))
    assert ev is not None
    assert ev["exact_name"] == 1.0 and ev["agree_vec"] == ev["agree_lex"] == ev["agree_mem"] == 1.0
    assert ev["sem_margin"] == pytest.approx(0.1) and ev["mem_share"] == pytest.approx(2 / 3)
    assert ev["mem_code"] == 0.75 and ev["domain_fit"] == 1.0 and ev["log_ret_rank"] == 0.0
    # the reranker chose the third candidate: no agreement, wrong domain, low retrieval rank
    ev3 = confidence.evidence(term, cands, RerankResult([RankedCandidate(3, 0.99)], 0.99, "llm"), ("Condition",))
    assert ev3 is not None and ev3["domain_fit"] == 0.0 and ev3["agree_vec"] == 0.0
    assert ev3["log_ret_rank"] == pytest.approx(math.log(3)) and ev3["raw_logit"] > 4
    assert ev["text_agree"] == ev["text_conflict"] == 0.0  # a diagnosis carries no specimen or strength
    # a lab name's hints: the first choice agrees on specimen and scale, contradicts the property
    lab = Candidate(4, "Potassium [Moles/volume] in Serum or Plasma", "Measurement", "LOINC", "Lab Test", "4", 0.8,
                    scores={"semantic": 0.8, "lab_system": 1.0, "lab_scale": 1.0, "lab_property": -1.0,
                            "lab_timing": 0.0})
    ev_lab = confidence.evidence(SourceTerm("K", "LAB", "P -Kalium"), [lab], RerankResult(
        [RankedCandidate(4, 0.8)], 0.8, "none"), ("Measurement",))
    assert ev_lab is not None and ev_lab["text_agree"] == 2.0 and ev_lab["text_conflict"] == 1.0
    # nothing to vouch for: no first choice, or one that is not a candidate
    assert confidence.evidence(term, cands, RerankResult([], 0.0, "none", no_match=True)) is None
    assert confidence.evidence(term, cands, RerankResult([RankedCandidate(99, 1.0)], 1.0, "llm")) is None


def test_review_sample_is_stratified_and_self_weighting_above_the_floor() -> None:
    from harmonia.pipeline.thresholds import fit_from_sample, review_sample

    rng = np.random.default_rng(11)
    conf = rng.beta(4, 1.5, 5000)
    d = review_sample(conf, 200, seed=3)
    assert len(d.high) == 170 and len(d.low) == 30 and not set(d.high) & set(d.low)
    assert all(conf[i] >= d.floor for i in d.high) and all(conf[i] < d.floor for i in d.low)
    assert d.floor == pytest.approx(np.quantile(conf, 0.5))
    # a small set: everything of a stratum, the spare rows go to the other
    small = review_sample(conf[:100], 200, seed=3)
    assert len(small.high) + len(small.low) == 100
    # the same seed, the same sample
    assert review_sample(conf, 200, seed=3) == d
    # a set whose upper half is near-certain (confidence 0.97-1.0, right 99.6% of the time): 170 reviewed rows
    # certify a threshold at 0.95; the coverage is counted over the whole set
    conf = np.where(conf >= d.floor, rng.uniform(0.97, 1.0, 5000), conf)
    right = np.where(conf >= d.floor, rng.random(5000) < 0.996, rng.random(5000) < 0.5)
    c = fit_from_sample(conf[d.high], right[d.high], conf, d.floor, target=0.95)
    assert c.threshold is not None and c.threshold >= d.floor and c.bound >= 0.95
    assert c.coverage == pytest.approx((conf >= c.threshold).mean()) and c.calibration_rows == 5000
    # 0.98 needs at least 149 right rows above the threshold: with 170 reviewed, only if nearly all are right
    strict = fit_from_sample(conf[d.high], np.zeros(170, bool), conf, d.floor)
    assert strict.threshold is None
