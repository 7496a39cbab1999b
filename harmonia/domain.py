"""The types every stage shares: what a source term is, what retrieval returns, what a reranker answers, what the
router decides, and a source with its correct targets (ground truth, known mappings).

This module imports nothing from Harmonia: every other module may import it, and a type that crosses a stage
boundary lives here rather than in the stage that happens to make it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NotRequired, Required, TypedDict

SourceKey = tuple[str, str]
"""(source_code, source_vocab): what identifies a source code everywhere (queue, map, review, memory)."""


@dataclass(frozen=True)
class SourceKind:
    """What a source set is (diagnoses, lab names, drug strings, ...): which domains its first choices may have,
    which domains and target vocabularies retrieval searches, and the kind the calibration is fitted per.
    harmonia.kinds says which kind each source vocabulary has."""

    name: str
    domains: tuple[str, ...] = ()           # a first choice outside these is never auto-approved (empty: any)
    retrieve_domains: tuple[str, ...] = ()  # retrieval searches only these domains (empty: all)
    vocabularies: tuple[str, ...] = ()      # ... and only these target vocabularies (empty: all configured)

    @property
    def calibratable(self) -> bool:
        """The kind 'unknown' (a set nobody declared) is never calibrated as a kind."""
        return self.name != "unknown"


@dataclass
class SourceTerm:
    """A source code to map, as read from a file, the queue or the API."""

    source_code: str
    source_vocab: str
    source_text: str
    source_frequency: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int | None = None  # where it came from in an input file, for messages

    @property
    def key(self) -> SourceKey:
        return (self.source_code, self.source_vocab)


@dataclass(frozen=True)
class Concept:
    """One row of vocab.concept (harmonia.store.concepts reads them)."""

    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    concept_code: str
    standard_concept: str | None
    invalid_reason: str | None

    @property
    def is_valid_standard(self) -> bool:
        return self.standard_concept == "S" and self.invalid_reason is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """A valid standard concept retrieved for a source text, with the scores that found it."""

    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    concept_code: str
    similarity: float  # cosine similarity (vector), the lexical score (lexical), or the fused score (hybrid)
    scores: dict[str, float] = field(default_factory=dict)  # per-generator scores, for the record
    evidence: dict[str, str] = field(default_factory=dict)  # e.g. the remembered source that maps here

    @classmethod
    def of(cls, concept: Concept, similarity: float, scores: dict[str, float] | None = None) -> Candidate:
        return cls(concept_id=concept.concept_id, concept_name=concept.concept_name, domain_id=concept.domain_id,
                   vocabulary_id=concept.vocabulary_id, concept_class_id=concept.concept_class_id,
                   concept_code=concept.concept_code, similarity=similarity, scores=dict(scores or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def compact(self) -> dict[str, Any]:
        """What a reranker needs to see, and no more."""
        return {"id": self.concept_id, "name": self.concept_name, "domain": self.domain_id,
                "vocabulary": self.vocabulary_id, "class": self.concept_class_id}


@dataclass
class RankedCandidate:
    concept_id: int
    score: float
    rationale: str = ""


MappingType = Literal["MAPS_TO", "MAPS_TO_VALUE", "MAPS_TO_UNIT"]
"""Usagi's mapping types: the target itself, the value of a 'Maps to' (history-of, lab results), or a unit."""

Equivalence = Literal["EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED", "UNREVIEWED"]
"""Usagi's equivalence of a source and a target."""

# Reranker failures that say nothing about the code: the provider was down, slow or busy. A worker returns such a
# code to the queue with a back-off instead of sending it to review; every other error kind is the code's own.
RETRYABLE_ERROR_KINDS = frozenset({"rate_limited", "server_error", "timeout", "connection_error"})


@dataclass
class AdditionalTarget:
    """A further target a reranker proposes beside its first choice (a second 'Maps to', a 'Maps to value')."""

    concept_id: int
    mapping_type: MappingType = "MAPS_TO"
    equivalence: Equivalence = "UNREVIEWED"
    rationale: str = ""


@dataclass
class RerankResult:
    """A reranker's answer for one source term."""

    ranked: list[RankedCandidate]          # best first, at most rerank_top_n, only ids among the candidates
    confidence: float                      # 0..1: how sure the top-1 is right
    model_version: str                     # reranker, model and prompt/checkpoint hash behind this answer
    no_match: bool = False                 # the reranker says no candidate matches
    error: str | None = None               # a fault: the code goes to review with it
    error_kind: str | None = None          # schema_violation, provider_error, timeout, ...
    usage: dict[str, Any] = field(default_factory=dict)    # tokens, calls, cache hits, latency
    details: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping with the decision
    equivalence: Equivalence | None = None  # of the first choice, when the reranker says
    additional: list[AdditionalTarget] = field(default_factory=list)  # further targets, only ids among candidates

    @property
    def retryable(self) -> bool:
        """The failure is the provider's, not the code's (see RETRYABLE_ERROR_KINDS)."""
        return self.error is not None and self.error_kind in RETRYABLE_ERROR_KINDS


class RankingEntry(TypedDict):
    """One ranked candidate as a reviewer sees it: stored in concept_map.candidate_ranking_json and
    review_queue.candidates_json, and served by the review API."""

    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    concept_code: str
    similarity: float
    score: float
    rationale: str
    evidence: NotRequired[dict[str, str]]  # e.g. the already-mapped source through which the memory proposed it


class RankingRecord(TypedDict, total=False):
    """concept_map.candidate_ranking_json: the ranking behind a map and how it was made (auto or reviewer)."""

    model_version: Required[str | None]
    confidence: Required[float | None]
    ranked: Required[list[RankingEntry]]
    reason: Required[str | None]
    source_frequency: Required[int | None]
    error: str | None            # auto-approval: the decision's error (None)
    usage: dict[str, Any]        # auto-approval: the reranker's usage
    retrieved: int               # auto-approval: how many candidates were retrieved
    review_item_id: int          # a reviewer's decision: the review item it resolved
    calibration: dict[str, Any]  # the router's calibration: kind, calibrator hash, threshold, raw confidence


Action = Literal["approve", "review"]


@dataclass
class Decision:
    """What the router made of one source term (harmonia.pipeline.route)."""

    term: SourceTerm
    action: Action
    concept_id: int | None              # the top-1 (approve: the mapped concept)
    confidence: float
    model_version: str
    ranking: list[RankingEntry]         # top-N with names, scores and rationales: what a reviewer sees
    # approved | low_confidence | uncalibrated | no_match | no_candidates | <error kind>
    reason: str
    error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)  # all retrieved (for metrics; not stored)
    # How the confidence was calibrated and against what it was compared: kind, calibrator hash, threshold (None:
    # uncalibrated), the reranker's raw confidence, the evidence; empty for a decision made without the router.
    calibration: dict[str, Any] = field(default_factory=dict)

    def ranking_json(self) -> RankingRecord:
        rec: RankingRecord = {"model_version": self.model_version, "confidence": self.confidence,
                              "ranked": self.ranking, "reason": self.reason, "error": self.error,
                              "usage": self.usage, "retrieved": len(self.candidates),
                              "source_frequency": self.term.source_frequency}
        if self.calibration:
            rec["calibration"] = self.calibration
        return rec


@dataclass
class SourceTargets:
    """One source with every correct target: a benchmark row, a known mapping, a training source.

    A source is a vocabulary concept (`source_concept_id` set: 'Maps to' ground truth, or a reviewed code that is
    one) or a code of an external set (a Usagi file, a local code). A prediction is right when it hits any target.
    """

    source_code: str
    source_vocab: str
    source_text: str
    targets: list[int]
    source_concept_id: int | None = None
    source_domain: str = ""
    target_names: list[str] = field(default_factory=list)
    same_name: bool = False      # the source's name equals a target's name (easy for retrieval)
    origin: str = ""             # known mappings: vocabulary | file | review

    @property
    def key(self) -> SourceKey:
        return (self.source_code, self.source_vocab)

    @property
    def split_key(self) -> int | str:
        """What the dev/test split rule hashes (harmonia.groundtruth.part_of): the source concept_id, else
        "vocab:code"."""
        if self.source_concept_id is not None:
            return self.source_concept_id
        return f"{self.source_vocab}:{self.source_code}"


@dataclass(frozen=True)
class MapsToEdge:
    """One 'Maps to' from a non-standard concept to a different valid standard concept (vocabulary ground truth)."""

    source_concept_id: int
    source_code: str
    source_vocab: str
    source_text: str
    source_domain: str
    target_concept_id: int
