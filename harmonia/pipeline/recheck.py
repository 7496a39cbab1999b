"""Re-check every map against the current vocabulary release (`harmonia vocab recheck`, run after each load).

A map is touched only when the release made it doubtful:
- `invalid_target`: its target is no longer a valid standard concept (detail: deprecated, upgraded, non_standard,
  or gone: the release's files lacked it and it was kept, marked invalid, because maps point at it);
- `maps_to_changed`: its source is a concept of the vocabulary whose 'Maps to' changed in this release and no
  longer include the map's target.
The successor proposed: the old target's 'Concept replaced by' (or, when that one is not standard, its 'Maps to'),
else the old target's own 'Maps to', else the source concept's new 'Maps to'; for `maps_to_changed` the new 'Maps
to'. With a pipeline, a finding with none of these gets a fresh retrieve + rerank whose ranking is the proposal.
Each finding sets the map's status (INVALID_TARGET, or FLAGGED for `maps_to_changed`; version and history
through harmonia.store.mapping) and opens the code's review item: the reason, the proposals first among the
candidates and the current target last, and both concepts described in the item's `proposal` ("recheck"). The map
keeps its targets: a reviewer accepts the successor (approve), picks another, or re-approves; nothing is replaced
silently, whoever decided the map. Maps that are still right are not read past the one query that finds the
affected ones, and not written.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psycopg

from harmonia.domain import Concept, MapStatus, RankingEntry, SourceTerm
from harmonia.store import concepts as concept_store
from harmonia.store import mapping as map_store
from harmonia.store import recheck as recheck_store
from harmonia.store import release as release_store

if TYPE_CHECKING:
    from harmonia.pipeline.run import Pipeline

DETAIL_WORDS = {"deprecated": "deprecated (invalid D)", "upgraded": "upgraded (invalid U)",
                "non_standard": "no longer standard", "gone": "not in the release (kept, marked invalid)",
                "maps_to_changed": "the source's 'Maps to' changed"}


@dataclass
class RecheckReport:
    release_id: int
    release_label: str
    maps_affected: int = 0
    new_findings: int = 0
    reviews_opened: int = 0
    retrieved: int = 0           # findings without a successor that got a fresh retrieve + rerank
    by_reason: dict[str, int] = field(default_factory=dict)    # "reason/detail" -> findings of the release
    proposed_by: dict[str, int] = field(default_factory=dict)  # of the new findings: 'Concept replaced by', ...
    statuses: dict[str, int] = field(default_factory=dict)     # maps set to INVALID_TARGET / FLAGGED
    seconds: float = 0.0


def _dedupe(*groups: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(x for g in groups for x in g))


def classify(a: recheck_store.AffectedMap) -> recheck_store.Finding:
    """Reason, detail and proposals of one affected map (no retrieval)."""
    if a.detail is not None:
        reason, detail = "invalid_target", a.detail
        proposed: tuple[int, ...] = ()
        by = None
        for ids, origin in ((a.replaced_by, "Concept replaced by"), (a.target_maps_to, "Maps to"),
                            (a.source_maps_to, "source Maps to")):
            if ids and not proposed:
                by = origin
            proposed = _dedupe(proposed, ids)
    else:
        reason, detail = "maps_to_changed", "maps_to_changed"
        proposed, by = a.source_maps_to, "source Maps to"
    return recheck_store.Finding(a.source_code, a.source_vocab, a.source_text, reason, detail, a.target,
                                 tuple(proposed), by if proposed else None, a.decided_by)


def _entry(c: Concept, rationale: str, score: float) -> RankingEntry:
    return RankingEntry(concept_id=c.concept_id, concept_name=c.concept_name, domain_id=c.domain_id,
                        vocabulary_id=c.vocabulary_id, concept_class_id=c.concept_class_id,
                        concept_code=c.concept_code, similarity=score, score=score, rationale=rationale)


def _describe(c: Concept | None, cid: int) -> str:
    return f"{cid} {c.concept_name} ({c.vocabulary_id} {c.concept_code})" if c else str(cid)


def review_item(f: recheck_store.Finding, concepts: dict[int, Concept], label: str,
                retrieved: list[RankingEntry] | None = None) -> tuple[list[RankingEntry], dict[str, Any]]:
    """The candidates (proposals first, the current target last) and the finding as the item's proposal shows it."""
    ranking: list[RankingEntry] = []
    if retrieved:
        ranking.extend({**e, "rationale": f"fresh retrieval after release {label}: {e['rationale']}".strip()}
                       for e in retrieved)
    else:
        for i, cid in enumerate(f.proposed):
            if cid in concepts:
                ranking.append(_entry(concepts[cid], f"proposed successor ({f.proposed_by}) in release {label}",
                                      round(1.0 - 0.01 * i, 4)))
    old = concepts.get(f.old_concept_id)
    if old is not None and all(e["concept_id"] != old.concept_id for e in ranking):
        ranking.append(_entry(old, f"the map's current target: {DETAIL_WORDS[f.detail]}", 0.0))
    first = ranking[0] if ranking and ranking[0]["concept_id"] != f.old_concept_id else None
    details: dict[str, Any] = {
        "reason": f.reason, "detail": f.detail, "release": label,
        "summary": f"{f.reason}: {DETAIL_WORDS[f.detail]} (release {label})",
        "current_target": _describe(old, f.old_concept_id), "old_concept_id": f.old_concept_id,
        "proposed_successor": (f"{first['concept_id']} {first['concept_name']} ({first['vocabulary_id']} "
                               f"{first['concept_code']}) by {f.proposed_by}") if first else "none found",
        "proposed_concept_ids": [e["concept_id"] for e in ranking if e["concept_id"] != f.old_concept_id],
        "proposed_by": f.proposed_by, "map_decided_by": f.decided_by,
    }
    return ranking, details


def _set_statuses(conn: psycopg.Connection,
                  items: list[tuple[recheck_store.Finding, list[RankingEntry], dict[str, Any]]], label: str
                  ) -> dict[str, int]:
    """INVALID_TARGET for a code with an invalid target, else FLAGGED; its targets stay (set_status keeps them)."""
    by_code: dict[tuple[str, str], list[tuple[recheck_store.Finding, dict[str, Any]]]] = {}
    for f, _, details in items:
        by_code.setdefault((f.source_code, f.source_vocab), []).append((f, details))
    out: Counter[str] = Counter()
    for key, found in by_code.items():
        status: MapStatus = "INVALID_TARGET" if any(f.reason == "invalid_target" for f, _ in found) else "FLAGGED"
        note = "; ".join(f"{d['summary']}: target {d['current_target']}, proposed {d['proposed_successor']}"
                         for _, d in found)
        map_store.set_status(conn, key, status, actor="recheck", action="recheck", note=note)
        out[status] += 1
    return dict(out)


def recheck(conn: psycopg.Connection, *, pipeline: Pipeline | None = None) -> RecheckReport:
    """Check every map against the current release; open review items for what is new. One transaction."""
    t0 = time.perf_counter()
    cur = release_store.current(conn)
    if cur is None:
        raise ValueError("no vocabulary release is loaded: nothing to re-check against")
    report = RecheckReport(release_id=cur.id, release_label=cur.label)
    with conn.transaction():
        with_previous = cur.previous_id is not None and release_store.has_previous(conn)
        affected = recheck_store.affected(conn, cur.id, with_previous=with_previous)
        report.maps_affected = len(affected)
        new = recheck_store.insert_findings(conn, cur.id, [classify(a) for a in affected])
        report.new_findings = len(new)
        retrieved: dict[tuple[str, str], list[RankingEntry]] = {}
        bare = [f for f in new if not f.proposed and f.source_text]
        if pipeline is not None and bare:
            terms = [SourceTerm(source_code=f.source_code, source_vocab=f.source_vocab, source_text=f.source_text or "")
                     for f in bare]
            for f, d in zip(bare, pipeline.decide(terms), strict=True):
                ranking = [e for e in d.ranking if e["concept_id"] != f.old_concept_id]
                if ranking:
                    retrieved[(f.source_code, f.source_vocab)] = ranking
            new = [replace(f, proposed=tuple(e["concept_id"] for e in r), proposed_by="retrieval")
                   if (r := retrieved.get((f.source_code, f.source_vocab))) else f for f in new]
            recheck_store.set_proposals(conn, cur.id, [f for f in new if f.proposed_by == "retrieval"])
            report.retrieved = len(retrieved)
        ids = {f.old_concept_id for f in new} | {x for f in new for x in f.proposed}
        concepts = concept_store.get_concepts(conn, ids)
        items = [(f, *review_item(f, concepts, cur.label, retrieved.get((f.source_code, f.source_vocab))))
                 for f in new]
        report.reviews_opened = recheck_store.open_reviews(conn, items, f"recheck:{cur.label}")
        report.statuses = _set_statuses(conn, items, cur.label)
        report.proposed_by = dict(Counter(f.proposed_by or "none" for f in new))
        release_store.mark_rechecked(conn, cur.id)
        report.by_reason = {f"{r}/{d}": n for (r, d), n in recheck_store.finding_counts(conn, cur.id).items()}
    report.seconds = time.perf_counter() - t0
    return report


def follow_memory(conn: psycopg.Connection) -> release_store.MemoryFollow:
    """The mapping memory after a release: targets re-pointed to their successors or dropped, counted (one
    transaction; see harmonia.store.release.memory_follow)."""
    with conn.transaction():
        return release_store.memory_follow(conn)
