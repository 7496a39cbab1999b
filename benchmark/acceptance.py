"""Acceptance figures on the bundled sample: top-1, top-5, MRR, recall@50 and rows/s of the real pipeline on the
test parts of the ICD10 'Maps to' set and of the FinOMOP lab set (Usagi ground truth), per reranker.

    python benchmark/acceptance.py --data-dir DIR [--reranker none] [--reranker classifier] [--seed 13]
                                   [--per-vocab 500] [--max-rows N] [--part test] [--out DIR]

The same as `harmonia --data-dir DIR bench curate --seed 13 --vocabulary ICD10 --name icd10` plus
`bench curate --no-maps-to --usagi data/sample/benchmark/finomop_lab.usagi.csv.gz`, then `bench run SET
--reranker R` on each test part. With --data-dir the embedded database there is reused (the sample vocabulary is
loaded and embedded first if missing: minutes on a busy machine). The lab set's source vocabulary is declared
`labs` (as `harmonia map FILE --kind labs` does), so it is searched in its kind's domains and its names read for
their specimen. Nothing is persisted into concept_map.
Gates (issue 4): dev-type sets top-1 >= 0.60 and top-5 >= 0.85; harder sets top-1 >= 0.50, top-5 >= 0.75.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harmonia import db
from harmonia.config import load_settings
from harmonia.embedding.ingest import embed_concepts
from harmonia.embedding.model import Embedder
from harmonia.evaluation.curate import curate_maps_to_from_db, curate_usagi_from_db
from harmonia.evaluation.run import check_gate, run_set, write_result
from harmonia.groundtruth import write_set
from harmonia.kinds import KindRegistry
from harmonia.paths import sample_dir
from harmonia.pipeline.run import Pipeline
from harmonia.store import migrations
from harmonia.store import vocab as vocab_store
from harmonia.vocabulary import load_vocabulary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="embedded database (reused) and outputs live here")
    ap.add_argument("--reranker", action="append", choices=["none", "llm", "classifier"],
                    help="repeatable; default: none")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--per-vocab", type=int, default=500)
    ap.add_argument("--max-rows", type=int, default=0, help="first N rows of each set (0: all)")
    ap.add_argument("--part", choices=["dev", "test"], default="test")
    ap.add_argument("--out", help="where sets and results go (default: <data-dir>/bench)")
    a = ap.parse_args()
    rerankers = a.reranker or ["none"]
    base = load_settings({"data_dir": a.data_dir})
    out = Path(a.out) if a.out else base.data_path / "bench"
    with db.connect(base.database, autocommit=True) as conn:
        migrations.migrate(conn)
        if vocab_store.counts(conn)["concept"] == 0:
            load_vocabulary(conn, sample_dir() / "vocab", progress=False)
        embed_concepts(conn, Embedder.from_settings(base), vocabularies=base.embedding.vocabularies,
                       batch_size=base.embedding.batch_size, progress=False, retrieval=base.retrieval)
        sets = [curate_maps_to_from_db(conn, seed=a.seed, per_vocab=a.per_vocab, vocabularies=["ICD10"],
                                       name="icd10"),
                curate_usagi_from_db(conn, sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz", seed=a.seed)]
        reg = KindRegistry.from_settings(base, conn)  # declared as a user would (`harmonia map --kind labs`)
        for vocab in {r.source_vocab for part in sets[1].parts.values() for r in part}:
            reg.declare(conn, vocab, "labs", declared_by="acceptance")
        paths = {}
        for cs in sets:
            for part, rows in cs.parts.items():
                write_set(rows, out / f"{cs.name}.{part}.csv")
            paths[cs.name] = (out / f"{cs.name}.{a.part}.csv", cs.parts[a.part])
        lines = ["| set | reranker | rows | same-name | top-1 | top-5 | MRR | recall@50 | rows/s | gate |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for reranker in rerankers:
            s = load_settings({"data_dir": a.data_dir, "reranker": reranker})
            with Pipeline.from_settings(conn, s) as pipe:
                for name, (path, all_rows) in paths.items():
                    rows = all_rows[: a.max_rows] if a.max_rows else all_rows
                    same = sum(r.same_name for r in rows)
                    r = run_set(pipe, rows, s, progress=False, set_path=str(path))
                    write_result(r, out / "runs", f"{path.stem}.{reranker}")
                    gate = "dev" if name == "icd10" else "hard"
                    failed = check_gate(r, gate, s.benchmark)
                    o = r["overall"]
                    lines.append(f"| {path.name} | {reranker} | {r['rows']} | {same} | {o['top1']:.3f} | "
                                 f"{o['top5']:.3f} | {o['mrr']:.3f} | {o['recall']:.3f} | {r['rows_per_s']:.1f} | "
                                 f"{gate}: {'pass' if not failed else 'FAIL'} |")
                    print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
