"""Vector retrieval: the top-K valid standard concepts by cosine similarity to the encoded source text, over one
model's embeddings (harmonia.store.embeddings)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psycopg

from harmonia.config import RetrievalSettings, Settings
from harmonia.domain import Candidate, SourceKey
from harmonia.embedding.model import Embedder
from harmonia.retrieval.base import RetrievalError, Retriever
from harmonia.store import embeddings as emb_store


class VectorRetriever(Retriever):
    """Vector retrieval over one model's embeddings (an HNSW index per model)."""

    def __init__(self, conn: psycopg.Connection, embedder: Embedder, cfg: RetrievalSettings) -> None:
        self.conn = conn
        self.embedder: Embedder = embedder
        self.cfg = cfg
        dim = emb_store.model_dim(conn, embedder.key)
        if dim is None or emb_store.count(conn, embedder.key) == 0:
            raise RetrievalError(f"no embeddings for model {embedder.key}: run `harmonia embed` first")
        self.dim = dim
        # domains with a partial index of the configured storage: a search filtered to only those walks their graphs
        self.indexed_domains = frozenset(
            d for d, name in emb_store.domain_indexes(conn, embedder.key).items()
            if name == emb_store.domain_index_name(embedder.key, cfg.hnsw_storage, d))

    @classmethod
    def from_settings(cls, conn: psycopg.Connection, embedder: Embedder, settings: Settings) -> VectorRetriever:
        return cls(conn, embedder, settings.retrieval)

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False,
                    source_keys: Sequence[SourceKey | None] | None = None) -> list[list[Candidate]]:
        """Embed all texts in one batch, then one index query each."""
        k = k or self.cfg.top_k
        domains = domains if domains is not None else (self.cfg.domains or None)
        vectors = self.embedder.encode_queries(list(texts))
        return [self.search_vector(v, k, domains=domains, vocabularies=vocabularies, exact=exact)
                for v in vectors]

    def search_vector(self, vector: np.ndarray, k: int, *, domains: Sequence[str] | None = None,
                      vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[Candidate]:
        """The top-k for an already encoded query."""
        return emb_store.vector_search(self.conn, self.embedder.key, self.dim, vector, k,
                                       ef_search=self.cfg.hnsw_ef_search, domains=domains,
                                       vocabularies=vocabularies, exact=exact, storage=self.cfg.hnsw_storage,
                                       by_domain=bool(domains) and set(domains or ()) <= self.indexed_domains)
