"""Source kinds as retrieval filters, and lab- and drug-aware text (issue 20 points 2-4), measured: retrieval only
(reranker none), hybrid retrieval with the mapping memory, the bundled MiniLM.

    .venv/bin/harmonia --data-dir DIR db migrate && .venv/bin/harmonia --data-dir DIR vocab load data/sample/vocab
    .venv/bin/harmonia --data-dir DIR embed && .venv/bin/harmonia --data-dir DIR memory build
    .venv/bin/python benchmark/kind_text_figures.py --data-dir DIR [--icd10 500] [--out DIR]

Sets: the ICD10 'Maps to' TEST part (a seeded sample of --icd10 sources), the FinOMOP lab Usagi set's test and
development parts (kind labs), and the AmsterdamUMCdb ICU development halves of labs (kind labs) and drugs (kind
drugs) in data/sample/benchmark. None of the Usagi sets is in the memory. Each runs under four configurations:
kind filter off/on x lab/drug text off/on (`retrieval_kind_filter`, `retrieval_lab_text`, `retrieval_drug_text`).
Metrics per set: recall@50, top-1, top-5, MRR over the pipeline's own decisions (`bench run`'s run_set). Nothing is
tuned here: the parsers' tables were written from the sets' names (every part), and the settings' defaults follow
the development sets' figures; the test parts are only reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from harmonia import db
from harmonia.config import load_settings
from harmonia.domain import SourceTargets
from harmonia.evaluation.curate import curate_maps_to_from_db, curate_usagi_from_db
from harmonia.evaluation.run import run_set
from harmonia.kinds import KindRegistry
from harmonia.paths import sample_dir
from harmonia.pipeline.run import Pipeline

CONFIGS: dict[str, dict[str, bool]] = {
    "filter off, text off": {"retrieval_kind_filter": False, "retrieval_lab_text": False,
                             "retrieval_drug_text": False},
    "filter on, text off": {"retrieval_kind_filter": True, "retrieval_lab_text": False, "retrieval_drug_text": False},
    "filter off, text on": {"retrieval_kind_filter": False, "retrieval_lab_text": True, "retrieval_drug_text": True},
    "filter on, text on": {"retrieval_kind_filter": True, "retrieval_lab_text": True, "retrieval_drug_text": True},
}
KINDS = {"finomop_lab": "labs", "amstel_lab": "labs", "amstel_drug": "drugs"}


def prepare(conn: Any, seed: int, icd10: int) -> dict[str, list[SourceTargets]]:
    cs = curate_maps_to_from_db(conn, seed=seed, per_vocab=None, vocabularies=["ICD10"])
    test = cs.parts["test"]
    if icd10 and len(test) > icd10:
        test = random.Random(seed).sample(test, icd10)
    sets = {"ICD10 test": test}
    fin = curate_usagi_from_db(conn, sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz", seed=seed)
    sets["finomop_lab test"] = fin.parts["test"]
    sets["finomop_lab dev"] = fin.parts["dev"]
    for name in ("amstel_lab", "amstel_drug"):
        us = curate_usagi_from_db(conn, sample_dir() / "benchmark" / f"{name}.dev.usagi.csv.gz", seed=seed)
        sets[f"{name} (dev half)"] = us.parts["dev"] + us.parts["test"]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--icd10", type=int, default=500, help="ICD10 test-part sources (a seeded sample; 0: all)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    ap.add_argument("--config", action="append", choices=list(CONFIGS), help="only these configurations")
    ap.add_argument("--sets", action="append", help="only the sets whose name starts with this")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = load_settings({"data_dir": a.data_dir, "retrieval_mode": "hybrid", "reranker": "none"})
    figures: dict[str, dict[str, dict[str, float]]] = {}
    with db.connect(base.database, autocommit=True) as conn:
        sets = prepare(conn, a.seed, a.icd10)
        if a.sets:
            sets = {k: v for k, v in sets.items() if any(k.startswith(p) for p in a.sets)}
        reg = KindRegistry.from_settings(base, conn)
        for name, rows in sets.items():
            kind = KINDS.get(name.split(" ")[0])
            for vocab in {r.source_vocab for r in rows}:
                if kind:
                    reg.declare(conn, vocab, kind, declared_by="kind_text_figures")
        print("sets:", ", ".join(f"{k} ({len(v)})" for k, v in sets.items()), flush=True)
        print(f"load before: {os.getloadavg()}", flush=True)
        for cfg_name, overrides in CONFIGS.items():
            if a.config and cfg_name not in a.config:
                continue
            s = load_settings({"data_dir": a.data_dir, "retrieval_mode": "hybrid", "reranker": "none", **overrides})
            t0 = time.perf_counter()
            with Pipeline.from_settings(conn, s) as pipe:
                for name, rows in sets.items():
                    r = run_set(pipe, rows, s, progress=False, set_path=name)
                    figures.setdefault(name, {})[cfg_name] = {**r["overall"], "rows": r["rows"]}
            print(f"{cfg_name}: {time.perf_counter() - t0:.0f}s", flush=True)
        print(f"load after: {os.getloadavg()}", flush=True)
    lines = ["| set | rows | configuration | recall@50 | top-1 | top-5 | MRR |", "|---|---|---|---|---|---|---|"]
    for name, by_cfg in figures.items():
        for cfg_name, m in by_cfg.items():
            lines.append(f"| {name} | {m['rows']} | {cfg_name} | {m['recall']:.3f} | {m['top1']:.3f} | "
                         f"{m['top5']:.3f} | {m['mrr']:.3f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "kind_text_figures.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
