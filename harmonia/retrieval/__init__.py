"""Candidate retrieval: the top-K valid standard concepts for a source text.

base.py is the interface; vector.py (pgvector), lexical.py (pg_trgm) and hybrid.py (both fused with the mapping
memory) implement it; memory.py builds the mapping memory and tune.py tunes the fusion weights.
`make_retriever` builds the one the `retrieval_mode` setting names.
"""

from __future__ import annotations

import psycopg

from harmonia.config import Settings
from harmonia.embedding.model import Embedder
from harmonia.retrieval.base import RetrievalError, Retriever


def make_retriever(conn: psycopg.Connection, embedder: Embedder, settings: Settings) -> Retriever:
    """The retriever the `retrieval_mode` setting names, on the caller's connection (the caller closes both)."""
    cfg, mode = settings.retrieval, settings.retrieval.mode
    if mode == "vector":
        from harmonia.retrieval.vector import VectorRetriever

        return VectorRetriever(conn, embedder, cfg)
    if mode == "lexical":
        from harmonia.retrieval.lexical import LexicalRetriever

        return LexicalRetriever.from_settings(conn, embedder, settings)
    if mode == "hybrid":
        from harmonia.retrieval.hybrid import HybridRetriever

        return HybridRetriever.from_settings(conn, embedder, settings)
    raise RetrievalError(f"retrieval_mode {mode!r} is not available")
