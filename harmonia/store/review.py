"""SQL for the review service: the review queue as reviewers see it, their writes to the concept map, and its
history. The caller owns the transaction (harmonia.review.service runs each decision in one)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

import psycopg

from harmonia.domain import RankingEntry, RankingRecord, SourceKey
from harmonia.store.common import one, scalar

STATUSES = ("open", "flagged", "resolved")


class ReviewItem(TypedDict):
    """A review_queue row as the API serves it."""

    id: int
    source_code: str
    source_vocab: str
    source_text: str | None
    source_frequency: int | None
    extra: dict[str, Any]
    candidates: list[RankingEntry]     # the router's ranking (empty when a fault left none)
    confidence: float | None
    model_version: str | None
    reason: str | None
    error: str | None
    status: str
    resolved_by: str | None            # the reviewer's name
    resolved_at: datetime | None
    created_at: datetime
    updated_at: datetime
    top_domain: str | None             # the domain of the model's top candidate


class MapRow(TypedDict):
    """A concept_map row with its concept and reviewer, as the API serves it."""

    id: int
    source_code: str
    source_vocab: str
    source_text: str | None
    omop_concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    confidence: float | None
    equivalence: str | None
    decided_by: str
    reviewer: str | None
    reviewed_at: datetime | None
    model_version: str | None
    created_at: datetime
    updated_at: datetime


class HistoryEntry(TypedDict):
    """A concept_map_history row."""

    id: int
    source_code: str
    source_vocab: str
    action: str
    old_concept_id: int | None
    new_concept_id: int | None
    confidence: float | None
    model_version: str | None
    reviewer: str | None
    note: str | None
    at: datetime

_ITEM_COLS = """q.id, q.source_code, q.source_vocab, q.source_text, q.source_frequency, q.extra, q.candidates_json,
    q.confidence, q.model_version, q.reason, q.error, q.status, u.name, q.resolved_at, q.created_at, q.updated_at,
    q.candidates_json -> 0 ->> 'domain_id'"""


def _num(v: Decimal | float | None) -> float | None:
    return float(v) if isinstance(v, Decimal) else v


def _item(r: Sequence[Any]) -> ReviewItem:
    return ReviewItem(id=r[0], source_code=r[1], source_vocab=r[2], source_text=r[3], source_frequency=r[4],
                      extra=r[5], candidates=r[6], confidence=_num(r[7]), model_version=r[8], reason=r[9],
                      error=r[10], status=r[11], resolved_by=r[12], resolved_at=r[13], created_at=r[14],
                      updated_at=r[15], top_domain=r[16])


def list_items(conn: psycopg.Connection, *, statuses: Sequence[str] = ("open", "flagged"),
               source_vocab: str | None = None, domain: str | None = None, min_confidence: float | None = None,
               max_confidence: float | None = None, limit: int = 50, offset: int = 0
               ) -> tuple[int, list[ReviewItem]]:
    """One page of review items (a calibration sample first, then oldest first) and the total matching."""
    where: list[str] = ["q.status = ANY(%s)"]
    params: list[Any] = [list(statuses)]
    if source_vocab:
        where.append("q.source_vocab = %s")
        params.append(source_vocab)
    if domain:  # the domain of the model's top candidate
        where.append("q.candidates_json -> 0 ->> 'domain_id' = %s")
        params.append(domain)
    if min_confidence is not None:
        where.append("q.confidence >= %s")
        params.append(min_confidence)
    if max_confidence is not None:
        where.append("q.confidence <= %s")
        params.append(max_confidence)
    cond = " AND ".join(where)
    total = scalar(conn.execute(f"SELECT count(*) FROM harmonia.review_queue q WHERE {cond}", params))
    rows = conn.execute(
        f"""SELECT {_ITEM_COLS} FROM harmonia.review_queue q LEFT JOIN harmonia.users u ON u.id = q.resolved_by
            WHERE {cond} ORDER BY q.priority DESC, q.id LIMIT %s OFFSET %s""", [*params, limit, offset]).fetchall()
    return total, [_item(r) for r in rows]


def get_item(conn: psycopg.Connection, item_id: int, *, lock: bool = False) -> ReviewItem | None:
    row = conn.execute(
        f"""SELECT {_ITEM_COLS} FROM harmonia.review_queue q LEFT JOIN harmonia.users u ON u.id = q.resolved_by
            WHERE q.id = %s {'FOR UPDATE OF q' if lock else ''}""", (item_id,)).fetchone()
    return _item(row) if row else None


def item_facets(conn: psycopg.Connection) -> dict[str, list[str]]:
    """The source vocabularies and top-candidate domains present in the queue, for filter menus."""
    vocabs = [r[0] for r in conn.execute(
        "SELECT DISTINCT source_vocab FROM harmonia.review_queue ORDER BY 1").fetchall()]
    domains = [r[0] for r in conn.execute(
        """SELECT DISTINCT candidates_json -> 0 ->> 'domain_id' FROM harmonia.review_queue
           WHERE candidates_json -> 0 ->> 'domain_id' IS NOT NULL ORDER BY 1""").fetchall()]
    return {"source_vocab": vocabs, "domain": domains}


def resolve_item(conn: psycopg.Connection, item_id: int, reviewer_id: int) -> None:
    conn.execute("""UPDATE harmonia.review_queue SET status = 'resolved', resolved_by = %s, resolved_at = now(),
                        updated_at = now() WHERE id = %s""", (reviewer_id, item_id))


def flag_item(conn: psycopg.Connection, item_id: int) -> None:
    conn.execute("""UPDATE harmonia.review_queue SET status = 'flagged', resolved_by = NULL, resolved_at = NULL,
                        updated_at = now() WHERE id = %s""", (item_id,))


def reopen_item(conn: psycopg.Connection, source_code: str, source_vocab: str) -> int | None:
    row = conn.execute("""UPDATE harmonia.review_queue SET status = 'open', resolved_by = NULL, resolved_at = NULL,
                              updated_at = now() WHERE source_code = %s AND source_vocab = %s RETURNING id""",
                       (source_code, source_vocab)).fetchone()
    return row[0] if row else None


# ------------------------------------------------------------------------------------------------ the map

_MAP_COLS = """m.id, m.source_code, m.source_vocab, m.source_text, m.omop_concept_id, c.concept_name, c.domain_id,
    c.vocabulary_id, m.confidence, m.equivalence, m.decided_by, u.name, m.reviewed_at, m.model_version,
    m.created_at, m.updated_at"""
_MAP_FROM = """harmonia.concept_map m JOIN vocab.concept c ON c.concept_id = m.omop_concept_id
    LEFT JOIN harmonia.users u ON u.id = m.reviewer_id"""


def _map(r: Sequence[Any]) -> MapRow:
    return MapRow(id=r[0], source_code=r[1], source_vocab=r[2], source_text=r[3], omop_concept_id=r[4],
                  concept_name=r[5], domain_id=r[6], vocabulary_id=r[7], confidence=_num(r[8]), equivalence=r[9],
                  decided_by=r[10], reviewer=r[11], reviewed_at=r[12], model_version=r[13], created_at=r[14],
                  updated_at=r[15])


def get_map(conn: psycopg.Connection, map_id: int | None = None, *, key: SourceKey | None = None,
            lock: bool = False) -> MapRow | None:
    cond, params = ("m.id = %s", (map_id,)) if map_id is not None else \
        ("m.source_code = %s AND m.source_vocab = %s", key)
    row = conn.execute(f"SELECT {_MAP_COLS} FROM {_MAP_FROM} WHERE {cond} {'FOR UPDATE OF m' if lock else ''}",
                       params).fetchone()
    return _map(row) if row else None


def list_maps(conn: psycopg.Connection, *, source_vocab: str | None = None, decided_by: str | None = None,
              search: str | None = None, limit: int = 50, offset: int = 0) -> tuple[int, list[MapRow]]:
    where: list[str] = ["TRUE"]
    params: list[Any] = []
    if source_vocab:
        where.append("m.source_vocab = %s")
        params.append(source_vocab)
    if decided_by:
        where.append("m.decided_by = %s")
        params.append(decided_by)
    if search:
        where.append("(m.source_code ILIKE %s OR m.source_text ILIKE %s OR c.concept_name ILIKE %s)")
        params += [f"%{search}%"] * 3
    cond = " AND ".join(where)
    total = scalar(conn.execute(f"SELECT count(*) FROM {_MAP_FROM} WHERE {cond}", params))
    rows = conn.execute(f"""SELECT {_MAP_COLS} FROM {_MAP_FROM} WHERE {cond}
                            ORDER BY m.source_vocab, m.source_code LIMIT %s OFFSET %s""",
                        [*params, limit, offset]).fetchall()
    return total, [_map(r) for r in rows]


def upsert_reviewed_map(conn: psycopg.Connection, *, source_code: str, source_vocab: str, source_text: str | None,
                        concept_id: int, confidence: float | None, model_version: str | None,
                        ranking: RankingRecord, reviewer_id: int) -> int:
    """Insert the reviewer's map, or update the existing one for this code (one row per code)."""
    row = one(conn.execute(
        """INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id, confidence,
               decided_by, reviewer_id, reviewed_at, model_version, candidate_ranking_json)
           VALUES (%s, %s, %s, %s, %s, 'reviewer', %s, now(), %s, %s)
           ON CONFLICT (source_code, source_vocab) DO UPDATE SET
               source_text = coalesce(EXCLUDED.source_text, harmonia.concept_map.source_text),
               omop_concept_id = EXCLUDED.omop_concept_id, confidence = EXCLUDED.confidence,
               decided_by = 'reviewer', reviewer_id = EXCLUDED.reviewer_id, reviewed_at = EXCLUDED.reviewed_at,
               model_version = EXCLUDED.model_version, candidate_ranking_json = EXCLUDED.candidate_ranking_json,
               updated_at = now()
           RETURNING id""",
        (source_code, source_vocab, source_text, concept_id, None if confidence is None else round(confidence, 4),
         reviewer_id, model_version, json.dumps(ranking))))
    return int(row[0])


def delete_map(conn: psycopg.Connection, map_id: int) -> None:
    conn.execute("DELETE FROM harmonia.concept_map WHERE id = %s", (map_id,))


def add_history(conn: psycopg.Connection, *, source_code: str, source_vocab: str, action: str,
                old_concept_id: int | None, new_concept_id: int | None, confidence: float | None,
                model_version: str | None, reviewer_id: int, note: str | None) -> None:
    conn.execute(
        """INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, old_concept_id,
               new_concept_id, confidence, model_version, reviewer_id, note)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (source_code, source_vocab, action, old_concept_id, new_concept_id,
         None if confidence is None else round(confidence, 4), model_version, reviewer_id, note))


def history(conn: psycopg.Connection, source_code: str, source_vocab: str) -> list[HistoryEntry]:
    rows = conn.execute(
        """SELECT h.id, h.source_code, h.source_vocab, h.action, h.old_concept_id, h.new_concept_id, h.confidence,
                  h.model_version, u.name, h.note, h.at
           FROM harmonia.concept_map_history h LEFT JOIN harmonia.users u ON u.id = h.reviewer_id
           WHERE h.source_code = %s AND h.source_vocab = %s ORDER BY h.id""", (source_code, source_vocab)).fetchall()
    return [HistoryEntry(id=r[0], source_code=r[1], source_vocab=r[2], action=r[3], old_concept_id=r[4],
                         new_concept_id=r[5], confidence=_num(r[6]), model_version=r[7], reviewer=r[8], note=r[9],
                         at=r[10]) for r in rows]
