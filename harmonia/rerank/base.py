"""The reranker interface, and `none` (retrieval order).

A reranker turns a source term and its retrieved candidates into a RerankResult (harmonia.domain): the best few,
a confidence in the first, the model_version behind them. The router (harmonia.pipeline.route) treats all alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

from harmonia.domain import Candidate, RankedCandidate, RerankResult, SourceTerm


class Reranker:
    """Base class; subclasses implement `rerank` and may override `rerank_many` to batch or run concurrently, and
    `close` to release what they opened (a client, a connection). A reranker is a context manager."""

    name = "base"

    def rerank(self, term: SourceTerm, candidates: Sequence[Candidate]) -> RerankResult:
        raise NotImplementedError

    def rerank_many(self, items: Sequence[tuple[SourceTerm, Sequence[Candidate]]]) -> list[RerankResult]:
        return [self.safe_rerank(t, c) for t, c in items]

    def safe_rerank(self, term: SourceTerm, candidates: Sequence[Candidate]) -> RerankResult:
        """`rerank`, with any unexpected exception turned into an error result (the code goes to review)."""
        try:
            return self.rerank(term, candidates)
        except Exception as exc:  # noqa: BLE001 - no fault may crash a run or lose a code
            return RerankResult(ranked=[], confidence=0.0, model_version=self.model_version,
                                error=f"{type(exc).__name__}: {exc}", error_kind="reranker_exception")

    @property
    def model_version(self) -> str:
        return self.name

    @property
    def trained_sources(self) -> frozenset[str] | None:
        """"VOCAB:CODE" of the sources this reranker learnt from (a calibration leaves them out); empty for one
        that learnt from no source, None when a trained model does not say."""
        return frozenset()

    def close(self) -> None:  # an optional hook: a reranker holding nothing closes nothing
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class NoneReranker(Reranker):
    """Keeps the retrieval order. The confidence is the top candidate's absolute semantic similarity (its cosine,
    or with the mapping memory the boosted cosine of a remembered source) where retrieval reports one, else its
    similarity, clipped to 0..1. Not hybrid's fused score: min-max fusion gives nearly every top candidate ~1.0
    (measured on 500 ICD10 test terms: 94% above 0.9 at precision 0.71, against 52% at 0.85 for the semantic
    score)."""

    name = "none"

    def __init__(self, top_n: int = 5) -> None:
        self.top_n = top_n

    def rerank(self, term: SourceTerm, candidates: Sequence[Candidate]) -> RerankResult:
        ranked = [RankedCandidate(c.concept_id, max(0.0, min(1.0, c.similarity)), "retrieval order")
                  for c in candidates[: self.top_n]]
        top = candidates[0] if ranked else None
        conf = max(0.0, min(1.0, top.scores.get("semantic", top.similarity))) if top is not None else 0.0
        return RerankResult(ranked=ranked, confidence=conf, model_version="none", no_match=not ranked)
