"""SQL that reads training material for the classifier reranker: concept texts and reviewers' decisions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

CONCEPT_TEXT_COLUMNS = ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id")


def standard_concepts(conn: psycopg.Connection, vocabularies: Sequence[str] | None = None) -> list[tuple]:
    """(concept_id, name, domain, vocabulary, class) of every valid standard concept (random negatives)."""
    q = f"""SELECT {', '.join(CONCEPT_TEXT_COLUMNS)} FROM vocab.concept
            WHERE standard_concept = 'S' AND invalid_reason IS NULL"""
    params: tuple = ()
    if vocabularies:
        q += " AND vocabulary_id = ANY(%s)"
        params = (list(vocabularies),)
    return conn.execute(q + " ORDER BY concept_id", params).fetchall()


def concept_texts(conn: psycopg.Connection, concept_ids: Iterable[int]) -> dict[int, tuple]:
    ids = sorted(set(concept_ids))
    rows = conn.execute(f"SELECT {', '.join(CONCEPT_TEXT_COLUMNS)} FROM vocab.concept WHERE concept_id = ANY(%s)",
                        (ids,)).fetchall()
    return {r[0]: r for r in rows}


def source_concept_ids(conn: psycopg.Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The vocabulary concept behind (source_code, source_vocab) keys, where there is one."""
    keys = list(set(keys))
    if not keys:
        return {}
    rows = conn.execute(
        """SELECT c.concept_code, c.vocabulary_id, c.concept_id FROM vocab.concept c
           JOIN unnest(%s::text[], %s::text[]) AS k(code, vocab)
             ON c.concept_code = k.code AND c.vocabulary_id = k.vocab""",
        ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def reviewer_approvals(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Maps a reviewer decided (approved or corrected): the source text and the concept chosen."""
    rows = conn.execute(
        """SELECT source_code, source_vocab, source_text, omop_concept_id FROM harmonia.concept_map
           WHERE decided_by = 'reviewer' AND source_text IS NOT NULL AND source_text <> ''
           ORDER BY source_vocab, source_code""").fetchall()
    return [dict(zip(("source_code", "source_vocab", "source_text", "concept_id"), r, strict=True)) for r in rows]


def reviewer_corrections(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Corrections: the suggestion a reviewer rejected (old_concept_id) with the source text, for hard negatives.
    The text comes from the map, else from the review item."""
    rows = conn.execute(
        """SELECT h.source_code, h.source_vocab, coalesce(m.source_text, q.source_text), h.old_concept_id,
                  h.new_concept_id
           FROM harmonia.concept_map_history h
           LEFT JOIN harmonia.concept_map m ON m.source_code = h.source_code AND m.source_vocab = h.source_vocab
           LEFT JOIN harmonia.review_queue q ON q.source_code = h.source_code AND q.source_vocab = h.source_vocab
           WHERE h.action = 'correct' AND h.old_concept_id IS NOT NULL
             AND h.old_concept_id IS DISTINCT FROM h.new_concept_id
           ORDER BY h.id""").fetchall()
    return [dict(zip(("source_code", "source_vocab", "source_text", "old_concept_id", "new_concept_id"), r,
                     strict=True)) for r in rows if r[2]]
