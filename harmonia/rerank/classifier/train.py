"""`harmonia reranker train`: fine-tune a cross-encoder on the vocabulary's own 'Maps to' pairs.

Training material, built once per run and saved with it (pairs.jsonl.gz) so a resumed run sees the same data:
- sources: non-standard concepts with 'Maps to' targets whose source concept is in the DEVELOPMENT part
  (harmonia.groundtruth.part_of); a test-part source never becomes a pair. A held-out slice of the
  development sources is kept out of training for the model card's metrics and for the calibration;
- per source: the true targets (positives), hard negatives (the retriever's own top-K that are not targets, the
  first few plus a random few) and random standard concepts;
- reviewers' decisions: maps with decided_by='reviewer' are positives, the suggestion a correction replaced is a
  hard negative (sources that are vocabulary concepts of the test part are left out, as above).

A run lives in <data_dir>/reranker/<timestamp>/: run.json (options), pairs.jsonl.gz, state/ (model, optimizer,
scheduler and step, saved every --save-every steps: --resume continues from there), and when finished model/,
calibration.json, model_card.json and README.md; then <data_dir>/reranker/latest points at it.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg

from harmonia.config import Settings
from harmonia.domain import Candidate, Concept, SourceTargets
from harmonia.groundtruth import GroundTruthError, file_mappings, maps_to_sources, part_of
from harmonia.metrics import aggregate, score_row
from harmonia.rerank.classifier.checkpoint import TRAINED_SOURCES, Calibration, reranker_root, weights_hash
from harmonia.rerank.classifier.scorer import (
    FUSION_GRID,
    PairScorer,
    autocast,
    candidate_text,
    fused_logits,
    resolve_dtype,
    sigmoid,
)
from harmonia.rerank.classifier.stacker import Stacker
from harmonia.rerank.classifier.stacker import features as stacker_features
from harmonia.rerank.classifier.trust import FILE as TRUST_FILE
from harmonia.rerank.classifier.trust import KindTrust
from harmonia.store import concepts as concept_store
from harmonia.store import mapping as map_store

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    pass


@dataclass
class TrainOptions:
    base_model: str = ""             # HF name or path; empty: the bundled all-MiniLM-L6-v2
    layers: int = 0                  # keep only the first N encoder layers of the base (0: all): N/L the cost
    epochs: float = 1.0
    max_steps: int = 0               # 0: epochs decide
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.05
    seed: int = 13
    hard_negatives: int = 4          # per source, from the retriever's top-K
    hard_top: int = 3                # of which the highest-ranked non-targets (the rest sampled from the top-K)
    random_negatives: int = 1        # per source
    max_positives: int = 3           # per source
    max_sources: int = 0             # 0: every development source
    holdout: float = 0.3             # share of development sources kept out: the stacker, metrics, calibration
    holdout_max: int = 2000
    source_vocabularies: list[str] = field(default_factory=list)  # empty: all
    save_every: int = 200
    retrieval_batch: int = 256
    include_reviews: bool = True
    pairs_from: list[str] = field(default_factory=list)  # mapping files (Usagi, benchmark sets): their dev rows too
    pairs_kind: str = ""             # the kind of those files' sources (empty: each source vocabulary's own kind)
    loss: str = "bce"                # bce | listwise (BCE plus a softmax over each source's pairs in the batch)


@dataclass
class Example:
    query: str
    doc: str
    label: float
    source: str       # source key: concept_id for vocabulary sources, "vocab:code" for reviewed ones
    kind: str         # positive | hard | random | review_positive | review_negative


# ------------------------------------------------------------------------------------------------ material


def dev_sources(conn: psycopg.Connection, vocabularies: Sequence[str] | None = None) -> dict[int, SourceTargets]:
    """Development-part 'Maps to' sources (of these source vocabularies, if given), by source concept_id."""
    return {st.source_concept_id: st for st in maps_to_sources(conn, vocabularies, part="dev")
            if st.source_concept_id is not None}


def file_sources(conn: psycopg.Connection, paths: Sequence[str | Path], vocabularies: Sequence[str] | None,
                 first_id: int = -1) -> dict[int, SourceTargets]:
    """Development-part rows of mapping files (a team's Usagi export, a benchmark set; the split rule of the
    benchmark and the memory, so a test-part row is never trained on), by a made-up negative id: they are no
    vocabulary concepts."""
    try:
        rows = file_mappings(conn, paths, vocabularies)
    except GroundTruthError as exc:
        raise TrainError(str(exc)) from exc
    return {first_id - i: st for i, st in enumerate(rows)}


def review_examples(conn: psycopg.Connection, texts: dict[int, Concept] | None = None) -> list[Example]:
    """Reviewers' approvals (positives) and the suggestions their corrections replaced (hard negatives)."""
    approvals = map_store.reviewer_approvals(conn)
    corrections = map_store.reviewer_corrections(conn)
    keys = [(r.source_code, r.source_vocab) for r in approvals] + [(r.source_code, r.source_vocab)
                                                                  for r in corrections]
    as_concept = concept_store.concept_ids_by_code(conn, keys)

    def held_out(code: str, vocab: str) -> bool:
        # A test-part source must not be trained on: keyed by its vocabulary concept id where it is one, else by
        # "vocab:code", as the benchmark keys external sets (e.g. local lab codes).
        return part_of(as_concept.get((code, vocab), f"{vocab}:{code}")) == "test"

    ids = {r.concept_id for r in approvals} | {r.old_concept_id for r in corrections}
    texts = texts if texts is not None else concept_store.get_concepts(conn, ids)
    missing = ids - set(texts)
    if missing:
        texts = {**texts, **concept_store.get_concepts(conn, missing)}
    current = {(r.source_code, r.source_vocab): r.concept_id for r in approvals}
    out: list[Example] = []
    for r in approvals:
        if held_out(r.source_code, r.source_vocab) or r.concept_id not in texts:
            continue
        out.append(Example(r.source_text, candidate_text(texts[r.concept_id]), 1.0,
                           f"{r.source_vocab}:{r.source_code}", "review_positive"))
    for c in corrections:
        key = (c.source_code, c.source_vocab)
        if held_out(*key) or c.old_concept_id not in texts or current.get(key) == c.old_concept_id:
            continue
        out.append(Example(c.source_text, candidate_text(texts[c.old_concept_id]), 0.0,
                           f"{c.source_vocab}:{c.source_code}", "review_negative"))
    return out


@dataclass
class Material:
    train: list[Example]
    holdout: dict[int, dict]                 # source id -> {text, targets, candidates: [(id, text, sim)]}
    counts: dict[str, int]
    # "VOCAB:CODE" of every source the cross-encoder learnt from: a calibration must never fit on them (it would
    # learn the confidence the model has on its own training rows, higher than on new codes)
    trained_keys: list[str] = field(default_factory=list)


def build_material(conn: psycopg.Connection, settings: Settings, opts: TrainOptions, *,
                   progress: bool = True) -> Material:
    from tqdm import tqdm

    from harmonia.domain import SourceTerm
    from harmonia.embedding.model import Embedder
    from harmonia.kinds import KindError, KindRegistry
    from harmonia.retrieval import by_kind, make_retriever

    rng = random.Random(opts.seed)
    sources = dev_sources(conn, opts.source_vocabularies)
    extra = file_sources(conn, opts.pairs_from, settings.embedding.vocabularies)
    if opts.pairs_from and not extra:
        raise TrainError(f"no development-part rows with a valid standard target in {', '.join(opts.pairs_from)}")
    sources.update(extra)
    ids = sorted(sources)
    rng.shuffle(ids)
    if opts.max_sources:
        ids = ids[: opts.max_sources]
    n_hold = min(opts.holdout_max, int(round(len(ids) * opts.holdout))) if len(ids) >= 10 else 0
    hold_ids, train_ids = ids[:n_hold], ids[n_hold:]
    pool = concept_store.standard_concepts(conn, settings.embedding.vocabularies)
    if not pool:
        raise TrainError("no valid standard concepts loaded: run `harmonia vocab load` first")
    texts = {c.concept_id: c for c in pool}
    missing = {t for i in ids for t in sources[i].targets} - set(texts)
    texts.update(concept_store.get_concepts(conn, missing))

    kinds = KindRegistry.from_settings(settings, conn)
    if opts.pairs_kind:
        try:
            kind = kinds.kind_named(opts.pairs_kind)
        except KindError as exc:
            raise TrainError(str(exc)) from exc
        for vocab in {st.source_vocab for st in extra.values()}:
            kinds.configured[vocab] = kind  # for this run only: nothing is declared in the database
    unknown = sorted({st.source_vocab for st in extra.values() if kinds.kind_of(st.source_vocab).name == "unknown"})
    if unknown:
        raise TrainError(f"the kind of {', '.join(unknown)} is unknown: give --pairs-kind (labs, drugs, ...) or "
                         f"declare it (`harmonia kinds set {unknown[0]} labs`)")
    terms = {sid: SourceTerm(sources[sid].source_code, sources[sid].source_vocab, sources[sid].source_text)
             for sid in ids}
    retrieved: dict[int, list[Candidate]] = {}
    query: dict[int, str] = {}
    # Mined as a decision is made: each source's view (lab- and drug-aware text), its kind's retrieval filter and
    # the text features the stacker reads; the mapping memory never hands a source its own targets (leave-one-out).
    rs = settings.retrieval
    with make_retriever(conn, Embedder.from_settings(settings), settings) as retriever, \
            tqdm(total=len(ids), unit="source", desc="mine negatives", disable=not progress) as bar:
        for start in range(0, len(ids), opts.retrieval_batch):
            chunk = ids[start:start + opts.retrieval_batch]
            views = by_kind.views([terms[s] for s in chunk], kinds, lab_text=rs.lab_text, drug_text=rs.drug_text)
            found = by_kind.search(retriever, views, kinds, kind_filter=rs.kind_filter, lab_text=rs.lab_text,
                                   drug_text=rs.drug_text)
            for sid, cands, view in zip(chunk, found, views, strict=True):
                retrieved[sid] = cands
                query[sid] = view.source_text
            bar.update(len(chunk))

    examples: list[Example] = []
    counts: dict[str, int] = defaultdict(int)
    for sid in train_ids:
        src = sources[sid]
        q, targets = query[sid], set(src.targets)
        for t in sorted(targets)[: opts.max_positives]:
            if t in texts:
                examples.append(Example(q, candidate_text(texts[t]), 1.0, str(sid), "positive"))
        non_targets = [c for c in retrieved[sid] if c.concept_id not in targets]
        hard = non_targets[: opts.hard_top]
        rest = non_targets[opts.hard_top:]
        hard += rng.sample(rest, min(len(rest), max(0, opts.hard_negatives - len(hard))))
        examples += [Example(q, candidate_text(c), 0.0, str(sid), "hard") for c in hard]
        for _ in range(opts.random_negatives):
            r = pool[rng.randrange(len(pool))]
            if r.concept_id not in targets:
                examples.append(Example(q, candidate_text(r), 0.0, str(sid), "random"))
    if opts.include_reviews:
        examples += review_examples(conn, texts)
    for e in examples:
        counts[e.kind] += 1
    counts["train_sources"] = len(train_ids)
    counts["holdout_sources"] = len(hold_ids)
    counts["pairs"] = len(examples)
    counts["file_sources"] = len(extra)
    holdout = {sid: {"text": query[sid], "targets": sorted(sources[sid].targets),
                     "kind": kinds.kind_of(sources[sid].source_vocab).name,
                     "candidates": [(c.concept_id, candidate_text(c), c.similarity, c.scores)
                                    for c in retrieved[sid]]}
               for sid in hold_ids}
    trained = {f"{sources[sid].source_vocab}:{sources[sid].source_code}" for sid in train_ids}
    trained |= {e.source for e in examples if e.kind.startswith("review")}
    return Material(examples, holdout, dict(counts), sorted(trained))


def save_material(path: Path, m: Material) -> None:
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as fh:
        fh.write(json.dumps({"counts": m.counts, "holdout": {str(k): v for k, v in m.holdout.items()},
                             "trained_keys": m.trained_keys}) + "\n")
        for e in m.train:
            fh.write(json.dumps(asdict(e)) + "\n")
    tmp.replace(path)


def load_material(path: Path) -> Material:
    with gzip.open(path, "rt") as fh:
        head = json.loads(fh.readline())
        train = [Example(**json.loads(line)) for line in fh]
    holdout = {int(k): {**v, "candidates": [tuple(c) for c in v["candidates"]]} for k, v in head["holdout"].items()}
    return Material(train, holdout, head["counts"], list(head.get("trained_keys", [])))


# ------------------------------------------------------------------------------------------------ evaluation


def _rank_metrics(rankings: Sequence[Sequence[int]], truths: Sequence[set[int]]) -> dict[str, float]:
    """top-1 / top-5 / MRR over all sources (a target missing from the candidates counts as a miss)."""
    agg = aggregate([score_row(r, r, t) for r, t in zip(rankings, truths, strict=True)])
    return {"top1": agg.top1, "top5": agg.top5, "mrr": agg.mrr}


def _holdout_candidates(s: dict) -> list[Candidate]:
    """A held-out source's stored candidates as Candidates (id, text, fused score, per-generator scores); runs
    saved before the scores were kept have 3-tuples."""
    out = []
    for c in s["candidates"]:
        scores = dict(c[3]) if len(c) > 3 and c[3] else {}
        out.append(Candidate(concept_id=int(c[0]), concept_name=c[1], domain_id="", vocabulary_id="",
                             concept_class_id="", concept_code="", similarity=float(c[2]), scores=scores))
    return out


STACKER_MIN_SOURCES = 40   # fewer held-out sources: fall back to logit + weight x retrieval score
STACKER_FOLDS = 5


@dataclass
class Evaluation:
    metrics: dict[str, float]
    top_p: list[float]          # each held-out source's top probability (out of fold for the stacker)
    right: list[bool]           # whether its top-1 is a target
    retrieval_weight: float     # the fallback fusion's weight (used when there is no stacker)
    stacker: Stacker | None
    trust: KindTrust = field(default_factory=KindTrust)  # the kinds it ranks better than retrieval order


def evaluate(scorer: PairScorer, holdout: dict[int, dict], *, seed: int = 13,
             stacker_hidden: Sequence[int] = (32,)) -> Evaluation:
    """Figures on held-out development sources: retrieval order, the cross-encoder alone, the cross-encoder plus
    the retrieval score with the weight (from FUSION_GRID) that maximises MRR, and, with enough sources, the
    stacker (.stacker) over the cross-encoder's logit and the retrieval evidence: cross-fitted in
    STACKER_FOLDS folds of sources, so its figures and the calibration points are out of fold; the stacker kept is
    then fit on every held-out source."""
    srcs = [s for s in holdout.values()]
    if not srcs:
        return Evaluation({}, [], [], 0.0, None)
    truths = [set(s["targets"]) for s in srcs]
    cands = [_holdout_candidates(s) for s in srcs]  # concept_name holds the text the cross-encoder reads
    logits = [scorer.logits([s["text"]] * len(cs), [c.concept_name for c in cs]) if cs else np.zeros(0)
              for s, cs in zip(srcs, cands, strict=True)]
    sims = [np.array([c.similarity for c in cs], dtype=np.float64) for cs in cands]

    def ranked(zs: Sequence[np.ndarray]) -> tuple[list[list[int]], list[float]]:
        rankings, top_p = [], []
        for cs, z in zip(cands, zs, strict=True):
            order = np.argsort(-z, kind="stable")
            rankings.append([cs[i].concept_id for i in order])
            top_p.append(float(sigmoid(z[order[0]])) if len(order) else 0.0)
        return rankings, top_p

    by_weight = {w: ranked([fused_logits(lg, sm, w) for lg, sm in zip(logits, sims, strict=True)])
                 for w in FUSION_GRID}
    scores = {w: _rank_metrics(by_weight[w][0], truths)["mrr"] for w in FUSION_GRID}
    best = max(FUSION_GRID, key=lambda w: (round(scores[w], 6), -w))  # ties: the smaller weight
    results = {"none": [[c.concept_id for c in cs] for cs in cands], "cross_encoder": by_weight[0.0][0],
               "fused": by_weight[best][0]}
    rankings, top_p = by_weight[best]

    stacker = None
    x = [stacker_features(cs, lg) for cs, lg in zip(cands, logits, strict=True)]
    y = [np.array([float(c.concept_id in t) for c in cs]) for cs, t in zip(cands, truths, strict=True)]
    usable = [i for i in range(len(srcs)) if len(y[i]) and 0 < y[i].sum() < len(y[i])]
    if len(usable) >= STACKER_MIN_SOURCES:
        stacker = Stacker.fit(np.vstack([x[i] for i in usable]), np.concatenate([y[i] for i in usable]),
                              hidden=stacker_hidden, seed=seed)
        # Sources with no target among their candidates are never fit on: the kept stacker is out of fold for them.
        oof = [stacker.logits(xi) if len(xi) else np.zeros(0) for xi in x]
        folds = np.random.default_rng(seed).permutation(len(usable)) % STACKER_FOLDS
        for f in range(STACKER_FOLDS):
            fit_on = [usable[j] for j in range(len(usable)) if folds[j] != f]
            model = Stacker.fit(np.vstack([x[i] for i in fit_on]), np.concatenate([y[i] for i in fit_on]),
                                hidden=stacker_hidden, seed=seed)
            for j in np.flatnonzero(folds == f):
                oof[usable[j]] = model.logits(x[usable[j]])
        rankings, top_p = ranked(oof)
    results["classifier"] = rankings
    metrics: dict[str, float] = {}
    for name, r in results.items():
        metrics.update({f"{name}_{k}": round(v, 4) for k, v in _rank_metrics(r, truths).items()})
    metrics["sources"] = len(srcs)
    right = [bool(r) and r[0] in t for r, t in zip(rankings, truths, strict=True)]
    none_right = [bool(r) and r[0] in t for r, t in zip(results["none"], truths, strict=True)]
    trust = KindTrust.fit([s.get("kind", "unknown") for s in srcs], none_right, right)
    return Evaluation(metrics, top_p, right, best, stacker, trust)


# ------------------------------------------------------------------------------------------------ training


def _now_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def find_resumable(root: Path) -> Path | None:
    """The newest run folder that has saved state but no finished model."""
    runs = sorted((p for p in root.glob("*") if p.is_dir() and (p / "state" / "trainer.pt").exists()
                   and not (p / "model_card.json").exists()), key=lambda p: p.name)
    return runs[-1] if runs else None


def point_latest(root: Path, run_dir: Path) -> Path:
    """Atomically re-point <root>/latest at run_dir (a relative symlink)."""
    link = root / "latest"
    tmp = root / f".latest-{os.getpid()}"
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)
    return link


@dataclass
class TrainReport:
    run_dir: Path
    steps: int
    seconds: float
    counts: dict[str, int]
    metrics: dict[str, float]
    checkpoint_hash: str
    resumed_from: int = 0
    retrieval_weight: float = 0.0
    stacked: bool = False            # a stacker was fit (enough held-out sources)
    trust: KindTrust = field(default_factory=KindTrust)


def _load_base(name: str, num_labels: int = 1, layers: int = 0) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    if Path(name).expanduser().exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name = str(Path(name).expanduser())
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A sentence encoder gets a fresh classification head; transformers' warning about it is expected.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(name)
        extra: dict[str, Any] = {"num_hidden_layers": layers} if layers else {}
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **extra)
    except OSError as exc:
        raise TrainError(f"cannot load base model {name!r}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return tok, model


def grouped_order(train: Sequence[Example], seed: int) -> np.ndarray:
    """Example indexes with each source's pairs next to each other, sources shuffled: a batch then holds whole
    candidate lists for the listwise loss (a source cut at a batch edge still counts in both halves)."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(train):
        by_source[e.source].append(i)
    keys = sorted(by_source)
    rng = np.random.default_rng(seed)
    return np.array([i for k in rng.permutation(len(keys)) for i in by_source[keys[k]]], dtype=np.int64)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, sources: Sequence[str]) -> torch.Tensor:
    """Mean over the batch's sources that have a positive and a negative of -log(softmax mass on the positives):
    it trains the ranking among one source's candidates, which is what top-1 measures; BCE alone scores each pair
    on its own."""
    import torch

    groups: dict[str, list[int]] = defaultdict(list)
    for i, src in enumerate(sources):
        groups[src].append(i)
    terms = []
    for idx in groups.values():
        z, y = logits[idx], labels[idx]
        pos = y > 0.5
        if pos.any() and (~pos).any():
            terms.append(torch.logsumexp(z, 0) - torch.logsumexp(z[pos], 0))
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


def train(conn: psycopg.Connection, settings: Settings, opts: TrainOptions, *, out: Path | None = None,
          resume: bool = False, progress: bool = True) -> TrainReport:
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    from harmonia.embedding.model import bundled_model_path, resolve_device

    root = reranker_root(settings.data_path)
    root.mkdir(parents=True, exist_ok=True)
    if resume:
        run_dir = out or find_resumable(root)
        if run_dir is None or not (run_dir / "state" / "trainer.pt").exists():
            raise TrainError(f"nothing to resume under {out or root}: no run with saved state")
        saved = json.loads((run_dir / "run.json").read_text())
        opts = TrainOptions(**{**saved["options"], "max_steps": opts.max_steps or saved["options"]["max_steps"]})
    else:
        run_dir = out or root / _now_stamp()
        if (run_dir / "model_card.json").exists() or (run_dir / "state").exists():
            raise TrainError(f"{run_dir} already holds a run: pick another --out, or --resume it")
        run_dir.mkdir(parents=True, exist_ok=True)
        opts.base_model = opts.base_model or settings.classifier.base_model or str(bundled_model_path())
        (run_dir / "run.json").write_text(json.dumps({"options": asdict(opts), "started": _now_stamp()}, indent=1))

    pairs_path = run_dir / "pairs.jsonl.gz"
    if pairs_path.exists():
        material = load_material(pairs_path)
    else:
        material = build_material(conn, settings, opts, progress=progress)
        save_material(pairs_path, material)
    if not material.train:
        raise TrainError("no training pairs: the loaded vocabulary has no 'Maps to' rows from development "
                         "sources and there are no review decisions")

    device = resolve_device(settings.embedding.device)
    dtype = resolve_dtype(settings.classifier.dtype, device)  # bfloat16 where the hardware has it: ~1.7x on a CPU
    torch.manual_seed(opts.seed)
    state_dir = run_dir / "state"
    tok, model = _load_base(str(state_dir / "model")) if resume else _load_base(opts.base_model, layers=opts.layers)
    model.to(device).train()  # type: ignore[arg-type]  # transformers' wrapper of Module.to drops its overloads
    n = len(material.train)
    per_epoch = math.ceil(n / opts.batch_size)
    total = int(math.ceil(per_epoch * opts.epochs))
    if opts.max_steps:
        total = min(total, opts.max_steps) if opts.epochs else opts.max_steps
    optim = torch.optim.AdamW(model.parameters(), lr=opts.learning_rate, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(optim, int(total * opts.warmup_ratio), total)
    step = 0
    if resume:
        st = torch.load(state_dir / "trainer.pt", map_location=device, weights_only=False)
        optim.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
        torch.set_rng_state(st["torch_rng"])
    resumed_from = step
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()

    def save_state() -> None:
        tmp = run_dir / "state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        torch.save({"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
        shutil.rmtree(state_dir, ignore_errors=True)
        tmp.rename(state_dir)

    order: np.ndarray | None = None
    epoch_of_order = -1
    running = 0.0
    with tqdm(total=total, initial=step, unit="step", desc="train", disable=not progress) as bar:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            if epoch != epoch_of_order:  # the order is a function of (seed, epoch): a resume sees the same
                order = (grouped_order(material.train, opts.seed + epoch) if opts.loss == "listwise"
                         else np.random.default_rng(opts.seed + epoch).permutation(n))
                epoch_of_order = epoch
            assert order is not None
            batch = [material.train[i] for i in order[offset * opts.batch_size:(offset + 1) * opts.batch_size]]
            enc = tok([e.query for e in batch], [e.doc for e in batch], truncation=True,
                      max_length=opts.max_length, padding=True, return_tensors="pt").to(device)
            labels = torch.tensor([e.label for e in batch], dtype=torch.float32, device=device)
            with autocast(device, dtype):
                logits = model(**enc).logits[:, 0]
            loss = loss_fn(logits.float(), labels)
            if opts.loss == "listwise":
                loss = loss + listwise_loss(logits.float(), labels, [e.source for e in batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if step > resumed_from + 1 else loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
            if opts.save_every and step % opts.save_every == 0 and step < total:
                save_state()
    train_seconds = time.perf_counter() - t0

    model_dir = run_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    scorer = PairScorer(model_dir, device=device, max_length=opts.max_length, batch_size=settings.classifier.batch_size,
                        dtype=dtype)
    ev = evaluate(scorer, material.holdout, seed=opts.seed)
    metrics, fusion_weight = ev.metrics, ev.retrieval_weight
    cal = Calibration.fit(ev.top_p, ev.right)
    (run_dir / "calibration.json").write_text(json.dumps({**cal.to_dict(), "retrieval_weight": fusion_weight}))
    (run_dir / "stacker.json").unlink(missing_ok=True)
    if ev.stacker is not None:
        (run_dir / "stacker.json").write_text(json.dumps(ev.stacker.to_dict()))
    (run_dir / TRUST_FILE).write_text(json.dumps(ev.trust.to_dict(), indent=1))
    digest = weights_hash(model_dir, run_dir / "stacker.json", run_dir / TRUST_FILE)
    card = {
        "checkpoint_hash": digest, "base_model": opts.base_model, "task": "binary (source, concept) equivalence, "
        f"one logit, {opts.loss}", "candidate_text": "name | domain | vocabulary | class", "steps": step,
        "layers": model.config.num_hidden_layers,
        "resumed_from_step": resumed_from, "epochs_seen": round(step / per_epoch, 3), "seed": opts.seed,
        "batch_size": opts.batch_size, "max_length": opts.max_length, "learning_rate": opts.learning_rate,
        "device": device, "dtype": dtype, "train_seconds_this_session": round(train_seconds, 1),
        "data": material.counts,
        "split": "harmonia.groundtruth.part_of == 'dev' sources only; held-out slice of dev for metrics",
        "embedding_model_for_negatives": settings.embedding.model or "bundled all-MiniLM-L6-v2",
        "retrieval_mode": settings.retrieval.mode,  # the stacker learnt this retriever's scores
        "holdout_metrics": metrics, "calibration": {"method": cal.method, "n": cal.n},
        "kinds": ev.trust.to_dict(),
        "retrieval_weight": fusion_weight,
        "stacker": ({"file": "stacker.json", "features": ev.stacker.features, "hidden": [w.shape[1] for w in
                     ev.stacker.weights[:-1]], "fit_on_sources": len(material.holdout), "folds": STACKER_FOLDS}
                    if ev.stacker is not None else None),
        "finished": _now_stamp(), "options": asdict(opts),
    }
    (run_dir / "model_card.json").write_text(json.dumps(card, indent=1))
    (run_dir / TRAINED_SOURCES).write_text(json.dumps({"sources": material.trained_keys}))
    (run_dir / "README.md").write_text(_readme(card))
    shutil.rmtree(state_dir, ignore_errors=True)
    point_latest(root, run_dir)
    return TrainReport(run_dir, step, train_seconds, material.counts, metrics, digest, resumed_from, fusion_weight,
                       ev.stacker is not None, ev.trust)


def _readme(card: dict[str, Any]) -> str:
    m = card["holdout_metrics"]
    lines = [f"# Harmonia classifier reranker {card['checkpoint_hash']}", "",
             f"Cross-encoder fine-tuned from `{card['base_model']}` for {card['steps']} steps "
             f"(batch {card['batch_size']}, max_length {card['max_length']}, seed {card['seed']}, {card['device']}).",
             "", "Training pairs (development sources only): " + ", ".join(f"{k} {v}" for k, v in card["data"].items()),
             ""]
    if m:
        lines += [f"Held-out development sources ({m['sources']}), 50 retrieved candidates each:", "",
                  "| reranker | top-1 | top-5 | MRR |", "|---|---|---|---|",
                  f"| none | {m['none_top1']} | {m['none_top5']} | {m['none_mrr']} |",
                  f"| cross-encoder alone | {m['cross_encoder_top1']} | {m['cross_encoder_top5']} | "
                  f"{m['cross_encoder_mrr']} |",
                  f"| cross-encoder + {card['retrieval_weight']} x retrieval score | {m.get('fused_top1')} | "
                  f"{m.get('fused_top5')} | {m.get('fused_mrr')} |",
                  f"| classifier ({'stacker, out of fold' if card.get('stacker') else 'the line above'}) | "
                  f"{m['classifier_top1']} | {m['classifier_top5']} | {m['classifier_mrr']} |", ""]
    kinds = card.get("kinds", {})
    if kinds.get("kinds"):
        lines += ["Kinds it ranks (the others keep retrieval order): " + (", ".join(kinds["trusted"]) or "none")
                  + f"; {kinds['rule']}.", "", "| kind | held-out sources | none top-1 | classifier top-1 | wins | "
                  "losses | p | ranks |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {k} | {v['sources']} | {v['none_top1']} | {v['classifier_top1']} | {v['wins']} | {v['losses']} "
                  f"| {v['p_value']:.3g} | {'yes' if v['trusted'] else 'no'} |" for k, v in kinds["kinds"].items()]
        lines.append("")
    lines.append(f"Confidence: {card['calibration']['method']} calibration on {card['calibration']['n']} sources.")
    return "\n".join(lines) + "\n"
