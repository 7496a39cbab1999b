"""Candidate retrieval: the top-K valid standard concepts for a source text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import psycopg

from harmonia.config import Settings
from harmonia.embedding.model import Embedder
from harmonia.store import embeddings as emb_store


class RetrievalError(RuntimeError):
    pass


@dataclass
class Candidate:
    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    concept_code: str
    similarity: float  # cosine similarity (vector), or the fused score (hybrid)
    scores: dict[str, float] = field(default_factory=dict)  # per-generator scores, for the record
    evidence: dict[str, str] = field(default_factory=dict)  # e.g. the remembered source that maps here

    def to_dict(self) -> dict:
        return asdict(self)

    def compact(self) -> dict:
        """What a reranker needs to see, and no more."""
        return {"id": self.concept_id, "name": self.concept_name, "domain": self.domain_id,
                "vocabulary": self.vocabulary_id, "class": self.concept_class_id}


def _rows_to_candidates(rows: list[tuple]) -> list[Candidate]:
    return [Candidate(concept_id=r[0], concept_name=r[1], domain_id=r[2], vocabulary_id=r[3],
                      concept_class_id=r[4], concept_code=r[5], similarity=float(r[6]),
                      scores={"vector": float(r[6])}) for r in rows]


class Retriever:
    """Vector retrieval over one model's embeddings (see harmonia.store.embeddings)."""

    def __init__(self, conn: psycopg.Connection, embedder: Embedder, settings: Settings) -> None:
        self.conn = conn
        self.embedder = embedder
        self.settings = settings
        dim = emb_store.model_dim(conn, embedder.key)
        if dim is None or emb_store.count(conn, embedder.key) == 0:
            raise RetrievalError(f"no embeddings for model {embedder.key}: run `harmonia embed` first")
        self.dim = dim

    def search(self, text: str, k: int | None = None, *, domains: Sequence[str] | None = None,
               vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[Candidate]:
        return self.search_many([text], k, domains=domains, vocabularies=vocabularies, exact=exact)[0]

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False,
                    source_keys: Sequence[tuple[str, str] | None] | None = None) -> list[list[Candidate]]:
        """Embed all texts in one batch, then one index query each. `source_keys` ((source_code, source_vocab) of
        each text) matter only to a retriever with a mapping memory, which never returns a source's own map."""
        k = k or self.settings.retrieval_top_k
        domains = domains if domains is not None else (self.settings.retrieval_domains or None)
        vectors = self.embedder.encode_queries(list(texts))
        return [self.search_vector(v, k, domains=domains, vocabularies=vocabularies, exact=exact)
                for v in vectors]

    def search_vector(self, vector, k: int, *, domains: Sequence[str] | None = None,  # noqa: ANN001
                      vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[Candidate]:
        rows = emb_store.vector_search(self.conn, self.embedder.key, self.dim, vector, k,
                                       ef_search=self.settings.hnsw_ef_search, domains=domains,
                                       vocabularies=vocabularies, exact=exact)
        return _rows_to_candidates(rows)


def make_retriever(conn: psycopg.Connection, embedder: Embedder, settings: Settings) -> Retriever:
    """The retriever the `retrieval_mode` setting names."""
    if settings.retrieval_mode == "vector":
        return Retriever(conn, embedder, settings)
    if settings.retrieval_mode in ("lexical", "hybrid"):
        from harmonia.retrieval.hybrid import HybridRetriever, LexicalRetriever  # it imports this module

        cls = LexicalRetriever if settings.retrieval_mode == "lexical" else HybridRetriever
        return cls(conn, embedder, settings)
    raise RetrievalError(f"retrieval_mode {settings.retrieval_mode!r} is not available")
