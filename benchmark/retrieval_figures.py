"""Retrieval figures (issue 8): vector only, lexical only, hybrid (tuned weights), hybrid with the mapping memory,
and the same with a fine-tuned embedder, measured in one run on the TEST part of the ICD10->SNOMED sample and on the
lab set; and the latency of hybrid retrieval.

    .venv/bin/harmonia --data-dir /tmp/hyb quickstart --n 5
    .venv/bin/harmonia --data-dir /tmp/hyb retrieve tune            # weights from the DEV part -> harmonia.toml
    .venv/bin/harmonia --data-dir /tmp/hyb embed train --max-steps 120
    .venv/bin/harmonia --data-dir /tmp/hyb embed --model /tmp/hyb/embedder/minilm-harmonia
    .venv/bin/harmonia --data-dir /tmp/hyb memory build                # and with --model for the fine-tuned one
    .venv/bin/python benchmark/retrieval_figures.py --data-dir /tmp/hyb \
        --finetuned /tmp/hyb/embedder/minilm-harmonia

Every mode is scored from the same candidate pools: `vector` is the vector generator's own top-50 (HNSW),
`lexical` the trigram generator's own top-50, `hybrid` the fusion of both with the configured weights and the
memory off (boost 0), `hybrid + memory` the same with the configured memory boost (where the model has a memory;
test-part sources are never in it, and each source's own row would be left out anyway). Metrics:
recall@50 (any correct target among the 50), top-1, top-5, MRR (first correct target in the top-50, else 0).
Latency is per query, one at a time, EXCLUDING query encoding (reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from pathlib import Path

from _common import percentile  # sibling module: python puts the script's folder first on sys.path

from harmonia import db
from harmonia.config import load_settings
from harmonia.domain import SourceTargets
from harmonia.embedding.model import Embedder
from harmonia.groundtruth import maps_to_sources, part_of, read_usagi_truth
from harmonia.metrics import aggregate, score_row
from harmonia.paths import sample_dir
from harmonia.retrieval.hybrid import FusionWeights, HybridRetriever, fused_ranking
from harmonia.store import concepts as concept_store
from harmonia.store import embeddings as emb_store
from harmonia.store import memory as mem_store

K = 50


def icd10_test(conn, vocabularies: list[str], n: int, seed: int) -> list[SourceTargets]:
    rows = maps_to_sources(conn, ["ICD10"], part="test")
    valid = {cid for cid, c in concept_store.get_concepts(conn, {t for r in rows for t in r.targets}).items()
             if c.vocabulary_id in vocabularies}
    for r in rows:
        r.targets = [t for t in r.targets if t in valid]
    rows = [r for r in rows if r.targets]
    if n and len(rows) > n:
        rows = sorted(random.Random(seed).sample(rows, n), key=lambda r: r.source_concept_id)
    return rows


def lab_rows(conn, path: Path, vocabularies: list[str], part: str
             ) -> tuple[list[SourceTargets], int]:
    rows = read_usagi_truth(path)
    concepts = concept_store.get_concepts(conn, {t for r in rows for t in r.targets})
    ok = {cid for cid, c in concepts.items() if c.is_valid_standard and c.vocabulary_id in vocabularies}
    kept = []
    dropped = 0
    for r in rows:
        r.targets = [t for t in r.targets if t in ok]
        if not r.targets:
            dropped += 1
        elif part == "all" or part_of(r.split_key) == part:
            kept.append(r)
    return kept, dropped


def score(pools, order) -> dict:
    agg = aggregate([score_row(order(p)[:K], order(p)[:K], r.targets) for r, p in pools])
    return {"n": agg.n, "recall@50": agg.recall, "top-1": agg.top1, "top-5": agg.top5, "MRR": agg.mrr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--n-icd", type=int, default=1000, help="ICD10 test sources sampled (0: all)")
    ap.add_argument("--lab-part", default="test", choices=["test", "all"])
    ap.add_argument("--finetuned", default="", help="fine-tuned model folder (embedded with `harmonia embed`)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=13)
    a = ap.parse_args()
    os.environ["HARMONIA_DATA_DIR"] = a.data_dir
    s = load_settings({"data_dir": a.data_dir})
    w = FusionWeights.of(s.retrieval)
    w0 = dataclasses.replace(w, boost_memory=0.0)
    print(f"weights ({s.sources.get('retrieval_weight_vector')}): {w}")
    conn = db.connect(s.database, autocommit=True)
    sets = {"ICD10->SNOMED test": icd10_test(conn, s.embedding.vocabularies, a.n_icd, a.seed)}
    labs, dropped = lab_rows(conn, sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz", s.embedding.vocabularies,
                             a.lab_part)
    sets[f"labs ({a.lab_part})"] = labs
    print(f"lab rows without a valid standard target in the loaded vocabulary (left out): {dropped}")
    embedders = {"base": Embedder.from_settings(s)}
    if a.finetuned:
        ft = Embedder(name_or_path=a.finetuned, device=embedders["base"].device)
        if emb_store.count(conn, ft.key) == 0:
            print(f"fine-tuned model {ft.key} has no embeddings: run `harmonia embed --model {a.finetuned}`")
        else:
            embedders["fine-tuned"] = ft
    results: list[tuple[str, str, dict]] = []
    latency: dict[str, list[float]] = {}
    for set_name, rows in sets.items():
        for ename, emb in embedders.items():
            t0 = time.perf_counter()
            pools = []
            with HybridRetriever.from_settings(conn, emb, s) as r:
                for i in range(0, len(rows), 64):
                    chunk = rows[i:i + 64]
                    pools.extend(zip(chunk, r.pools([x.source_text for x in chunk], source_keys=[x.key for x in chunk]),
                                     strict=True))
            memory = mem_store.count(conn, emb.key)
            print(f"{set_name}, {ename} embedder: {len(pools)} pools in {time.perf_counter() - t0:.0f}s; memory "
                  f"{sum(memory.values()):,} sources {memory}", flush=True)
            suffix = "" if ename == "base" else ", fine-tuned embedder"
            results.append((set_name, "vector only" + suffix, score(pools, lambda p: p.vector_order)))
            if ename == "base":
                results.append((set_name, "lexical only", score(pools, lambda p: p.lexical_order)))
            results.append((set_name, "hybrid (tuned)" + suffix,
                            score(pools, lambda p: fused_ranking(p, w0, K).tolist())))
            if memory and w.boost_memory:
                results.append((set_name, "hybrid + memory" + suffix,
                                score(pools, lambda p: fused_ranking(p, w, K).tolist())))
    # Latency: one query at a time, as the pipeline's single lookups do.
    texts = [x.source_text for x in sets["ICD10->SNOMED test"][:a.latency_n]]
    enc, ret = [], []
    with HybridRetriever.from_settings(conn, embedders["base"], s) as r:
        for t in texts:
            t0 = time.perf_counter()
            v = r.embedder.encode_queries([t])[0]
            t1 = time.perf_counter()
            r.search_encoded(t, v, K)
            t2 = time.perf_counter()
            enc.append((t1 - t0) * 1000)
            ret.append((t2 - t1) * 1000)
    with_memory = " + memory" if r.memory_rows and w.boost_memory else ""
    latency[f"hybrid retrieval{with_memory}, excl. encoding"] = ret
    latency["query encoding alone"] = enc
    print()
    print("| set | mode | n | recall@50 | top-1 | top-5 | MRR |")
    print("|---|---|---|---|---|---|---|")
    for set_name, mode, m in results:
        print(f"| {set_name} | {mode} | {m['n']} | {m['recall@50']:.3f} | {m['top-1']:.3f} | {m['top-5']:.3f} | "
              f"{m['MRR']:.3f} |")
    print()
    print("| latency (ms, per query) | n | p50 | p95 |")
    print("|---|---|---|---|")
    for name, vals in latency.items():
        print(f"| {name} | {len(vals)} | {percentile(vals, 50):.1f} | {percentile(vals, 95):.1f} |")
    print(f"\nmachine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
