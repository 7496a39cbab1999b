"""The classifier reranker's last step: one small model over the cross-encoder's logit and the retriever's own
evidence for each candidate.

The cross-encoder reads only the two texts. The retriever knows more: how close the concept's name is in the
embedding space, its trigram score, and above all what the mapping memory says (how many of the source's nearest
already-mapped neighbours map to this concept, and how close they are). A stacker learns how much each is worth:
a multi-layer perceptron (scikit-learn's) over standardised features, fit on development sources the cross-encoder
never trained on. It is stored as plain numbers in JSON (no pickle: a checkpoint folder is safe to share) and
evaluated here with numpy, so scoring adds well under a millisecond per source.

Features are computed per candidate list, so "gap" features (a score minus the list's best) carry how the
candidate compares with its rivals. Scores a retriever does not produce (vector mode has no lexical or memory
scores) are 0: a stacker fit on hybrid candidates still ranks them, less well; refit after changing retrieval.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from harmonia.retrieval.vector import Candidate

# The order is the stored model's input order: append, never reorder (a stored stacker names its features).
FEATURES: tuple[str, ...] = (
    "similarity", "log_rank", "vector", "lexical", "name", "synonym", "memory", "semantic", "rrf",
    "memory_votes", "memory_count", "memory_first", "memory_top", "memory_gap",
    "semantic_gap", "vector_gap", "lexical_gap", "logit", "logit_gap", "logit_log_rank", "memory_code",
    # how a candidate agrees with the source's lab name or drug string (harmonia.text, with retrieval_lab_text /
    # retrieval_drug_text on): +1 agrees, -1 contradicts, 0 unknown
    "lab_system", "lab_scale", "lab_property", "lab_timing", "drug_strength", "drug_form", "drug_brand",
)
TEXT_FEATURES = ("lab_system", "lab_scale", "lab_property", "lab_timing", "drug_strength", "drug_form", "drug_brand")


CONSTANT_SCALE = 1e12


class StackerError(ValueError):
    pass


def _rank(x: np.ndarray) -> np.ndarray:
    """0-based rank by descending value."""
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(-x, kind="stable")] = np.arange(len(x))
    return r


def features(cands: Sequence[Candidate], logits: np.ndarray) -> np.ndarray:
    """One row of FEATURES per candidate (in retrieval order, which `log_rank` records)."""
    n = len(cands)
    if n == 0:
        return np.zeros((0, len(FEATURES)))

    def col(key: str) -> np.ndarray:
        return np.array([float(c.scores.get(key, 0.0)) for c in cands], dtype=np.float64)

    sim = np.array([c.similarity for c in cands], dtype=np.float64)
    vector = np.array([c.scores.get("vector", c.similarity) for c in cands], dtype=np.float64)
    lexical, memory, semantic = col("lexical"), col("memory"), col("semantic")
    if not semantic.any():
        semantic = vector
    first = col("memory_rank")
    top = col("memory_top")
    z = np.asarray(logits, dtype=np.float64)
    cols = {
        "similarity": sim, "log_rank": np.log1p(np.arange(n, dtype=np.float64)), "vector": vector,
        "lexical": lexical, "name": col("name"), "synonym": col("synonym"), "memory": memory, "semantic": semantic,
        "rrf": col("rrf"), "memory_votes": col("memory_votes"), "memory_count": col("memory_count"),
        "memory_first": np.where(first > 0, 1.0 / np.maximum(first, 1.0), 0.0), "memory_top": top,
        "memory_gap": np.where(memory > 0, memory - top, -1.0), "semantic_gap": semantic - semantic.max(),
        "vector_gap": vector - vector.max(), "lexical_gap": lexical - lexical.max(), "logit": z,
        "logit_gap": z - z.max(), "logit_log_rank": np.log1p(_rank(z)), "memory_code": col("memory_code"),
        **{f: col(f) for f in TEXT_FEATURES},
    }
    return np.column_stack([cols[f] for f in FEATURES])


@dataclass
class Stacker:
    """Standardise, then a ReLU perceptron (no hidden layer: logistic regression) to one logit."""

    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    n: int = 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h[:, 0]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, hidden: Sequence[int] = (32,), alpha: float = 1e-3,
            seed: int = 13) -> Stacker:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        if len(np.unique(y)) < 2:
            raise StackerError("the stacker needs both matching and non-matching candidates to learn from")
        sc = StandardScaler().fit(x)
        # A feature constant in fitting (the lab features of a stacker fit on ICD10 sources only) says nothing: a
        # huge scale standardises it to 0 when it does vary later, so an untrained weight cannot act on it.
        scale = np.where(sc.var_ > 0, sc.scale_, CONSTANT_SCALE)
        if hidden:
            # Early stopping on a validation tenth where there is data to spare; a small set trains to convergence.
            big = len(y) >= 20000
            m = MLPClassifier(hidden_layer_sizes=tuple(hidden), alpha=alpha, max_iter=300 if big else 1000,
                              early_stopping=big, n_iter_no_change=20, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter reached is fine for a stacker
                m.fit((x - sc.mean_) / scale, y)
            weights, biases = [np.asarray(w) for w in m.coefs_], [np.asarray(b) for b in m.intercepts_]
        else:
            from sklearn.linear_model import LogisticRegression

            m = LogisticRegression(C=1.0 / max(alpha, 1e-9), max_iter=3000).fit((x - sc.mean_) / scale, y)
            weights, biases = [m.coef_.T.copy()], [m.intercept_.copy()]
        return cls(list(FEATURES), np.asarray(sc.mean_), scale, weights, biases, n=len(y))

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": [w.tolist() for w in self.weights], "biases": [b.tolist() for b in self.biases],
                "n": self.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stacker:
        names = list(d.get("features", []))
        if names != list(FEATURES[: len(names)]):
            raise StackerError(f"stacker features {names} do not match this version's {list(FEATURES)}")
        s = cls(names, np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64),
                [np.asarray(w, dtype=np.float64) for w in d["weights"]],
                [np.asarray(b, dtype=np.float64) for b in d["biases"]], n=int(d.get("n", 0)))
        dims = [len(names)] + [w.shape[1] for w in s.weights]
        if (len(s.mean) != len(names) or any(w.shape[0] != a for w, a in zip(s.weights, dims, strict=False))
                or dims[-1] != 1):
            raise StackerError("stacker weights do not fit its features")
        return s

    def score(self, cands: Sequence[Candidate], logits: np.ndarray) -> np.ndarray:
        x = features(cands, logits)[:, : len(self.features)]
        return self.logits(x)
