"""The router: auto-approve what the reranker is sure of, send the rest to review with the reasoning attached."""

from __future__ import annotations

from collections.abc import Sequence

from harmonia.domain import Action, Candidate, Decision, RankingEntry, RerankResult, SourceTerm


def route(term: SourceTerm, candidates: Sequence[Candidate], result: RerankResult, threshold: float,
          top_n: int = 5) -> Decision:
    by_id = {c.concept_id: c for c in candidates}
    # The reranker should only return candidates; anything else is dropped here too (the FK is the last line).
    ranked = [r for r in result.ranked if r.concept_id in by_id][:top_n]
    ranking: list[RankingEntry] = []
    for r in ranked:
        c = by_id[r.concept_id]
        entry = RankingEntry(concept_id=r.concept_id, concept_name=c.concept_name, domain_id=c.domain_id,
                             vocabulary_id=c.vocabulary_id, concept_class_id=c.concept_class_id,
                             concept_code=c.concept_code, similarity=round(c.similarity, 4),
                             score=round(float(r.score), 4), rationale=r.rationale)
        if c.evidence:  # e.g. the already-mapped source through which the mapping memory proposed this concept
            entry["evidence"] = c.evidence
        ranking.append(entry)
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
    action: Action = "approve" if reason == "approved" else "review"
    return Decision(term=term, action=action, concept_id=top, confidence=confidence,
                    model_version=result.model_version, ranking=ranking, reason=reason, error=result.error,
                    usage=result.usage, candidates=list(candidates))
