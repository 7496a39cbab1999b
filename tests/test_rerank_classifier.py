"""The classifier reranker: tiny training runs on the real sample vocabulary, the checkpoint, the calibration, the
pipeline with reranker=classifier, and review decisions as training pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

from harmonia.config import Settings
from harmonia.domain import SourceTerm
from harmonia.groundtruth import part_of
from harmonia.rerank import make_reranker
from harmonia.rerank.classifier.checkpoint import Calibration, CheckpointError, checkpoint_from_settings
from harmonia.rerank.classifier.reranker import ClassifierReranker
from harmonia.rerank.classifier.scorer import PairScorer, candidate_text, resolve_dtype
from harmonia.rerank.classifier.train import TrainOptions, dev_sources, load_material, review_examples, train
from harmonia.store import concepts as concept_store
from tests.conftest import calibrate_as_is, make_settings

TINY = dict(max_sources=12, batch_size=8, learning_rate=3e-4, layers=2, hard_negatives=1, hard_top=1,
            random_negatives=1, max_positives=1, holdout=0.0, max_length=40, save_every=10, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def tiny_run(template_db: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    """One tiny training run (reads only; the connection is closed before other tests copy the template)."""
    data = tmp_path_factory.mktemp("clf")
    s = make_settings(template_db, data)
    with psycopg.connect(template_db, autocommit=True) as conn:
        report = train(conn, s, TrainOptions(max_steps=30, epochs=0, **TINY), progress=False)
    return s, report.run_dir


@pytest.mark.slow
def test_tiny_run_writes_a_loadable_checkpoint_that_ranks_true_pairs_first(tiny_run: tuple[Settings, Path]) -> None:
    s, run_dir = tiny_run
    assert checkpoint_from_settings(s) == run_dir.resolve()  # `latest` points at it
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["steps"] == 30 and card["data"]["positive"] > 0 and card["checkpoint_hash"]
    assert not (run_dir / "state").exists()
    material = load_material(run_dir / "pairs.jsonl.gz")
    scorer = PairScorer(run_dir / "model", max_length=40)
    pos = [e for e in material.train if e.kind == "positive"]
    rnd = {e.source: e for e in material.train if e.kind == "random"}
    pairs = [(p, rnd[p.source]) for p in pos if p.source in rnd]
    assert len(pairs) >= 8
    p_true = scorer.probs([p.query for p, _ in pairs], [p.doc for p, _ in pairs])
    p_rand = scorer.probs([r.query for _, r in pairs], [r.doc for _, r in pairs])
    assert (p_true > p_rand).mean() >= 0.9, (p_true, p_rand)


@pytest.mark.slow
def test_bfloat16_scoring_matches_float32(tiny_run: tuple[Settings, Path]) -> None:
    _, run_dir = tiny_run
    material = load_material(run_dir / "pairs.jsonl.gz")
    q, d = [e.query for e in material.train[:40]], [e.doc for e in material.train[:40]]
    f32 = PairScorer(run_dir / "model", max_length=40, dtype="float32").logits(q, d)
    b16 = PairScorer(run_dir / "model", max_length=40, dtype="bfloat16")
    assert b16.dtype == "bfloat16"
    z = b16.logits(q, d)
    assert z.dtype == np.float32 and np.abs(z - f32).max() < 0.1 * max(1.0, float(np.abs(f32).max()))
    assert np.corrcoef(z, f32)[0, 1] > 0.99


def test_dtype_setting_is_resolved_or_refused() -> None:
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="classifier_dtype"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.slow
def test_no_test_part_source_in_training_pairs(conn: psycopg.Connection, tiny_run: tuple[Settings, Path]) -> None:
    _, run_dir = tiny_run
    material = load_material(run_dir / "pairs.jsonl.gz")
    sources = {int(e.source) for e in material.train if e.kind in ("positive", "hard", "random")}
    assert sources and all(part_of(sid) == "dev" for sid in sources)
    # and the whole development pool the trainer draws from holds no test source, though the sample has them
    from harmonia.store import vocab as vocab_store

    all_sources = {e.source_concept_id for e in vocab_store.maps_to_edges(conn, ["ICD10"])}
    dev = dev_sources(conn, ["ICD10"])
    assert any(part_of(sid) == "test" for sid in all_sources)
    assert dev and set(dev) < all_sources and all(part_of(sid) == "dev" for sid in dev)
    # the checkpoint says which sources it learnt from, so a calibration can leave them out
    trained = ClassifierReranker(run_dir).trained_sources
    pool = dev_sources(conn)  # training drew from every vocabulary's development part
    assert trained == {f"{pool[sid].source_vocab}:{pool[sid].source_code}" for sid in sources}


@pytest.mark.slow
def test_a_checkpoint_used_on_another_retrieval_than_it_learnt_says_so(
        tiny_run: tuple[Settings, Path], caplog: pytest.LogCaptureFixture) -> None:
    s, run_dir = tiny_run
    learnt = json.loads((run_dir / "model_card.json").read_text())["retrieval_mode"]
    assert learnt == s.retrieval.mode
    other = "hybrid" if learnt != "hybrid" else "vector"
    for mode, warned in ((learnt, False), (other, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="harmonia.rerank.classifier.reranker"):
            r = ClassifierReranker.from_settings(make_settings(s.database.url, s.data_path, reranker="classifier",
                                                               classifier_checkpoint=str(run_dir),
                                                               retrieval_mode=mode))
        assert r.retrieval_mode == learnt
        assert (f"trained on {learnt} retrieval, this run retrieves with {mode}" in caplog.text) is warned


def test_calibration_is_monotone_into_unit_interval() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 400)
    correct = rng.uniform(0, 1, 400) < p ** 2
    cal = Calibration.fit(p, correct)
    assert cal.method == "isotonic"
    grid = np.linspace(-0.5, 1.5, 501)
    out = cal(grid)
    assert np.all(out >= 0) and np.all(out <= 1) and np.all(np.diff(out) >= -1e-12)
    assert cal(0.05) < 0.2 < 0.7 < cal(0.97)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.allclose(back(grid), out)
    assert Calibration.fit([0.9] * 30, [True] * 30).method == "identity"  # one outcome: nothing to fit
    with pytest.raises(CheckpointError):
        Calibration.from_dict({"x": [0.5, 0.1], "y": [0.1, 0.2]})


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    s = make_settings("postgresql://unused", tmp_path, reranker="classifier")
    with pytest.raises(CheckpointError, match="reranker train"):
        make_reranker(s)


@pytest.mark.slow
def test_pipeline_with_classifier_routes_and_persists(conn: psycopg.Connection, settings: Settings,
                                                     tiny_run: tuple[Settings, Path]) -> None:
    from harmonia.pipeline.confidence import Calibration
    from harmonia.pipeline.run import MapSummary, Pipeline, map_terms
    from harmonia.store import vocab as vocab_store

    _, run_dir = tiny_run
    s = make_settings(settings.database.url, settings.data_path, reranker="classifier",
                      classifier_checkpoint=str(run_dir), auto_approve_threshold=0.0, classifier_kinds=["*"])
    test_sources = {e.source_concept_id: e for e in vocab_store.maps_to_edges(conn, ["ICD10"])
                    if part_of(e.source_concept_id) == "test"}
    rows = list(test_sources.values())
    terms = [SourceTerm(source_code=r.source_code, source_vocab=r.source_vocab, source_text=r.source_text)
             for r in rows[:6]]
    pipe = Pipeline.from_settings(conn, s)
    assert isinstance(pipe.reranker, ClassifierReranker)
    assert pipe.reranker.kinds is pipe.kinds  # one registry of source kinds, kept fresh by the pipeline
    # calibrated as it is, threshold 0: every first choice approved
    calibrate_as_is(conn, s.data_path, "classifier", pipe.reranker.model_version, threshold=0.0)
    pipe.calibration = Calibration.load(conn, s.data_path, "classifier", pipe.reranker.model_version)
    summary = map_terms(conn, pipe, terms, summary=MapSummary(input_rows=len(terms)), progress=False)
    assert summary.approved == len(terms) and summary.reconciles
    stored = conn.execute("SELECT model_version, candidate_ranking_json, confidence FROM harmonia.concept_map"
                          ).fetchall()
    assert len(stored) == len(terms)
    for mv, ranking, conf in stored:
        assert mv == f"{pipe.reranker.model_version}+cal:{pipe.calibration.hash}" and mv.startswith("classifier:")
        assert 1 <= len(ranking["ranked"]) <= s.rerank.top_n and 0 <= conf <= 1
        scores = [r["score"] for r in ranking["ranked"]]
        assert scores == sorted(scores, reverse=True)
    # other codes with an unreachable floor go to review instead, with the ranking attached
    s2 = make_settings(settings.database.url, settings.data_path, reranker="classifier",
                       classifier_checkpoint=str(run_dir), auto_approve_threshold=1.0)
    terms2 = [SourceTerm(source_code=r.source_code, source_vocab=r.source_vocab, source_text=r.source_text)
              for r in rows[6:9]]
    summary2 = map_terms(conn, Pipeline.from_settings(conn, s2), terms2, progress=False)
    assert summary2.review == len(terms2)
    q = conn.execute("SELECT model_version, reason, jsonb_array_length(candidates_json) FROM harmonia.review_queue"
                     ).fetchall()
    assert len(q) == len(terms2)
    assert all(mv.startswith("classifier:") and reason == "low_confidence" and n >= 1 for mv, reason, n in q)


@pytest.mark.slow
def test_rerank_many_batches_across_items_and_records_the_checkpoint(tiny_run: tuple[Settings, Path]) -> None:
    from harmonia.domain import Candidate

    _, run_dir = tiny_run
    rr = ClassifierReranker(run_dir, top_n=2, batch_size=3)
    cands = [Candidate(i, f"concept {i}", "Condition", "SNOMED", "Clinical Finding", str(i), 0.5) for i in range(5)]
    out = rr.rerank_many([(SourceTerm("A", "X", "fever"), cands), (SourceTerm("B", "X", "cough"), cands[:1]),
                          (SourceTerm("C", "X", "nothing"), [])])
    assert [len(r.ranked) for r in out] == [2, 1, 0]
    assert out[2].no_match and out[0].details["checkpoint"] == str(run_dir.resolve())
    assert out[0].model_version == f"classifier:{out[0].details['checkpoint_hash']}"


@pytest.mark.slow
def test_review_decisions_become_pairs(conn: psycopg.Connection, settings: Settings) -> None:
    rows = concept_store.standard_concepts(conn, ["SNOMED"])[:3]
    good, rejected, other = rows
    conn.execute("""INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id,
                        confidence, decided_by) VALUES ('L1', 'LOCAL', 'my local lab name', %s, 1, 'reviewer'),
                        ('L2', 'LOCAL', 'auto approved text', %s, 0.99, 'auto')""", (good.concept_id, other.concept_id))
    conn.execute("""INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, old_concept_id,
                        new_concept_id) VALUES ('L1', 'LOCAL', 'correct', %s, %s)""",
                 (rejected.concept_id, good.concept_id))
    ex = review_examples(conn)
    assert [(e.query, e.doc, e.label, e.kind) for e in ex] == [
        ("my local lab name", candidate_text(good), 1.0, "review_positive"),
        ("my local lab name", candidate_text(rejected), 0.0, "review_negative")]
    # they reach the next training run's pairs
    s = make_settings(settings.database.url, settings.data_path)
    opts = TrainOptions(max_steps=1, epochs=0, **{**TINY, "max_sources": 2})
    report = train(conn, s, opts, progress=False)
    kinds = [e.kind for e in load_material(report.run_dir / "pairs.jsonl.gz").train]
    assert kinds.count("review_positive") == 1 and kinds.count("review_negative") == 1


def test_review_decision_on_a_test_part_vocabulary_source_is_left_out(conn: psycopg.Connection) -> None:
    from harmonia.store import vocab as vocab_store

    e = next(e for e in vocab_store.maps_to_edges(conn, ["ICD10"]) if part_of(e.source_concept_id) == "test")
    target = e.target_concept_id
    conn.execute("""INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id,
                        decided_by) VALUES (%s, %s, %s, %s, 'reviewer')""",
                 (e.source_code, e.source_vocab, e.source_text, target))
    assert review_examples(conn) == []
    # an external code of the test part ("vocab:code" key, as the benchmark keys the lab set) is left out too
    conn.execute("""INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id,
                        decided_by) VALUES ('L3', 'LOCAL', 'a test-part local code', %s, 'reviewer')""", (target,))
    assert part_of("LOCAL:L3") == "test" and review_examples(conn) == []


@pytest.mark.slow
def test_resume_continues_from_saved_state(conn: psycopg.Connection, settings: Settings, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    s = make_settings(settings.database.url, settings.data_path)
    out = tmp_path / "run"
    opts = TrainOptions(max_steps=12, epochs=0, **{**TINY, "max_sources": 4, "save_every": 5})
    # Interrupt after the state at step 10 is saved: fail the 11th optimizer step.
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train(conn, s, opts, out=out, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    st = torch.load(out / "state" / "trainer.pt", weights_only=False)
    assert st["step"] == 10 and not (out / "model_card.json").exists()
    report = train(conn, s, TrainOptions(), out=out, resume=True, progress=False)
    assert report.run_dir == out and report.resumed_from == 10 and report.steps == 12
    assert json.loads((out / "model_card.json").read_text())["resumed_from_step"] == 10


def test_training_picks_the_retrieval_weight_that_maximises_held_out_mrr() -> None:
    from harmonia.rerank.classifier.train import evaluate

    class Scorer:  # a cross-encoder that slightly prefers the wrong candidate
        def logits(self, queries: list[str], docs: list[str]) -> np.ndarray:
            return np.array([1.0 if "wrong" in d else 0.0 for d in docs])

    holdout = {1: {"text": "q", "targets": [10], "candidates": [(11, "wrong", 0.5), (10, "right", 0.9)]}}
    ev = evaluate(Scorer(), holdout)  # type: ignore[arg-type]  # a duck-typed stand-in scorer
    # 0.4 * w > 1 first holds at w = 5 in the grid; larger weights tie, and ties go to the smaller one
    assert ev.retrieval_weight == 5.0 and ev.right == [True] and 0 < ev.top_p[0] < 1
    m = ev.metrics
    assert m["cross_encoder_top1"] == 0.0 and m["fused_top1"] == 1.0 and m["none_top1"] == 0
    assert ev.stacker is None and m["classifier_top1"] == m["fused_top1"]  # one source: too few for a stacker


def _holdout_where_memory_votes_decide(n: int, seed: int = 0) -> dict[int, dict]:
    """Sources whose target is the candidate most remembered sources vote for, at a random retrieval rank, with a
    similarity that does not tell it apart."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(n):
        right = int(rng.integers(10))
        cands = []
        for i in range(10):
            votes = 3.0 if i == right else float(rng.integers(0, 2))
            cands.append((s * 100 + i, f"concept {i}", float(rng.uniform(0.5, 0.9)),
                          {"vector": float(rng.uniform(0.5, 0.9)), "memory_votes": votes * 0.8,
                           "memory_count": votes, "memory_rank": 1.0 if votes else 0.0}))
        out[s] = {"text": f"source {s}", "targets": [s * 100 + right], "candidates": cands}
    return out


def test_the_stacker_learns_the_retrievers_evidence_out_of_fold() -> None:
    from harmonia.rerank.classifier.stacker import Stacker
    from harmonia.rerank.classifier.train import evaluate

    class Scorer:  # a cross-encoder that knows nothing
        def logits(self, queries: list[str], docs: list[str]) -> np.ndarray:
            return np.zeros(len(docs))

    ev = evaluate(Scorer(), _holdout_where_memory_votes_decide(80))  # type: ignore[arg-type]  # stand-in
    m = ev.metrics
    assert ev.stacker is not None and m["sources"] == 80
    assert m["none_top1"] < 0.3 and m["cross_encoder_top1"] < 0.3
    assert m["classifier_top1"] >= 0.9  # out of fold: each source ranked by a stacker that never saw it
    assert len(ev.top_p) == 80 and sum(ev.right) == round(m["classifier_top1"] * 80)
    # Stored as JSON numbers and read back, it scores the same.
    again = Stacker.from_dict(json.loads(json.dumps(ev.stacker.to_dict())))
    x = np.random.default_rng(1).normal(size=(7, len(again.features)))
    assert np.allclose(again.logits(x), ev.stacker.logits(x))


def test_a_kind_is_ranked_only_where_its_held_out_sources_show_a_gain() -> None:
    from harmonia.rerank.classifier.trust import KindTrust

    rng = np.random.default_rng(3)
    kinds, none_right, clf_right = [], [], []
    for kind, n, p_none, p_clf in (("diagnosis", 200, 0.70, 0.80), ("labs", 200, 0.62, 0.62),
                                    ("drugs", 12, 0.2, 0.9), ("admission", 150, 0.40, 0.35)):
        for _ in range(n):
            kinds.append(kind)
            a = bool(rng.random() < p_none)
            none_right.append(a)
            # mostly the same first choice; where they differ the better ranker tends to be right
            clf_right.append(a if rng.random() < 0.6 else bool(rng.random() < p_clf))
    t = KindTrust.fit(kinds, none_right, clf_right)
    assert t.trusted_kinds == ["diagnosis"], t.to_dict()
    assert not t.ranks("labs") and not t.ranks("drugs")  # no gain; too few sources to tell
    assert not t.ranks("admission") and not t.ranks("unknown")  # a loss; never seen
    f = t.figures["diagnosis"]
    assert f.wins > f.losses and f.p_value < 0.05 and f.sources == 200
    again = KindTrust.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again.trusted_kinds == ["diagnosis"] and (again.figures["labs"].wins, again.figures["labs"].losses) == (
        t.figures["labs"].wins, t.figures["labs"].losses)
    assert KindTrust.from_dict(t.to_dict(), configured=["labs"]).ranks("labs")
    assert KindTrust.from_dict(t.to_dict(), configured=["*"]).ranks("admission")
    assert KindTrust().trusted_kinds == [] and not KindTrust().ranks("diagnosis")  # nothing held out: no kind


def test_evaluation_trusts_the_kinds_the_stacker_ranks_better_out_of_fold() -> None:
    from harmonia.rerank.classifier.train import evaluate

    class Scorer:  # a cross-encoder that knows nothing: the stacker learns the memory's votes
        def logits(self, queries: list[str], docs: list[str]) -> np.ndarray:
            return np.zeros(len(docs))

    holdout = _holdout_where_memory_votes_decide(120)
    for sid, src in holdout.items():
        src["kind"] = "diagnosis" if sid % 2 else "labs"
    for sid in [s for s in holdout if s % 2 == 0]:  # labs: the target is retrieval's first and gets no votes
        src = holdout[sid]
        cands = [(cid, text, 0.95 if cid == src["targets"][0] else sim, {**sc, "memory_votes": 0.0,
                  "memory_count": 0.0, "memory_rank": 0.0}) for cid, text, sim, sc in src["candidates"]]
        src["candidates"] = sorted(cands, key=lambda c: -c[2])
    ev = evaluate(Scorer(), holdout)  # type: ignore[arg-type]  # a duck-typed stand-in scorer
    assert ev.trust.ranks("diagnosis"), ev.trust.to_dict()
    assert not ev.trust.ranks("labs"), ev.trust.to_dict()  # retrieval order is already right there


def test_a_stacker_for_other_features_is_refused() -> None:
    from harmonia.rerank.classifier.stacker import FEATURES, Stacker, StackerError

    good = Stacker(list(FEATURES), np.zeros(len(FEATURES)), np.ones(len(FEATURES)),
                   [np.ones((len(FEATURES), 1))], [np.zeros(1)]).to_dict()
    Stacker.from_dict(good)
    with pytest.raises(StackerError, match="do not match"):
        Stacker.from_dict({**good, "features": ["logit", *FEATURES[1:]]})
    with pytest.raises(StackerError, match="do not fit"):
        Stacker.from_dict({**good, "weights": [np.ones((3, 1)).tolist()]})


def _copy_of(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(run_dir, ck)
    return ck


def _memory_only_stacker(ck: Path) -> list:
    """Give the checkpoint a stacker that only listens to the memory's votes; three candidates where the votes and
    retrieval order disagree (retrieval: 0, 1, 2; votes: 1, 2, 0)."""
    from harmonia.domain import Candidate
    from harmonia.rerank.classifier.stacker import FEATURES, Stacker

    w = np.zeros((len(FEATURES), 1))
    w[FEATURES.index("memory_votes"), 0] = 5.0
    (ck / "stacker.json").write_text(json.dumps(Stacker(list(FEATURES), np.zeros(len(FEATURES)),
                                                        np.ones(len(FEATURES)), [w], [np.zeros(1)]).to_dict()))
    return [Candidate(i, name, "Condition", "SNOMED", "Clinical Finding", str(i), sim,
                      scores={"vector": sim, "memory_votes": votes, "memory_count": votes})
            for i, (name, sim, votes) in enumerate([("Fever", 0.9, 0.0), ("Asthma", 0.5, 2.0),
                                                    ("Fracture of femur", 0.2, 1.0)])]


@pytest.mark.slow
def test_checkpoint_stacker_ranks_by_the_memory_votes(tiny_run: tuple[Settings, Path], tmp_path: Path) -> None:
    ck = _copy_of(tiny_run[1], tmp_path)
    before = ClassifierReranker(ck).model_version
    cands = _memory_only_stacker(ck)
    (ck / "model_card.json").unlink()  # the hash is then computed, and covers the stacker
    r = ClassifierReranker(ck, top_n=3, rank_kinds=["*"])
    out = r.rerank(SourceTerm("A", "X", "fever"), cands)
    assert [c.concept_id for c in out.ranked] == [1, 2, 0] and out.details["stacker"] is True
    assert "2 similar mapped sources map here" in out.ranked[0].rationale
    assert r.model_version != before
    (ck / "stacker.json").write_text("{}")
    with pytest.raises(CheckpointError, match="stacker.json"):
        ClassifierReranker(ck)


@pytest.mark.slow
def test_a_kind_the_checkpoint_was_not_validated_on_keeps_retrieval_order(tiny_run: tuple[Settings, Path],
                                                                         tmp_path: Path) -> None:
    from harmonia.kinds import KindRegistry
    from harmonia.rerank.classifier.trust import KindTrust

    ck = _copy_of(tiny_run[1], tmp_path)
    (ck / "model_card.json").unlink()  # the hash is computed, and covers kinds.json
    cands = _memory_only_stacker(ck)
    trust = KindTrust.fit(["diagnosis"] * 40 + ["labs"] * 40, [False] * 80, [True] * 40 + [False] * 40)
    (ck / "kinds.json").write_text(json.dumps(trust.to_dict()))
    kinds = KindRegistry()
    kinds.configured["LOCAL_LAB"] = kinds.kind_named("labs")
    r = ClassifierReranker(ck, top_n=3, kinds=kinds)
    diag = r.rerank(SourceTerm("R50.9", "ICD10", "fever"), cands)
    assert [c.concept_id for c in diag.ranked] == [1, 2, 0] and diag.details["ranked_by"] == "classifier"
    lab = r.rerank(SourceTerm("K1", "LOCAL_LAB", "fever"), cands)
    assert [c.concept_id for c in lab.ranked] == [0, 1, 2] and lab.details["ranked_by"] == "retrieval order"
    assert "not validated on kind labs" in lab.ranked[0].rationale
    assert lab.ranked[1].score > lab.ranked[0].score  # its probabilities are kept for the calibrator
    assert ClassifierReranker(ck, top_n=3, kinds=kinds, rank_kinds=["labs"]).rerank(
        SourceTerm("K1", "LOCAL_LAB", "fever"), cands).ranked[0].concept_id == 1
    before = r.model_version
    (ck / "kinds.json").write_text(json.dumps(KindTrust.fit(["labs"] * 40, [False] * 40, [True] * 40).to_dict()))
    assert ClassifierReranker(ck).model_version != before  # which kinds it ranks is part of model_version


@pytest.mark.slow
def test_checkpoint_retrieval_weight_is_applied_when_reranking(tiny_run: tuple[Settings, Path],
                                                               tmp_path: Path) -> None:
    from harmonia.domain import Candidate

    ck = _copy_of(tiny_run[1], tmp_path)
    cands = [Candidate(i, name, "Condition", "SNOMED", "Clinical Finding", str(i), sim)
             for i, (name, sim) in enumerate([("Fracture of femur", 0.2), ("Fever", 0.9), ("Asthma", 0.5)])]
    term = SourceTerm("A", "X", "fever")
    cal = json.loads((ck / "calibration.json").read_text())
    (ck / "calibration.json").write_text(json.dumps({**cal, "retrieval_weight": 1000.0}))
    heavy = ClassifierReranker(ck, top_n=3, rank_kinds=["*"]).rerank(term, cands)
    assert [r.concept_id for r in heavy.ranked] == [1, 2, 0]  # the retrieval score decides
    assert heavy.details["retrieval_weight"] == 1000.0
    (ck / "calibration.json").write_text(json.dumps({**cal, "retrieval_weight": 0.0}))
    alone = ClassifierReranker(ck, top_n=3, rank_kinds=["*"])
    p = alone.scorer.probs([term.source_text] * 3, [candidate_text(c) for c in cands])
    assert [r.concept_id for r in alone.rerank(term, cands).ranked] == list(np.argsort(-p, kind="stable"))


def test_listwise_loss_rewards_the_positive_ranked_first() -> None:
    import torch

    from harmonia.rerank.classifier.train import listwise_loss

    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    sources = ["a", "a", "a", "b", "b"]
    good = listwise_loss(torch.tensor([3.0, 0.0, 0.0, 2.0, -1.0]), labels, sources)
    bad = listwise_loss(torch.tensor([0.0, 3.0, 0.0, -1.0, 2.0]), labels, sources)
    assert 0 < float(good) < float(bad)
    # a source without a negative (or a positive) in the batch adds nothing
    assert float(listwise_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), ["c", "c"])) == 0.0


def test_grouped_order_keeps_each_source_together_and_follows_the_seed() -> None:
    from harmonia.rerank.classifier.train import Example, grouped_order

    ex = [Example("q", "d", 1.0 if i % 3 == 0 else 0.0, f"s{i // 3}", "positive") for i in range(30)]
    order = grouped_order(ex, 5)
    assert sorted(order.tolist()) == list(range(30))
    sources = [ex[i].source for i in order]
    assert sum(1 for j, s in enumerate(sources) if j == 0 or sources[j - 1] != s) == 10  # one run per source
    assert (grouped_order(ex, 5) == order).all() and not (grouped_order(ex, 6) == order).all()


def _lab_file(tmp: Path, name: str, n: int = 60) -> tuple[Path, list]:
    """The first n rows of the bundled lab Usagi set, written as a new file `name` (its set name is its source
    vocabulary)."""
    import csv
    import gzip

    from harmonia.paths import sample_dir

    src = sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz"
    with gzip.open(src, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, [r for _, r in zip(range(n), reader, strict=False)]
    path = tmp / name
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path, rows


def test_mapping_file_rows_train_as_their_kind_sees_them(conn: psycopg.Connection, settings: Settings,
                                                          tmp_path: Path) -> None:
    """`reranker train --pairs-from FILE --pairs-kind labs`: the file's development-part rows become pairs, with the
    query text the pipeline gives a lab name and negatives from the kind's domains; no test-part row is used."""
    from harmonia.rerank.classifier.train import TrainError, build_material

    path, rows = _lab_file(tmp_path, "mylabs.usagi.csv")
    opts = TrainOptions(**{**TINY, "max_sources": 0, "holdout": 0.3}, source_vocabularies=["NO_SUCH_VOCAB"],
                        pairs_from=[str(path)], pairs_kind="labs", include_reviews=False)
    m = build_material(conn, settings, opts, progress=False)
    dev = {r["sourceCode"] for r in rows if part_of(f"mylabs:{r['sourceCode']}") == "dev"}
    test = {r["sourceCode"] for r in rows} - dev
    assert dev and test
    trained = {k.split(":", 1)[1] for k in m.trained_keys}
    held = {v["text"] for v in m.holdout.values()}
    assert trained and held and trained <= dev and not trained & test
    assert m.counts["file_sources"] == len(trained) + len(m.holdout) <= len(dev)
    # each row is trained on as the pipeline shows a lab name: "S -Albumin" as "Albumin in Serum"
    from harmonia.kinds import BUILTIN_KINDS
    from harmonia.text import query_text

    views = {query_text(SourceTerm(r["sourceCode"], "mylabs", r["sourceName"]), BUILTIN_KINDS["labs"])
             for r in rows if r["sourceCode"] in dev}
    queries = {e.query for e in m.train} | held
    assert queries <= views and "Albumin in Serum" in queries
    assert not any(q.startswith(("P -", "S -", "U -")) for q in queries)
    # negatives come from the labs kind's domain, as at run time
    hard = [e for e in m.train if e.kind == "hard"]
    assert hard and all("| Measurement |" in e.doc for e in hard)
    assert all(m.holdout[s]["candidates"] for s in m.holdout)
    # a file whose kind nobody declared is refused, naming it
    with pytest.raises(TrainError, match="mylabs.*unknown"):
        build_material(conn, settings, TrainOptions(**{**TINY, "max_sources": 0}, source_vocabularies=["NONE"],
                                                    pairs_from=[str(path)]), progress=False)
