"""Rerankers: given a source term and its retrieved candidates, rank the best few with a confidence.

One interface, three kinds chosen by the `reranker` setting: `none` (retrieval order, similarity as confidence),
`llm` (harmonia.rerank.llm, a provider forced through a JSON-schema tool call) and `classifier`
(harmonia.rerank.classifier, a local fine-tuned cross-encoder). The router (harmonia.route) treats all alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    from harmonia.config import Settings
    from harmonia.retrieval.vector import Candidate


@dataclass
class SourceTerm:
    source_code: str
    source_vocab: str
    source_text: str
    source_frequency: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int | None = None  # where it came from in an input file, for messages

    @property
    def key(self) -> tuple[str, str]:
        return (self.source_code, self.source_vocab)


@dataclass
class RankedCandidate:
    concept_id: int
    score: float
    rationale: str = ""


@dataclass
class RerankResult:
    ranked: list[RankedCandidate]          # best first, at most rerank_top_n, only ids among the candidates
    confidence: float                      # 0..1: how sure the top-1 is right
    model_version: str                     # reranker, model and prompt/checkpoint hash behind this answer
    no_match: bool = False                 # the reranker says no candidate matches
    error: str | None = None               # a fault: the code goes to review with it
    error_kind: str | None = None          # schema_violation, provider_error, timeout, ...
    usage: dict[str, Any] = field(default_factory=dict)    # tokens, calls, cache hits, latency
    details: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping with the decision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reranker:
    """Base class; subclasses implement `rerank` and may override `rerank_many` to batch or run concurrently."""

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

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


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


def make_reranker(settings: Settings, conn: psycopg.Connection | None = None) -> Reranker:
    """The reranker the settings name. Swapping providers or kinds is configuration, never code."""
    if settings.reranker == "none":
        return NoneReranker(settings.rerank_top_n)
    if settings.reranker == "llm":
        from harmonia.rerank.llm.reranker import LLMReranker

        return LLMReranker.from_settings(settings, conn=conn)
    if settings.reranker == "classifier":
        from harmonia.rerank.classifier.scorer import ClassifierReranker

        return ClassifierReranker.from_settings(settings, conn=conn)
    raise ValueError(f"unknown reranker {settings.reranker!r}")
