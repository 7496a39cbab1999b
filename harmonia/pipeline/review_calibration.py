"""Calibrating a new source set from reviews (issue 14 point 5): a team with no ground truth for its own codes.

`sample`: a random sample of the set's pending decisions, stratified by confidence (thresholds.review_sample: most
rows from the upper half, where a threshold could ever be), goes to the head of the review queue in a random order.
`fit`: once reviewers have judged enough of its upper stratum, the set's threshold is certified from their verdicts
with the bound of `harmonia bench calibrate` (Clopper-Pearson, fixed-sequence testing), stored for the set (tied
to the reranker version and calibrator of its decisions), and the set's pending decisions at or above it are
approved, each with a history entry naming the calibration. Later decisions of the set are routed with it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from harmonia.kinds import KindRegistry
from harmonia.pipeline.thresholds import DEFAULT_ALPHA, fit_from_sample, min_rows_for, review_sample
from harmonia.store import calibration as cal_store
from harmonia.store import kinds as kinds_store

SAMPLE_PRIORITY = 1_000_000  # above any other item of the queue


class ReviewCalibrationError(ValueError):
    """The set cannot be sampled or fitted (the message says why and what to do)."""


def split_version(model_version: str) -> tuple[str, str]:
    """(reranker version, calibrator hash) of a decision's model_version `RERANKER+cal:HASH`."""
    reranker, sep, cal = model_version.rpartition("+cal:")
    if not sep or not reranker or not cal:
        raise ReviewCalibrationError(
            f"decisions made by {model_version!r} carry no calibrator: fit one first (`harmonia bench calibrate` on "
            "any development set, or the quickstart), then map the set again")
    return reranker, cal


@dataclass
class SampleReport:
    source_vocab: str
    pending: int
    sampled_high: int
    sampled_low: int
    floor: float
    model_version: str
    replaced: int = 0


def sample(conn: psycopg.Connection, source_vocab: str, n: int = 200, *, seed: int = 0) -> SampleReport:
    """Draw the set's review sample (replacing an earlier one) and put it at the head of the review queue."""
    pending = cal_store.pending_decisions(conn, source_vocab)
    if not pending:
        raise ReviewCalibrationError(f"no pending decision of {source_vocab!r} with a first choice: map the set "
                                     "first (`harmonia map FILE --source-vocab ...`)")
    versions: dict[str, int] = {}
    for p in pending:
        versions[p.model_version] = versions.get(p.model_version, 0) + 1
    version = max(versions, key=lambda v: versions[v])  # the set's current decisions; older ones are left out
    split_version(version)
    rows = [p for p in pending if p.model_version == version]
    design = review_sample([p.confidence for p in rows], n, seed=seed)
    order = design.high + design.low
    high = set(design.high)
    random.Random(seed).shuffle(order)  # the review order: any judged prefix is a random sample
    picked = [cal_store.SampledDecision(
        source_code=rows[i].source_code, stratum="high" if i in high else "low", floor=design.floor,
        confidence=rows[i].confidence, proposed_concept_id=rows[i].concept_id, model_version=version, draw=d)
        for d, i in enumerate(order)]
    with conn.transaction():
        replaced = cal_store.clear_sample(conn, source_vocab)
        cal_store.add_sample(conn, source_vocab, picked, SAMPLE_PRIORITY)
    return SampleReport(source_vocab, len(rows), len(design.high), len(design.low), design.floor, version, replaced)


@dataclass
class Progress:
    """How far the reviewers are with a set's sample, and its calibration if one was fitted."""

    source_vocab: str
    sampled: int = 0
    judged: int = 0
    high: int = 0
    high_judged: int = 0
    high_right: int = 0
    needed: int = 0               # judged upper-stratum rows below which no threshold can be certified
    target: float = 0.98
    threshold: float | None = None
    bound: float | None = None
    calibrated_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress(conn: psycopg.Connection, source_vocab: str, *, target: float = 0.98,
             alpha: float = DEFAULT_ALPHA) -> Progress:
    rows = cal_store.sample_with_verdicts(conn, source_vocab)
    p = Progress(source_vocab, sampled=len(rows), judged=sum(r.verdict is not None for r in rows),
                 high=sum(r.stratum == "high" for r in rows), needed=min_rows_for(target, alpha), target=target)
    high = [r for r in rows if r.stratum == "high" and r.verdict is not None]
    p.high_judged, p.high_right = len(high), sum(bool(r.verdict) for r in high)
    for t in cal_store.all_thresholds(conn):
        if t.source_vocab == source_vocab and t.origin == "reviews":
            p.threshold, p.bound = t.threshold, t.bound
            p.calibrated_at = t.created_at.isoformat() if t.created_at else None
            p.details = t.details
            break
    return p


@dataclass
class FitReport:
    source_vocab: str
    kind: str
    threshold: float | None
    bound: float
    rows_behind: int
    rows_correct: int
    judged_high: int
    coverage: float
    approved: int
    calibration_id: int | None
    reason: str = ""


def fit(conn: psycopg.Connection, source_vocab: str, *, target: float = 0.98, alpha: float = DEFAULT_ALPHA,
        approve: bool = True, floor: float = 0.0, kinds: KindRegistry | None = None) -> FitReport:
    """Certify the set's threshold from the reviewers' verdicts on its sample, store it and (unless `approve` is
    off) approve the set's pending decisions at or above it (and at or above `floor`, the auto_approve_threshold
    setting, as the router does). One transaction."""
    rows = cal_store.sample_with_verdicts(conn, source_vocab)
    if not rows:
        raise ReviewCalibrationError(f"{source_vocab!r} has no review sample: `harmonia calibrate sample "
                                     f"--source-vocab {source_vocab}` first")
    version = rows[0].model_version
    reranker_version, cal_hash = split_version(version)
    high = [r for r in rows if r.stratum == "high" and r.verdict is not None]
    needed = min_rows_for(target, alpha)
    if len(high) < needed:
        raise ReviewCalibrationError(
            f"{len(high)} of the {sum(r.stratum == 'high' for r in rows)} upper-stratum decisions of "
            f"{source_vocab!r} are judged; a bound of {target} needs at least {needed}")
    pending = [p for p in cal_store.pending_decisions(conn, source_vocab) if p.model_version == version]
    set_conf = [p.confidence for p in pending] + [r.confidence for r in rows]
    choice = fit_from_sample([r.confidence for r in high], [bool(r.verdict) for r in high], set_conf, rows[0].floor,
                             target=target, alpha=alpha)
    kind = (kinds or KindRegistry(declared=kinds_store.declared(conn))).kind_of(source_vocab).name
    with conn.transaction():
        cal_id = cal_store.save_threshold(conn, cal_store.StoredThreshold(
            reranker_version=reranker_version, calibrator_hash=cal_hash, kind=kind, source_vocab=source_vocab,
            threshold=choice.threshold, target=target, alpha=alpha,
            bound=choice.bound if choice.threshold is not None else None, rows_behind=choice.rows,
            rows_correct=choice.correct, coverage=choice.coverage, calibration_rows=len(set_conf),
            method=choice.method, origin="reviews",
            details={"sampled": len(rows), "judged_high": len(high), "floor": rows[0].floor,
                     "reason": choice.reason}))
        approved = 0
        if approve and choice.threshold is not None:
            note = (f"calibration #{cal_id} from reviews of {source_vocab}: threshold {choice.threshold:.4f}, "
                    f"{int(100 * (1 - alpha))}% lower bound {choice.bound:.4f} on {choice.rows} reviewed decisions")
            approved = cal_store.approve_pending(conn, source_vocab, version, max(choice.threshold, floor), note)
    return FitReport(source_vocab, kind, choice.threshold, choice.bound, choice.rows, choice.correct, len(high),
                     choice.coverage, approved, cal_id, choice.reason)
