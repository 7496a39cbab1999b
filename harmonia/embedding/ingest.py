"""`harmonia embed`: every valid standard concept of the configured vocabularies into pgvector, in batches
(resumable: a re-run embeds only what is missing or renamed), then the model's HNSW index.

After a new vocabulary release this is incremental: only concepts that are new or whose embedded text changed are
encoded (`new`, `changed`); concepts deprecated, made non-standard or gone leave the index (`deleted`); the HNSW
index is kept and follows the inserts and deletes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg

from harmonia.config import RetrievalSettings
from harmonia.embedding.model import Embedder
from harmonia.store import embeddings as emb_store


@dataclass
class EmbedReport:
    model: str
    dim: int
    todo: int
    written: int
    batches: int
    deleted: int
    seconds: float
    total: int
    index_seconds: float = 0.0  # of `seconds`: building the HNSW index when it did not exist yet
    new: int = 0                # of `todo`: concepts without an embedding
    changed: int = 0            # of `todo`: concepts whose embedded text changed (renamed)
    embedded_ids: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def embed_concepts(conn: psycopg.Connection, embedder: Embedder, *, vocabularies: Sequence[str] | None,
                   batch_size: int = 256, progress: bool = True, retrieval: RetrievalSettings | None = None,
                   limit: int | None = None) -> EmbedReport:
    """Embed what is missing for this model; each batch is its own committed transaction."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with conn.transaction():
        emb_store.register_model(conn, embedder.key, embedder.name_or_path, embedder.dim)
    deleted = emb_store.delete_orphans(conn, embedder.key, vocabularies)
    todo = emb_store.concepts_to_embed(conn, embedder.key, vocabularies)
    if limit is not None:
        todo = todo[:limit]
    fresh = emb_store.count(conn, embedder.key) == 0  # a first ingest needs no upsert
    written = batches = 0
    with tqdm(total=len(todo), unit="concept", desc="embed", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ids = [r[0] for r in chunk]
            texts = [r[1] for r in chunk]
            vectors = embedder.encode_documents(texts, batch_size=batch_size)
            written += emb_store.write_batch(conn, embedder.key, ids, texts, vectors, fresh=fresh)
            batches += 1
            bar.update(len(chunk))
    s = retrieval or RetrievalSettings()  # the HNSW build parameters
    t_index = time.perf_counter()
    # a release may have moved concepts to another domain: their rows (and so the domain indexes) follow
    emb_store.sync_domains(conn, embedder.key)
    emb_store.ensure_index(conn, embedder.key, embedder.dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction,
                           maintenance_work_mem=s.maintenance_work_mem, workers=s.hnsw_workers, storage=s.hnsw_storage)
    emb_store.ensure_domain_indexes(conn, embedder.key, embedder.dim, s.hnsw_domain_indexes, m=s.hnsw_m,
                                    ef_construction=s.hnsw_ef_construction,
                                    maintenance_work_mem=s.maintenance_work_mem, workers=s.hnsw_workers,
                                    storage=s.hnsw_storage)
    t_end = time.perf_counter()
    changed = sum(1 for r in todo if r[2])
    return EmbedReport(model=embedder.key, dim=embedder.dim, todo=len(todo), written=written, batches=batches,
                       deleted=deleted, seconds=t_end - t0, index_seconds=t_end - t_index,
                       total=emb_store.count(conn, embedder.key), new=len(todo) - changed, changed=changed,
                       embedded_ids=[r[0] for r in todo])
