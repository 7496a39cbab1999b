"""SQL the scale benchmark (benchmark/scale.py) needs besides the stores' own: concept id ranges, the vectors of a
range, relation and database sizes. Benchmark scripts hold no SQL (tests/test_architecture.py)."""

from __future__ import annotations

import json

import numpy as np
import psycopg

from harmonia.store.common import scalar


def relation_size(conn: psycopg.Connection, name: str) -> int | None:
    """Bytes of a table or index ("schema.name"); None when there is none."""
    if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() in (None, (None,)):
        return None
    return int(scalar(conn.execute("SELECT pg_relation_size(%s)", (name,))))


def database_size(conn: psycopg.Connection) -> int:
    return int(scalar(conn.execute("SELECT pg_database_size(current_database())")))


def has_concepts_in(conn: psycopg.Connection, lo: int, hi: int) -> bool:
    """Whether vocab.concept exists and holds a concept with lo <= id < hi."""
    if scalar(conn.execute("SELECT to_regclass('vocab.concept')")) is None:
        return False
    return bool(scalar(conn.execute("SELECT EXISTS (SELECT 1 FROM vocab.concept WHERE concept_id >= %s "
                                    "AND concept_id < %s)", (lo, hi))))


def concept_names_in(conn: psycopg.Connection, lo: int, hi: int) -> list[tuple[int, str]]:
    rows = conn.execute("SELECT concept_id, concept_name FROM vocab.concept WHERE concept_id >= %s "
                        "AND concept_id < %s ORDER BY concept_id", (lo, hi)).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def embedded_ids_in(conn: psycopg.Connection, model_key: str, lo: int, hi: int) -> set[int]:
    rows = conn.execute("SELECT concept_id FROM vocab.concept_embedding WHERE model = %s AND concept_id >= %s "
                        "AND concept_id < %s", (model_key, lo, hi)).fetchall()
    return {int(r[0]) for r in rows}


def vectors_outside(conn: psycopg.Connection, model_key: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the model's embeddings whose id is NOT in lo <= id < hi, by id."""
    rows = conn.execute("SELECT concept_id, embedding::text FROM vocab.concept_embedding WHERE model = %s "
                        "AND NOT (concept_id >= %s AND concept_id < %s) ORDER BY concept_id",
                        (model_key, lo, hi)).fetchall()
    return (np.array([r[0] for r in rows], dtype=np.int64),
            np.array([json.loads(r[1]) for r in rows], dtype=np.float32).reshape(len(rows), -1))
