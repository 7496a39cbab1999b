"""Mapping memory: what is already mapped, as a third candidate generator.

ICD10 says "Other specified spondylopathies, lumbar region" where SNOMED says "Disorder of lumbar spine": the target
shares few words with the source, so neither the embedder nor trigrams find it, but a sibling source that is already
mapped ("..., cervical region" -> "Disorder of cervical spine") reads almost the same. The memory holds such known
mappings with an embedding of each source text; hybrid retrieval looks up the sources most similar to a new one and
adds their targets to the candidate pool, scored by that similarity (harmonia.retrieve_hybrid).

What goes in (`harmonia memory build`), by the same rule as every trained or tuned part of Harmonia:
- the vocabulary's own 'Maps to' from non-standard concepts whose source is in the benchmark's DEVELOPMENT part
  (harmonia.benchmark.split.part_of), so test-part sources stay unseen and benchmark figures stay honest;
- the development-part rows of approved mapping files named with --pairs-from (Usagi exports, benchmark sets);
- reviewers' decisions (concept_map rows decided_by = 'reviewer') whose source is not in the test part.
`--all-parts` drops the split (production: use every known mapping; test-part figures then mean nothing). Only
targets that are valid standard concepts of the configured vocabularies are kept.

A source never gets its own mapping back: retrieval excludes memory rows with the same (source_code, source_vocab)
as the term being mapped, so tuning on development sources is leave-one-out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from harmonia.config import Settings
from harmonia.embedding.model import Embedder
from harmonia.groundtruth import part_of
from harmonia.store import embeddings as emb_store
from harmonia.store import memory as mem_store
from harmonia.store import training as train_store
from harmonia.store import vocab as vocab_store

log = logging.getLogger(__name__)


@dataclass
class KnownMap:
    """One mapped source and every target it maps to."""

    source_vocab: str
    source_code: str
    source_key: str      # the split key: source concept_id, or "vocab:code"
    source_text: str
    targets: list[int]
    origin: str          # vocabulary | file | review

    def row(self) -> tuple:
        return (self.source_vocab, self.source_code, self.source_key, self.source_text, self.targets, self.origin)


def known_mappings(conn: psycopg.Connection, vocabularies: Sequence[str] | None, *,
                   extra_sets: Sequence[Path] = (), include_reviews: bool = True,
                   all_parts: bool = False) -> list[KnownMap]:
    """Known mappings, in a stable order (vocabulary, then files, then reviews), of the development part unless
    `all_parts`, with targets kept only where they are valid standard concepts of `vocabularies` (None: any)."""
    from harmonia.retrieval.tune import rows_from_csv

    def wanted_part(key: int | str) -> bool:
        return all_parts or part_of(key) == "dev"

    out: list[KnownMap] = []
    by_src: dict[int, KnownMap] = {}
    for sid, code, voc, name, _dom, target in vocab_store.maps_to_pairs(conn):
        if not wanted_part(sid):
            continue
        km = by_src.get(sid)
        if km is None:
            km = by_src[sid] = KnownMap(voc, code, str(sid), name, [], "vocabulary")
            out.append(km)
        km.targets.append(int(target))
    for path in extra_sets:
        out += [KnownMap(r.source_vocab, r.source_code, str(r.split_key), r.source_text, list(r.targets), "file")
                for r in rows_from_csv(Path(path)) if wanted_part(r.split_key)]
    if include_reviews:
        approvals = train_store.reviewer_approvals(conn)
        as_concept = train_store.source_concept_ids(conn, [(r["source_code"], r["source_vocab"]) for r in approvals])
        for r in approvals:
            # A reviewed code keeps the benchmark's split: its vocabulary concept id, else its "vocab:code" key.
            key = as_concept.get((r["source_code"], r["source_vocab"]), f"{r['source_vocab']}:{r['source_code']}")
            if wanted_part(key):
                out.append(KnownMap(r["source_vocab"], r["source_code"], str(key), r["source_text"],
                                    [int(r["concept_id"])], "review"))
    concepts = vocab_store.get_concepts(conn, sorted({t for km in out for t in km.targets}))
    wanted = set(vocabularies) if vocabularies else None

    def ok(cid: int) -> bool:
        c = concepts.get(cid)
        return (c is not None and c["standard_concept"] == "S" and c["invalid_reason"] is None
                and (wanted is None or c["vocabulary_id"] in wanted))

    for km in out:
        km.targets = sorted({t for t in km.targets if ok(t)})
    return [km for km in out if km.targets and km.source_text.strip()]


@dataclass
class MemoryReport:
    model: str
    rows: int
    by_origin: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # the same (vocab, code) more than once: the later origin wins (a review over a file)
    seconds: float = 0.0


def build_memory(conn: psycopg.Connection, embedder: Embedder, settings: Settings, maps: Sequence[KnownMap], *,
                 progress: bool = True) -> MemoryReport:
    """Encode the mapped sources' texts with the embedder (as queries: the memory is compared with queries) and
    replace the model's memory in one transaction."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    latest: dict[tuple[str, str], KnownMap] = {}
    for km in maps:  # one row per source: a reviewer's decision overrides the vocabulary's or a file's
        latest[(km.source_vocab, km.source_code)] = km
    rows = list(latest.values())
    with conn.transaction():
        emb_store.register_model(conn, embedder.key, embedder.name_or_path, embedder.dim)
    batch = max(settings.embedding_batch_size, 1)
    vectors = []
    with tqdm(total=len(rows), unit="source", desc="memory", disable=not progress) as bar:
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            vectors.extend(embedder.encode_queries([km.source_text for km in chunk], batch_size=batch))
            bar.update(len(chunk))
    n = mem_store.replace(conn, embedder.key, embedder.dim, [km.row() for km in rows], vectors,
                          m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction,
                          maintenance_work_mem=settings.maintenance_work_mem)
    by_origin: dict[str, int] = {}
    for km in rows:
        by_origin[km.origin] = by_origin.get(km.origin, 0) + 1
    return MemoryReport(model=embedder.key, rows=n, by_origin=by_origin, duplicates=len(maps) - len(rows),
                        seconds=time.perf_counter() - t0)
