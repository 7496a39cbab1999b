"""SQL for calibrated auto-approval thresholds (harmonia.calibration_threshold, migration 085)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg


@dataclass
class StoredThreshold:
    """One calibration: for a reranker version and calibrator, the threshold of a kind (source_vocab '') or of one
    source set. threshold None: calibrated, but no threshold is certified (approves nothing)."""

    reranker_version: str
    calibrator_hash: str
    kind: str
    source_vocab: str
    threshold: float | None
    target: float
    alpha: float
    bound: float | None
    rows_behind: int
    rows_correct: int
    coverage: float | None
    calibration_rows: int
    method: str
    origin: str                       # bench | reviews
    details: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    created_at: datetime | None = None


_COLS = ("reranker_version, calibrator_hash, kind, source_vocab, threshold, target, alpha, bound, rows_behind, "
         "rows_correct, coverage, calibration_rows, method, origin, details, id, created_at")


def _row(r: tuple[Any, ...]) -> StoredThreshold:
    return StoredThreshold(reranker_version=r[0], calibrator_hash=r[1], kind=r[2], source_vocab=r[3],
                           threshold=r[4], target=r[5], alpha=r[6], bound=r[7], rows_behind=r[8],
                           rows_correct=r[9], coverage=r[10], calibration_rows=r[11], method=r[12], origin=r[13],
                           details=dict(r[14] or {}), id=r[15], created_at=r[16])


def save_threshold(conn: psycopg.Connection, t: StoredThreshold) -> int:
    """Insert or replace the calibration of (reranker_version, calibrator_hash, kind, source_vocab); the caller
    owns the transaction."""
    row = conn.execute(
        """INSERT INTO harmonia.calibration_threshold (reranker_version, calibrator_hash, kind, source_vocab,
               threshold, target, alpha, bound, rows_behind, rows_correct, coverage, calibration_rows, method,
               origin, details)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (reranker_version, calibrator_hash, kind, source_vocab) DO UPDATE SET
               threshold = EXCLUDED.threshold, target = EXCLUDED.target, alpha = EXCLUDED.alpha,
               bound = EXCLUDED.bound, rows_behind = EXCLUDED.rows_behind, rows_correct = EXCLUDED.rows_correct,
               coverage = EXCLUDED.coverage, calibration_rows = EXCLUDED.calibration_rows,
               method = EXCLUDED.method, origin = EXCLUDED.origin, details = EXCLUDED.details, created_at = now()
           RETURNING id""",
        (t.reranker_version, t.calibrator_hash, t.kind, t.source_vocab, t.threshold, t.target, t.alpha, t.bound,
         t.rows_behind, t.rows_correct, t.coverage, t.calibration_rows, t.method, t.origin,
         json.dumps(t.details))).fetchone()
    assert row is not None
    return int(row[0])


def thresholds_for(conn: psycopg.Connection, reranker_version: str, calibrator_hash: str) -> list[StoredThreshold]:
    """Every calibration valid for this reranker version and calibrator (the others are stale)."""
    rows = conn.execute(
        f"""SELECT {_COLS} FROM harmonia.calibration_threshold
            WHERE reranker_version = %s AND calibrator_hash = %s ORDER BY kind, source_vocab""",
        (reranker_version, calibrator_hash)).fetchall()
    return [_row(r) for r in rows]


def all_thresholds(conn: psycopg.Connection) -> list[StoredThreshold]:
    rows = conn.execute(f"""SELECT {_COLS} FROM harmonia.calibration_threshold
                            ORDER BY created_at DESC, id DESC""").fetchall()
    return [_row(r) for r in rows]


# ------------------------------------------------------------------------------------ calibration from reviews


@dataclass
class PendingDecision:
    """An open review item of a set with a first choice: what a review sample draws from and what a fitted
    threshold may approve."""

    item_id: int
    source_code: str
    confidence: float
    concept_id: int
    model_version: str


def pending_decisions(conn: psycopg.Connection, source_vocab: str) -> list[PendingDecision]:
    """Open (not flagged) review items of the set that have a first choice and a confidence, with no map yet."""
    rows = conn.execute(
        """SELECT q.id, q.source_code, q.confidence, (q.candidates_json -> 0 ->> 'concept_id')::integer,
                  q.model_version
           FROM harmonia.review_queue q
           WHERE q.source_vocab = %s AND q.status = 'open' AND q.confidence IS NOT NULL
             AND q.model_version IS NOT NULL AND jsonb_array_length(q.candidates_json) > 0
             AND q.reason IN ('uncalibrated', 'low_confidence')
             AND NOT EXISTS (SELECT 1 FROM harmonia.concept_map m
                             WHERE m.source_code = q.source_code AND m.source_vocab = q.source_vocab)
           ORDER BY q.id""", (source_vocab,)).fetchall()
    return [PendingDecision(r[0], r[1], float(r[2]), int(r[3]), r[4]) for r in rows]


@dataclass
class SampledDecision:
    source_code: str
    stratum: str
    floor: float
    confidence: float
    proposed_concept_id: int
    model_version: str
    draw: int
    verdict: bool | None = None  # None: not judged yet; True: the reviewer kept the first choice


def add_sample(conn: psycopg.Connection, source_vocab: str, rows: list[SampledDecision], priority: int) -> None:
    """Record a review sample and put its items at the head of the review queue, in the sample's random order."""
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO harmonia.calibration_sample (source_vocab, source_code, stratum, floor, confidence,
                   proposed_concept_id, model_version, draw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
            [(source_vocab, r.source_code, r.stratum, r.floor, r.confidence, r.proposed_concept_id,
              r.model_version, r.draw) for r in rows])
        cur.executemany(
            """UPDATE harmonia.review_queue SET priority = %s, updated_at = now()
               WHERE source_code = %s AND source_vocab = %s""",
            [(priority - r.draw, r.source_code, source_vocab) for r in rows])


def clear_sample(conn: psycopg.Connection, source_vocab: str) -> int:
    """Forget a set's review sample (a new one replaces it); items keep their place but lose their priority."""
    conn.execute(
        """UPDATE harmonia.review_queue q SET priority = 0 FROM harmonia.calibration_sample s
           WHERE s.source_vocab = %s AND q.source_vocab = s.source_vocab AND q.source_code = s.source_code""",
        (source_vocab,))
    cur = conn.execute("DELETE FROM harmonia.calibration_sample WHERE source_vocab = %s", (source_vocab,))
    return cur.rowcount


def sample_with_verdicts(conn: psycopg.Connection, source_vocab: str) -> list[SampledDecision]:
    """The set's review sample in review order, each with the reviewer's verdict on its first choice: a map a
    reviewer decided to that concept is right; to another concept (or to no match, concept 0) wrong."""
    rows = conn.execute(
        """SELECT s.source_code, s.stratum, s.floor, s.confidence, s.proposed_concept_id, s.model_version, s.draw,
                  m.omop_concept_id
           FROM harmonia.calibration_sample s
           LEFT JOIN harmonia.concept_map m ON m.source_code = s.source_code AND m.source_vocab = s.source_vocab
                                           AND m.decided_by = 'reviewer'
           WHERE s.source_vocab = %s ORDER BY s.draw""", (source_vocab,)).fetchall()
    return [SampledDecision(source_code=r[0], stratum=r[1], floor=r[2], confidence=r[3], proposed_concept_id=r[4],
                            model_version=r[5], draw=r[6], verdict=None if r[7] is None else r[7] == r[4])
            for r in rows]


def approve_pending(conn: psycopg.Connection, source_vocab: str, model_version: str, threshold: float,
                    note: str) -> int:
    """Auto-approve the set's pending decisions of this model_version at or above the threshold (their first
    choice), each with an `auto_approve` history row carrying `note` (which calibration approved it); sampled
    items are left to the reviewers. The caller owns the transaction. Returns how many were approved."""
    rows = conn.execute(
        """SELECT q.id, q.source_code, q.source_text, (q.candidates_json -> 0 ->> 'concept_id')::integer,
                  q.confidence, q.candidates_json, q.reason, q.source_frequency
           FROM harmonia.review_queue q
           WHERE q.source_vocab = %s AND q.status = 'open' AND q.model_version = %s AND q.confidence >= %s
             AND jsonb_array_length(q.candidates_json) > 0 AND q.reason IN ('uncalibrated', 'low_confidence')
             AND NOT EXISTS (SELECT 1 FROM harmonia.calibration_sample s
                             WHERE s.source_vocab = q.source_vocab AND s.source_code = q.source_code)
           ORDER BY q.id FOR UPDATE""", (source_vocab, model_version, threshold)).fetchall()
    approved = 0
    for item_id, code, text, concept_id, conf, ranked, reason, freq in rows:
        ranking = {"model_version": model_version, "confidence": float(conf), "ranked": ranked,
                   "reason": "approved", "source_frequency": freq, "calibration": {"note": note, "was": reason}}
        new = conn.execute(
            """INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id, confidence,
                   decided_by, model_version, candidate_ranking_json)
               VALUES (%s, %s, %s, %s, %s, 'auto', %s, %s)
               ON CONFLICT (source_code, source_vocab) DO NOTHING RETURNING id""",
            (code, source_vocab, text, concept_id, conf, model_version, json.dumps(ranking))).fetchone()
        if new is None:
            continue
        conn.execute(
            """INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, new_concept_id,
                   confidence, model_version, note) VALUES (%s, %s, 'auto_approve', %s, %s, %s, %s)""",
            (code, source_vocab, concept_id, conf, model_version, note))
        conn.execute(
            """UPDATE harmonia.review_queue SET status = 'resolved', resolved_at = now(), updated_at = now(),
                   reason = 'approved' WHERE id = %s""", (item_id,))
        approved += 1
    return approved
