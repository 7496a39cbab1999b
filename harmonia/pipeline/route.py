"""The router: auto-approve what the reranker is sure of, send the rest to review with the reasoning attached."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from harmonia.rerank.base import RerankResult, SourceTerm
from harmonia.retrieval.vector import Candidate


@dataclass
class Decision:
    term: SourceTerm
    action: Literal["approve", "review"]
    concept_id: int | None              # the top-1 (approve: the mapped concept)
    confidence: float
    model_version: str
    ranking: list[dict[str, Any]]       # top-N with names, scores and rationales: what a reviewer sees
    reason: str                         # approved | low_confidence | no_match | no_candidates | <error kind>
    error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)  # all retrieved (for metrics; not stored)

    def ranking_json(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "confidence": self.confidence, "ranked": self.ranking,
                "reason": self.reason, "error": self.error, "usage": self.usage,
                "retrieved": len(self.candidates), "source_frequency": self.term.source_frequency}


def route(term: SourceTerm, candidates: Sequence[Candidate], result: RerankResult, threshold: float,
          top_n: int = 5) -> Decision:
    by_id = {c.concept_id: c for c in candidates}
    # The reranker should only return candidates; anything else is dropped here too (the FK is the last line).
    ranked = [r for r in result.ranked if r.concept_id in by_id][:top_n]
    ranking = [{"concept_id": r.concept_id, "concept_name": by_id[r.concept_id].concept_name,
                "domain_id": by_id[r.concept_id].domain_id, "vocabulary_id": by_id[r.concept_id].vocabulary_id,
                "concept_class_id": by_id[r.concept_id].concept_class_id,
                "concept_code": by_id[r.concept_id].concept_code,
                "similarity": round(by_id[r.concept_id].similarity, 4),
                "score": round(float(r.score), 4), "rationale": r.rationale,
                # e.g. the already-mapped source through which the mapping memory proposed this concept
                **({"evidence": by_id[r.concept_id].evidence} if by_id[r.concept_id].evidence else {})}
               for r in ranked]
    confidence = max(0.0, min(1.0, float(result.confidence)))
    top = ranked[0].concept_id if ranked else None
    if result.error:
        reason = result.error_kind or "error"
    elif not candidates:
        reason = "no_candidates"
    elif result.no_match or top is None:
        reason = "no_match"
    elif confidence >= threshold and result.ranked[0].concept_id in by_id:  # a dropped top-1's confidence is void
        reason = "approved"
    else:
        reason = "low_confidence"
    action: Literal["approve", "review"] = "approve" if reason == "approved" else "review"
    return Decision(term=term, action=action, concept_id=top, confidence=confidence,
                    model_version=result.model_version, ranking=ranking, reason=reason, error=result.error,
                    usage=result.usage, candidates=list(candidates))
