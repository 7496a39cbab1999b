"""Classifier reranker figures on the ICD10 -> SNOMED TEST part of the loaded vocabulary (issue 5).

    python benchmark/classifier_figures.py --data-dir /tmp/clf [--n 500] [--checkpoint DIR] [--threads 2]

Sources: ICD10 concepts with 'Maps to' targets in SNOMED whose source concept is in the test part
(harmonia.groundtruth.part_of == "test"), a seeded sample of --n. Each is retrieved once (top-50, the
configured retriever, e.g. hybrid with the mapping memory); `none` keeps retrieval order, `classifier` reranks the
same 50 with the checkpoint. A hit is any SNOMED 'Maps to' target. Time: each source code reranked on its own
(50 pairs, one call), wall clock, after a warm-up; the batched throughput of rerank_many is printed too. Goals:
top-1 >= 0.85; <= 150 ms per source code on 2 CPU cores. The load average is printed with the times: on a shared
machine they are noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from _common import percentile  # sibling module: python puts the script's folder first on sys.path

from harmonia import db
from harmonia.config import load_settings
from harmonia.domain import SourceTerm
from harmonia.embedding.model import Embedder
from harmonia.groundtruth import maps_to_sources
from harmonia.metrics import aggregate, score_row
from harmonia.rerank.base import NoneReranker
from harmonia.rerank.classifier.checkpoint import checkpoint_from_settings
from harmonia.rerank.classifier.reranker import ClassifierReranker
from harmonia.retrieval import make_retriever
from harmonia.store import concepts as concept_store


def metrics(rankings: list[list[int]], truths: list[set[int]]) -> dict[str, float]:
    agg = aggregate([score_row(r, r, t) for r, t in zip(rankings, truths, strict=True)])
    return {"top1": agg.top1, "top5": agg.top5, "mrr": agg.mrr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--checkpoint", default="", help="Default: classifier_checkpoint, else <data_dir>/reranker/latest")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the goal is stated for 2 cores)")
    ap.add_argument("--timed", type=int, default=0, help="Time only the first N sources one by one (0: all).")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    overrides = {"data_dir": args.data_dir, "reranker": "classifier"}
    if args.checkpoint:
        overrides["classifier_checkpoint"] = args.checkpoint
    s = load_settings(overrides)
    with db.connect(s.database, autocommit=True) as conn:
        sources = maps_to_sources(conn, ["ICD10"], part="test")  # by source concept_id
        target_vocab = {cid: c.vocabulary_id for cid, c in
                        concept_store.get_concepts(conn, {t for st in sources for t in st.targets}).items()}
        snomed = [(st, {t for t in st.targets if target_vocab.get(t) == "SNOMED"}) for st in sources]
        snomed = [(st, targets) for st, targets in snomed if targets]
        order = list(range(len(snomed)))
        random.Random(args.seed).shuffle(order)
        order = order[: args.n]
        terms = [SourceTerm(snomed[i][0].source_code, snomed[i][0].source_vocab, snomed[i][0].source_text)
                 for i in order]
        truths = [snomed[i][1] for i in order]
        retriever = make_retriever(conn, Embedder.from_settings(s), s)
        cand_lists = []
        with retriever:
            for start in range(0, len(terms), 128):
                chunk = terms[start:start + 128]
                cand_lists += retriever.search_many([t.source_text for t in chunk],
                                                    source_keys=[t.key for t in chunk])

    reranker = ClassifierReranker(checkpoint_from_settings(s), top_n=max(s.rerank.top_n, 50),
                                  batch_size=s.classifier.batch_size, max_length=s.classifier.max_length,
                                  device="cpu", dtype=s.classifier.dtype)
    none = NoneReranker(50)
    base = [[r.concept_id for r in none.rerank(t, c).ranked] for t, c in zip(terms, cand_lists, strict=True)]
    reranker.rerank(terms[0], cand_lists[0])  # warm-up
    load_before = os.getloadavg()
    timed = len(terms) if not args.timed else min(args.timed, len(terms))
    per_code_ms: list[float] = []
    ranked: list[list[int]] = []
    for i, (t, c) in enumerate(zip(terms, cand_lists, strict=True)):
        if i < timed:
            t0 = time.perf_counter()
            r = reranker.rerank(t, c)
            per_code_ms.append((time.perf_counter() - t0) * 1000)
        else:
            r = reranker.rerank(t, c)
        ranked.append([x.concept_id for x in r.ranked])
    load_mid = os.getloadavg()
    t0 = time.perf_counter()
    batch = reranker.rerank_many(list(zip(terms[:timed], cand_lists[:timed], strict=True)))
    batched_ms = (time.perf_counter() - t0) * 1000 / max(len(batch), 1)
    load_after = os.getloadavg()
    # Batching only changes padding; in bfloat16 that can swap near-ties, so compare the top-1s, not exact lists.
    same_top1 = sum(bool(r.ranked) and r.ranked[0].concept_id == x[0]
                    for r, x in zip(batch, ranked[:timed], strict=True)) / max(len(batch), 1)
    assert same_top1 >= 0.95, f"batched and single calls disagree on {1 - same_top1:.0%} of top-1s"

    recall = sum(any(c.concept_id in tr for c in cl) for cl, tr in zip(cand_lists, truths, strict=True))
    m_none, m_clf = metrics(base, truths), metrics(ranked, truths)
    pairs_per = statistics.mean(len(c) for c in cand_lists)
    print(f"ICD10 -> SNOMED test part: {len(terms)} source codes (seed {args.seed}), "
          f"{pairs_per:.0f} candidates each, recall@{s.retrieval.top_k} {recall / len(terms):.3f}")
    print(f"checkpoint {reranker.checkpoint} ({reranker.model_version}, base {reranker.base_model}); retrieval "
          f"{s.retrieval.mode}, embedder {retriever.embedder.key if retriever.embedder else '-'}; "
          f"classifier dtype {reranker.scorer.dtype}, "
          f"{reranker.scorer.model.config.num_hidden_layers} layers, "
          + (f"stacker over {len(reranker.stacker.features)} features" if reranker.stacker is not None
             else f"logit + {reranker.retrieval_weight:g} x retrieval score"))
    print()
    print("| reranker | top-1 | top-5 | MRR | ms per source code (50 pairs) |")
    print("|---|---|---|---|---|")
    print(f"| none | {m_none['top1']:.3f} | {m_none['top5']:.3f} | {m_none['mrr']:.3f} | - |")
    print(f"| classifier | {m_clf['top1']:.3f} | {m_clf['top5']:.3f} | {m_clf['mrr']:.3f} | "
          f"median {statistics.median(per_code_ms):.0f}, p95 {percentile(per_code_ms, 95):.0f}, "
          f"mean {statistics.mean(per_code_ms):.0f} (one call per code, {timed} codes); "
          f"batched {batched_ms:.0f} (same top-1 as single calls: {same_top1:.0%}) |")
    print()
    print(f"torch threads {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}; load average "
          f"(1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
          f"after single calls {load_mid[0]:.1f}, after batched {load_after[0]:.1f}")


if __name__ == "__main__":
    main()
