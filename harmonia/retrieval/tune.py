"""`harmonia retrieve tune`: fusion weights that maximise MRR (or recall@50) on the benchmark's DEVELOPMENT part.

Every dev source's candidate pool (vector, lexical and mapping-memory candidates with all raw scores, see
harmonia.retrieval.hybrid) is computed once from the database; optuna's seeded TPE sampler then searches the
weights, fusing the pools in Python (milliseconds per trial). Test-part sources are refused wherever sources come
from, so nothing tuned here has seen them; the mapping memory leaves each source's own mapping out of its pool.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from harmonia.config import RetrievalSettings, Settings
from harmonia.domain import SourceTargets
from harmonia.embedding.model import Embedder
from harmonia.groundtruth import maps_to_sources, part_of, read_mapping_file
from harmonia.metrics import Aggregate, aggregate, score_row
from harmonia.retrieval.hybrid import FusionWeights, HybridRetriever, Pool, fused_ranking
from harmonia.store import concepts as concept_store

log = logging.getLogger(__name__)


class TuneError(ValueError):
    pass


@dataclass
class TuneResult:
    before: Aggregate
    after: Aggregate
    weights: FusionWeights
    trials: int
    source_keys: list[int | str]  # the split keys of the sources used (all in the dev part)


def dev_only(rows: Sequence[SourceTargets]) -> list[SourceTargets]:
    return [r for r in rows if part_of(r.split_key) == "dev"]


def dev_sources_from_db(conn: psycopg.Connection, vocabularies: Sequence[str] | None, *, limit: int = 0,
                        seed: int = 13) -> list[SourceTargets]:
    """Dev-part sources of the vocabulary's 'Maps to' ground truth, keeping the targets in the configured
    vocabularies; a seeded sample of `limit` (0: all)."""
    rows = maps_to_sources(conn, part="dev")
    if vocabularies:
        wanted = set(vocabularies)
        concepts = concept_store.get_concepts(conn, {t for r in rows for t in r.targets})
        for r in rows:
            r.targets = [t for t in r.targets if t in concepts and concepts[t].vocabulary_id in wanted]
        rows = [r for r in rows if r.targets]
    if not rows:
        raise TuneError("no development-part sources: the vocabulary holds no 'Maps to' ground truth")
    if limit and len(rows) > limit:
        rows = sorted(random.Random(seed).sample(rows, limit), key=lambda r: str(r.split_key))
    return rows


def dev_sources_from_csv(path: Path) -> list[SourceTargets]:
    """A benchmark set CSV or a Usagi export (harmonia.groundtruth.read_mapping_file); only its dev-part rows."""
    rows = read_mapping_file(path)
    dev = dev_only(rows)
    if len(dev) < len(rows):
        log.warning("%s: %d test-part row(s) skipped", path, len(rows) - len(dev))
    if not dev:
        raise TuneError(f"{path}: no development-part rows")
    return dev


def precompute(conn: psycopg.Connection, embedder: Embedder, settings: Settings,
               sources: Sequence[SourceTargets], batch: int = 64) -> list[tuple[SourceTargets, Pool]]:
    leaked = [r.split_key for r in sources if part_of(r.split_key) != "dev"]
    if leaked:
        raise TuneError(f"refusing to tune on test-part sources: {leaked[:5]}")
    out: list[tuple[SourceTargets, Pool]] = []
    with HybridRetriever.from_settings(conn, embedder, settings) as retriever:
        for i in range(0, len(sources), batch):
            chunk = list(sources[i:i + batch])
            # Each source's own (code, vocab) goes along: the mapping memory leaves it out (leave-one-out).
            out.extend(zip(chunk, retriever.pools([r.source_text for r in chunk], source_keys=[r.key for r in chunk]),
                           strict=True))
    return out


def evaluate(pools: Sequence[tuple[SourceTargets, Pool]], w: FusionWeights, k: int = 50) -> Aggregate:
    scores = []
    for row, pool in pools:
        ranked = fused_ranking(pool, w, k).tolist()
        scores.append(score_row(ranked, ranked, row.targets))
    return aggregate(scores)


OBJECTIVES = ("mrr", "recall")


def objective_value(a: Aggregate, objective: str) -> float:
    """What a trial maximises: MRR (retrieval order is the answer: reranker `none`), or recall@50 with MRR only
    breaking ties (a reranker reorders the 50, so what counts is that the answer is among them)."""
    if objective == "recall":
        return a.recall + 1e-3 * a.mrr
    return a.mrr


def tune(pools: Sequence[tuple[SourceTargets, Pool]], cfg: RetrievalSettings, *, trials: int = 100, seed: int = 13,
         objective: str = "mrr") -> TuneResult:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    k = cfg.top_k
    current = FusionWeights.of(cfg)
    before = evaluate(pools, current, k)

    # The memory boost is searched only where the pools hold memory scores (a memory is built for the model).
    has_memory = any(p.memory is not None and p.memory.any() for _, p in pools)

    def params_to_weights(p: dict) -> FusionWeights:
        # Min-max normalisation makes the lexical term scale-free, so only boost_synonym / boost_name matters.
        return FusionWeights(vector=p["vector"], lexical=p["lexical"], rrf=p["rrf"], rrf_k=p["rrf_k"],
                             boost_name=1.0, boost_synonym=p["boost_synonym"],
                             boost_memory=p.get("boost_memory", current.boost_memory))

    def trial_value(trial: optuna.Trial) -> float:
        p = {"vector": trial.suggest_float("vector", 0.0, 1.0),
             "lexical": trial.suggest_float("lexical", 0.0, 1.0),
             "rrf": trial.suggest_float("rrf", 0.0, 1.0),
             "rrf_k": trial.suggest_float("rrf_k", 1.0, 100.0),
             "boost_synonym": trial.suggest_float("boost_synonym", 0.3, 1.2)}
        if has_memory:
            p["boost_memory"] = trial.suggest_float("boost_memory", 0.0, 1.2)
        w = params_to_weights(p)
        a = evaluate(pools, w, k)
        trial.set_user_attr("recall", a.recall)
        return objective_value(a, objective)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    # The current weights are the first trial, so tuning never reports worse than where it started.
    first = {"vector": min(max(current.vector, 0.0), 1.0), "lexical": min(max(current.lexical, 0.0), 1.0),
             "rrf": min(max(current.rrf, 0.0), 1.0), "rrf_k": min(max(current.rrf_k, 1.0), 100.0),
             "boost_synonym": min(max(current.boost_synonym / (current.boost_name or 1.0), 0.3), 1.2)}
    if has_memory:
        first["boost_memory"] = min(max(current.boost_memory, 0.0), 1.2)
    study.enqueue_trial(first)
    study.optimize(trial_value, n_trials=trials)
    best = params_to_weights(study.best_params)
    after = evaluate(pools, best, k)
    if objective_value(after, objective) < objective_value(before, objective):
        best, after = current, before
    return TuneResult(before=before, after=after, weights=best, trials=trials,
                      source_keys=[r.split_key for r, _ in pools])
