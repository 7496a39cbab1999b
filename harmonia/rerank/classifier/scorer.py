"""Scoring (source text, candidate concept) pairs with a cross-encoder: how a concept is shown to it, the precision
it runs in, and the fusion of its logit with the retriever's score."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harmonia.domain import Candidate, Concept

if TYPE_CHECKING:
    import torch


def candidate_text(c: Candidate | Concept) -> str:
    """How a concept is shown to the cross-encoder: "name | domain | vocabulary | class"."""
    parts = [c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id]
    return " | ".join(str(p) for p in parts if p)


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


def autocast(device: str, dtype: str) -> torch.autocast:
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


FUSION_GRID = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
