"""SQL for the concept map (approved maps), its history and the review queue."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from harmonia.pipeline.route import Decision


def existing_maps(conn: psycopg.Connection, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    keys = list(keys)
    if not keys:
        return set()
    rows = conn.execute(
        """SELECT m.source_code, m.source_vocab FROM harmonia.concept_map m
           JOIN unnest(%s::text[], %s::text[]) AS k(code, vocab)
             ON m.source_code = k.code AND m.source_vocab = k.vocab""",
        ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
    return {(r[0], r[1]) for r in rows}


def record_decision(conn: psycopg.Connection, d: Decision) -> str:
    """Persist one routing decision; the caller owns the transaction. Returns 'approved', 'review' or
    'already_mapped' (a map for this code exists: a re-run never overwrites it, least of all a reviewer's)."""
    t = d.term
    if d.action == "approve":
        assert d.concept_id is not None
        row = conn.execute(
            """INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id,
                   confidence, decided_by, model_version, candidate_ranking_json)
               VALUES (%s, %s, %s, %s, %s, 'auto', %s, %s)
               ON CONFLICT (source_code, source_vocab) DO NOTHING RETURNING id""",
            (t.source_code, t.source_vocab, t.source_text, d.concept_id, round(d.confidence, 4),
             d.model_version, json.dumps(d.ranking_json()))).fetchone()
        if row is None:
            return "already_mapped"
        conn.execute(
            """INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, new_concept_id,
                   confidence, model_version) VALUES (%s, %s, 'auto_approve', %s, %s, %s)""",
            (t.source_code, t.source_vocab, d.concept_id, round(d.confidence, 4), d.model_version))
        conn.execute(
            """UPDATE harmonia.review_queue SET status = 'resolved', resolved_at = now(), updated_at = now()
               WHERE source_code = %s AND source_vocab = %s AND status <> 'resolved'""",
            (t.source_code, t.source_vocab))
        return "approved"
    mapped = conn.execute("SELECT 1 FROM harmonia.concept_map WHERE source_code = %s AND source_vocab = %s",
                          (t.source_code, t.source_vocab)).fetchone()
    if mapped:
        return "already_mapped"
    enqueue_review(conn, t.source_code, t.source_vocab, t.source_text, t.source_frequency, t.extra,
                   d.ranking, d.confidence, d.model_version, d.reason, d.error)
    return "review"


def enqueue_review(conn: psycopg.Connection, source_code: str, source_vocab: str, source_text: str | None,
                   source_frequency: int | None, extra: dict[str, Any], ranking: Sequence[dict[str, Any]],
                   confidence: float | None, model_version: str | None, reason: str, error: str | None) -> None:
    """Open (or refresh) the review item for a code; a flagged item stays flagged."""
    conn.execute(
        """INSERT INTO harmonia.review_queue (source_code, source_vocab, source_text, source_frequency, extra,
               candidates_json, confidence, model_version, reason, error)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (source_code, source_vocab) DO UPDATE SET
               source_text = EXCLUDED.source_text, source_frequency = EXCLUDED.source_frequency,
               extra = EXCLUDED.extra, candidates_json = EXCLUDED.candidates_json,
               confidence = EXCLUDED.confidence, model_version = EXCLUDED.model_version,
               reason = EXCLUDED.reason, error = EXCLUDED.error, updated_at = now(),
               status = CASE WHEN harmonia.review_queue.status = 'flagged' THEN 'flagged' ELSE 'open' END""",
        (source_code, source_vocab, source_text, source_frequency, json.dumps(extra), json.dumps(list(ranking)),
         None if confidence is None else round(confidence, 4), model_version, reason, error))


EXPORT_COLUMNS = ("source_code", "source_vocab", "source_text", "omop_concept_id", "concept_name", "domain_id",
                  "vocabulary_id", "confidence", "equivalence", "decided_by", "reviewer", "reviewed_at",
                  "model_version", "created_at", "source_frequency", "candidate_ids")


def approved_maps(conn: psycopg.Connection, source_vocab: str | None = None) -> list[dict[str, Any]]:
    q = """SELECT m.source_code, m.source_vocab, m.source_text, m.omop_concept_id, c.concept_name, c.domain_id,
                  c.vocabulary_id, m.confidence, m.equivalence, m.decided_by, u.name, m.reviewed_at,
                  m.model_version, m.created_at,
                  m.candidate_ranking_json ->> 'source_frequency',
                  (SELECT string_agg(x ->> 'concept_id', ';')
                     FROM jsonb_array_elements(coalesce(m.candidate_ranking_json -> 'ranked', '[]'::jsonb)) x)
           FROM harmonia.concept_map m JOIN vocab.concept c ON c.concept_id = m.omop_concept_id
           LEFT JOIN harmonia.users u ON u.id = m.reviewer_id"""
    params: tuple = ()
    if source_vocab:
        q += " WHERE m.source_vocab = %s"
        params = (source_vocab,)
    q += " ORDER BY m.source_vocab, m.source_code"
    return [dict(zip(EXPORT_COLUMNS, r, strict=True)) for r in conn.execute(q, params).fetchall()]


def summary_counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        "concept_map": conn.execute("SELECT count(*) FROM harmonia.concept_map").fetchone()[0],
        "review_open": conn.execute(
            "SELECT count(*) FROM harmonia.review_queue WHERE status <> 'resolved'").fetchone()[0],
    }
