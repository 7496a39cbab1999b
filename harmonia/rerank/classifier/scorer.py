"""The local classifier reranker: a cross-encoder that scores (source text, candidate concept) pairs.

A checkpoint (written by `harmonia reranker train`, see harmonia.rerank.train) is a folder holding a Hugging Face
sequence-classification model with one logit, its tokenizer (model/), a calibration (calibration.json: isotonic
points mapping the top candidate's probability to P(top-1 is right), fit on held-out development sources), a
stacker (stacker.json, harmonia.rerank.stacker: the cross-encoder's logit combined with the retriever's evidence,
the mapping memory's votes above all) and a model card. Candidates are ranked by the stacker's score; the calibrated
top probability is what the router compares with auto_approve_threshold, as for every reranker.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harmonia.rerank.base import RankedCandidate, Reranker, RerankResult, SourceTerm
from harmonia.rerank.classifier.stacker import Stacker, StackerError

if TYPE_CHECKING:
    import psycopg

    from harmonia.config import Settings
    from harmonia.retrieval.vector import Candidate


class CheckpointError(RuntimeError):
    """No usable classifier checkpoint."""


def candidate_text(c: Candidate | dict[str, Any] | Sequence[Any]) -> str:
    """How a concept is shown to the cross-encoder: "name | domain | vocabulary | class"."""
    if isinstance(c, dict):
        parts = [c.get("concept_name") or c.get("name"), c.get("domain_id") or c.get("domain"),
                 c.get("vocabulary_id") or c.get("vocabulary"), c.get("concept_class_id") or c.get("class")]
    elif isinstance(c, tuple | list):  # (concept_id, name, domain, vocabulary, class) rows from the store
        parts = list(c[1:5])
    else:
        parts = [c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id]
    return " | ".join(str(p) for p in parts if p)


# ------------------------------------------------------------------------------------------------ calibration


@dataclass
class Calibration:
    """A non-decreasing step-wise-linear map from the top pair's probability to a confidence in 0..1."""

    x: list[float]
    y: list[float]
    method: str = "isotonic"
    n: int = 0

    def __call__(self, p: float | np.ndarray) -> np.ndarray | float:
        out = np.clip(np.interp(p, self.x, self.y) if self.x else p, 0.0, 1.0)
        return float(out) if np.ndim(out) == 0 else out

    @classmethod
    def identity(cls) -> Calibration:
        return cls(x=[0.0, 1.0], y=[0.0, 1.0], method="identity", n=0)

    @classmethod
    def fit(cls, probs: Sequence[float], correct: Sequence[bool], min_points: int = 20) -> Calibration:
        """Isotonic regression of correctness on the top probability; identity when there is too little data or
        only one outcome (nothing to learn a mapping from)."""
        p = np.asarray(probs, dtype=float)
        y = np.asarray(correct, dtype=float)
        if len(p) < min_points or y.min(initial=1) == y.max(initial=0):
            return cls.identity()
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
        xs = [float(v) for v in iso.X_thresholds_]
        ys = [float(v) for v in iso.y_thresholds_]
        return cls(x=xs, y=ys, method="isotonic", n=len(p))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n": self.n, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        x, y = list(d.get("x", [])), list(d.get("y", []))
        if len(x) != len(y) or any(b < a for a, b in zip(x, x[1:], strict=False)):
            raise CheckpointError("calibration.json: x and y must be equally long and x sorted")
        return cls(x=x, y=y, method=d.get("method", "isotonic"), n=int(d.get("n", 0)))


# ------------------------------------------------------------------------------------------------ checkpoints


def reranker_root(settings: Settings) -> Path:
    return settings.data_path / "reranker"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, following a `latest` pointer (a symlink, or a file naming the folder)."""
    p = Path(path).expanduser()
    if p.is_file():  # a pointer file
        target = Path(p.read_text().strip())
        p = target if target.is_absolute() else p.parent / target
    p = p.resolve()
    if not (p / "model" / "config.json").exists():
        raise CheckpointError(f"{p} is not a classifier checkpoint (no model/config.json): run "
                              "`harmonia reranker train` or set classifier_checkpoint")
    return p


def checkpoint_from_settings(settings: Settings) -> Path:
    if settings.classifier_checkpoint:
        return resolve_checkpoint(settings.classifier_checkpoint)
    latest = reranker_root(settings) / "latest"
    if not latest.exists():
        raise CheckpointError(f"no trained classifier at {latest}: run `harmonia reranker train` first "
                              "(or set classifier_checkpoint)")
    return resolve_checkpoint(latest)


def weights_hash(model_dir: Path, *extra: Path) -> str:
    """Short hash of the model weights and config (and of `extra` files, e.g. the stacker, where they exist):
    what model_version names."""
    h = hashlib.sha256()
    for p in [*sorted(model_dir.iterdir()), *extra]:
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
            h.update(p.name.encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023 - fh is bound per iteration
                    h.update(block)
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ scoring


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matrix work in hardware (elsewhere it is emulated, and slower than float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(setting: str, device: str) -> str:
    """'auto' -> bfloat16 where the hardware does it natively (a CUDA GPU that supports it, a CPU with AVX512-BF16
    or AMX), else float32."""
    if setting in ("float32", "bfloat16"):
        return setting
    if setting != "auto":
        raise ValueError(f"classifier_dtype must be auto, float32 or bfloat16, not {setting!r}")
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and _cpu_has_native_bf16() else "float32"


def autocast(device: str, dtype: str):  # noqa: ANN201 - a torch autocast context
    """Mixed precision for the forward pass: matrix products in bfloat16, reductions and the loss in float32."""
    import torch

    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")


class PairScorer:
    """A sequence-classification model with one logit: probability that a candidate matches a source text."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", max_length: int = 64,
                 batch_size: int = 64, dtype: str = "float32") -> None:
        if Path(model_dir).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint must never reach for a hub
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
        self.model.to(device).eval()
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.dtype = resolve_dtype(dtype, device)

    def logits(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        import torch

        out: list[np.ndarray] = []
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for i in range(0, len(queries), self.batch_size):
                enc = self.tokenizer(list(queries[i:i + self.batch_size]), list(docs[i:i + self.batch_size]),
                                     truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt").to(self.device)
                out.append(self.model(**enc).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def probs(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(queries, docs)))


def fused_logits(logits: np.ndarray, similarity: np.ndarray, weight: float) -> np.ndarray:
    """logit + weight * retrieval score: what candidates are ranked by. Rank by this, not by its sigmoid, which
    saturates to exactly 1.0 for large values and would turn the ranking into ties."""
    return np.asarray(logits, dtype=np.float64) + weight * np.asarray(similarity, dtype=np.float64)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _memory_note(c: Candidate) -> str:
    n = int(c.scores.get("memory_count", 0))
    return f", {n} similar mapped source{'s map' if n > 1 else ' maps'} here" if n else ""


FUSION_GRID = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class ClassifierReranker(Reranker):
    """Scores every retrieved candidate against the source text; ranks by probability; the calibrated top
    probability is the confidence."""

    name = "classifier"

    def __init__(self, checkpoint: str | Path, *, top_n: int = 5, batch_size: int = 64, max_length: int = 64,
                 device: str = "cpu", dtype: str = "float32") -> None:
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.scorer = PairScorer(self.checkpoint / "model", device=device, max_length=max_length,
                                 batch_size=batch_size, dtype=dtype)
        cal = self.checkpoint / "calibration.json"
        cal_doc = json.loads(cal.read_text()) if cal.exists() else {}
        self.calibration = Calibration.from_dict(cal_doc) if cal_doc else Calibration.identity()
        # Weight of the retriever's own score added to the logit, fit on held-out development sources at training
        # time (0: the cross-encoder alone). It keeps a young checkpoint from ranking below retrieval order. Used
        # only without a stacker (a run with too few held-out sources, or one trained before there was one).
        self.retrieval_weight = float(cal_doc.get("retrieval_weight", 0.0))
        st = self.checkpoint / "stacker.json"
        try:
            self.stacker = Stacker.from_dict(json.loads(st.read_text())) if st.exists() else None
        except (StackerError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{st}: {exc}") from exc
        card = self.checkpoint / "model_card.json"
        meta = json.loads(card.read_text()) if card.exists() else {}
        self.hash = meta.get("checkpoint_hash") or weights_hash(self.checkpoint / "model", st)
        self.base_model = meta.get("base_model", "")
        self.top_n = top_n

    @classmethod
    def from_settings(cls, settings: Settings, conn: psycopg.Connection | None = None) -> ClassifierReranker:
        from harmonia.embedding.model import resolve_device

        return cls(checkpoint_from_settings(settings), top_n=settings.rerank_top_n,
                   batch_size=settings.classifier_batch_size, max_length=settings.classifier_max_length,
                   device=resolve_device(settings.embedding_device), dtype=settings.classifier_dtype)

    @property
    def model_version(self) -> str:
        return f"classifier:{self.hash}"

    def rerank(self, term: SourceTerm, candidates: Sequence[Candidate]) -> RerankResult:
        return self.rerank_many([(term, candidates)])[0]

    def rerank_many(self, items: Sequence[tuple[SourceTerm, Sequence[Candidate]]]) -> list[RerankResult]:
        """All pairs of all items in one stream of batches; a failure sends every item of the call to review."""
        t0 = time.perf_counter()
        queries = [t.source_text for t, cands in items for _ in cands]
        docs = [candidate_text(c) for _, cands in items for c in cands]
        sims = np.array([c.similarity for _, cands in items for c in cands], dtype=np.float32)
        try:
            logits = self.scorer.logits(queries, docs)
            if self.stacker is None:
                z = fused_logits(logits, sims, self.retrieval_weight)
            else:  # each item's own candidate list: the stacker's features compare a candidate with its rivals
                bounds = np.cumsum([0] + [len(cands) for _, cands in items])
                z = np.concatenate([self.stacker.score(cands, logits[bounds[k]:bounds[k + 1]])
                                    for k, (_, cands) in enumerate(items)] or [np.zeros(0)])
        except Exception as exc:  # noqa: BLE001 - a model fault must not lose the codes
            return [RerankResult(ranked=[], confidence=0.0, model_version=self.model_version,
                                 error=f"{type(exc).__name__}: {exc}", error_kind="reranker_exception")
                    for _ in items]
        ms = (time.perf_counter() - t0) * 1000 / max(len(items), 1)
        results, at = [], 0
        for _term, cands in items:
            zi = z[at:at + len(cands)]
            p, p_pair = sigmoid(zi), sigmoid(logits[at:at + len(cands)])
            at += len(cands)
            order = np.argsort(-zi, kind="stable")[: self.top_n]
            ranked = [RankedCandidate(cands[i].concept_id, float(p[i]),
                                      f"classifier p={p[i]:.3f} (cross-encoder {p_pair[i]:.3f}, retrieval rank "
                                      f"{i + 1}{_memory_note(cands[i])})")
                      for i in order]
            conf = float(self.calibration(float(p[order[0]]))) if len(order) else 0.0
            results.append(RerankResult(
                ranked=ranked, confidence=conf, model_version=self.model_version, no_match=not ranked,
                usage={"pairs": len(cands), "ms": round(ms, 2)},
                details={"checkpoint": str(self.checkpoint), "checkpoint_hash": self.hash,
                         "top_probability": round(float(p[order[0]]), 4) if len(order) else None,
                         "retrieval_weight": self.retrieval_weight, "dtype": self.scorer.dtype,
                         "stacker": self.stacker is not None,
                         "calibration": self.calibration.method}))
        return results
