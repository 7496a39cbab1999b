"""SQL for concept embeddings and vector search. pgvector's type and operator are always schema-qualified
(public.vector, OPERATOR(public.<=>)) so a connection whose search_path lacks `public` works."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.types.json import Jsonb

from harmonia.domain import Candidate
from harmonia.store.common import scalar
from harmonia.store.concepts import candidate

# Model keys and dimensions go into the SQL text as literals, not parameters: the partial HNSW index
# (WHERE model = '<key>') is only usable when the planner sees the constant, and a cached generic plan would not.


def index_name(model_key: str, storage: str = "vector") -> str:
    """The model's HNSW index; a halfvec one has its own name, so a change of storage builds a new index."""
    base = "concept_embedding_hnsw_" + hashlib.sha1(model_key.encode()).hexdigest()[:12]
    return base if storage == "vector" else f"{base}_{storage}"


def _typed(storage: str, dim: int) -> sql.Composable:
    """The pgvector type of an index expression: vector(dim) or halfvec(dim)."""
    if storage not in ("vector", "halfvec"):
        raise ValueError(f"storage {storage!r}: vector or halfvec")
    return sql.SQL("public.{}({})").format(sql.Identifier(storage), sql.Literal(dim))


def register_model(conn: psycopg.Connection, model_key: str, model_name: str, dim: int) -> None:
    row = conn.execute("SELECT dim FROM vocab.embedding_model WHERE model = %s", (model_key,)).fetchone()
    if row and row[0] != dim:
        raise ValueError(f"model {model_key} was registered with dimension {row[0]}, now reports {dim}")
    if not row:
        conn.execute("INSERT INTO vocab.embedding_model (model, model_name, dim) VALUES (%s, %s, %s)",
                     (model_key, model_name, dim))


def model_dim(conn: psycopg.Connection, model_key: str) -> int | None:
    row = conn.execute("SELECT dim FROM vocab.embedding_model WHERE model = %s", (model_key,)).fetchone()
    return row[0] if row else None


def concepts_to_embed(conn: psycopg.Connection, model_key: str, vocabularies: Sequence[str] | None
                      ) -> list[tuple[int, str, bool]]:
    """Valid standard concepts of the vocabularies (None: all) lacking a current embedding for this model, as
    (concept_id, name, whether it has one of an older text): new concepts and renamed ones, nothing else."""
    q = """SELECT c.concept_id, c.concept_name, e.concept_id IS NOT NULL FROM vocab.concept c
           LEFT JOIN vocab.concept_embedding e ON e.concept_id = c.concept_id AND e.model = %s
           WHERE c.standard_concept = 'S' AND c.invalid_reason IS NULL
             AND (e.concept_id IS NULL OR e.text_md5 <> md5(c.concept_name))"""
    params: list = [model_key]
    if vocabularies is not None:
        q += " AND c.vocabulary_id = ANY(%s)"
        params.append(list(vocabularies))
    # Similar lengths share a batch: far less padding, so encoding runs faster.
    q += " ORDER BY length(c.concept_name), c.concept_id"
    return conn.execute(q, params).fetchall()


def vector_literal(v: np.ndarray | Sequence[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, dtype=np.float32).tolist()) + "]"


def copy_rows(copy: psycopg.Copy, rows: Sequence[tuple]) -> None:
    """Binary COPY rows whose last field is a vector: pgvector's own binary form goes over as bytes (the server
    reads it with vector_recv), so no float is ever formatted as text here or parsed back there."""
    for *head, vec in rows:
        copy.write_row((*head, Vector(vec).to_binary()))


def write_batch(conn: psycopg.Connection, model_key: str, ids: Sequence[int], texts: Sequence[str],
                vectors: np.ndarray, *, fresh: bool = False) -> int:
    """Write one batch in its own transaction (a crash loses at most one batch). `fresh` (the model had no rows when
    the run began): COPY straight into the table; otherwise upsert through a temp table, since some of the
    concepts may already have an embedding with an older text."""
    md5s = [hashlib.md5(t.encode()).hexdigest() for t in texts]
    vectors = np.asarray(vectors, dtype=np.float32)
    with conn.transaction():
        if fresh:
            domain: dict[int, str] = dict(conn.execute(
                "SELECT concept_id, domain_id FROM vocab.concept WHERE concept_id = ANY(%s)", (list(ids),)).fetchall())
            with conn.cursor().copy("COPY vocab.concept_embedding (concept_id, model, text_md5, domain_id, "
                                    "embedding) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text", "text", "text", "bytea"])
                copy_rows(copy, [(cid, model_key, h, domain.get(cid), v)
                                 for cid, h, v in zip(ids, md5s, vectors, strict=True)])
            return len(ids)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _emb_in (concept_id integer, text_md5 text, "
                     "embedding public.vector) ON COMMIT DELETE ROWS")
        with conn.cursor().copy("COPY _emb_in (concept_id, text_md5, embedding) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            copy_rows(copy, list(zip(ids, md5s, vectors, strict=True)))
        cur = conn.execute(
            """INSERT INTO vocab.concept_embedding (concept_id, model, text_md5, domain_id, embedding)
               SELECT i.concept_id, %s, i.text_md5, c.domain_id, i.embedding
               FROM _emb_in i LEFT JOIN vocab.concept c ON c.concept_id = i.concept_id
               ON CONFLICT (concept_id, model) DO UPDATE
               SET text_md5 = EXCLUDED.text_md5, domain_id = EXCLUDED.domain_id, embedding = EXCLUDED.embedding""",
            (model_key,))
        return cur.rowcount


def delete_orphans(conn: psycopg.Connection, model_key: str, vocabularies: Sequence[str] | None) -> int:
    """Embeddings of concepts that are gone, no longer valid standard, or outside the configured vocabularies."""
    q = """DELETE FROM vocab.concept_embedding e WHERE e.model = %s AND NOT EXISTS (
             SELECT 1 FROM vocab.concept c WHERE c.concept_id = e.concept_id
             AND c.standard_concept = 'S' AND c.invalid_reason IS NULL"""
    params: list = [model_key]
    if vocabularies is not None:
        q += " AND c.vocabulary_id = ANY(%s)"
        params.append(list(vocabularies))
    q += ")"
    with conn.transaction():
        return conn.execute(q, params).rowcount


def create_hnsw(conn: psycopg.Connection, table: str, name: str, model_key: str, dim: int, *, m: int = 16,
                ef_construction: int = 128, maintenance_work_mem: str = "1GB", workers: int = 2,
                storage: str = "vector") -> None:
    """A partial HNSW cosine index on `table`'s rows of one model (inside the caller's transaction)."""
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem)))
    # pgvector builds HNSW in parallel; the encoder is idle by now, so let the build use the cores.
    conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(sql.Literal(workers)))
    conn.execute(sql.SQL(
        "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw "
        "((embedding::{}) {}) WITH (m = {}, ef_construction = {}) "
        "WHERE model = {}").format(sql.Identifier(name), sql.Identifier("vocab", table), _typed(storage, dim),
                                   sql.SQL("public.{}").format(sql.Identifier(f"{storage}_cosine_ops")),
                                   sql.Literal(m), sql.Literal(ef_construction), sql.Literal(model_key)))


def ensure_index(conn: psycopg.Connection, model_key: str, dim: int, *, m: int = 16, ef_construction: int = 128,
                 maintenance_work_mem: str = "1GB", workers: int = 2, storage: str = "vector") -> str:
    """The model's partial HNSW cosine index in `storage`; built once, kept up to date by later inserts. The
    model's index of the other storage, if any, is dropped with the build (one index per model in memory)."""
    name = index_name(model_key, storage)
    with conn.transaction():
        create_hnsw(conn, "concept_embedding", name, model_key, dim, m=m, ef_construction=ef_construction,
                    maintenance_work_mem=maintenance_work_mem, workers=workers, storage=storage)
        for other in ("vector", "halfvec"):
            if other != storage:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(
                    sql.Identifier("vocab", index_name(model_key, other))))
        conn.execute("UPDATE vocab.embedding_model SET index_name = %s WHERE model = %s", (name, model_key))
    conn.execute("ANALYZE vocab.concept_embedding")
    return name


AUTO_DOMAIN_SHARE = 0.25  # "auto": a domain below this share of the model's vectors gets a partial index


def domain_index_name(model_key: str, storage: str, domain: str) -> str:
    return f"{index_name(model_key, storage)}_d{hashlib.sha1(domain.encode()).hexdigest()[:8]}"


REBUILD_SHARE = 0.1  # sync_domains: above this share of a model's rows changing, drop its indexes and rebuild


def sync_domains(conn: psycopg.Connection, model_key: str) -> int:
    """Copy each concept's domain onto the model's embedding rows where it changed (a new release may move a
    concept; rows written before migration 140 have none); the partial domain indexes follow the rows. When many
    rows change, the model's HNSW indexes are dropped first (the caller, embed_concepts, rebuilds them): an
    updated row is inserted into each graph again, and a million of those take longer than one build.
    Returns the rows changed."""
    stale = """FROM vocab.concept c WHERE e.model = %s AND c.concept_id = e.concept_id
               AND e.domain_id IS DISTINCT FROM c.domain_id"""
    n = scalar(conn.execute("""SELECT count(*) FROM vocab.concept_embedding e JOIN vocab.concept c
                               ON c.concept_id = e.concept_id
                               WHERE e.model = %s AND e.domain_id IS DISTINCT FROM c.domain_id""", (model_key,)))
    if not n:
        return 0
    with conn.transaction():
        if n > REBUILD_SHARE * count(conn, model_key):
            names = [index_name(model_key, st) for st in ("vector", "halfvec")]
            names += list(domain_indexes(conn, model_key).values())
            for name in names:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier("vocab", name)))
            conn.execute("UPDATE vocab.embedding_model SET domain_indexes = '{}'::jsonb WHERE model = %s",
                         (model_key,))
        return conn.execute(f"UPDATE vocab.concept_embedding e SET domain_id = c.domain_id {stale}",
                            (model_key,)).rowcount


def ensure_domain_indexes(conn: psycopg.Connection, model_key: str, dim: int, domains: Sequence[str], *,
                          m: int = 16, ef_construction: int = 128, maintenance_work_mem: str = "1GB",
                          workers: int = 2, storage: str = "vector") -> dict[str, str]:
    """The model's partial HNSW indexes, one per domain of `domains` (["auto"]: each domain under
    AUTO_DOMAIN_SHARE of its vectors); indexes of domains no longer chosen, or of another storage, are dropped.
    Returns domain -> index name, also recorded in vocab.embedding_model.domain_indexes."""
    counts: dict[str, int] = dict(conn.execute(
        "SELECT domain_id, count(*) FROM vocab.concept_embedding WHERE model = %s AND domain_id IS NOT NULL "
        "GROUP BY domain_id", (model_key,)).fetchall())
    total = sum(counts.values())
    if list(domains) == ["auto"]:
        chosen = sorted(d for d, n in counts.items() if total and n < AUTO_DOMAIN_SHARE * total)
    else:
        chosen = sorted(d for d in domains if d in counts)
    row = conn.execute("SELECT domain_indexes FROM vocab.embedding_model WHERE model = %s", (model_key,)).fetchone()
    before: dict[str, str] = dict(row[0]) if row and row[0] else {}
    out = {d: domain_index_name(model_key, storage, d) for d in chosen}
    for d, name in before.items():
        if out.get(d) != name:
            with conn.transaction():
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier("vocab", name)))
    for d, name in out.items():
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem)))
            conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(sql.Literal(workers)))
            conn.execute(sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON vocab.concept_embedding USING hnsw ((embedding::{}) {}) "
                "WITH (m = {}, ef_construction = {}) WHERE model = {} AND domain_id = {}").format(
                sql.Identifier(name), _typed(storage, dim),
                sql.SQL("public.{}").format(sql.Identifier(f"{storage}_cosine_ops")), sql.Literal(m),
                sql.Literal(ef_construction), sql.Literal(model_key), sql.Literal(d)))
    with conn.transaction():
        conn.execute("UPDATE vocab.embedding_model SET domain_indexes = %s WHERE model = %s",
                     (Jsonb(out), model_key))
    return out


def domain_indexes(conn: psycopg.Connection, model_key: str) -> dict[str, str]:
    """domain -> the model's partial index of it (empty: none built)."""
    row = conn.execute("SELECT domain_indexes FROM vocab.embedding_model WHERE model = %s", (model_key,)).fetchone()
    return dict(row[0]) if row and row[0] else {}


def count(conn: psycopg.Connection, model_key: str) -> int:
    return scalar(conn.execute("SELECT count(*) FROM vocab.concept_embedding WHERE model = %s",
                        (model_key,)))


def vector_search(conn: psycopg.Connection, model_key: str, dim: int, query: np.ndarray, k: int, *,
                  ef_search: int = 200, domains: Sequence[str] | None = None,
                  vocabularies: Sequence[str] | None = None, exact: bool = False,
                  storage: str = "vector", by_domain: bool = False) -> list[Candidate]:
    """Top-k valid standard concepts by cosine similarity (best first; scores["vector"] is the similarity too).
    `storage`: the type the model's index keeps (the query is cast to it, or the index goes unused); `exact` skips
    the index and compares in full precision (for recall checks). `by_domain` (every domain of `domains` has a
    partial index, see ensure_domain_indexes): one top-k search per domain on its own graph, merged, instead of
    an iterative scan of the model's whole index."""
    filters = [sql.SQL("c.standard_concept = 'S'"), sql.SQL("c.invalid_reason IS NULL")]
    params: list = []
    if domains:
        filters.append(sql.SQL("c.domain_id = ANY(%s)"))
        params.append(list(domains))
    if vocabularies:
        filters.append(sql.SQL("c.vocabulary_id = ANY(%s)"))
        params.append(list(vocabularies))
    # The order is the index's (its type: the planner uses the index only for that expression); the similarity
    # returned is always computed in full precision.
    full = sql.SQL("(e.embedding::{t}) OPERATOR(public.<=>) %s::{t}").format(t=_typed("vector", dim))
    order = sql.SQL("(e.embedding::{t}) OPERATOR(public.<=>) %s::{t}").format(
        t=_typed("vector" if exact else storage, dim))
    one = sql.SQL("""SELECT c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id,
                            c.concept_code, 1 - ({full}) AS similarity
                     FROM vocab.concept_embedding e JOIN vocab.concept c ON c.concept_id = e.concept_id
                     WHERE e.model = {model} AND {filters}{domain}
                     ORDER BY {order} LIMIT {k}""")
    args = dict(full=full, order=order, model=sql.Literal(model_key), filters=sql.SQL(" AND ").join(filters),
                k=sql.Literal(k))
    lit = vector_literal(query)
    if by_domain and domains and not exact:
        # e.domain_id = '<literal>': the planner matches each branch to that domain's partial index
        parts = [sql.SQL("({})").format(one.format(**args, domain=sql.SQL(" AND e.domain_id = {}").format(
            sql.Literal(d)))) for d in sorted(set(domains))]
        q = sql.SQL("SELECT * FROM ({}) u ORDER BY similarity DESC LIMIT {}").format(
            sql.SQL(" UNION ALL ").join(parts), sql.Literal(k))
        qparams = [v for _ in parts for v in (lit, *params, lit)]
    else:
        q = one.format(**args, domain=sql.SQL(""))
        qparams = [lit, *params, lit]
    with conn.transaction():
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
            conn.execute("SET LOCAL enable_bitmapscan = off")
        else:
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(max(ef_search, k))))
            # Filters drop rows after the index scan; iterative scans keep reading until k rows pass.
            conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        # prepare=False: psycopg prepares a statement after 5 runs and would reuse that plan even where the
        # settings above call for another (an exact search silently served by the index).
        rows = conn.execute(q, qparams, prepare=False).fetchall()
    if not exact:
        # relaxed_order may return slightly out of order; order by the exact similarity it computed.
        rows.sort(key=lambda r: -r[6])
    return [candidate(r, float(r[6]), {"vector": float(r[6])}) for r in rows]
