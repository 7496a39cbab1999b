"""Calibrating the auto-approve threshold from a benchmark run: which confidence gives the precision we need.

A row can be auto-approved only when the router would approve it at a low enough threshold: it has a top-1 and
no fault (reason approved or low_confidence). Share auto-approved is over all rows, precision over those approved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

APPROVABLE = ("approved", "low_confidence")


@dataclass
class CoveragePoint:
    threshold: float
    approved: int     # rows with confidence >= threshold
    share: float      # approved / all rows
    precision: float  # correct top-1 among the approved


def points_from_run(rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[bool], int]:
    """(confidences, top-1 correct) of the approvable rows, and the number of all rows."""
    conf, ok = [], []
    for r in rows:
        if r.get("reason") in APPROVABLE and r.get("top5"):
            conf.append(float(r["confidence"]))
            ok.append(bool(r["hit1"]))
    return conf, ok, len(rows)


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


def choose_threshold(points: Sequence[CoveragePoint], target: float) -> CoveragePoint | None:
    """The smallest threshold whose auto-approved precision reaches the target (None if none does)."""
    return next((p for p in points if p.precision >= target), None)


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


def table_markdown(points: Sequence[CoveragePoint], chosen: CoveragePoint | None, target: float,
                   max_lines: int = 25) -> str:
    """The precision-coverage table, thinned to about `max_lines` thresholds (the chosen one always shown)."""
    step = max(1, len(points) // max_lines)
    shown = [p for i, p in enumerate(points) if i % step == 0 or p is chosen or i == len(points) - 1]
    lines = ["| threshold | auto-approved | share auto-approved | precision |", "|---:|---:|---:|---:|"]
    for p in shown:
        mark = " **<- chosen**" if p is chosen else ""
        lines.append(f"| {p.threshold:.4f} | {p.approved} | {p.share:.3f} | {p.precision:.3f}{mark} |")
    verdict = (f"Smallest threshold with precision >= {target}: {chosen.threshold:.4f} (auto-approves "
               f"{chosen.share:.1%}, precision {chosen.precision:.3f})" if chosen
               else f"No threshold reaches precision {target}.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def plot(points: Sequence[CoveragePoint], rel: Sequence[dict[str, Any]], chosen: CoveragePoint | None,
         target: float, path: Path, title: str = "") -> Path:
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


@dataclass
class Calibration:
    target: float
    rows: int
    approvable: int
    points: list[CoveragePoint]
    chosen: CoveragePoint | None
    reliability: list[dict[str, Any]]

    @property
    def threshold(self) -> float | None:
        return self.chosen.threshold if self.chosen else None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "rows": self.rows, "approvable": self.approvable,
                "threshold": self.threshold, "chosen": asdict(self.chosen) if self.chosen else None,
                "points": [asdict(p) for p in self.points], "reliability": self.reliability}


def at_threshold(result: dict[str, Any], threshold: float) -> CoveragePoint:
    """What a threshold does on another run (calibrate on the dev part, check on the test part)."""
    conf, ok, total = points_from_run(result.get("rows_detail", []))
    approved = [o for c, o in zip(conf, ok, strict=True) if c >= threshold]
    return CoveragePoint(threshold, len(approved), len(approved) / total if total else 0.0,
                         sum(approved) / len(approved) if approved else 0.0)


def calibrate_run(result: dict[str, Any], target: float) -> Calibration:
    """Calibration of a `bench run` result (its per-row details)."""
    conf, ok, total = points_from_run(result.get("rows_detail", []))
    points = precision_coverage(conf, ok, total)
    return Calibration(target, total, len(conf), points, choose_threshold(points, target), reliability(conf, ok))
