"""SQL for lexical retrieval: pg_trgm similarity over concept names and synonyms (indexes: migrations/060_lexical.sql).

A name scores the mean of word_similarity (how much of the query a stretch of the name covers: typos, extra words)
and similarity (trigram-set overlap of the whole strings: word order does not matter). Both sides go through
vocab.lexnorm (lower case, no accents), the expression the GIN indexes are built on. pg_trgm's functions and
operators are schema-qualified so a search_path without `public` works.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import psycopg
from psycopg import sql

from harmonia.domain import Candidate
from harmonia.store.concepts import CANDIDATE_COLUMNS, VALID_STANDARD, candidate, filters
from harmonia.store.embeddings import vector_literal

_SCORE = ("(public.word_similarity(vocab.lexnorm(%(q)s), vocab.lexnorm({col})) "
          "+ public.similarity(vocab.lexnorm(%(q)s), vocab.lexnorm({col}))) / 2")


def lexical_search(conn: psycopg.Connection, text: str, k: int, *, domains: Sequence[str] | None = None,
                   vocabularies: Sequence[str] | None = None, boost_name: float = 1.0, boost_synonym: float = 0.8,
                   threshold: float = 0.3) -> list[Candidate]:
    """Top-k valid standard concepts by lexical score, ties by concept_id: similarity is the score
    max(boost_name * name score, boost_synonym * synonym score), and scores hold all three ("lexical", "name",
    "synonym")."""
    params: dict[str, object] = {"q": text, "bn": boost_name, "bs": boost_synonym, "k": k}
    where = filters(domains, vocabularies, params)
    name_score = _SCORE.format(col="c.concept_name")
    syn_score = _SCORE.format(col="s.concept_synonym_name")
    # Each branch is an index scan (`q <% name` reads the GIN trigram index); the union keeps each concept's best
    # name and best synonym score.
    q = f"""
        WITH hits AS (
            SELECT c.concept_id, {name_score} AS ns, 0.0::float8 AS ss FROM vocab.concept c
            WHERE vocab.lexnorm(%(q)s) OPERATOR(public.<%%) vocab.lexnorm(c.concept_name) AND {where}
            UNION ALL
            SELECT c.concept_id, 0.0::float8, {syn_score} FROM vocab.concept_synonym s
            JOIN vocab.concept c ON c.concept_id = s.concept_id
            WHERE vocab.lexnorm(%(q)s) OPERATOR(public.<%%) vocab.lexnorm(s.concept_synonym_name) AND {where}
        ), best AS (
            SELECT concept_id, max(ns) AS ns, max(ss) AS ss FROM hits GROUP BY concept_id
        )
        SELECT {CANDIDATE_COLUMNS}, greatest(%(bn)s * b.ns, %(bs)s * b.ss) AS score, b.ns, b.ss
        FROM best b JOIN vocab.concept c ON c.concept_id = b.concept_id
        ORDER BY score DESC, c.concept_id LIMIT %(k)s"""
    with conn.transaction():
        conn.execute("SELECT set_config('pg_trgm.word_similarity_threshold', %s, true)", (str(threshold),))
        rows = conn.execute(q, params).fetchall()
    return [candidate(r, float(r[6]), {"lexical": float(r[6]), "name": float(r[7]), "synonym": float(r[8])})
            for r in rows]


def rescore(conn: psycopg.Connection, text: str, concept_ids: Sequence[int], k: int, *,
            domains: Sequence[str] | None = None, vocabularies: Sequence[str] | None = None,
            boost_name: float = 1.0, boost_synonym: float = 0.8) -> list[Candidate]:
    """lexical_search's top-k and scores, computed only over the given concepts (another index's candidates): the
    same trigram score, so fusion sees the same numbers whichever generator found the concepts."""
    if not concept_ids:
        return []
    params: dict[str, object] = {"q": text, "bn": boost_name, "bs": boost_synonym, "k": k, "ids": list(concept_ids)}
    where = filters(domains, vocabularies, params)
    # The query is normalised once (not once per row and score, as lexical_search's index scan allows).
    one = ("(public.word_similarity(qn.q, vocab.lexnorm({col})) + public.similarity(qn.q, vocab.lexnorm({col}))) "
           "/ 2")
    name_score = one.format(col="c.concept_name")
    syn_score = one.format(col="s.concept_synonym_name")
    q = f"""
        WITH qn AS MATERIALIZED (SELECT vocab.lexnorm(%(q)s) AS q), b AS (
            SELECT c.concept_id, {name_score} AS ns,
                   coalesce((SELECT max({syn_score}) FROM vocab.concept_synonym s
                             WHERE s.concept_id = c.concept_id), 0)::float8 AS ss
            FROM vocab.concept c CROSS JOIN qn WHERE c.concept_id = ANY(%(ids)s) AND {where}
        )
        SELECT {CANDIDATE_COLUMNS}, greatest(%(bn)s * b.ns, %(bs)s * b.ss) AS score, b.ns, b.ss
        FROM b JOIN vocab.concept c ON c.concept_id = b.concept_id
        ORDER BY score DESC, c.concept_id LIMIT %(k)s"""
    rows = conn.execute(q, params).fetchall()
    return [candidate(r, float(r[6]), {"lexical": float(r[6]), "name": float(r[7]), "synonym": float(r[8])})
            for r in rows]


def index_rows(conn: psycopg.Connection, batch: int = 50_000) -> Iterator[list[tuple[int, str, str, str]]]:
    """Every name and synonym of the valid standard concepts as (concept_id, text, domain_id, vocabulary_id), in
    batches, read in one snapshot (a server-side cursor inside one transaction): what a BM25 index holds."""
    with conn.transaction(), conn.cursor(name="harmonia_lexical_index_rows") as cur:
        cur.itersize = batch
        cur.execute(f"""SELECT c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id FROM vocab.concept c
                        WHERE {VALID_STANDARD}
                        UNION ALL
                        SELECT c.concept_id, s.concept_synonym_name, c.domain_id, c.vocabulary_id
                        FROM vocab.concept_synonym s JOIN vocab.concept c ON c.concept_id = s.concept_id
                        WHERE {VALID_STANDARD}""")
        while rows := cur.fetchmany(batch):
            yield rows


def lexical_scores(conn: psycopg.Connection, text: str, concept_ids: Sequence[int]) -> dict[int, tuple[float, float]]:
    """(name_score, synonym_score) of given concepts, without a threshold: completes fusion for concepts only the
    vector generator found."""
    if not concept_ids:
        return {}
    name_score = _SCORE.format(col="c.concept_name")
    syn_score = _SCORE.format(col="s.concept_synonym_name")
    q = f"""SELECT c.concept_id, {name_score},
                   coalesce((SELECT max({syn_score}) FROM vocab.concept_synonym s
                             WHERE s.concept_id = c.concept_id), 0)
            FROM vocab.concept c WHERE c.concept_id = ANY(%(ids)s)"""
    rows = conn.execute(q, {"q": text, "ids": list(concept_ids)}).fetchall()
    return {r[0]: (float(r[1]), float(r[2])) for r in rows}


def vector_scores(conn: psycopg.Connection, model_key: str, dim: int, vector: np.ndarray,
                  concept_ids: Sequence[int]) -> dict[int, float]:
    """Exact cosine similarity of given concepts: completes fusion for concepts only the lexical generator found."""
    if not concept_ids:
        return {}
    q = sql.SQL("""SELECT concept_id,
                          1 - ((embedding::public.vector({dim})) OPERATOR(public.<=>) %s::public.vector({dim}))
                   FROM vocab.concept_embedding WHERE model = %s AND concept_id = ANY(%s)""").format(
        dim=sql.Literal(dim))
    rows = conn.execute(q, (vector_literal(vector), model_key, list(concept_ids))).fetchall()
    return {r[0]: float(r[1]) for r in rows}


def synonym_pairs(conn: psycopg.Connection, vocabularies: Sequence[str] | None) -> list[tuple[str, str]]:
    """(synonym, concept name) of valid standard concepts where the two differ (training pairs for the embedder)."""
    q = f"""SELECT s.concept_synonym_name, c.concept_name FROM vocab.concept_synonym s
            JOIN vocab.concept c ON c.concept_id = s.concept_id
            WHERE {VALID_STANDARD} AND lower(s.concept_synonym_name) <> lower(c.concept_name)"""
    params: list = []
    if vocabularies:
        q += " AND c.vocabulary_id = ANY(%s)"
        params.append(list(vocabularies))
    q += " ORDER BY c.concept_id, s.concept_synonym_name"
    return [(r[0], r[1]) for r in conn.execute(q, params).fetchall()]
