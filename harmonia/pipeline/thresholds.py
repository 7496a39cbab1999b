"""Thresholds with a guarantee: the smallest confidence threshold whose auto-approved precision is certified to
reach a target at a given level, from labelled calibration rows (issue 14 points 3 and 4).

The certificate is a one-sided Clopper-Pearson lower bound (scipy.stats.beta) on the precision of the rows at or
above a threshold. Choosing among many thresholds by looking at their bounds would overstate the guarantee, so the
choice is Learn-then-Test fixed-sequence testing: the candidate thresholds are put in an order fixed WITHOUT the
verdicts (high to low, starting where the calibrated confidences themselves predict the highest bound, their
predicted errors doubled), each is
tested at level alpha in that order, and the walk stops at the first that fails. The last one that passed holds
for the family at level alpha with no multiplicity correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_ALPHA = 0.05  # one-sided 95%


def cp_lower(k: int, n: int, alpha: float = DEFAULT_ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a proportion of k successes in n trials."""
    from scipy.stats import beta

    if n <= 0 or k <= 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def min_rows_for(target: float, alpha: float = DEFAULT_ALPHA) -> int:
    """The fewest rows, all correct, whose bound reaches `target` (0.98 at 95%: 149). Fewer calibration rows
    above a threshold can never certify it."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target {target}: must be in (0, 1)")
    # k = n: the bound is alpha ** (1 / n); solve alpha ** (1 / n) >= target
    n = int(np.ceil(np.log(alpha) / np.log(target)))
    while cp_lower(n, n, alpha) < target:  # guard against rounding
        n += 1
    return n


@dataclass
class ThresholdChoice:
    """What `choose_threshold` found. threshold None: no threshold is certified (nothing may be auto-approved)."""

    threshold: float | None
    rows: int            # calibration rows at or above the threshold (behind the bound)
    correct: int         # of which right
    bound: float         # the one-sided lower confidence bound of their precision
    coverage: float      # share of all calibration rows at or above the threshold (the expected coverage)
    calibration_rows: int
    target: float
    alpha: float
    method: str = "ltt-fixed-sequence-clopper-pearson"
    reason: str = ""     # why there is no threshold, when there is none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _grid(conf: np.ndarray, n_min: int, step: float) -> list[float]:
    """Candidate thresholds from high to low, from the confidences alone: the first admits the n_min most
    confident rows, each next one about `step` of the rows more."""
    c = np.sort(conf)[::-1]
    out: list[float] = []
    k = n_min
    while k <= len(c):
        t = float(c[k - 1])
        if not out or t < out[-1]:
            out.append(t)
        k += max(1, int(round(step * len(c))))
    return out


# Where the walk starts assumes the calibrator predicts this many times too few errors among its most confident
# rows. Calibrated probabilities are least reliable at the very top (few rows, p near 1): read at face value they
# start the walk where the first test fails by a row or two (quickstart, 3,000 ICD10 rows: 371 of 374 right, bound
# 0.9797 < 0.98, nothing approved); a start a little higher passes and walks down past it.
START_ERROR_FACTOR = 2.0


def choose_threshold(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, *,
                     target: float = 0.98, alpha: float = DEFAULT_ALPHA, floor: float = 0.0,
                     step: float = 0.005, start_error_factor: float = START_ERROR_FACTOR) -> ThresholdChoice:
    """The smallest threshold (>= floor) whose rows' precision has a (1 - alpha) lower bound >= target, chosen by
    fixed-sequence testing (see the module docstring). `confidence` should be calibrated probabilities scored
    out of fold (no row scores itself); `correct`: whether each row's first choice was right."""
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    if conf.shape != ok.shape:
        raise ValueError(f"{len(conf)} confidences but {len(ok)} verdicts")
    n_all = len(conf)
    n_min = min_rows_for(target, alpha)
    none = ThresholdChoice(None, 0, 0, 0.0, 0.0, n_all, target, alpha)
    grid = [t for t in _grid(conf, n_min, step) if t >= floor]
    if not grid:
        none.reason = (f"too few calibration rows: {int((conf >= floor).sum())} at or above the floor {floor}, "
                       f"a bound of {target} needs at least {n_min}")
        return none
    # Where to start: the threshold whose bound the confidences (read as probabilities, no verdicts) predict to be
    # highest, the one most likely to pass. Higher thresholds would cover less and fail more easily (starting at
    # the very top fails at once unless the first n_min rows are all right); the walk goes down from there.
    order = np.sort(conf)[::-1]
    cum = np.cumsum(order)
    predicted = []
    for t in grid:
        n = int((conf >= t).sum())
        errors = start_error_factor * (n - cum[n - 1])
        predicted.append(cp_lower(max(0, int(np.floor(n - errors + 1e-9))), n, alpha))
    start = int(np.argmax(predicted))
    best = none
    for t in grid[start:]:
        sel = conf >= t
        n, k = int(sel.sum()), int(ok[sel].sum())
        lb = cp_lower(k, n, alpha)
        if lb < target:
            break
        best = ThresholdChoice(t, n, k, lb, n / n_all, n_all, target, alpha)
    if best.threshold is None:
        t = grid[start]
        sel = conf >= t
        best.reason = (f"the first threshold tested ({t:.4f}: {int(ok[sel].sum())} of {int(sel.sum())} right) "
                       f"has a lower bound below {target}")
    return best


def precision_at(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                 threshold: float | None) -> tuple[int, int]:
    """(approved, right) when `threshold` approves confidence >= threshold (None: nothing)."""
    if threshold is None:
        return 0, 0
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    sel = conf >= threshold
    return int(sel.sum()), int(ok[sel].sum())


# ------------------------------------------------------------------------------- a new set's reviewed sample


@dataclass
class SampleDesign:
    """Which decisions of a set go to reviewers (`harmonia calibrate sample`): indices into the set's decisions."""

    high: list[int]      # sampled from the upper stratum (confidence >= floor): the only rows a threshold can use
    low: list[int]       # sampled from the rest: for the record (reliability), never for the bound
    floor: float         # the stratum boundary: the lowest threshold a fit from this sample may choose


def review_sample(confidence: Sequence[float] | np.ndarray, n: int, *, seed: int = 0, share_high: float = 0.85,
                  floor_quantile: float = 0.5) -> SampleDesign:
    """A random sample of n decisions stratified by confidence: the upper stratum (confidence at or above the
    `floor_quantile` quantile of the set) gets `share_high` of the rows, the lower one the rest (spare rows go to
    the other stratum). Within a stratum every decision has the same chance, so the sampled upper rows at or
    above any threshold t >= floor are a simple random sample of the set's decisions above t, and the plain
    Clopper-Pearson bound on their verdicts is valid without weights."""
    conf = np.asarray(confidence, dtype=float)
    if n < 1:
        raise ValueError(f"sample size {n}: must be at least 1")
    if len(conf) == 0:
        return SampleDesign([], [], 1.0)
    floor = float(np.quantile(conf, floor_quantile))
    hi = np.flatnonzero(conf >= floor)
    lo = np.flatnonzero(conf < floor)
    n_hi = min(len(hi), int(round(share_high * n)))
    n_lo = min(len(lo), n - n_hi)
    n_hi = min(len(hi), n - n_lo)
    rng = np.random.default_rng(seed)
    pick_hi = sorted(int(i) for i in rng.choice(hi, n_hi, replace=False)) if n_hi else []
    pick_lo = sorted(int(i) for i in rng.choice(lo, n_lo, replace=False)) if n_lo else []
    return SampleDesign(pick_hi, pick_lo, floor)


def fit_from_sample(high_confidence: Sequence[float], high_right: Sequence[bool], set_confidence: Sequence[float],
                    floor: float, *, target: float = 0.98, alpha: float = DEFAULT_ALPHA) -> ThresholdChoice:
    """The set's threshold from its reviewers' verdicts on the upper-stratum sample (see `review_sample`); the
    expected coverage is the share of all the set's decisions at or above it."""
    choice = choose_threshold(high_confidence, high_right, target=target, alpha=alpha, floor=floor)
    all_conf = np.asarray(set_confidence, dtype=float)
    if choice.threshold is not None and len(all_conf):
        choice.coverage = float((all_conf >= choice.threshold).mean())
    choice.calibration_rows = len(all_conf)
    choice.method = "ltt-fixed-sequence-clopper-pearson, reviewed sample of the upper stratum"
    return choice
