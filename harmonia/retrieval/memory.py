"""Mapping memory: what is already mapped, as a third candidate generator.

ICD10 says "Other specified spondylopathies, lumbar region" where SNOMED says "Disorder of lumbar spine": the target
shares few words with the source, so neither the embedder nor trigrams find it, but a sibling source that is already
mapped ("..., cervical region" -> "Disorder of cervical spine") reads almost the same. The memory holds such known
mappings with an embedding of each source text; hybrid retrieval looks up the sources most similar to a new one and
adds their targets to the candidate pool, scored by that similarity (harmonia.retrieval.hybrid).

What goes in (`harmonia memory build`, harmonia.groundtruth.known_mappings), by the same rule as every trained or
tuned part of Harmonia:
- the vocabulary's own 'Maps to' from non-standard concepts whose source is in the benchmark's DEVELOPMENT part
  (harmonia.groundtruth.part_of), so test-part sources stay unseen and benchmark figures stay honest;
- the development-part rows of approved mapping files named with --pairs-from (Usagi exports, benchmark sets);
- reviewers' decisions (concept_map rows decided_by = 'reviewer') whose source is not in the test part.
`--all-parts` drops the split (production: use every known mapping; test-part figures then mean nothing). Only
targets that are valid standard concepts of the configured vocabularies are kept.

A source never gets its own mapping back: retrieval excludes memory rows with the same (source_code, source_vocab)
as the term being mapped, so tuning on development sources is leave-one-out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg

from harmonia.config import Settings
from harmonia.domain import SourceKey, SourceTargets
from harmonia.embedding.model import Embedder
from harmonia.store import embeddings as emb_store
from harmonia.store import memory as mem_store


@dataclass
class MemoryReport:
    model: str
    rows: int
    by_origin: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # the same (vocab, code) more than once: the later origin wins (a review over a file)
    seconds: float = 0.0


def build_memory(conn: psycopg.Connection, embedder: Embedder, settings: Settings, maps: Sequence[SourceTargets], *,
                 progress: bool = True) -> MemoryReport:
    """Encode the mapped sources' texts with the embedder (as queries: the memory is compared with queries) and
    replace the model's memory in one transaction."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    latest: dict[SourceKey, SourceTargets] = {}
    for st in maps:  # one row per source: a reviewer's decision overrides the vocabulary's or a file's
        latest[st.key] = st
    rows = list(latest.values())
    with conn.transaction():
        emb_store.register_model(conn, embedder.key, embedder.name_or_path, embedder.dim)
    batch = max(settings.embedding.batch_size, 1)
    vectors: list[np.ndarray] = []
    with tqdm(total=len(rows), unit="source", desc="memory", disable=not progress) as bar:
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            vectors.extend(embedder.encode_queries([st.source_text for st in chunk], batch_size=batch))
            bar.update(len(chunk))
    n = mem_store.replace(conn, embedder.key, embedder.dim, rows, vectors,
                          m=settings.retrieval.hnsw_m, ef_construction=settings.retrieval.hnsw_ef_construction,
                          maintenance_work_mem=settings.retrieval.maintenance_work_mem)
    by_origin: dict[str, int] = {}
    for st in rows:
        by_origin[st.origin] = by_origin.get(st.origin, 0) + 1
    return MemoryReport(model=embedder.key, rows=n, by_origin=by_origin, duplicates=len(maps) - len(rows),
                        seconds=time.perf_counter() - t0)
