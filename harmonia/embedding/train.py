"""Contrastive fine-tuning of the embedding model (`harmonia embed train`).

Pairs come from the vocabulary itself: each non-standard source concept of the benchmark's DEVELOPMENT part
(harmonia.groundtruth.part_of) with its 'Maps to' target, and each synonym of a valid standard concept with
the concept's name. MultipleNegativesRankingLoss treats the other positives of a batch as negatives, so a batch
never holds the same anchor or positive twice. The loop is plain PyTorch, so training runs offline and resumes
exactly: a checkpoint holds the model, optimiser, scheduler and step, and batches follow from (seed, epoch).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from harmonia.config import Settings
from harmonia.groundtruth import known_mappings
from harmonia.store import concepts as concept_store
from harmonia.store import lexical as lex_store

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE = "train_state.pt"
CARD_JSON = "harmonia_train.json"


class TrainError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    base: str
    out: str
    max_steps: int = 0  # 0: epochs decide
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_seq_length: int = 64
    seed: int = 13
    checkpoint_every: int = 100
    max_pairs: int = 0  # 0: all


@dataclass
class TrainReport:
    out: str
    steps: int
    pairs: int
    maps_to_pairs: int
    synonym_pairs: int
    seconds: float
    last_loss: float
    resumed_from: int


def training_pairs(conn: psycopg.Connection, vocabularies: Sequence[str] | None, *,
                   extra_sets: Sequence[Path] = (), include_reviews: bool = True,
                   ) -> tuple[list[tuple[str, str]], dict]:
    """(anchor, positive) pairs, deduplicated, in a stable order: 'Maps to' of the development part, synonyms of
    valid standard concepts, the development-part rows of mapping files the user names (a benchmark set or a Usagi
    export: source name -> approved concept), and reviewers' decisions (source text -> chosen concept) whose source
    is not a test-part vocabulary concept."""
    known = known_mappings(conn, vocabularies, extra_sets=extra_sets, include_reviews=include_reviews)
    targets = concept_store.get_concepts(conn, {t for km in known for t in km.targets})
    names = {cid: c.concept_name for cid, c in targets.items()}

    def named(origin: str) -> list[tuple[str, str]]:
        # An identical pair teaches nothing.
        return [(km.source_text, names[t]) for km in known if km.origin == origin for t in km.targets
                if t in names and km.source_text.strip().lower() != names[t].strip().lower()]

    maps, ext_pairs, review_pairs = named("vocabulary"), named("file"), named("review")
    syn = lex_store.synonym_pairs(conn, vocabularies)
    seen: set[tuple[str, str]] = set()
    out = []
    for a, b in maps + ext_pairs + review_pairs + syn:
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    dev_sources = sum(1 for km in known if km.origin == "vocabulary")
    info = {"maps_to_pairs": len(maps), "synonym_pairs": len(syn), "dev_sources": dev_sources,
            "mapping_file_pairs": len(ext_pairs), "mapping_files": [str(p) for p in extra_sets],
            "review_pairs": len(review_pairs),
            "split": "harmonia.groundtruth.part_of(source key) == 'dev'"}
    return out, info


def make_batches(pairs: Sequence[tuple[str, str]], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of pair indexes with no repeated anchor or positive (in-batch negatives must be
    negatives); a pair that clashes waits for the next batch."""
    from collections import deque

    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    queue = deque(order)
    batches: list[list[int]] = []
    while queue:
        cur: list[int] = []
        texts: set[str] = set()
        skipped: list[int] = []
        while queue and len(cur) < batch_size:
            i = queue.popleft()
            a, b = pairs[i]
            if a in texts or b in texts:
                skipped.append(i)
            else:
                cur.append(i)
                texts.update((a, b))
        queue.extendleft(reversed(skipped))  # clashing pairs go first into the next batch
        if len(cur) >= 2:
            batches.append(cur)
            continue
        # A lone pair has nothing to contrast with: into an earlier batch it does not clash with, else dropped.
        a, b = pairs[cur[0]]
        for bt in batches:
            if all(a not in pairs[j] and b not in pairs[j] for j in bt):
                bt.append(cur[0])
                break
    return batches


def _loss_class() -> type[torch.nn.Module]:
    """MultipleNegativesRankingLoss, from where this sentence-transformers release keeps it."""
    import importlib

    try:
        module = importlib.import_module("sentence_transformers.sentence_transformer.losses")
    except ImportError:  # older sentence-transformers
        module = importlib.import_module("sentence_transformers.losses")
    loss: type[torch.nn.Module] = module.MultipleNegativesRankingLoss
    return loss


def train(pairs: Sequence[tuple[str, str]], cfg: TrainConfig, *, info: dict | None = None, resume: bool = False,
          progress: bool = True, device: str = "cpu") -> TrainReport:
    """Fine-tune cfg.base on pairs; checkpoints under cfg.out/checkpoint, the final model in cfg.out."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import batch_to_device
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    if len(pairs) < 2:
        raise TrainError(f"only {len(pairs)} training pair(s): load a vocabulary with 'Maps to' or synonyms first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: base is a local path
    out = Path(cfg.out)
    ckpt = out / CHECKPOINT
    start = 0
    if resume and (ckpt / STATE).exists():
        model = SentenceTransformer(str(ckpt), device=device)
    else:
        if resume:
            log.warning("no checkpoint under %s: starting from %s", ckpt, cfg.base)
        model = SentenceTransformer(cfg.base, device=device)
    model.max_seq_length = cfg.max_seq_length
    torch.manual_seed(cfg.seed)
    loss_fn = _loss_class()(model)
    batches_per_epoch = len(make_batches(pairs, cfg.batch_size, cfg.seed))
    total = cfg.max_steps or max(1, int(round(cfg.epochs * batches_per_epoch)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    if resume and (ckpt / STATE).exists():
        state = torch.load(ckpt / STATE, weights_only=False)
        if state["total"] != total or state["pairs"] != len(pairs):
            raise TrainError(f"checkpoint in {ckpt} was for {state['total']} steps over {state['pairs']} pairs, "
                             f"not {total} over {len(pairs)}: resume with the same options, or drop --resume")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` is deprecated in newer releases
    t0 = time.perf_counter()
    last = float("nan")
    epoch_batches: dict[int, list[list[int]]] = {}
    model.train()
    with tqdm(total=total, initial=start, desc="embed train", unit="step", disable=not progress) as bar:
        for step in range(start, total):
            epoch, j = divmod(step, batches_per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: make_batches(pairs, cfg.batch_size, cfg.seed + epoch)}
            batch = epoch_batches[epoch][j % len(epoch_batches[epoch])]
            anchors = [pairs[i][0] for i in batch]
            positives = [pairs[i][1] for i in batch]
            features = [batch_to_device(tokenize(anchors), model.device),
                        batch_to_device(tokenize(positives), model.device)]
            loss = loss_fn(features, torch.empty(0))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            last = float(loss.detach())
            bar.set_postfix(loss=f"{last:.3f}")
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                _checkpoint(model, ckpt, {"step": step + 1, "total": total, "pairs": len(pairs),
                                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                          "torch_rng": torch.get_rng_state()})
    model.eval()
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out), create_model_card=False)
    info = info or {}
    card = {"base_model": cfg.base, "loss": "MultipleNegativesRankingLoss (in-batch negatives)",
            "pairs": len(pairs), **info, "steps": total, "resumed_from_step": start,
            "batches_per_epoch": batches_per_epoch, "config": asdict(cfg), "last_loss": last,
            "train_seconds_this_run": round(seconds, 1), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
    (out / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(card))
    shutil.rmtree(ckpt, ignore_errors=True)
    return TrainReport(out=str(out), steps=total, pairs=len(pairs), maps_to_pairs=info.get("maps_to_pairs", 0),
                       synonym_pairs=info.get("synonym_pairs", 0), seconds=seconds, last_loss=last,
                       resumed_from=start)


def _checkpoint(model: SentenceTransformer, ckpt: Path, state: dict[str, Any]) -> None:
    """Write to a temp dir, then swap: a crash mid-write leaves the previous checkpoint intact."""
    import torch

    tmp = ckpt.with_name(CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp), create_model_card=False)
    torch.save(state, tmp / STATE)
    old = ckpt.with_name(CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _model_card(card: dict) -> str:
    c = card["config"]
    return "\n".join([
        "# Harmonia fine-tuned embedder", "",
        f"Fine-tuned from `{card['base_model']}` with {card['loss']} by `harmonia embed train`.", "",
        "## Data", "",
        f"- {card.get('maps_to_pairs', 0):,} pairs: non-standard source concept name -> its 'Maps to' target name, "
        f"development part only ({card.get('split', '')}; {card.get('dev_sources', 0):,} dev sources)",
        f"- {card.get('synonym_pairs', 0):,} pairs: concept synonym -> concept name (valid standard concepts)",
        f"- {card['pairs']:,} distinct pairs in all", "",
        "## Training", "",
        f"- steps: {card['steps']} (batch {c['batch_size']}, {card['batches_per_epoch']} batches per epoch), "
        f"lr {c['lr']}, warmup {c['warmup_ratio']}, max_seq_length {c['max_seq_length']}, seed {c['seed']}",
        f"- last batch loss: {card['last_loss']:.4f}; finished {card['finished_at']}", "",
        "Use it with `harmonia embed --model <this folder>` (or the setting `embedding_model`).", ""])


def default_out(settings: Settings, name: str) -> Path:
    return settings.data_path / "embedder" / name
