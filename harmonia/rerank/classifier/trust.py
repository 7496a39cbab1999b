"""Which kinds of source a classifier checkpoint may rank (issue 20 point 6: never worse than retrieval order).

A cross-encoder learns the sets it was trained on: measured leave-one-set-out, the ICD10-trained checkpoint beat
retrieval order on diagnoses and lost on lab, admission and microbiology sets. So a checkpoint ranks only the kinds
its own held-out development sources show it ranks better than retrieval order, by a one-sided sign test on the
sources where the two first choices differ (one right, the other wrong). For every other kind it keeps retrieval
order (its probabilities still go to the calibrator and the rationale). Written at training time as `kinds.json`
in the run folder, part of the checkpoint's hash; a checkpoint without one (older runs) ranks every kind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import binomtest

MIN_SOURCES = 30      # fewer held-out sources of a kind: too few to tell, retrieval order
MAX_P_VALUE = 0.05    # one-sided sign test: the classifier's wins over its losses on discordant sources
FILE = "kinds.json"


@dataclass(frozen=True)
class KindFigures:
    sources: int
    none_top1: float
    classifier_top1: float
    wins: int     # the classifier's first choice right where retrieval order's is wrong
    losses: int   # the reverse
    p_value: float

    @property
    def trusted(self) -> bool:
        return self.sources >= MIN_SOURCES and self.wins > self.losses and self.p_value < MAX_P_VALUE


@dataclass
class KindTrust:
    """Kind name -> held-out figures; `rank_all` (no kinds.json, or the `classifier_kinds = ["*"]` setting)
    trusts every kind."""

    figures: dict[str, KindFigures] = field(default_factory=dict)
    rank_all: bool = False
    configured: tuple[str, ...] = ()

    def ranks(self, kind: str) -> bool:
        if self.rank_all or kind in self.configured:
            return True
        f = self.figures.get(kind)
        return f is not None and f.trusted

    @property
    def trusted_kinds(self) -> list[str]:
        return sorted(k for k, f in self.figures.items() if f.trusted)

    @classmethod
    def fit(cls, kinds: Sequence[str], none_right: Sequence[bool], classifier_right: Sequence[bool]) -> KindTrust:
        groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
        for k, a, b in zip(kinds, none_right, classifier_right, strict=True):
            groups[k].append((bool(a), bool(b)))
        figures = {}
        for k, pairs in sorted(groups.items()):
            wins = sum(b and not a for a, b in pairs)
            losses = sum(a and not b for a, b in pairs)
            p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
            figures[k] = KindFigures(len(pairs), sum(a for a, _ in pairs) / len(pairs),
                                     sum(b for _, b in pairs) / len(pairs), wins, losses, float(p))
        return cls(figures)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": f"rank a kind when >= {MIN_SOURCES} held-out sources and a one-sided sign test of the "
                        f"classifier's first choice against retrieval order's gives p < {MAX_P_VALUE}",
                "trusted": self.trusted_kinds,
                "kinds": {k: {"sources": f.sources, "none_top1": round(f.none_top1, 4),
                              "classifier_top1": round(f.classifier_top1, 4), "wins": f.wins, "losses": f.losses,
                              "p_value": round(f.p_value, 6), "trusted": f.trusted}
                          for k, f in self.figures.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, configured: Sequence[str] = ()) -> KindTrust:
        figures = {k: KindFigures(int(v["sources"]), float(v["none_top1"]), float(v["classifier_top1"]),
                                  int(v["wins"]), int(v["losses"]), float(v["p_value"]))
                   for k, v in d.get("kinds", {}).items()}
        return cls(figures, rank_all="*" in configured, configured=tuple(k for k in configured if k != "*"))
