"""The router: auto-approve what a calibration vouches for, send the rest to review with the reasoning attached.

The one router of `harmonia map`, the workers and the API's queue. A decision is auto-approved only when its
(calibrated) confidence reaches a threshold that a calibration certified for its kind or source set; without one
(`threshold` None) it goes to review with reason `uncalibrated`, however sure the reranker says it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harmonia.domain import Action, Candidate, Decision, RankingEntry, RerankResult, SourceTerm


def route(term: SourceTerm, candidates: Sequence[Candidate], result: RerankResult, threshold: float | None,
          top_n: int = 5, *, confidence: float | None = None, model_version: str | None = None,
          calibration: dict[str, Any] | None = None, guard: str | None = None) -> Decision:
    """`threshold`: the certified threshold for this term's kind or set (None: uncalibrated, never approved);
    `confidence`: the calibrated probability (default: the reranker's own confidence); `model_version`: the
    decision's (default: the reranker's); `calibration`: what to record about both; `guard`: the reason a guard
    (harmonia.pipeline.guards) stopped the first choice, which then goes to review whatever its confidence."""
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
    confidence = max(0.0, min(1.0, float(result.confidence if confidence is None else confidence)))
    top = ranked[0].concept_id if ranked else None
    # Further targets: only candidates, never the first choice again as a MAPS_TO (the FK is the last line).
    additional = [a for a in result.additional if a.concept_id in by_id
                  and not (a.concept_id == top and a.mapping_type == "MAPS_TO")]
    if result.error:
        reason = result.error_kind or "error"
    elif not candidates:
        reason = "no_candidates"
    elif result.no_match or top is None:
        reason = "no_match"
    elif guard:
        reason = guard
    elif threshold is None:
        reason = "uncalibrated"
    elif confidence >= threshold and result.ranked[0].concept_id in by_id:  # a dropped top-1's confidence is void
        # The calibration vouches for the first choice alone: further targets it never saw go to a reviewer.
        reason = "additional_targets" if additional else "approved"
    else:
        reason = "low_confidence"
    action: Action = "approve" if reason == "approved" else "review"
    return Decision(term=term, action=action, concept_id=top, confidence=confidence,
                    model_version=model_version or result.model_version, ranking=ranking, reason=reason,
                    error=result.error, usage=result.usage, candidates=list(candidates),
                    calibration=dict(calibration or {}), equivalence=result.equivalence, additional=additional)


def retrieval_ranking(candidates: Sequence[Candidate], top_n: int = 5) -> list[RankingEntry]:
    """The retrieval's own top-N as a reviewer sees it (score: the retrieval similarity), for a review item whose
    reranker gave no ranking (its provider kept failing)."""
    out: list[RankingEntry] = []
    for c in candidates[:top_n]:
        entry = RankingEntry(concept_id=c.concept_id, concept_name=c.concept_name, domain_id=c.domain_id,
                             vocabulary_id=c.vocabulary_id, concept_class_id=c.concept_class_id,
                             concept_code=c.concept_code, similarity=round(c.similarity, 4),
                             score=round(c.similarity, 4), rationale="retrieval order (no reranker answer)")
        if c.evidence:
            entry["evidence"] = c.evidence
        out.append(entry)
    return out
