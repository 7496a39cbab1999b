"""`harmonia bench calibrate`: fit a reranker's calibrator on benchmark runs of development parts and certify a
threshold per kind of source (issue 14 points 1-3).

A row can be auto-approved only when the router would approve it at a low enough threshold: it has a first choice
and no fault (reason approved, low_confidence or uncalibrated). The calibrator is fitted on those rows' evidence
(harmonia.pipeline.confidence); the thresholds are chosen on out-of-fold probabilities (no row scored by a model
that saw it) with the fixed-sequence Clopper-Pearson test of harmonia.pipeline.thresholds. Coverage is over all
rows of the kind, precision over those approved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from harmonia.kinds import UNKNOWN, builtin_kind_of
from harmonia.pipeline import confidence as conf_mod
from harmonia.pipeline.confidence import Calibrator
from harmonia.pipeline.thresholds import DEFAULT_ALPHA, ThresholdChoice, choose_threshold
from harmonia.store import calibration as cal_store
from harmonia.store.calibration import StoredThreshold

APPROVABLE = ("approved", "low_confidence", "uncalibrated")


class CalibrationError(ValueError):
    """The runs cannot be calibrated (the message says why)."""


@dataclass
class CoveragePoint:
    threshold: float
    approved: int     # rows with confidence >= threshold
    share: float      # approved / all rows
    precision: float  # correct top-1 among the approved


def precision_coverage(confidences: Sequence[float], correct: Sequence[bool], total: int | None = None
                       ) -> list[CoveragePoint]:
    """One point per distinct observed confidence, ascending (threshold t approves confidence >= t)."""
    total = len(confidences) if total is None else total
    pairs = sorted(zip(confidences, correct, strict=True), key=lambda p: -p[0])
    out: list[CoveragePoint] = []
    approved = right = 0
    i = 0
    while i < len(pairs):  # walk down from the highest confidence, taking ties together
        t = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == t:
            approved += 1
            right += pairs[i][1]
            i += 1
        out.append(CoveragePoint(t, approved, approved / total if total else 0.0, right / approved))
    return out[::-1]


def reliability(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, Any]]:
    """Per confidence bin: mean confidence, accuracy, count (the reliability diagram)."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if idx:
            out.append({"lo": lo, "hi": hi, "n": len(idx),
                        "confidence": sum(confidences[i] for i in idx) / len(idx),
                        "accuracy": sum(correct[i] for i in idx) / len(idx)})
    return out


def plot(points: Sequence[CoveragePoint], rel: Sequence[dict[str, Any]], chosen: CoveragePoint | None,
         target: float, path: Path, title: str = "") -> Path:
    """Reliability diagram and precision-coverage curve side by side (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if rel:
        ax1.bar([(b["lo"] + b["hi"]) / 2 for b in rel], [b["accuracy"] for b in rel], width=0.09, alpha=0.6,
                label="top-1 accuracy per bin")
        ax1.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", color="C1",
                 label="mean confidence vs accuracy")
    ax1.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="top-1 accuracy", title="Reliability diagram")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.plot([p.share for p in points], [p.precision for p in points], "-", color="C0")
    ax2.axhline(target, ls="--", color="C3", lw=1, label=f"target {target}")
    if chosen:
        ax2.plot([chosen.share], [chosen.precision], "o", color="C3",
                 label=f"threshold {chosen.threshold:.3f}: {chosen.share:.1%} auto-approved")
    ax2.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="share auto-approved", ylabel="precision of auto-approved",
            title="Precision vs coverage")
    ax2.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path




# ------------------------------------------------------------------------------------------ fitting from runs


@dataclass
class CalRow:
    """One benchmark row as the calibration sees it."""

    source_vocab: str
    source_code: str
    kind: str
    correct: bool
    approvable: bool
    evidence: dict[str, float] | None


@dataclass
class KindCalibration:
    kind: str
    rows: int                   # all rows of the kind (the coverage's denominator)
    approvable: int
    choice: ThresholdChoice
    points: list[CoveragePoint]
    reliability: list[dict[str, Any]]


@dataclass
class RunsCalibration:
    reranker: str
    reranker_version: str
    calibrator: Calibrator
    kinds: dict[str, KindCalibration] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # kind -> why it got no calibration

    def stored(self) -> list[StoredThreshold]:
        out = []
        for k in self.kinds.values():
            c = k.choice
            out.append(StoredThreshold(
                reranker_version=self.reranker_version, calibrator_hash=self.calibrator.hash, kind=k.kind,
                source_vocab="", threshold=c.threshold, target=c.target, alpha=c.alpha,
                bound=c.bound if c.threshold is not None else None, rows_behind=c.rows, rows_correct=c.correct,
                coverage=c.rows / k.rows if k.rows else 0.0, calibration_rows=k.rows, method=c.method,
                origin="bench", details={"approvable": k.approvable, "reason": c.reason}))
        return out


def rows_of(result: dict[str, Any]) -> list[CalRow]:
    out = []
    for i, r in enumerate(result.get("rows_detail", [])):
        cal = r.get("calibration") or {}
        approvable = r.get("reason") in APPROVABLE and bool(r.get("top5"))
        ev = cal.get("evidence")
        if approvable and not isinstance(ev, dict):
            raise CalibrationError(f"{result.get('set', 'run')}: row {i + 1} has no evidence recorded (a run made "
                                   "before calibration existed): run `harmonia bench run` again")
        out.append(CalRow(source_vocab=str(r.get("source_vocab", "")), source_code=str(r.get("source_code", "")),
                          kind=str(cal.get("kind") or builtin_kind_of(str(r.get("source_vocab", ""))).name),
                          correct=bool(r.get("hit1")), approvable=approvable,
                          evidence={k: float(v) for k, v in ev.items()} if isinstance(ev, dict) else None))
    return out


def calibrate_runs(results: Sequence[dict[str, Any]], *, target: float = 0.98, alpha: float = DEFAULT_ALPHA,
                   folds: int = 5) -> RunsCalibration:
    """Fit the calibrator on every approvable row of the runs (all made with one reranker version) and certify a
    threshold per kind on out-of-fold probabilities. The kind `unknown` (a set whose kind was never declared) is
    never calibrated as a kind: it would cover every undeclared set."""
    if not results:
        raise CalibrationError("no run given")
    versions = {str(r.get("model_version")) for r in results}
    rerankers = {str(r.get("reranker")) for r in results}
    if len(versions) != 1 or len(rerankers) != 1:
        raise CalibrationError(f"the runs were made with different rerankers ({', '.join(sorted(versions))}); "
                               "calibrate each reranker version on its own runs")
    unknown = [str(r.get("set") or "run") for r in results if r.get("reranker_training_sources") == "unknown"]
    if unknown:
        raise CalibrationError(f"{', '.join(unknown)}: made with a classifier checkpoint that does not record its "
                               "training sources, so its own training rows cannot be left out of the calibration "
                               "(they would make it overconfident): retrain it with `harmonia reranker train`")
    # A source the reranker learnt from is no calibration row: its confidence there is higher than on new codes.
    trained = {(str(d.get("source_vocab", "")), str(d.get("source_code", "")))
               for res in results for d in res.get("rows_detail", []) if d.get("trained_on")}
    rows = [row for res in results for row in rows_of(res) if (row.source_vocab, row.source_code) not in trained]
    fit_rows = [r for r in rows if r.approvable and r.evidence is not None]
    if len(fit_rows) < 20:
        raise CalibrationError(f"{len(fit_rows)} rows with a first choice: too few to fit a calibrator (20 at least)")
    ev = [r.evidence or {} for r in fit_rows]
    ok = [r.correct for r in fit_rows]
    kinds = [r.kind for r in fit_rows]
    reranker = rerankers.pop()
    try:
        oof = conf_mod.cross_fit(ev, ok, kinds, [f"{r.source_vocab}:{r.source_code}" for r in fit_rows], reranker,
                                 folds=folds)
        calibrator = conf_mod.fit(ev, ok, kinds, reranker)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from exc
    calibrator.fitted_on.update(sets=sorted({str(r.get("set", "")) for r in results}))
    # The longest text each kind was calibrated on: the text_too_long guard's yardstick (harmonia.pipeline.guards)
    lengths: dict[str, int] = {}
    for r, e in zip(fit_rows, ev, strict=True):
        if "log_len" in e:
            lengths[r.kind] = max(lengths.get(r.kind, 0), round(math.expm1(e["log_len"])))
    calibrator.fitted_on.update(text_len=lengths)
    calibrator.fitted_on.update(left_out_trained_on=len(trained))
    out = RunsCalibration(reranker=reranker, reranker_version=versions.pop(), calibrator=calibrator)
    if trained:
        out.skipped["trained_on"] = (f"{len(trained)} rows left out: the reranker was trained on their sources "
                                     "(a calibration on them would be overconfident)")
    for kind in sorted({r.kind for r in rows}):
        idx = [i for i, r in enumerate(fit_rows) if r.kind == kind]
        total = sum(1 for r in rows if r.kind == kind)
        if kind == UNKNOWN.name:
            out.skipped[kind] = (f"{total} rows of sets without a declared kind: never calibrated as a kind "
                                 "(declare the kind, or calibrate the set from reviews)")
            continue
        conf = oof[idx]
        right = [ok[i] for i in idx]
        choice = choose_threshold(conf, right, target=target, alpha=alpha)
        out.kinds[kind] = KindCalibration(kind=kind, rows=total, approvable=len(idx), choice=choice,
                                          points=precision_coverage(list(conf), right, total),
                                          reliability=reliability(list(conf), right))
    return out


def check_run(result: dict[str, Any], calibrator: Calibrator, thresholds: dict[str, float | None]
              ) -> dict[str, dict[str, Any]]:
    """What a calibration does on another run (e.g. the test part): per kind, rows, approved, right."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows_of(result):
        k = out.setdefault(r.kind, {"rows": 0, "approved": 0, "right": 0})
        k["rows"] += 1
        t = thresholds.get(r.kind)
        if t is None or not r.approvable or r.evidence is None:
            continue
        if calibrator.probability(r.evidence, r.kind) >= t:
            k["approved"] += 1
            k["right"] += int(r.correct)
    return out


def choice_markdown(cal: RunsCalibration) -> str:
    lines = [f"Calibrator {cal.calibrator.hash} for `{cal.reranker_version}` "
             f"({cal.calibrator.fitted_on.get('rows')} rows, {cal.calibrator.fitted_on.get('right')} right; "
             f"features {', '.join(cal.calibrator.features)}).", "",
             "| kind | rows | threshold | lower bound (95%) | rows behind | right | expected coverage |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in cal.kinds.values():
        c = k.choice
        if c.threshold is None:
            lines.append(f"| {k.kind} | {k.rows} | none | - | - | - | 0 |")
        else:
            lines.append(f"| {k.kind} | {k.rows} | {c.threshold:.4f} | {c.bound:.4f} | {c.rows} | {c.correct} | "
                         f"{c.rows / k.rows:.1%} |")
    for k in cal.kinds.values():
        if k.choice.threshold is None:
            lines.append(f"\n{k.kind}: no threshold ({k.choice.reason}); nothing of this kind is auto-approved.")
    for kind, why in cal.skipped.items():
        lines.append(f"\n{kind}: {why}.")
    return "\n".join(lines) + "\n"


def store(conn: psycopg.Connection, cal: RunsCalibration, data_path: Path) -> Path:
    """Write the calibrator under the data directory and its thresholds into the database (one transaction)."""
    path = conf_mod.save(cal.calibrator, data_path)
    with conn.transaction():
        for t in cal.stored():
            cal_store.save_threshold(conn, t)
    return path


def as_point(k: KindCalibration) -> CoveragePoint | None:
    c = k.choice
    if c.threshold is None:
        return None
    return CoveragePoint(c.threshold, c.rows, c.rows / k.rows if k.rows else 0.0, c.correct / c.rows)

