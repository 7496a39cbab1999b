"""Calibrating a new source set from reviews, against the real embedded PostgreSQL: the stratified sample heads the
review queue, reviewers' verdicts (through the review service) certify the set's threshold, the pending decisions
above it are approved with a history entry naming the calibration, and the page's API reports the progress."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from harmonia.cli import app as cli_app
from harmonia.config import Settings
from harmonia.pipeline import review_calibration as rc
from harmonia.review import service as svc
from harmonia.review.api import create_app
from harmonia.store import calibration as cal_store
from harmonia.store import mapping
from harmonia.store import review as review_store
from harmonia.store import users as user_store
from tests.test_review_api import auth, concepts_like

VOCAB = "lab-site"
VERSION = "none+cal:abc123def456"


def seed_set(conn: psycopg.Connection, n: int = 400) -> dict[str, float]:
    """n pending decisions of a new local set, confidences spread over 0.5..1.0, each with two real candidates."""
    cands = concepts_like(conn, "%diabetes%", n=2)
    conf = {}
    with conn.transaction():
        for i in range(n):
            c = round(0.5 + 0.5 * ((i * 37) % n) / n, 4)
            ranking = [{**x, "similarity": 0.8, "score": 0.9 - k / 10, "rationale": "r"} for k, x in enumerate(cands)]
            mapping.enqueue_review(conn, f"L{i:03d}", VOCAB, f"local code {i}", 1, {}, ranking, c, VERSION,
                                   "uncalibrated", None)
            conf[f"L{i:03d}"] = c
    return conf


def judge(conn: psycopg.Connection, reviewer: int, wrong: set[str] = frozenset()) -> None:  # type: ignore[assignment]  # never mutated
    """A reviewer goes through the sample in queue order: keeps the first choice, or picks the second for `wrong`."""
    total, items = review_store.list_items(conn, source_vocab=VOCAB, limit=500)
    sampled = {r.source_code for r in cal_store.sample_with_verdicts(conn, VOCAB)}
    for it in items[:len(sampled)]:
        assert it["source_code"] in sampled  # the sample heads the queue
        svc.decide(conn, it["id"], reviewer, "approve", rank=2 if it["source_code"] in wrong else 1)


@pytest.fixture
def reviewer(conn: psycopg.Connection) -> int:
    user_store.add_user(conn, "rev", "reviewer")
    return conn.execute("SELECT id FROM harmonia.users WHERE name = 'rev'").fetchone()[0]


def test_sample_then_fit_approves_the_pending_decisions_above_the_threshold(
        conn: psycopg.Connection, settings: Settings, reviewer: int) -> None:
    conf = seed_set(conn)
    with pytest.raises(rc.ReviewCalibrationError, match="no review sample"):
        rc.fit(conn, VOCAB)
    rep = rc.sample(conn, VOCAB, 200, seed=1)
    assert (rep.pending, rep.sampled_high, rep.sampled_low, rep.model_version) == (400, 170, 30, VERSION)
    rows = cal_store.sample_with_verdicts(conn, VOCAB)
    assert len(rows) == 200 and all(r.verdict is None for r in rows)
    assert all(r.confidence >= rep.floor for r in rows if r.stratum == "high")
    assert all(r.confidence < rep.floor for r in rows if r.stratum == "low")
    with pytest.raises(rc.ReviewCalibrationError, match="0 of the 170 upper-stratum decisions"):
        rc.fit(conn, VOCAB)
    # the page's API: progress before any verdict
    with TestClient(create_app(settings)) as client:
        token = user_store.add_user(conn, "reader1", "reader")[1]
        p = client.get("/api/calibration", params={"source_vocab": VOCAB}, headers=auth(token)).json()
        assert (p["sampled"], p["judged"], p["high"], p["needed"], p["calibrated_at"]) == (200, 0, 170, 149, None)

    # every upper-stratum first choice is right, every lower one wrong
    low = {r.source_code for r in rows if r.stratum == "low"}
    judge(conn, reviewer, wrong=low)
    rows = cal_store.sample_with_verdicts(conn, VOCAB)
    assert all(r.verdict is (r.stratum == "high") for r in rows)
    r = rc.fit(conn, VOCAB, target=0.98)
    assert r.threshold is not None and r.threshold >= rep.floor and r.bound >= 0.98 and r.rows_behind >= 149
    sampled = {x.source_code for x in rows}
    expected = {c for c, v in conf.items() if v >= r.threshold and c not in sampled}
    assert r.approved == len(expected) > 0
    mapped = dict(conn.execute("SELECT source_code, decided_by FROM harmonia.concept_map WHERE source_vocab = %s",
                               (VOCAB,)).fetchall())
    assert {c for c, by in mapped.items() if by == "auto"} == expected
    notes = conn.execute("SELECT DISTINCT note FROM harmonia.concept_map_history WHERE action = 'auto_approve' "
                         "AND source_vocab = %s", (VOCAB,)).fetchall()
    assert len(notes) == 1 and notes[0][0].startswith(f"calibration #{r.calibration_id} from reviews of {VOCAB}")
    # below the threshold: still waiting for a person
    left = {x["source_code"] for x in review_store.list_items(conn, source_vocab=VOCAB, limit=500)[1]}
    assert left == {c for c, v in conf.items() if v < r.threshold and c not in sampled}
    # stored for the set, tied to the decisions' reranker version and calibrator: routing uses it from now on
    stored = cal_store.thresholds_for(conn, "none", "abc123def456")
    assert [(t.kind, t.source_vocab, t.origin, t.threshold) for t in stored] == [
        ("unknown", VOCAB, "reviews", r.threshold)]
    p = rc.progress(conn, VOCAB)
    assert (p.judged, p.high_judged, p.high_right, p.threshold) == (200, 170, 170, r.threshold)


def test_too_many_wrong_verdicts_certify_nothing_and_approve_nothing(conn: psycopg.Connection,
                                                                     reviewer: int) -> None:
    seed_set(conn)
    rc.sample(conn, VOCAB, 200, seed=2)
    rows = cal_store.sample_with_verdicts(conn, VOCAB)
    high = sorted((r for r in rows if r.stratum == "high"), key=lambda r: -r.confidence)
    judge(conn, reviewer, wrong={r.source_code for r in high[::15]})  # 12 of 170 wrong, spread over the stratum
    r = rc.fit(conn, VOCAB, target=0.98)
    assert r.threshold is None and r.approved == 0
    assert conn.execute("SELECT count(*) FROM harmonia.concept_map WHERE decided_by = 'auto'").fetchone()[0] == 0
    assert [t.threshold for t in cal_store.thresholds_for(conn, "none", "abc123def456")] == [None]


def test_calibrate_cli_sample_status_fit(fresh_db: str, tmp_path, conn: psycopg.Connection, reviewer: int) -> None:
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}

    def cli(*args: str):
        return CliRunner().invoke(cli_app, ["--database-url", fresh_db, "calibrate", *args], env=env)

    r = cli("sample", "--source-vocab", VOCAB)
    assert r.exit_code == 1 and "no pending decision of 'lab-site'" in r.output
    seed_set(conn, 300)
    r = cli("sample", "--source-vocab", VOCAB, "--n", "200", "--seed", "4")
    assert r.exit_code == 0, r.output
    assert "200 of 300 pending decisions" in " ".join(r.output.split())
    r = cli("fit", "--source-vocab", VOCAB)
    assert r.exit_code == 1 and "needs at least 149" in " ".join(r.output.split())
    judge(conn, reviewer)
    r = cli("status", "--source-vocab", VOCAB, "--json")
    assert r.exit_code == 0 and '"high_judged": 150' in r.output  # the whole upper half of 300
    r = cli("fit", "--source-vocab", VOCAB, "--no-approve")
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "threshold" in out and "0 pending decisions approved" in out
    # a decision made without a calibrator cannot be calibrated from reviews
    mapping.enqueue_review(conn, "X1", "raw-set", "x", 1, {}, [{"concept_id": 1, "concept_name": "x"}], 0.9,
                           "none", "uncalibrated", None)
    r = cli("sample", "--source-vocab", "raw-set")
    assert r.exit_code == 1 and "carry no calibrator" in r.output
