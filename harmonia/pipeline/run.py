"""retrieve -> rerank -> route -> persist, for a list of source terms (used by `harmonia map`, the quickstart,
the benchmark and the workers). Deciding and persisting are separate so a worker can persist a decision and its
queue state in one transaction.

A Pipeline owns its retriever and reranker: closing it (or leaving its `with` block) closes both.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import psycopg

from harmonia.config import RerankSettings, RetrievalSettings, RouterSettings, Settings
from harmonia.domain import Candidate, Decision, RerankResult, SourceKind, SourceTerm
from harmonia.kinds import KindRegistry
from harmonia.pipeline import confidence as conf_mod
from harmonia.pipeline import guards
from harmonia.pipeline.confidence import Calibration
from harmonia.pipeline.route import route
from harmonia.rerank.base import Reranker
from harmonia.retrieval import by_kind
from harmonia.retrieval.base import Retriever
from harmonia.store import mapping as map_store

log = logging.getLogger(__name__)


class Pipeline:
    """retrieve -> rerank -> route for batches of source terms; owns (and closes) its retriever and reranker."""

    def __init__(self, retriever: Retriever, reranker: Reranker, router: RouterSettings,
                 rerank: RerankSettings, calibration: Calibration | None = None, *, kinds: KindRegistry | None = None,
                 retrieval: RetrievalSettings | None = None, second_opinions: dict[str, Reranker] | None = None
                 ) -> None:
        """`calibration`: the reranker's calibrator and certified thresholds (`Calibration.load`); without one
        nothing is auto-approved (reason `uncalibrated`). `kinds`: each source vocabulary's kind (default: the
        built-in ones); `retrieval.kind_filter` restricts retrieval to the kind's domains and vocabularies.
        `second_opinions`: rerankers `router.approve_requires` names besides this one (owned and closed here)."""
        self.retriever = retriever
        self.reranker = reranker
        self.router = router
        # No longer a threshold by itself: a floor under every calibrated one.
        self.floor = router.auto_approve_threshold
        self.top_n = rerank.top_n
        self.calibration = calibration or Calibration.uncalibrated(reranker.model_version)
        self.kinds = kinds or KindRegistry()
        self.kind_filter = retrieval.kind_filter if retrieval is not None else True
        self.lab_text = retrieval.lab_text if retrieval is not None else True
        self.drug_text = retrieval.drug_text if retrieval is not None else True
        self.second_opinions = dict(second_opinions or {})

    @classmethod
    def from_settings(cls, conn: psycopg.Connection, settings: Settings) -> Pipeline:
        """The configured retriever (on `conn`) and reranker. The retriever comes first: without embeddings there
        is no reranker to close."""
        from harmonia.embedding.model import Embedder
        from harmonia.rerank import make_reranker
        from harmonia.retrieval import make_retriever

        kinds = KindRegistry.from_settings(settings, conn)
        retriever = make_retriever(conn, Embedder.from_settings(settings), settings)
        opened: list[Reranker] = []
        try:
            reranker = make_reranker(settings, conn, source_kinds=kinds)
            opened.append(reranker)
            calibration = Calibration.load(conn, settings.data_path, reranker.name, reranker.model_version)
            second: dict[str, Reranker] = {}
            for name in settings.router.approve_requires:
                if name in ("classifier", "llm") and name != reranker.name:
                    second[name] = make_reranker(settings, conn, kind=name, source_kinds=kinds)
                    opened.append(second[name])
                elif name not in guards.RETRIEVAL_VOTERS and name not in ("classifier", "llm"):
                    from harmonia.config import ConfigError

                    raise ConfigError(f"setting 'router_approve_requires': {name!r} is not one of vector, lexical, "
                                      "memory, classifier, llm")
        except BaseException:
            for r in opened:
                r.close()
            retriever.close()
            raise
        return cls(retriever, reranker, settings.router, settings.rerank, calibration, kinds=kinds,
                   retrieval=settings.retrieval, second_opinions=second)

    def close(self) -> None:
        """Close the rerankers and the retriever (not the connection the retriever was given)."""
        try:
            self.reranker.close()
            for r in self.second_opinions.values():
                r.close()
        finally:
            self.retriever.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def decide(self, terms: Sequence[SourceTerm]) -> list[Decision]:
        """Retrieval batched across the terms, then the reranker (which may batch or run concurrently)."""
        if not terms:
            return []
        try:
            self.kinds.refresh_if_due()
        except psycopg.OperationalError as exc:  # the database is away: the kinds read last stay in force
            log.warning("kind refresh failed, keeping the declarations read last: %s", exc)
        views = self.views(terms)
        candidate_lists = self.retrieve_views(views)
        results = self.reranker.rerank_many(list(zip(views, candidate_lists, strict=True)))
        results = [r if isinstance(r, RerankResult)  # defensive: a reranker bug must not lose the code
                   else RerankResult([], 0.0, self.reranker.model_version, error="reranker returned nothing",
                                     error_kind="reranker_exception") for r in results]
        opinions = self.ask_second_opinions(views, candidate_lists, results)
        return [self.route(term, cands, result, opinions[i])
                for i, (term, cands, result) in enumerate(zip(terms, candidate_lists, results, strict=True))]

    def views(self, terms: Sequence[SourceTerm]) -> list[SourceTerm]:
        """Each term as retrieval and the rerankers see it (harmonia.retrieval.by_kind.views); decisions are
        routed and stored with the original term."""
        return by_kind.views(terms, self.kinds, lab_text=self.lab_text, drug_text=self.drug_text)

    def retrieve(self, terms: Sequence[SourceTerm]) -> list[list[Candidate]]:
        """Candidates per term (its view's text, see `views`)."""
        return self.retrieve_views(self.views(terms))

    def retrieve_views(self, terms: Sequence[SourceTerm]) -> list[list[Candidate]]:
        """Candidates per term as given, searched as its kind asks (harmonia.retrieval.by_kind.search)."""
        return by_kind.search(self.retriever, terms, self.kinds, kind_filter=self.kind_filter,
                              lab_text=self.lab_text, drug_text=self.drug_text)

    def ask_second_opinions(self, terms: Sequence[SourceTerm], candidate_lists: Sequence[Sequence[Candidate]],
                            results: Sequence[RerankResult]) -> list[dict[str, int | None]]:
        """The first choice of each second reranker, asked only about terms whose own answer has a first choice
        (a second LLM call for every code would double the bill for nothing)."""
        out: list[dict[str, int | None]] = [{} for _ in terms]
        ask = [i for i, r in enumerate(results) if r.ranked and not r.error and not r.no_match]
        for name, other in self.second_opinions.items():
            answers = other.rerank_many([(terms[i], list(candidate_lists[i])) for i in ask])
            for i, a in zip(ask, answers, strict=True):
                out[i][name] = a.ranked[0].concept_id if a.ranked and not a.error and not a.no_match else None
        return out

    def route(self, term: SourceTerm, cands: Sequence[Candidate], result: RerankResult,
              second_opinions: dict[str, int | None] | None = None) -> Decision:
        return route_calibrated(term, cands, result, self.calibration, self.floor, self.top_n,
                                kind=self.kinds.kind_of(term.source_vocab), router=self.router,
                                reranker=self.reranker.name, second_opinions=second_opinions)


def route_calibrated(term: SourceTerm, cands: Sequence[Candidate], result: RerankResult, cal: Calibration,
                     floor: float, top_n: int = 5, *, kind: SourceKind | None = None,
                     router: RouterSettings | None = None, reranker: str = "",
                     second_opinions: dict[str, int | None] | None = None) -> Decision:
    """Calibrate a reranker's answer, check the guards, and route it against the certified threshold of the term's
    kind or set (none: review, `uncalibrated`); `floor` (the auto_approve_threshold setting) is a floor under every
    threshold. `kind`: the term's (default: its built-in kind)."""
    from harmonia.kinds import builtin_kind_of

    try:
        cal.refresh_if_due()
    except psycopg.OperationalError as exc:  # the database is away: the thresholds loaded last stay in force
        log.warning("calibration refresh failed, keeping the loaded thresholds: %s", exc)
    kind = kind or builtin_kind_of(term.source_vocab)
    router = router or RouterSettings()
    ev = conf_mod.evidence(term, cands, result, kind.domains)
    text_len = cal.calibrator.fitted_on.get("text_len", {}) if cal.calibrator else {}
    guard = guards.check(term, cands, result, kind, reranker=reranker or result.model_version.split(":")[0],
                         max_len=guards.max_text_len(kind, text_len if isinstance(text_len, dict) else {},
                                                     router.max_text_len),
                         max_retrieval_rank=router.max_retrieval_rank, requires=router.approve_requires,
                         second_opinions=second_opinions)
    record: dict[str, object] = {"kind": kind.name, "raw_confidence": round(float(result.confidence), 4)}
    if guard:
        record["guard"] = guard
    if ev is not None:  # kept with the decision: what a calibrator is fitted on (`bench calibrate`)
        record["evidence"] = {k: round(v, 6) for k, v in ev.items()}
        first = next(c for c in cands if c.concept_id == result.ranked[0].concept_id)
        record["domain"] = first.domain_id  # to recompute the domain fit for another kind (benchmarks)
    if cal.calibrator is None or ev is None:
        # Nothing to calibrate (no calibrator; or no first choice, which the router sends to review anyway)
        return route(term, cands, result, None, top_n, calibration=record, guard=guard)
    prob = cal.calibrator.probability(ev, kind.name)
    stored = cal.threshold_for(kind.name, term.source_vocab, result.model_version) if kind.calibratable or \
        cal.thresholds.get((kind.name, term.source_vocab)) else None
    threshold = None
    if stored is not None:
        record.update(threshold_id=stored.id, origin=stored.origin, source_vocab=stored.source_vocab)
        if stored.threshold is not None:  # a calibration that certified no threshold approves nothing
            threshold = max(stored.threshold, floor)
    record.update(calibrator=cal.calibrator.hash, threshold=threshold)
    return route(term, cands, result, threshold, top_n, confidence=prob,
                 model_version=f"{result.model_version}+cal:{cal.calibrator.hash}", calibration=record, guard=guard)


# Faults that say the provider cannot answer anyone (bad key, unknown model, server down): a run of them stops a map
FAIL_FAST_KINDS = frozenset({"provider_fatal", "connection_error"})


@dataclass
class MapSummary:
    input_rows: int = 0
    approved: int = 0
    review: int = 0
    already_mapped: int = 0
    skipped_invalid: int = 0
    duplicates: int = 0
    errors: int = 0  # decisions that went to review because of a fault (counted in review too)
    untouched: int = 0  # codes a stopped run never decided: still pending, neither mapped nor in review
    stopped: str | None = None  # why the run stopped early (fail-fast), one line
    reasons: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def reconciles(self) -> bool:
        return (self.approved + self.review + self.already_mapped + self.skipped_invalid + self.duplicates
                + self.untouched == self.input_rows)


def stream_decisions(pipeline: Pipeline, terms: Sequence[SourceTerm], *,
                     batch_size: int = 32) -> Generator[Decision, None, None]:
    """Decisions for `terms` in the order they finish. A reranker that calls out (`concurrency` > 1: the LLM)
    gets a bounded pool of that many threads fed one term at a time, so one slow code never holds the others;
    retrieval stays on this thread (its connection), a batch at a time, just ahead of the pool. Any other reranker
    decides batch by batch (a classifier scores a batch at once). Closing the iterator early cancels what has not
    started and waits for what has."""
    workers = int(getattr(pipeline.reranker, "concurrency", 1) or 1)
    if workers <= 1:
        for start in range(0, len(terms), batch_size):
            yield from pipeline.decide(terms[start:start + batch_size])
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rerank")
    pending: dict[Future[RerankResult], tuple[SourceTerm, list[Candidate]]] = {}
    i = 0
    try:
        while i < len(terms) or pending:
            # keep a batch's worth queued behind the running calls, so the pool never waits on retrieval
            while i < len(terms) and len(pending) < workers + batch_size:
                chunk = terms[i:i + batch_size]
                i += len(chunk)
                views = pipeline.views(chunk)  # the kind filter and lab/drug text, as `decide` has them
                lists = pipeline.retrieve_views(views)
                for term, view, cands in zip(chunk, views, lists, strict=True):
                    pending[pool.submit(pipeline.reranker.safe_rerank, view, cands)] = (term, list(cands))
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                term, cands = pending.pop(fut)
                result = fut.result()
                if not isinstance(result, RerankResult):  # defensive: a reranker bug must not lose the code
                    result = RerankResult([], 0.0, pipeline.reranker.model_version,
                                          error="reranker returned nothing", error_kind="reranker_exception")
                yield pipeline.route(term, cands, result)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def map_terms(conn: psycopg.Connection, pipeline: Pipeline, terms: Sequence[SourceTerm], *,
              batch_size: int = 32, skip_existing: bool = True, summary: MapSummary | None = None,
              progress: bool = True, on_decision: Callable[[Decision, str], None] | None = None,
              fail_after: int = 0) -> MapSummary:
    """Decide and persist each term as its decision arrives (`stream_decisions`), one transaction per term
    (nothing half-written).

    `fail_after` > 0: after that many consecutive provider_fatal / connection_error decisions the run stops
    (`summary.stopped` says why); those decisions and every code not yet decided stay untouched (pending, not in
    review: a dead server or a bad key must not fill the queue). A shorter run of them is persisted as soon as any
    other decision arrives."""
    from tqdm import tqdm

    s = summary or MapSummary(input_rows=len(terms))
    todo = list(terms)
    if skip_existing:
        existing = map_store.existing_maps(conn, [t.key for t in todo])
        s.already_mapped += sum(1 for t in todo if t.key in existing)
        todo = [t for t in todo if t.key not in existing]
    held: list[Decision] = []  # the current run of fail-fast faults, persisted only if the run is broken

    def persist(d: Decision) -> None:
        with conn.transaction():
            outcome = map_store.record_decision(conn, d)
        if outcome == "approved":
            s.approved += 1
        elif outcome == "review":
            s.review += 1
            if d.error:
                s.errors += 1
                s.error_kinds[d.reason] += 1
        else:
            s.already_mapped += 1
        s.reasons[d.reason] += 1
        s.decisions.append(d)
        if on_decision:
            on_decision(d, outcome)

    decided = 0
    stream = stream_decisions(pipeline, todo, batch_size=batch_size)
    with tqdm(total=len(todo), unit="code", desc="map", disable=not progress) as bar:
        try:
            for d in stream:
                if fail_after > 0 and d.error and d.reason in FAIL_FAST_KINDS:
                    held.append(d)
                    if len(held) >= fail_after:
                        s.stopped = (f"stopped after {len(held)} consecutive provider failures "
                                     f"({', '.join(sorted({h.reason for h in held}))}); last: {d.error}")
                        break
                    continue
                for h in [*held, d]:
                    persist(h)
                    decided += 1
                bar.update(len(held) + 1)
                held.clear()
        finally:
            stream.close()
    if s.stopped is None:
        for h in held:
            persist(h)
            decided += 1
    s.untouched = len(todo) - decided
    return s
