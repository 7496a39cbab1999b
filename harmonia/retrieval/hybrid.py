"""Hybrid retrieval: the trigram generator (harmonia.retrieval.lexical) fused with vector search
(harmonia.retrieval.vector) and, where one is built, the mapping memory (harmonia.retrieval.memory).

Hybrid search gathers the vector generator's top `retrieval_vector_k`, the lexical generator's top
`retrieval_lexical_k` and the targets of the `retrieval_memory_k` most similar already-mapped sources, completes
every candidate of the union with the score the other generators would give it (exact cosine, trigram score), then
ranks the union by

    fused = (w_vector * minmax(semantic) + w_lexical * minmax(lexical) + w_rrf * rrf) / (w_vector + w_lexical + w_rrf)

where semantic = max(cosine to the concept's name, boost_memory * cosine to the most similar remembered source that
maps to the concept): a remembered source is one more name of its target in the same embedding space, as a synonym
is for the lexical score; lexical = max(boost_name * name score, boost_synonym * synonym score); and rrf is the mean
over the semantic and lexical rankings of (k + 1) / (k + rank), so every term lies in 0..1. (Measured on 1,000
development sources, leave-one-out, bundled embedder: this max form lifted recall@50 0.922 -> 0.962 and top-1
0.633 -> 0.723; adding the memory similarity as a fourth weighted term instead reached the same recall only at a
top-1 of 0.49.) Ties go to the lower concept_id. The pool (union with raw scores) is kept apart from the fusion
so `harmonia retrieve tune` can fuse thousands of times without SQL.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg.pq import TransactionStatus

from harmonia.config import RetrievalSettings, Settings
from harmonia.domain import Candidate, SourceKey
from harmonia.embedding.model import Embedder
from harmonia.retrieval.base import Retriever
from harmonia.retrieval.bm25 import Bm25Generator
from harmonia.retrieval.lexical import LEXICAL_THRESHOLD, LexicalRetriever, bm25_of
from harmonia.retrieval.vector import VectorRetriever
from harmonia.store import concepts as concept_store
from harmonia.store import lexical as lex_store
from harmonia.store import memory as mem_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionWeights:
    vector: float = 0.5
    lexical: float = 0.5
    rrf: float = 0.0
    rrf_k: float = 60.0
    boost_name: float = 1.0
    boost_synonym: float = 0.8
    boost_memory: float = 0.0

    @classmethod
    def of(cls, cfg: RetrievalSettings) -> FusionWeights:
        """The weights the retrieval settings hold."""
        return cls(vector=cfg.weight_vector, lexical=cfg.weight_lexical, rrf=cfg.weight_rrf, rrf_k=cfg.rrf_k,
                   boost_name=cfg.boost_name, boost_synonym=cfg.boost_synonym, boost_memory=cfg.boost_memory)

    def as_settings(self) -> dict[str, float]:
        """The weights by their settings' flat keys (what `retrieve tune` writes into the configuration file)."""
        return {"retrieval_weight_vector": self.vector, "retrieval_weight_lexical": self.lexical,
                "retrieval_weight_rrf": self.rrf, "retrieval_rrf_k": self.rrf_k,
                "retrieval_boost_name": self.boost_name, "retrieval_boost_synonym": self.boost_synonym,
                "retrieval_boost_memory": self.boost_memory}


@dataclass
class MemoryRecall:
    """What the memory's nearest remembered sources say about one query (see HybridRetriever.memory)."""

    score: dict[int, float] = field(default_factory=dict)   # target -> best similarity of a source mapping to it
    text: dict[int, str] = field(default_factory=dict)      # target -> that source's text
    votes: dict[int, tuple[float, int, int]] = field(default_factory=dict)  # target -> (sum sim, count, first rank)
    top: float = 0.0                                        # the nearest remembered source's similarity
    # target -> the longest code prefix a remembered source of the query's own vocabulary that maps there shares
    # with the query's code, as a share of that code: hierarchical codes (ICD10 "L66.1" and "L66.9") are kin.
    code: dict[int, float] = field(default_factory=dict)


@dataclass
class Pool:
    """One query's candidate union with every generator's raw score (arrays aligned with `ids`, ids ascending)."""

    ids: np.ndarray
    vector: np.ndarray
    name: np.ndarray
    synonym: np.ndarray
    rows: dict[int, Candidate] = field(default_factory=dict)  # concept_id -> the candidate as a generator found it
    vector_order: list[int] = field(default_factory=list)  # each generator's own ranking, for comparisons
    lexical_order: list[int] = field(default_factory=list)
    memory: np.ndarray | None = None  # best similarity of a remembered source mapping to each id (0: none)
    memory_sources: dict[int, str] = field(default_factory=dict)  # concept_id -> the remembered source's text
    # The memory's votes and code kinship: not used by the fusion, recorded in Candidate.scores for rerankers that
    # learn from them (the classifier's stacker).
    recall: MemoryRecall = field(default_factory=MemoryRecall)

    def memory_scores(self) -> np.ndarray:
        return self.memory if self.memory is not None else np.zeros(len(self.ids))


def code_kinship(code: str, other: str) -> float:
    """Shared leading characters (dots ignored) as a share of `code`'s length."""
    a, b = code.replace(".", ""), other.replace(".", "")
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / len(a) if a else 0.0


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def _ranks(score: np.ndarray) -> np.ndarray:
    """1-based rank by descending score; ids are ascending, so a stable sort breaks ties by concept_id."""
    order = np.argsort(-score, kind="stable")
    r = np.empty(len(score), dtype=np.float64)
    r[order] = np.arange(1, len(score) + 1)
    return r


def _semantic(pool: Pool, w: FusionWeights) -> np.ndarray:
    """Cosine to the concept's name, or the boosted cosine of a remembered source mapping to it if higher."""
    return np.maximum(pool.vector, w.boost_memory * pool.memory_scores()) if w.boost_memory else pool.vector


def fuse(pool: Pool, w: FusionWeights, k: int) -> list[tuple[int, float, dict[str, float]]]:
    """The top k of the pool as (concept_id, fused score, per-generator scores), deterministic."""
    if len(pool.ids) == 0:
        return []
    lexical = np.maximum(w.boost_name * pool.name, w.boost_synonym * pool.synonym)
    memory = pool.memory_scores()
    semantic = _semantic(pool, w)
    rrf = ((w.rrf_k + 1) / (w.rrf_k + _ranks(semantic)) + (w.rrf_k + 1) / (w.rrf_k + _ranks(lexical))) / 2
    total = w.vector + w.lexical + w.rrf
    fused = (w.vector * _minmax(semantic) + w.lexical * _minmax(lexical) + w.rrf * rrf) / (total or 1.0)
    order = np.argsort(-fused, kind="stable")[:k]
    return [(int(pool.ids[i]), float(fused[i]),
             {"vector": float(pool.vector[i]), "lexical": float(lexical[i]), "name": float(pool.name[i]),
              "synonym": float(pool.synonym[i]), "memory": float(memory[i]), "semantic": float(semantic[i]),
              "rrf": float(rrf[i])})
            for i in order]


def fused_ranking(pool: Pool, w: FusionWeights, k: int) -> np.ndarray:
    """Only the ranked ids (for tuning: no per-candidate dicts)."""
    if len(pool.ids) == 0:
        return pool.ids
    lexical = np.maximum(w.boost_name * pool.name, w.boost_synonym * pool.synonym)
    semantic = _semantic(pool, w)
    fused = w.vector * _minmax(semantic) + w.lexical * _minmax(lexical)
    if w.rrf:
        fused = fused + w.rrf * ((w.rrf_k + 1) / (w.rrf_k + _ranks(semantic))
                                 + (w.rrf_k + 1) / (w.rrf_k + _ranks(lexical))) / 2
    return pool.ids[np.argsort(-fused, kind="stable")[:k]]


def _close_side(conn: psycopg.Connection, thread: ThreadPoolExecutor | None) -> None:
    if thread is not None:
        thread.shutdown(wait=True)
    conn.close()


class HybridRetriever(Retriever):
    """Vector, lexical and mapping-memory candidates fused into one ranking (see the module docstring)."""

    def __init__(self, conn: psycopg.Connection, embedder: Embedder, cfg: RetrievalSettings,
                 vocabularies: Sequence[str], *, threshold: float = LEXICAL_THRESHOLD,
                 weights: FusionWeights | None = None, bm25: Bm25Generator | None = None) -> None:
        self.vector_retriever = VectorRetriever(conn, embedder, cfg)  # checks the model's embeddings exist
        self.lexical_retriever = LexicalRetriever(conn, cfg, vocabularies, embedder=embedder, threshold=threshold,
                                                  bm25=bm25)
        self.conn = conn
        self.embedder: Embedder = embedder
        self.cfg = cfg
        self.dim = self.vector_retriever.dim
        self.weights = weights or FusionWeights.of(cfg)
        # The memory is consulted whenever this model has one (its boost may be 0, but tuning needs the scores).
        # Counted once: a long-lived process (API server, worker) sees a memory rebuilt later after a restart.
        self.memory_rows = sum(mem_store.count(conn, embedder.key).values()) if cfg.memory_k else 0
        self._side: psycopg.Connection | None = None
        self._side_thread: ThreadPoolExecutor | None = None
        self._parallel = cfg.parallel
        self.early_lexical = True  # see pool(); benchmark/scale.py measures without (before 4 Dec)

    @classmethod
    def from_settings(cls, conn: psycopg.Connection, embedder: Embedder, settings: Settings, *,
                      threshold: float = LEXICAL_THRESHOLD, weights: FusionWeights | None = None) -> HybridRetriever:
        return cls(conn, embedder, settings.retrieval, settings.embedding.vocabularies, threshold=threshold,
                   weights=weights, bm25=bm25_of(settings))

    def _side_connection(self) -> psycopg.Connection | None:
        """A second connection for the lexical query, so that it runs while this one does the vector and memory
        searches (two server processes, two cores). Only while this connection has no open transaction: both then
        read the same committed vocabulary. None when off or when it cannot be opened (then all runs here)."""
        if not self._parallel or self.conn.info.transaction_status != TransactionStatus.IDLE:
            return None
        if self._side is None:
            info = self.conn.info
            try:
                # The dsn leaves the password out; a None password is ignored.
                self._side = psycopg.connect(info.dsn, autocommit=True, password=info.password)
            except psycopg.Error as exc:
                log.warning("lexical search runs sequentially: no second connection (%s)", exc)
                self._parallel = False
                return None
            self._side_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmonia-lexical")
            weakref.finalize(self, _close_side, self._side, self._side_thread)
        return self._side

    def close(self) -> None:
        if self._side is not None:
            _close_side(self._side, self._side_thread)
            self._side = self._side_thread = None

    def memory(self, vector: np.ndarray, source_key: SourceKey | None) -> MemoryRecall:
        """Each target of the most similar remembered sources (never the source itself) with the best similarity
        of a source mapping to it, that source's text (for the record) and the neighbours' votes."""
        if not self.memory_rows:
            return MemoryRecall()
        hits = mem_store.search(self.conn, self.embedder.key, self.dim, vector, self.cfg.memory_k,
                                exclude=[source_key] if source_key else (), ef_search=self.cfg.hnsw_ef_search)
        out = MemoryRecall(top=max(hits[0].similarity, 0.0) if hits else 0.0)
        for rank, h in enumerate(hits, start=1):  # best first
            sim = max(h.similarity, 0.0)
            kin = code_kinship(source_key[0], h.source_code) if source_key and h.source_vocab == source_key[1] else 0.0
            for t in h.targets:
                if kin > out.code.get(t, 0.0):
                    out.code[t] = kin
                if t not in out.score:
                    out.score[t], out.text[t] = sim, h.source_text
                votes, count, first = out.votes.get(t, (0.0, 0, rank))
                out.votes[t] = (votes + sim, count + 1, first)
        return out

    def pool(self, text: str, vector: np.ndarray, *, domains: Sequence[str] | None = None,
             vocabularies: Sequence[str] | None = None, exact: bool = False,
             source_key: SourceKey | None = None) -> Pool:
        side = self._side_connection()
        lex_job = None
        if side is not None and self._side_thread is not None:
            lex_job = self._side_thread.submit(self.lexical_retriever.rows, text, self.cfg.lexical_k,
                                               domains=domains, vocabularies=vocabularies, conn=side)
        vec = self.vector_retriever.search_vector(vector, self.cfg.vector_k, domains=domains,
                                                  vocabularies=vocabularies, exact=exact)
        recall = self.memory(vector, source_key)
        mscore, msource = recall.score, recall.text
        # While the lexical query still runs on the side connection, score the vector candidates lexically here:
        # most of them are not among the lexical ones, and afterwards this would be on the critical path.
        early = (lex_store.lexical_scores(self.conn, text, [c.concept_id for c in vec])
                 if lex_job is not None and self.early_lexical else {})
        lex = (lex_job.result() if lex_job is not None else
               self.lexical_retriever.rows(text, self.cfg.lexical_k, domains=domains, vocabularies=vocabularies))
        rows = {c.concept_id: c for c in vec}
        vscore = {c.concept_id: c.similarity for c in vec}
        lscore = {c.concept_id: (c.scores["name"], c.scores["synonym"]) for c in lex}
        lscore.update({i: v for i, v in early.items() if i not in lscore})  # the same score either way
        for c in lex:
            rows.setdefault(c.concept_id, c)
        # Remembered targets pass the same filters as the generators' own candidates (valid standard, domains,
        # vocabularies); the vocabulary may have changed since the memory was built.
        remembered = concept_store.get_concepts(
            self.conn, [t for t in mscore if t not in rows], valid_standard=True, domains=domains,
            vocabularies=self.lexical_retriever.vocabularies(vocabularies))
        rows.update({cid: Candidate.of(concept, 0.0) for cid, concept in remembered.items()})
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
                    rows=rows, vector_order=[c.concept_id for c in vec], lexical_order=[c.concept_id for c in lex],
                    memory=np.array([mscore.get(i, 0.0) for i in ids], dtype=np.float64),
                    memory_sources={i: msource[i] for i in ids if i in msource},
                    recall=recall)

    def pools(self, texts: Sequence[str], *, domains: Sequence[str] | None = None,
              vocabularies: Sequence[str] | None = None, exact: bool = False,
              source_keys: Sequence[SourceKey | None] | None = None) -> list[Pool]:
        vectors = self.embedder.encode_queries(list(texts))
        keys = source_keys or [None] * len(texts)
        return [self.pool(t, v, domains=domains, vocabularies=vocabularies, exact=exact, source_key=key)
                for t, v, key in zip(texts, vectors, keys, strict=True)]

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False,
                    source_keys: Sequence[SourceKey | None] | None = None) -> list[list[Candidate]]:
        k = k or self.cfg.top_k
        domains = domains if domains is not None else (self.cfg.domains or None)
        vectors = self.embedder.encode_queries(list(texts))
        keys = source_keys or [None] * len(texts)
        return [self.search_encoded(t, v, k, domains=domains, vocabularies=vocabularies, exact=exact, source_key=key)
                for t, v, key in zip(texts, vectors, keys, strict=True)]

    def search_encoded(self, text: str, vector: np.ndarray, k: int, *, domains: Sequence[str] | None = None,
                       vocabularies: Sequence[str] | None = None, exact: bool = False,
                       source_key: SourceKey | None = None) -> list[Candidate]:
        """Hybrid search for an already encoded query."""
        p = self.pool(text, vector, domains=domains, vocabularies=vocabularies, exact=exact, source_key=source_key)
        out = []
        for cid, score, parts in fuse(p, self.weights, k):
            votes, count, first = p.recall.votes.get(cid, (0.0, 0, 0))
            parts.update(memory_votes=votes, memory_count=float(count), memory_rank=float(first),
                         memory_top=p.recall.top, memory_code=p.recall.code.get(cid, 0.0))
            c = dataclasses.replace(p.rows[cid], similarity=score, scores=parts, evidence={})
            if cid in p.memory_sources:
                c.evidence = {"memory_source": p.memory_sources[cid]}
            out.append(c)
        return out
