"""SQL for the concept map (approved maps), its history and the review queue."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

import psycopg

from harmonia.domain import Decision, RankingEntry, SourceKey
from harmonia.store.common import scalar


def existing_maps(conn: psycopg.Connection, keys: Iterable[SourceKey]) -> set[SourceKey]:
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
                   source_frequency: int | None, extra: dict[str, Any], ranking: Sequence[RankingEntry],
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


class ApprovedMap(TypedDict):
    """An approved map with what the exports write (harmonia.export)."""

    source_code: str
    source_vocab: str
    source_text: str | None
    omop_concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    confidence: Decimal | None
    equivalence: str | None
    decided_by: str
    reviewer: str | None
    reviewed_at: datetime | None
    model_version: str | None
    created_at: datetime
    source_frequency: str | None       # as text, from the ranking record
    candidate_ids: str | None          # the ranked concept ids, ';'-separated


def approved_maps(conn: psycopg.Connection, source_vocab: str | None = None) -> list[ApprovedMap]:
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
    return [ApprovedMap(source_code=r[0], source_vocab=r[1], source_text=r[2], omop_concept_id=r[3],
                        concept_name=r[4], domain_id=r[5], vocabulary_id=r[6], confidence=r[7], equivalence=r[8],
                        decided_by=r[9], reviewer=r[10], reviewed_at=r[11], model_version=r[12], created_at=r[13],
                        source_frequency=r[14], candidate_ids=r[15]) for r in conn.execute(q, params).fetchall()]


def summary_counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        "concept_map": scalar(conn.execute("SELECT count(*) FROM harmonia.concept_map")),
        "review_open": scalar(conn.execute(
            "SELECT count(*) FROM harmonia.review_queue WHERE status <> 'resolved'")),
    }


# ------------------------------------------------------------------------------------ reviewers' decisions


@dataclass(frozen=True)
class ReviewerApproval:
    """A map a reviewer decided (approved or corrected): the source text and the concept chosen."""

    source_code: str
    source_vocab: str
    source_text: str
    concept_id: int


@dataclass(frozen=True)
class ReviewerCorrection:
    """A correction: the suggestion a reviewer replaced (old_concept_id) by another concept."""

    source_code: str
    source_vocab: str
    source_text: str
    old_concept_id: int
    new_concept_id: int | None


def reviewer_approvals(conn: psycopg.Connection) -> list[ReviewerApproval]:
    """Maps a reviewer decided, by source vocabulary and code (known mappings, training positives)."""
    rows = conn.execute(
        """SELECT source_code, source_vocab, source_text, omop_concept_id FROM harmonia.concept_map
           WHERE decided_by = 'reviewer' AND source_text IS NOT NULL AND source_text <> ''
           ORDER BY source_vocab, source_code""").fetchall()
    return [ReviewerApproval(*r) for r in rows]


def reviewer_corrections(conn: psycopg.Connection) -> list[ReviewerCorrection]:
    """Corrections with the source text (from the map, else from the review item), in history order: the rejected
    suggestions are hard negatives for training."""
    rows = conn.execute(
        """SELECT h.source_code, h.source_vocab, coalesce(m.source_text, q.source_text), h.old_concept_id,
                  h.new_concept_id
           FROM harmonia.concept_map_history h
           LEFT JOIN harmonia.concept_map m ON m.source_code = h.source_code AND m.source_vocab = h.source_vocab
           LEFT JOIN harmonia.review_queue q ON q.source_code = h.source_code AND q.source_vocab = h.source_vocab
           WHERE h.action = 'correct' AND h.old_concept_id IS NOT NULL
             AND h.old_concept_id IS DISTINCT FROM h.new_concept_id
           ORDER BY h.id""").fetchall()
    return [ReviewerCorrection(*r) for r in rows if r[2]]
