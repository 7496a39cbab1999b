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
