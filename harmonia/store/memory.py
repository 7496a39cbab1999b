"""SQL for the mapping memory (migrations/070_memory.sql): already-mapped sources with their embeddings, searched by
cosine similarity. pgvector's type and operator are schema-qualified, as everywhere."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from harmonia.domain import SourceTargets
from harmonia.store.embeddings import copy_rows, create_hnsw, vector_literal


@dataclass(frozen=True)
class MemoryHit:
    source_code: str
    source_vocab: str
    source_text: str
    targets: tuple[int, ...]
    similarity: float


def index_name(model_key: str) -> str:
    return "mapping_memory_hnsw_" + hashlib.sha1(model_key.encode()).hexdigest()[:12]


def replace(conn: psycopg.Connection, model_key: str, dim: int, rows: Sequence[SourceTargets],
            vectors: np.ndarray | Sequence[np.ndarray],
            *, m: int = 16, ef_construction: int = 128, maintenance_work_mem: str = "1GB") -> int:
    """Replace the model's memory with `rows` (each stored with its split key, targets and origin) and their
    vectors, in one transaction: readers see the old memory or the new one, never half of it. The index is dropped
    first and built after the COPY (one bulk build instead of thousands of inserts)."""
    name = index_name(model_key)
    with conn.transaction():
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier("vocab", name)))
        conn.execute("DELETE FROM vocab.mapping_memory WHERE model = %s", (model_key,))
        with conn.cursor().copy("COPY vocab.mapping_memory (model, source_vocab, source_code, source_key, "
                                "source_text, targets, origin, embedding) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "text", "text", "text", "int4[]", "text", "bytea"])
            copy_rows(copy, [(model_key, r.source_vocab, r.source_code, str(r.split_key), r.source_text, r.targets,
                              r.origin, v) for r, v in zip(rows, np.asarray(vectors, dtype=np.float32), strict=True)])
        if rows:
            create_hnsw(conn, "mapping_memory", name, model_key, dim, m=m, ef_construction=ef_construction,
                        maintenance_work_mem=maintenance_work_mem)
    conn.execute("ANALYZE vocab.mapping_memory")
    return len(rows)


def count(conn: psycopg.Connection, model_key: str) -> dict[str, int]:
    """Rows per origin for a model."""
    rows = conn.execute("SELECT origin, count(*) FROM vocab.mapping_memory WHERE model = %s GROUP BY origin",
                        (model_key,)).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def search(conn: psycopg.Connection, model_key: str, dim: int, vector: np.ndarray, k: int, *,
           exclude: Sequence[tuple[str, str]] = (), ef_search: int = 200) -> list[MemoryHit]:
    """The k mapped sources most similar to `vector`, leaving out the sources named in `exclude` as
    (source_code, source_vocab): a source never gets its own mapping back from the memory."""
    dist = sql.SQL("(embedding::public.vector({dim})) OPERATOR(public.<=>) %(q)s::public.vector({dim})").format(
        dim=sql.Literal(dim))
    where: list[sql.Composable] = [sql.SQL("model = {}").format(sql.Literal(model_key))]
    params: dict[str, object] = {"q": vector_literal(vector)}
    if exclude:
        where.append(sql.SQL("(source_code, source_vocab) NOT IN (SELECT * FROM unnest(%(codes)s::text[], "
                             "%(vocabs)s::text[]))"))
        params["codes"] = [e[0] for e in exclude]
        params["vocabs"] = [e[1] for e in exclude]
    q = sql.SQL("""SELECT source_code, source_vocab, source_text, targets, 1 - ({dist})
                   FROM vocab.mapping_memory WHERE {where} ORDER BY {dist} LIMIT {k}""").format(
        dist=dist, where=sql.SQL(" AND ").join(where), k=sql.Literal(k))
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(max(ef_search, k))))
        conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        rows = conn.execute(q, params, prepare=False).fetchall()
    hits = [MemoryHit(r[0], r[1], r[2], tuple(r[3]), float(r[4])) for r in rows]
    hits.sort(key=lambda h: -h.similarity)  # relaxed_order: order by the exact similarity it computed
    return hits
