"""SQL that reads concepts: the one lookup of vocab.concept rows by id (with the filters retrieval applies), every
valid standard concept, and the concept behind a source code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg

from harmonia.domain import Candidate, Concept, SourceKey

COLUMNS = ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "concept_code",
           "standard_concept", "invalid_reason")
_SELECT = "SELECT " + ", ".join(f"c.{col}" for col in COLUMNS) + " FROM vocab.concept c"
VALID_STANDARD = "c.standard_concept = 'S' AND c.invalid_reason IS NULL"


def _concept(row: Sequence[Any]) -> Concept:
    return Concept(concept_id=row[0], concept_name=row[1], domain_id=row[2], vocabulary_id=row[3],
                   concept_class_id=row[4], concept_code=row[5], standard_concept=row[6], invalid_reason=row[7])


# The candidate columns a search selects (valid standard concepts: standard_concept and invalid_reason are known).
CANDIDATE_COLUMNS = "c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id, c.concept_code"


def candidate(row: Sequence[Any], similarity: float, scores: dict[str, float]) -> Candidate:
    """A Candidate from a row that starts with CANDIDATE_COLUMNS."""
    return Candidate(concept_id=row[0], concept_name=row[1], domain_id=row[2], vocabulary_id=row[3],
                     concept_class_id=row[4], concept_code=row[5], similarity=similarity, scores=scores)


def filters(domains: Sequence[str] | None, vocabularies: Sequence[str] | None, params: dict[str, Any]) -> str:
    """The WHERE conditions every candidate passes: a valid standard concept, of the domains and vocabularies given
    (None or empty: any). Named parameters go into `params`."""
    out = [VALID_STANDARD]
    if domains:
        out.append("c.domain_id = ANY(%(domains)s)")
        params["domains"] = list(domains)
    if vocabularies:
        out.append("c.vocabulary_id = ANY(%(vocabs)s)")
        params["vocabs"] = list(vocabularies)
    return " AND ".join(out)


def get_concepts(conn: psycopg.Connection, concept_ids: Iterable[int], *, valid_standard: bool = False,
                 domains: Sequence[str] | None = None, vocabularies: Sequence[str] | None = None
                 ) -> dict[int, Concept]:
    """The concepts with the given ids, by id; with `valid_standard` (or any filter) only the valid standard ones of
    those domains and vocabularies (candidates another generator, e.g. the mapping memory, proposes by id)."""
    ids = sorted(set(concept_ids))
    if not ids:
        return {}
    params: dict[str, Any] = {"ids": ids}
    where = "c.concept_id = ANY(%(ids)s)"
    if valid_standard or domains or vocabularies:
        where += " AND " + filters(domains, vocabularies, params)
    rows = conn.execute(f"{_SELECT} WHERE {where}", params).fetchall()
    return {r[0]: _concept(r) for r in rows}


def concepts_of_decision_later(conn: psycopg.Connection, concept_ids: Iterable[int], review_item_id: int
                               ) -> Callable[[], dict[int, Concept]]:
    """Send the query now, read when called: the concepts with these ids and those review item `review_item_id`
    suggests (what a reviewer's decision on it may target), by id."""
    cur = conn.execute(
        f"""{_SELECT} WHERE c.concept_id IN (
                SELECT unnest(%s::integer[])
                UNION SELECT (e ->> 'concept_id')::integer FROM harmonia.review_queue q,
                       jsonb_array_elements(CASE jsonb_typeof(q.candidates_json) WHEN 'array'
                                                 THEN q.candidates_json ELSE '[]'::jsonb END) e
                WHERE q.id = %s AND e ->> 'concept_id' ~ '^[0-9]{{1,9}}$')""",
        (sorted({i for i in concept_ids if 0 <= i < 2**31}), review_item_id))  # others exist in no integer column
    return lambda: {r[0]: _concept(r) for r in cur.fetchall()}


def standard_concepts(conn: psycopg.Connection, vocabularies: Sequence[str] | None = None) -> list[Concept]:
    """Every valid standard concept (of the vocabularies, if given), by concept_id."""
    params: dict[str, Any] = {}
    rows = conn.execute(f"{_SELECT} WHERE {filters(None, vocabularies, params)} ORDER BY c.concept_id",
                        params).fetchall()
    return [_concept(r) for r in rows]


def concept_ids_by_code(conn: psycopg.Connection, keys: Iterable[SourceKey]) -> dict[SourceKey, int]:
    """The vocabulary concept behind (source_code, source_vocab) keys, where there is one."""
    unique = sorted(set(keys))
    if not unique:
        return {}
    rows = conn.execute(
        """SELECT c.concept_code, c.vocabulary_id, c.concept_id FROM vocab.concept c
           JOIN unnest(%s::text[], %s::text[]) AS k(code, vocab)
             ON c.concept_code = k.code AND c.vocabulary_id = k.vocab""",
        ([k[0] for k in unique], [k[1] for k in unique])).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}
