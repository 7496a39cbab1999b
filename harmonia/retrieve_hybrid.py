"""Lexical and hybrid retrieval: a trigram generator over names and synonyms, fused with vector search.

Hybrid search gathers the vector generator's top `retrieval_vector_k` and the lexical generator's top
`retrieval_lexical_k`, completes every candidate of the union with the score the other generator would give it
(exact cosine, trigram score), then ranks the union by

    fused = (w_vector * minmax(vector) + w_lexical * minmax(lexical) + w_rrf * rrf) / (w_vector + w_lexical + w_rrf)

where lexical = max(boost_name * name score, boost_synonym * synonym score) and rrf is the mean over both
generators of (k + 1) / (k + rank), so every term lies in 0..1. Ties go to the lower concept_id. The pool (union with
raw scores) is kept apart from the fusion so `harmonia retrieve tune` can fuse thousands of times without SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg

from harmonia.config import Settings
from harmonia.embed import Embedder
from harmonia.retrieve import Candidate, Retriever
from harmonia.store import lexical as lex_store

# Lexical hits must cover this share of the query's trigrams (pg_trgm word_similarity): lower finds more typos
# but costs time, as every hit is scored.
LEXICAL_THRESHOLD = 0.35


@dataclass(frozen=True)
class FusionWeights:
    vector: float = 0.5
    lexical: float = 0.5
    rrf: float = 0.0
    rrf_k: float = 60.0
    boost_name: float = 1.0
    boost_synonym: float = 0.8

    @classmethod
    def from_settings(cls, s: Settings) -> FusionWeights:
        return cls(vector=s.retrieval_weight_vector, lexical=s.retrieval_weight_lexical, rrf=s.retrieval_weight_rrf,
                   rrf_k=s.retrieval_rrf_k, boost_name=s.retrieval_boost_name,
                   boost_synonym=s.retrieval_boost_synonym)

    def as_settings(self) -> dict[str, float]:
        return {"retrieval_weight_vector": self.vector, "retrieval_weight_lexical": self.lexical,
                "retrieval_weight_rrf": self.rrf, "retrieval_rrf_k": self.rrf_k,
                "retrieval_boost_name": self.boost_name, "retrieval_boost_synonym": self.boost_synonym}


@dataclass
class Pool:
    """One query's candidate union with every generator's raw score (arrays aligned with `ids`, ids ascending)."""

    ids: np.ndarray
    vector: np.ndarray
    name: np.ndarray
    synonym: np.ndarray
    rows: dict[int, tuple] = field(default_factory=dict)  # concept_id -> the six candidate columns
    vector_order: list[int] = field(default_factory=list)  # each generator's own ranking, for comparisons
    lexical_order: list[int] = field(default_factory=list)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def _ranks(score: np.ndarray) -> np.ndarray:
    """1-based rank by descending score; ids are ascending, so a stable sort breaks ties by concept_id."""
    order = np.argsort(-score, kind="stable")
    r = np.empty(len(score), dtype=np.float64)
    r[order] = np.arange(1, len(score) + 1)
    return r


def fuse(pool: Pool, w: FusionWeights, k: int) -> list[tuple[int, float, dict[str, float]]]:
    """The top k of the pool as (concept_id, fused score, per-generator scores), deterministic."""
    if len(pool.ids) == 0:
        return []
    lexical = np.maximum(w.boost_name * pool.name, w.boost_synonym * pool.synonym)
    rrf = ((w.rrf_k + 1) / (w.rrf_k + _ranks(pool.vector)) + (w.rrf_k + 1) / (w.rrf_k + _ranks(lexical))) / 2
    total = w.vector + w.lexical + w.rrf
    fused = (w.vector * _minmax(pool.vector) + w.lexical * _minmax(lexical) + w.rrf * rrf) / (total or 1.0)
    order = np.argsort(-fused, kind="stable")[:k]
    return [(int(pool.ids[i]), float(fused[i]),
             {"vector": float(pool.vector[i]), "lexical": float(lexical[i]), "name": float(pool.name[i]),
              "synonym": float(pool.synonym[i]), "rrf": float(rrf[i])}) for i in order]


def fused_ranking(pool: Pool, w: FusionWeights, k: int) -> np.ndarray:
    """Only the ranked ids (for tuning: no per-candidate dicts)."""
    if len(pool.ids) == 0:
        return pool.ids
    lexical = np.maximum(w.boost_name * pool.name, w.boost_synonym * pool.synonym)
    fused = w.vector * _minmax(pool.vector) + w.lexical * _minmax(lexical)
    if w.rrf:
        fused = fused + w.rrf * ((w.rrf_k + 1) / (w.rrf_k + _ranks(pool.vector))
                                 + (w.rrf_k + 1) / (w.rrf_k + _ranks(lexical))) / 2
    return pool.ids[np.argsort(-fused, kind="stable")[:k]]


def _candidate(row: tuple, similarity: float, scores: dict[str, float]) -> Candidate:
    return Candidate(concept_id=row[0], concept_name=row[1], domain_id=row[2], vocabulary_id=row[3],
                     concept_class_id=row[4], concept_code=row[5], similarity=similarity, scores=scores)


class LexicalRetriever(Retriever):
    """Trigram retrieval only: needs no embeddings (the embedder is kept for the API, never called)."""

    def __init__(self, conn: psycopg.Connection, embedder: Embedder | None, settings: Settings,
                 threshold: float = LEXICAL_THRESHOLD) -> None:
        self.conn = conn
        self.embedder = embedder  # type: ignore[assignment]
        self.settings = settings
        self.threshold = threshold

    def _vocabularies(self, vocabularies: Sequence[str] | None) -> list[str] | None:
        # Vector search only sees embedded (configured) vocabularies; lexical search must filter for the same.
        v = vocabularies if vocabularies else self.settings.vocabularies
        return list(v) if v else None

    def lexical(self, text: str, k: int, *, domains: Sequence[str] | None = None,
                vocabularies: Sequence[str] | None = None) -> list[tuple]:
        s = self.settings
        return lex_store.lexical_search(self.conn, text, k, domains=domains,
                                        vocabularies=self._vocabularies(vocabularies),
                                        boost_name=s.retrieval_boost_name, boost_synonym=s.retrieval_boost_synonym,
                                        threshold=self.threshold)

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[list[Candidate]]:
        k = k or self.settings.retrieval_top_k
        domains = domains if domains is not None else (self.settings.retrieval_domains or None)
        out = []
        for t in texts:
            rows = self.lexical(t, k, domains=domains, vocabularies=vocabularies)
            out.append([_candidate(r[:6], r[6], {"lexical": r[6], "name": r[7], "synonym": r[8]}) for r in rows])
        return out


class HybridRetriever(LexicalRetriever):
    """Vector and lexical candidates fused into one ranking (see the module docstring)."""

    def __init__(self, conn: psycopg.Connection, embedder: Embedder, settings: Settings,
                 threshold: float = LEXICAL_THRESHOLD, weights: FusionWeights | None = None) -> None:
        Retriever.__init__(self, conn, embedder, settings)  # checks the model's embeddings exist
        self.threshold = threshold
        self.weights = weights or FusionWeights.from_settings(settings)

    def pool(self, text: str, vector: np.ndarray, *, domains: Sequence[str] | None = None,
             vocabularies: Sequence[str] | None = None, exact: bool = False) -> Pool:
        s = self.settings
        vec = self.search_vector(vector, s.retrieval_vector_k, domains=domains, vocabularies=vocabularies,
                                 exact=exact)
        lex = self.lexical(text, s.retrieval_lexical_k, domains=domains, vocabularies=vocabularies)
        rows = {c.concept_id: (c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id,
                               c.concept_code) for c in vec}
        vscore = {c.concept_id: c.similarity for c in vec}
        lscore = {r[0]: (r[7], r[8]) for r in lex}
        for r in lex:
            rows.setdefault(r[0], tuple(r[:6]))
        ids = sorted(rows)
        missing_v = [i for i in ids if i not in vscore]
        missing_l = [i for i in ids if i not in lscore]
        vscore.update(lex_store.vector_scores(self.conn, self.embedder.key, self.dim, vector, missing_v))
        lscore.update(lex_store.lexical_scores(self.conn, text, missing_l))
        floor = min(vscore.values()) if vscore else 0.0  # a concept without an embedding ranks last on vector
        return Pool(ids=np.array(ids, dtype=np.int64),
                    vector=np.array([vscore.get(i, floor) for i in ids], dtype=np.float64),
                    name=np.array([lscore.get(i, (0.0, 0.0))[0] for i in ids], dtype=np.float64),
                    synonym=np.array([lscore.get(i, (0.0, 0.0))[1] for i in ids], dtype=np.float64),
                    rows=rows, vector_order=[c.concept_id for c in vec], lexical_order=[r[0] for r in lex])

    def pools(self, texts: Sequence[str], *, domains: Sequence[str] | None = None,
              vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[Pool]:
        vectors = self.embedder.encode_queries(list(texts))
        return [self.pool(t, v, domains=domains, vocabularies=vocabularies, exact=exact)
                for t, v in zip(texts, vectors, strict=True)]

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[list[Candidate]]:
        k = k or self.settings.retrieval_top_k
        domains = domains if domains is not None else (self.settings.retrieval_domains or None)
        vectors = self.embedder.encode_queries(list(texts))
        return [self.search_encoded(t, v, k, domains=domains, vocabularies=vocabularies, exact=exact)
                for t, v in zip(texts, vectors, strict=True)]

    def search_encoded(self, text: str, vector: np.ndarray, k: int, *, domains: Sequence[str] | None = None,
                       vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[Candidate]:
        """Hybrid search for an already encoded query."""
        p = self.pool(text, vector, domains=domains, vocabularies=vocabularies, exact=exact)
        return [_candidate(p.rows[cid], score, parts) for cid, score, parts in fuse(p, self.weights, k)]
