"""The calibrator: a decision's evidence -> P(its first choice is correct), for every reranker (issue 14 point 1).

A reranker's own confidence is not a probability (`none`: a cosine; `classifier`: isotonic on ICD10 only; `llm`:
what the model says about itself). The calibrator is a logistic regression (scikit-learn) on the evidence a decision
carries: the reranker's own score (one input among several, never the decision alone), its margin to the runner-up,
whether the generators agree (vector, lexical and mapping-memory first choices, memory votes, code kinship, the
retrieval rank of the reranker's choice), an exact normalised name match, whether the candidate's domain fits the
source's kind, how many of a lab name's or drug string's hints it agrees with and contradicts, and the kind
itself. Evidence features carry a sign (more agreement never lowers the probability): a feature whose fitted weight
has the wrong sign is dropped and the model refitted, so the probability is monotone in each of them. It is fitted
on development rows only, cross-fitted (`cross_fit`: no row is scored by a model that saw it) for the thresholds,
and stored as plain JSON under `<data_dir>/calibration/<reranker>.json`; the hash of
that JSON is part of each decision's model_version and of each stored threshold, so a refit calibrator is
uncalibrated until its thresholds are chosen again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from harmonia.domain import Candidate, RerankResult, SourceTerm
from harmonia.store import calibration as cal_store
from harmonia.store.calibration import StoredThreshold

FORMAT_VERSION = 1

# feature -> sign: +1 more is better, -1 more is worse, 0 free (no monotonicity asked)
EVIDENCE: dict[str, int] = {
    "raw_logit": +1,      # the reranker's own confidence, as a logit (LLM: its self-reported confidence)
    "margin": +1,         # the reranker's score of its first choice minus its runner-up's
    "sem1": +1,           # semantic similarity of the first choice (cosine, or a remembered source's)
    "sem_margin": +1,     # ... minus the best other candidate's
    "lex1": +1,           # trigram score of the first choice
    "agree_vec": +1,      # the first choice is vector search's first choice
    "agree_lex": +1,      # ... lexical search's
    "agree_mem": +1,      # ... the mapping memory's (most votes)
    "mem_share": +1,      # share of the memory's votes that go to the first choice
    "mem_code": +1,       # code kinship: a remembered code of the same vocabulary sharing a prefix maps there
    "log_ret_rank": -1,   # log of the first choice's retrieval rank (0 for `none`)
    "exact_name": +1,     # normalised source text == the first choice's name
    "domain_fit": +1,     # the first choice's domain is one the source's kind expects
    "text_agree": +1,     # what a lab name or drug string says that the first choice agrees with (specimen, scale,
    "text_conflict": -1,  # property, timing; strength, form, brand: harmonia.text) ... and contradicts
    "log_len": 0,         # log length of the source text
}
# Candidate.scores keys of the text agreement features (harmonia.retrieval.by_kind puts them there)
TEXT_FEATURES = frozenset({"lab_system", "lab_scale", "lab_property", "lab_timing", "drug_strength", "drug_form",
                           "drug_brand"})
# The reranker's own score says little for `none` beyond sem1 (it IS sem1); keep the rest.
FEATURES: dict[str, list[str]] = {
    "none": [f for f in EVIDENCE if f not in ("raw_logit", "log_ret_rank")],
}


def features_for(reranker: str) -> list[str]:
    return FEATURES.get(reranker, list(EVIDENCE))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.casefold()).split())


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def evidence(term: SourceTerm, candidates: Sequence[Candidate], result: RerankResult,
             expected_domains: Sequence[str] = ()) -> dict[str, float] | None:
    """The evidence behind a decision's first choice; None when there is no first choice among the candidates."""
    if not result.ranked or not candidates:
        return None
    ids = [c.concept_id for c in candidates]
    top = result.ranked[0].concept_id
    if top not in ids:
        return None
    i = ids.index(top)

    def col(key: str) -> np.ndarray:
        return np.array([c.scores.get(key, c.similarity if key == "semantic" else 0.0) for c in candidates],
                        dtype=float)

    sem, vec, lex, votes = col("semantic"), col("vector"), col("lexical"), col("memory_votes")
    others = np.delete(np.arange(len(candidates)), i)
    raw = result.details.get("top_probability")  # the classifier's probability before its own isotonic map
    raw = float(raw) if isinstance(raw, int | float) else float(result.confidence)
    scores = [r.score for r in result.ranked]
    c1 = candidates[i]
    text = [float(v) for k, v in c1.scores.items() if k in TEXT_FEATURES]
    return {
        "raw_logit": _logit(raw),
        "margin": float(scores[0] - scores[1]) if len(scores) > 1 else 1.0,
        "sem1": float(sem[i]),
        "sem_margin": float(sem[i] - sem[others].max()) if len(others) else float(sem[i]),
        "lex1": float(lex[i]),
        "agree_vec": float(int(np.argmax(vec)) == i and vec.any()),
        "agree_lex": float(int(np.argmax(lex)) == i and lex[i] > 0),
        "agree_mem": float(int(np.argmax(votes)) == i and votes[i] > 0),
        "mem_share": float(votes[i] / votes.sum()) if votes.sum() > 0 else 0.0,
        "mem_code": float(c1.scores.get("memory_code", 0.0)),
        "log_ret_rank": math.log(i + 1),
        "exact_name": float(_norm(c1.concept_name) == _norm(term.source_text)),
        "domain_fit": float(c1.domain_id in expected_domains) if expected_domains else 1.0,
        "text_agree": float(sum(v > 0 for v in text)),
        "text_conflict": float(sum(v < 0 for v in text)),
        "log_len": math.log1p(len(term.source_text)),
    }


class CalibratorError(ValueError):
    """A stored calibrator cannot be read (the message names the file)."""


# A kind with this many calibration rows (and this many of each verdict) gets a calibrator of its own: evidence
# means different things for different kinds (a lab name's rival with the right analyte in the wrong specimen, a
# diagnosis whose sibling code is remembered), and one shared set of weights let the other kinds' rows blur the
# order of a well-covered kind's most confident rows (leave-one-set-out, ICD10: 0/3 seeds certified with shared
# weights, 3/3 with its own). Smaller kinds share the pooled model and its one-hot kind term.
OWN_MIN_ROWS = 400
OWN_MIN_EACH = 40


@dataclass
class Calibrator:
    """Logistic regression on standardised evidence plus a one-hot kind; plain numbers, evaluated with numpy.
    `own`: kinds with enough rows have a model of their own (same form, fitted on their rows only)."""

    reranker: str
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    kinds: list[str]
    kind_coef: list[float]
    intercept: float
    fitted_on: dict[str, Any] = field(default_factory=dict)  # rows, positives, sets: for the record, not hashed
    own: dict[str, Calibrator] = field(default_factory=dict)

    def model_dict(self) -> dict[str, Any]:
        doc = {"type": "logistic", "format": FORMAT_VERSION, "reranker": self.reranker,
               "features": self.features, "signs": [EVIDENCE.get(f, 0) for f in self.features],
               "mean": self.mean, "scale": self.scale, "coef": self.coef, "kinds": self.kinds,
               "kind_coef": self.kind_coef, "intercept": self.intercept}
        if self.own:  # absent when empty: a calibrator without per-kind models keeps its hash
            doc["own"] = {k: m.model_dict() for k, m in sorted(self.own.items())}
        return doc

    @property
    def hash(self) -> str:
        doc = json.dumps(self.model_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return self.model_dict() | {"hash": self.hash, "fitted_on": self.fitted_on}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Calibrator:
        try:
            if doc["type"] != "logistic" or doc["format"] != FORMAT_VERSION:
                raise CalibratorError(f"unknown calibrator {doc['type']!r} format {doc['format']!r}")
            cal = cls(reranker=str(doc["reranker"]), features=[str(f) for f in doc["features"]],
                      mean=[float(x) for x in doc["mean"]], scale=[float(x) for x in doc["scale"]],
                      coef=[float(x) for x in doc["coef"]], kinds=[str(k) for k in doc["kinds"]],
                      kind_coef=[float(x) for x in doc["kind_coef"]], intercept=float(doc["intercept"]),
                      fitted_on=dict(doc.get("fitted_on") or {}),
                      own={str(k): cls.from_json(m) for k, m in (doc.get("own") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibratorError(f"not a calibrator: {exc}") from exc
        if not (len(cal.features) == len(cal.mean) == len(cal.scale) == len(cal.coef)) or \
                len(cal.kinds) != len(cal.kind_coef):
            raise CalibratorError("not a calibrator: its arrays differ in length")
        unknown = [f for f in cal.features if f not in EVIDENCE]
        if unknown:
            raise CalibratorError(f"not a calibrator: unknown features {unknown}")
        return cal

    def _matrix(self, rows: Sequence[Mapping[str, float]], kinds: Sequence[str]) -> np.ndarray:
        x = np.array([[float(r.get(f, 0.0)) for f in self.features] for r in rows], dtype=float).reshape(
            len(rows), len(self.features))
        xs = (x - np.array(self.mean)) / np.array(self.scale)
        xk = np.array([[float(k == kk) for kk in self.kinds] for k in kinds], dtype=float).reshape(
            len(rows), len(self.kinds))
        return np.hstack([xs, xk])

    def probabilities(self, rows: Sequence[Mapping[str, float]], kinds: Sequence[str]) -> np.ndarray:
        if not rows:
            return np.zeros(0)
        z = self._matrix(rows, kinds) @ np.array(self.coef + self.kind_coef) + self.intercept
        out = np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=float)
        for kind, model in self.own.items():
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                out[idx] = model.probabilities([rows[i] for i in idx], [kind] * len(idx))
        return out

    def probability(self, row: Mapping[str, float], kind: str) -> float:
        return float(self.probabilities([row], [kind])[0])


def fit(rows: Sequence[Mapping[str, float]], correct: Sequence[bool], kinds: Sequence[str], reranker: str, *,
        features: Sequence[str] | None = None, c: float = 1.0, own_kinds: bool = True) -> Calibrator:
    """Fit a calibrator; a signed feature that ends up with the wrong sign is dropped and the rest refitted. With
    `own_kinds`, each kind with OWN_MIN_ROWS rows (OWN_MIN_EACH of each verdict) also gets a model of its own."""
    cal = _fit_one(rows, correct, kinds, reranker, features=features, c=c)
    if own_kinds and len(set(kinds)) > 1:  # one kind: the pooled model is already its own
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            right = sum(bool(correct[i]) for i in idx)
            if len(idx) >= OWN_MIN_ROWS and min(right, len(idx) - right) >= OWN_MIN_EACH:
                cal.own[kind] = _fit_one([rows[i] for i in idx], [correct[i] for i in idx], [kind] * len(idx),
                                         reranker, features=features, c=c)
    return cal


def _fit_one(rows: Sequence[Mapping[str, float]], correct: Sequence[bool], kinds: Sequence[str], reranker: str, *,
             features: Sequence[str] | None = None, c: float = 1.0) -> Calibrator:
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(correct, dtype=int)
    if len(rows) != len(y) or len(kinds) != len(y):
        raise ValueError("rows, verdicts and kinds differ in length")
    if len(set(y.tolist())) < 2:
        raise ValueError(f"cannot fit a calibrator: all {len(y)} rows are {'right' if y.all() else 'wrong'}")
    feats = [f for f in (features or features_for(reranker)) if f in EVIDENCE]
    x_all = np.array([[float(r.get(f, 0.0)) for f in feats] for r in rows], dtype=float)
    keep = [j for j in range(len(feats)) if x_all[:, j].std() > 1e-9]  # constant columns carry nothing
    kind_list = sorted(set(kinds))
    xk = np.array([[float(k == kk) for kk in kind_list] for k in kinds], dtype=float)
    while True:
        x = x_all[:, keep]
        mu, sd = x.mean(0), x.std(0)
        sd = np.where(sd > 1e-9, sd, 1.0)
        model = LogisticRegression(C=c, max_iter=2000).fit(np.hstack([(x - mu) / sd, xk]), y)
        coef = model.coef_[0]
        wrong = [(coef[n] * EVIDENCE[feats[j]], n) for n, j in enumerate(keep)
                 if EVIDENCE[feats[j]] and coef[n] * EVIDENCE[feats[j]] < 0]
        if not wrong:
            break
        keep.pop(min(wrong)[1])  # the worst offender first; its removal may fix the others
    return Calibrator(reranker=reranker, features=[feats[j] for j in keep], mean=[float(v) for v in mu],
                      scale=[float(v) for v in sd], coef=[float(v) for v in coef[:len(keep)]], kinds=kind_list,
                      kind_coef=[float(v) for v in coef[len(keep):]], intercept=float(model.intercept_[0]),
                      fitted_on={"rows": int(len(y)), "right": int(y.sum())})


def cross_fit(rows: Sequence[Mapping[str, float]], correct: Sequence[bool], kinds: Sequence[str],
              groups: Sequence[str], reranker: str, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities: each row scored by a calibrator fitted on the folds without its group (source)."""
    from sklearn.model_selection import GroupKFold

    n = len(rows)
    out = np.zeros(n)
    uniq = sorted(set(groups))
    k = min(folds, len(uniq))
    if k < 2:
        raise ValueError("cross-fitting needs rows of at least two sources")
    # GroupKFold is deterministic in the group order; shuffle the group labels with the seed first
    perm = {g: i for i, g in enumerate(np.random.default_rng(seed).permutation(uniq))}
    gid = np.array([perm[g] for g in groups])
    for train, test in GroupKFold(n_splits=k).split(np.zeros(n), groups=gid):
        cal = fit([rows[i] for i in train], [correct[i] for i in train], [kinds[i] for i in train], reranker)
        out[test] = cal.probabilities([rows[i] for i in test], [kinds[i] for i in test])
    return out


# ------------------------------------------------------------------------------------------------ storage


def calibrator_path(data_path: Path, reranker: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", reranker)
    return data_path / "calibration" / f"{safe}.json"


def save(cal: Calibrator, data_path: Path) -> Path:
    path = calibrator_path(data_path, cal.reranker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cal.to_json(), indent=1))
    tmp.replace(path)
    return path


def load(data_path: Path, reranker: str) -> Calibrator | None:
    """The stored calibrator of a reranker, None when there is none."""
    path = calibrator_path(data_path, reranker)
    if not path.exists():
        return None
    try:
        return Calibrator.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, CalibratorError) as exc:
        raise CalibratorError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------------------------ at run time


@dataclass
class Calibration:
    """What the router needs for one reranker: its calibrator (None: none fitted, so nothing is calibrated) and the
    thresholds stored for this reranker version and calibrator. Thresholds are re-read every `refresh_s` seconds
    so a long-lived worker sees a new calibration without a restart."""

    reranker_version: str
    calibrator: Calibrator | None = None
    thresholds: dict[tuple[str, str], StoredThreshold] = field(default_factory=dict)
    conn: psycopg.Connection | None = None
    refresh_s: float = 60.0
    loaded_at: float = 0.0

    @classmethod
    def load(cls, conn: psycopg.Connection | None, data_path: Path, reranker: str, reranker_version: str,
             refresh_s: float = 60.0) -> Calibration:
        c = cls(reranker_version=reranker_version, calibrator=load(data_path, reranker), conn=conn,
                refresh_s=refresh_s)
        c.refresh()
        return c

    @classmethod
    def uncalibrated(cls, reranker_version: str = "") -> Calibration:
        return cls(reranker_version=reranker_version)

    @property
    def hash(self) -> str | None:
        return self.calibrator.hash if self.calibrator else None

    def refresh(self) -> None:
        if self.conn is None or self.calibrator is None:
            return
        rows = cal_store.thresholds_for(self.conn, self.reranker_version, self.calibrator.hash)
        self.thresholds = {(t.kind, t.source_vocab): t for t in rows}
        self.loaded_at = time.monotonic()

    def refresh_if_due(self) -> None:
        if self.conn is not None and time.monotonic() - self.loaded_at >= self.refresh_s:
            self.refresh()

    def threshold_for(self, kind: str, source_vocab: str, reranker_version: str) -> StoredThreshold | None:
        """The set's own calibration, else its kind's; None when neither exists or the reranker answering is not
        the version calibrated (a stale calibration)."""
        if self.calibrator is None or reranker_version != self.reranker_version:
            return None
        return self.thresholds.get((kind, source_vocab)) or self.thresholds.get((kind, ""))
