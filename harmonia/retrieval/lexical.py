"""Lexical retrieval: pg_trgm similarity over concept names and synonyms (harmonia.store.lexical). Needs no
embeddings; hybrid retrieval uses it as its second generator. With retrieval_lexical_generator = bm25 the
candidates come from the release's BM25 index (harmonia.retrieval.bm25) and keep the trigram score."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from harmonia.config import RetrievalSettings, Settings
from harmonia.domain import Candidate, SourceKey
from harmonia.embedding.model import Embedder
from harmonia.retrieval.base import Retriever
from harmonia.retrieval.bm25 import Bm25Generator
from harmonia.store import lexical as lex_store

# Lexical hits must cover this share of the query's trigrams (pg_trgm word_similarity): lower finds more typos
# but costs time, as every hit is scored.
LEXICAL_THRESHOLD = 0.35


def bm25_of(settings: Settings) -> Bm25Generator | None:
    """The BM25 generator where the settings choose it (retrieval_lexical_generator), else None (pg_trgm)."""
    return Bm25Generator(settings) if settings.retrieval.lexical_generator == "bm25" else None


class LexicalRetriever(Retriever):
    """Trigram retrieval only. `vocabularies` are the configured (embedded) ones, searched when a call names none.
    The embedder, if given, is kept for the record (a benchmark run names it) and never called."""

    def __init__(self, conn: psycopg.Connection, cfg: RetrievalSettings, vocabularies: Sequence[str], *,
                 embedder: Embedder | None = None, threshold: float = LEXICAL_THRESHOLD,
                 bm25: Bm25Generator | None = None) -> None:
        self.conn = conn
        self.bm25 = bm25
        self.cfg = cfg
        self.configured_vocabularies = list(vocabularies)
        self.embedder = embedder
        self.threshold = threshold

    @classmethod
    def from_settings(cls, conn: psycopg.Connection, embedder: Embedder | None, settings: Settings,
                      threshold: float = LEXICAL_THRESHOLD) -> LexicalRetriever:
        return cls(conn, settings.retrieval, settings.embedding.vocabularies, embedder=embedder, threshold=threshold,
                   bm25=bm25_of(settings))

    def vocabularies(self, vocabularies: Sequence[str] | None) -> list[str] | None:
        """The vocabularies a search covers: vector search only sees embedded (configured) vocabularies, so lexical
        search filters for the same unless the caller names others."""
        v = vocabularies if vocabularies else self.configured_vocabularies
        return list(v) if v else None

    def rows(self, text: str, k: int, *, domains: Sequence[str] | None = None,
             vocabularies: Sequence[str] | None = None, conn: psycopg.Connection | None = None) -> list[Candidate]:
        """The lexical top-k (on `conn` if given: hybrid search runs this on a second connection)."""
        if self.bm25 is not None:
            return self.bm25.rows(conn or self.conn, text, k, domains=domains,
                                  vocabularies=self.vocabularies(vocabularies), boost_name=self.cfg.boost_name,
                                  boost_synonym=self.cfg.boost_synonym, threshold=self.threshold)
        return lex_store.lexical_search(conn or self.conn, text, k, domains=domains,
                                        vocabularies=self.vocabularies(vocabularies),
                                        boost_name=self.cfg.boost_name, boost_synonym=self.cfg.boost_synonym,
                                        threshold=self.threshold)

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False,
                    source_keys: Sequence[SourceKey | None] | None = None) -> list[list[Candidate]]:
        k = k or self.cfg.top_k
        domains = domains if domains is not None else (self.cfg.domains or None)
        return [self.rows(t, k, domains=domains, vocabularies=vocabularies) for t in texts]
