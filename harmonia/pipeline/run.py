"""retrieve -> rerank -> route -> persist, for a list of source terms (used by `harmonia map`, the quickstart,
the benchmark and the workers). Deciding and persisting are separate so a worker can persist a decision and its
queue state in one transaction.

A Pipeline owns its retriever and reranker: closing it (or leaving its `with` block) closes both.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import psycopg

from harmonia.config import RerankSettings, RouterSettings, Settings
from harmonia.domain import Decision, RerankResult, SourceTerm
from harmonia.pipeline.route import route
from harmonia.rerank.base import Reranker
from harmonia.retrieval.base import Retriever
from harmonia.store import mapping as map_store

log = logging.getLogger(__name__)


class Pipeline:
    """retrieve -> rerank -> route for batches of source terms; owns (and closes) its retriever and reranker."""

    def __init__(self, retriever: Retriever, reranker: Reranker, router: RouterSettings,
                 rerank: RerankSettings) -> None:
        self.retriever = retriever
        self.reranker = reranker
        self.threshold = router.auto_approve_threshold
        self.top_n = rerank.top_n

    @classmethod
    def from_settings(cls, conn: psycopg.Connection, settings: Settings) -> Pipeline:
        """The configured retriever (on `conn`) and reranker. The retriever comes first: without embeddings there
        is no reranker to close."""
        from harmonia.embedding.model import Embedder
        from harmonia.rerank import make_reranker
        from harmonia.retrieval import make_retriever

        retriever = make_retriever(conn, Embedder.from_settings(settings), settings)
        try:
            reranker = make_reranker(settings, conn)
        except BaseException:
            retriever.close()
            raise
        return cls(retriever, reranker, settings.router, settings.rerank)

    def close(self) -> None:
        """Close the reranker and the retriever (not the connection the retriever was given)."""
        try:
            self.reranker.close()
        finally:
            self.retriever.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def decide(self, terms: Sequence[SourceTerm]) -> list[Decision]:
        """Retrieval batched across the terms, then the reranker (which may batch or run concurrently)."""
        if not terms:
            return []
        candidate_lists = self.retriever.search_many([t.source_text for t in terms],
                                                     source_keys=[t.key for t in terms])
        results = self.reranker.rerank_many(list(zip(terms, candidate_lists, strict=True)))
        decisions = []
        for term, cands, result in zip(terms, candidate_lists, results, strict=True):
            if not isinstance(result, RerankResult):  # defensive: a reranker bug must not lose the code
                result = RerankResult([], 0.0, self.reranker.model_version, error="reranker returned nothing",
                                      error_kind="reranker_exception")
            decisions.append(route(term, cands, result, self.threshold, self.top_n))
        return decisions


@dataclass
class MapSummary:
    input_rows: int = 0
    approved: int = 0
    review: int = 0
    already_mapped: int = 0
    skipped_invalid: int = 0
    duplicates: int = 0
    errors: int = 0  # decisions that went to review because of a fault (counted in review too)
    reasons: Counter[str] = field(default_factory=Counter)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def reconciles(self) -> bool:
        return (self.approved + self.review + self.already_mapped + self.skipped_invalid + self.duplicates
                == self.input_rows)


def map_terms(conn: psycopg.Connection, pipeline: Pipeline, terms: Sequence[SourceTerm], *,
              batch_size: int = 32, skip_existing: bool = True, summary: MapSummary | None = None,
              progress: bool = True, on_decision: Callable[[Decision, str], None] | None = None) -> MapSummary:
    """Decide and persist each term, one transaction per term (nothing half-written)."""
    from tqdm import tqdm

    s = summary or MapSummary(input_rows=len(terms))
    todo = list(terms)
    if skip_existing:
        existing = map_store.existing_maps(conn, [t.key for t in todo])
        s.already_mapped += sum(1 for t in todo if t.key in existing)
        todo = [t for t in todo if t.key not in existing]
    with tqdm(total=len(todo), unit="code", desc="map", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            for d in pipeline.decide(todo[start:start + batch_size]):
                with conn.transaction():
                    outcome = map_store.record_decision(conn, d)
                if outcome == "approved":
                    s.approved += 1
                elif outcome == "review":
                    s.review += 1
                    if d.error:
                        s.errors += 1
                else:
                    s.already_mapped += 1
                s.reasons[d.reason] += 1
                s.decisions.append(d)
                if on_decision:
                    on_decision(d, outcome)
                bar.update(1)
    return s
