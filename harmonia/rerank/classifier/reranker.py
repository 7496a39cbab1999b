"""The local classifier reranker: a cross-encoder that scores (source text, candidate concept) pairs.

A checkpoint (written by `harmonia reranker train`, see .train and .checkpoint) is a folder holding a Hugging Face
sequence-classification model with one logit, its tokenizer (model/), a calibration (calibration.json: isotonic
points mapping the top candidate's probability to P(top-1 is right), fit on held-out development sources), a
stacker (stacker.json, .stacker: the cross-encoder's logit combined with the retriever's evidence, the mapping
memory's votes above all) and a model card. Candidates are ranked by the stacker's score; the calibrated top
probability is what the router compares with auto_approve_threshold, as for every reranker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harmonia.domain import Candidate, RankedCandidate, RerankResult, SourceTerm
from harmonia.rerank.base import Reranker
from harmonia.rerank.classifier.checkpoint import (
    Calibration,
    CheckpointError,
    checkpoint_from_settings,
    resolve_checkpoint,
    trained_sources,
    weights_hash,
)
from harmonia.rerank.classifier.scorer import PairScorer, candidate_text, fused_logits, sigmoid
from harmonia.rerank.classifier.stacker import Stacker, StackerError
from harmonia.rerank.classifier.trust import FILE as TRUST_FILE
from harmonia.rerank.classifier.trust import KindTrust

if TYPE_CHECKING:
    import psycopg

    from harmonia.config import Settings
    from harmonia.kinds import KindRegistry

log = logging.getLogger(__name__)


def _memory_note(c: Candidate) -> str:
    n = int(c.scores.get("memory_count", 0))
    return f", {n} similar mapped source{'s map' if n > 1 else ' maps'} here" if n else ""


class ClassifierReranker(Reranker):
    """Scores every retrieved candidate against the source text; ranks by probability; the calibrated top
    probability is the confidence."""

    name = "classifier"

    def __init__(self, checkpoint: str | Path, *, top_n: int = 5, batch_size: int = 64, max_length: int = 64,
                 device: str = "cpu", dtype: str = "float32", kinds: KindRegistry | None = None,
                 rank_kinds: Sequence[str] = ()) -> None:
        from harmonia.kinds import KindRegistry

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
        # The kinds it ranks better than retrieval order (.trust); a checkpoint from before kinds.json ranks all.
        tf = self.checkpoint / TRUST_FILE
        try:
            self.trust = (KindTrust.from_dict(json.loads(tf.read_text()), configured=rank_kinds) if tf.exists()
                          else KindTrust(rank_all=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{tf}: {exc}") from exc
        self.kinds = kinds or KindRegistry()
        card = self.checkpoint / "model_card.json"
        meta = json.loads(card.read_text()) if card.exists() else {}
        self.hash = meta.get("checkpoint_hash") or weights_hash(self.checkpoint / "model", st, tf)
        self.base_model = meta.get("base_model", "")
        self.retrieval_mode = str(meta.get("retrieval_mode", ""))  # the retrieval whose scores the stacker learnt
        self.top_n = top_n
        self._trained = trained_sources(self.checkpoint)

    @property
    def trained_sources(self) -> frozenset[str] | None:
        return self._trained

    @classmethod
    def from_settings(cls, settings: Settings, conn: psycopg.Connection | None = None, *,
                      kinds: KindRegistry | None = None) -> ClassifierReranker:
        """`kinds`: a registry its owner keeps fresh (the pipeline's); else one read now from the settings and the
        database."""
        from harmonia.embedding.model import resolve_device
        from harmonia.kinds import KindRegistry

        r = cls(checkpoint_from_settings(settings), top_n=settings.rerank.top_n,
                batch_size=settings.classifier.batch_size, max_length=settings.classifier.max_length,
                device=resolve_device(settings.embedding.device), dtype=settings.classifier.dtype,
                kinds=kinds or KindRegistry.from_settings(settings, conn),
                rank_kinds=settings.classifier.kinds)
        if r.retrieval_mode and r.retrieval_mode != settings.retrieval.mode:
            # Its stacker weighs evidence (lexical rank, memory votes) that another retrieval does not give: it
            # still ranks, but below what its held-out figures say; the calibration keeps approvals honest.
            log.warning("classifier %s was trained on %s retrieval, this run retrieves with %s: set "
                        "retrieval_mode = %r (or retrain on this retrieval)", r.checkpoint, r.retrieval_mode,
                        settings.retrieval.mode, r.retrieval_mode)
        return r

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
        for term, cands in items:
            zi = z[at:at + len(cands)]
            p, p_pair = sigmoid(zi), sigmoid(logits[at:at + len(cands)])
            at += len(cands)
            kind = self.kinds.kind_of(term.source_vocab).name
            ranks = self.trust.ranks(kind)
            # A kind it was not shown to rank better: retrieval order, the probabilities kept for the calibrator.
            order = (np.argsort(-zi, kind="stable") if ranks else np.arange(len(cands)))[: self.top_n]
            note = "" if ranks else f"; retrieval order kept: not validated on kind {kind}"
            ranked = [RankedCandidate(cands[i].concept_id, float(p[i]),
                                      f"classifier p={p[i]:.3f} (cross-encoder {p_pair[i]:.3f}, retrieval rank "
                                      f"{i + 1}{_memory_note(cands[i])}{note})")
                      for i in order]
            conf = float(self.calibration(float(p[order[0]]))) if len(order) else 0.0
            results.append(RerankResult(
                ranked=ranked, confidence=conf, model_version=self.model_version, no_match=not ranked,
                usage={"pairs": len(cands), "ms": round(ms, 2)},
                details={"checkpoint": str(self.checkpoint), "checkpoint_hash": self.hash,
                         "top_probability": round(float(p[order[0]]), 4) if len(order) else None,
                         "retrieval_weight": self.retrieval_weight, "dtype": self.scorer.dtype,
                         "stacker": self.stacker is not None, "kind": kind, "ranked_by": "classifier" if ranks
                         else "retrieval order",
                         "calibration": self.calibration.method}))
        return results
