"""Bundled models side by side (issue 20 point 1): embedders (all-MiniLM-L6-v2, all-mpnet-base-v2, fine-tuned
ones) as the retriever, and classifier checkpoints (cross-encoders of either base) as the reranker, measured in one
run through the real pipeline on the ICD10 'Maps to' test part and the FinOMOP lab test part.

    python benchmark/model_figures.py --data-dir DIR --embedder "" --embedder /models/all-mpnet-base-v2 \
        --checkpoint DIR/reranker/minilm4 --checkpoint DIR/reranker/mpnet4 --max-rows 500 --timed 40

The lab set's source vocabulary is declared `labs` first (its kind's domains searched, lab names read for their
specimen), as `harmonia map FILE --kind labs` does. Each `--embedder` ("" = the bundled MiniLM) must be embedded
(`harmonia embed --model X`) and have a mapping memory (`harmonia memory build --model X`) when retrieval is
hybrid; missing embeddings are added first (minutes). Its rows
use reranker `none`. Each `--checkpoint` reranks the retrieval of the first embedder (train it with that retriever:
its stacker learnt those scores). Per line: top-1, top-5, MRR, recall@50 on each set; ms per source code, one code
at a time over the first --timed ICD10 rows (retrieval + rerank, after a warm-up; the `none` line of the same
embedder is the retrieval share); for a checkpoint its base, layers and training seconds from its model card.
Timing on a shared 2-core machine is noisy: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from harmonia import db
from harmonia.config import load_settings
from harmonia.domain import SourceTargets, SourceTerm
from harmonia.embedding.ingest import embed_concepts
from harmonia.embedding.model import Embedder
from harmonia.evaluation.curate import curate_maps_to_from_db, curate_usagi_from_db
from harmonia.evaluation.run import run_set
from harmonia.kinds import KindRegistry
from harmonia.paths import sample_dir
from harmonia.pipeline.run import Pipeline
from harmonia.store import memory as mem_store


def ms_per_code(pipe: Pipeline, rows: list[SourceTargets], n: int) -> float:
    terms = [SourceTerm(source_code=r.source_code, source_vocab=r.source_vocab, source_text=r.source_text)
             for r in rows[: n + 3]]
    pipe.decide(terms[:3])  # warm-up: model load, first-call allocations
    times = []
    for t in terms[3:]:
        t0 = time.perf_counter()
        pipe.decide([t])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times) if times else float("nan")


def card_of(checkpoint: str) -> dict[str, Any]:
    p = Path(checkpoint) / "model_card.json"
    return json.loads(p.read_text()) if p.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--embedder", action="append", default=None, help='repeatable; "" = the bundled MiniLM')
    ap.add_argument("--checkpoint", action="append", default=[], help="repeatable; a reranker run folder")
    ap.add_argument("--max-rows", type=int, default=500, help="first N rows of each test part (0: all)")
    ap.add_argument("--timed", type=int, default=40, help="ICD10 codes timed one at a time (0: no timing)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    embedders = a.embedder if a.embedder is not None else [""]
    base = load_settings({"data_dir": a.data_dir})
    lines = ["| retriever (embedder) | reranker | ICD10 top-1 | top-5 | MRR | recall@50 | labs top-1 | top-5 | MRR "
             "| recall@50 | ms/code | training |", "|---|---|" + "---:|" * 10]
    results: list[dict[str, Any]] = []
    with db.connect(base.database, autocommit=True) as conn:
        icd = curate_maps_to_from_db(conn, seed=a.seed, per_vocab=500, vocabularies=["ICD10"], name="icd10")
        lab = curate_usagi_from_db(conn, sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz", seed=a.seed)
        sets = {"icd10": icd.parts["test"], "labs": lab.parts["test"]}
        reg = KindRegistry.from_settings(base, conn)  # the lab set declared as a user would (`map --kind labs`)
        for vocab in {r.source_vocab for r in sets["labs"]}:
            reg.declare(conn, vocab, "labs", declared_by="model_figures")
        if a.max_rows:
            sets = {k: v[: a.max_rows] for k, v in sets.items()}
        runs: list[tuple[str, dict[str, Any], str]] = [
            (e or "bundled MiniLM", {"embedding_model": e, "reranker": "none"}, "") for e in embedders]
        runs += [(embedders[0] or "bundled MiniLM", {"embedding_model": embedders[0], "reranker": "classifier",
                                                      "classifier_checkpoint": c}, c) for c in a.checkpoint]
        for label, over, checkpoint in runs:
            s = load_settings({"data_dir": a.data_dir, **over})
            embedder = Embedder.from_settings(s)
            rep = embed_concepts(conn, embedder, vocabularies=s.embedding.vocabularies,
                                 batch_size=s.embedding.batch_size, progress=False, retrieval=s.retrieval)
            if rep.written:
                print(f"embedded {rep.written:,} concepts for {embedder.key} first", flush=True)
            if s.retrieval.mode == "hybrid" and not mem_store.count(conn, embedder.key):
                raise SystemExit(f"{label}: no mapping memory for this model; run `harmonia memory build --model "
                                 f"{over['embedding_model'] or '...'}` first")
            row: dict[str, Any] = {"embedder": label, "reranker": s.rerank.kind, "checkpoint": checkpoint}
            with Pipeline.from_settings(conn, s) as pipe:
                row["model_version"] = pipe.reranker.model_version
                for name, rows in sets.items():
                    r = run_set(pipe, rows, s, progress=False)
                    row[name] = {k: r["overall"][k] for k in ("top1", "top5", "mrr", "recall")} | {"rows": r["rows"]}
                row["ms_per_code"] = ms_per_code(pipe, sets["icd10"], a.timed) if a.timed else float("nan")
            card = card_of(checkpoint) if checkpoint else {}
            row["card"] = {k: card.get(k) for k in ("base_model", "layers", "steps", "train_seconds_this_session",
                                                    "holdout_metrics")}
            base_name = str(card.get("base_model") or "")
            base_name = "all-MiniLM-L6-v2" if not base_name or "minilm_l6" in base_name else Path(base_name).name
            training = (f"{base_name}, {card.get('layers')} layers, "
                        f"{card.get('steps')} steps, {card.get('train_seconds_this_session')} s" if card else "-")
            results.append(row)
            i, b = row["icd10"], row["labs"]
            lines.append(f"| {Path(label).name} | {row['model_version']} | {i['top1']:.3f} | {i['top5']:.3f} | "
                         f"{i['mrr']:.3f} | {i['recall']:.3f} | {b['top1']:.3f} | {b['top5']:.3f} | {b['mrr']:.3f} | "
                         f"{b['recall']:.3f} | {row['ms_per_code']:.0f} | {training} |")
            print(lines[-1], f"(load {os.getloadavg()[0]:.1f})", flush=True)
    out = base.data_path / "bench" / "model_figures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": {k: len(v) for k, v in sets.items()}, "results": results}, indent=1))
    print(f"\nICD10 test rows {len(sets['icd10'])}, lab test rows {len(sets['labs'])}; results in {out}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
