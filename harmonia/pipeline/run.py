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
from harmonia.domain import Candidate, Decision, RerankResult, SourceTerm
from harmonia.pipeline import confidence as conf_mod
from harmonia.pipeline.confidence import Calibration
from harmonia.pipeline.route import route
from harmonia.rerank.base import Reranker
from harmonia.retrieval.base import Retriever
from harmonia.store import mapping as map_store

log = logging.getLogger(__name__)


class Pipeline:
    """retrieve -> rerank -> route for batches of source terms; owns (and closes) its retriever and reranker."""

    def __init__(self, retriever: Retriever, reranker: Reranker, router: RouterSettings,
                 rerank: RerankSettings, calibration: Calibration | None = None) -> None:
        """`calibration`: the reranker's calibrator and certified thresholds (`Calibration.load`); without one
        nothing is auto-approved (reason `uncalibrated`)."""
        self.retriever = retriever
        self.reranker = reranker
        # No longer a threshold by itself: a floor under every calibrated one.
        self.floor = router.auto_approve_threshold
        self.top_n = rerank.top_n
        self.calibration = calibration or Calibration.uncalibrated(reranker.model_version)

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
            calibration = Calibration.load(conn, settings.data_path, reranker.name, reranker.model_version)
        except BaseException:
            retriever.close()
            raise
        return cls(retriever, reranker, settings.router, settings.rerank, calibration)

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
            decisions.append(self.route(term, cands, result))
        return decisions

    def route(self, term: SourceTerm, cands: Sequence[Candidate], result: RerankResult) -> Decision:
        return route_calibrated(term, cands, result, self.calibration, self.floor, self.top_n)


def route_calibrated(term: SourceTerm, cands: Sequence[Candidate], result: RerankResult, cal: Calibration,
                     floor: float, top_n: int = 5) -> Decision:
    """Calibrate a reranker's answer and route it against the certified threshold of the term's kind or set (none:
    review, `uncalibrated`); `floor` (the auto_approve_threshold setting) is a floor under every threshold."""
    try:
        cal.refresh_if_due()
    except psycopg.OperationalError as exc:  # the database is away: the thresholds loaded last stay in force
        log.warning("calibration refresh failed, keeping the loaded thresholds: %s", exc)
    kind, domains = conf_mod.kind_of(term.source_vocab)
    ev = conf_mod.evidence(term, cands, result, domains)
    record: dict[str, object] = {"kind": kind, "raw_confidence": round(float(result.confidence), 4)}
    if ev is not None:  # kept with the decision: what a calibrator is fitted on (`bench calibrate`)
        record["evidence"] = {k: round(v, 6) for k, v in ev.items()}
        first = next(c for c in cands if c.concept_id == result.ranked[0].concept_id)
        record["domain"] = first.domain_id  # to recompute the domain fit for another kind (benchmarks)
    if cal.calibrator is None or ev is None:
        # Nothing to calibrate (no calibrator; or no first choice, which the router sends to review anyway)
        return route(term, cands, result, None, top_n, calibration=record)
    prob = cal.calibrator.probability(ev, kind)
    stored = cal.threshold_for(kind, term.source_vocab, result.model_version)
    threshold = None
    if stored is not None:
        record.update(threshold_id=stored.id, origin=stored.origin, source_vocab=stored.source_vocab)
        if stored.threshold is not None:  # a calibration that certified no threshold approves nothing
            threshold = max(stored.threshold, floor)
    record.update(calibrator=cal.calibrator.hash, threshold=threshold)
    return route(term, cands, result, threshold, top_n, confidence=prob,
                 model_version=f"{result.model_version}+cal:{cal.calibrator.hash}", calibration=record)


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
