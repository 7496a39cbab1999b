"""Calibration across sets (issue 14 point 7): leave-one-set-out over the visible mapping sets.

    python benchmark/calibration_loso.py --data-dir DIR [--reranker none] [--reranker classifier]
                                         [--max-rows 600] [--sample 200] [--seeds 3] [--target 0.98] [--out DIR]

Sets: each 'Maps to' source vocabulary of the loaded vocabulary with at least --min-rows sources (ICD10: its test
part; the others, too small to split, both parts), the FinOMOP lab Usagi set (its test part: its development part
trained the fine-tuned embedder and, with --pairs-from, the classifier) and
the three AmsterdamUMCdb development halves (labs, drugs, admission diagnoses) in data/sample/benchmark — none of
those in the memory. Each set has a kind (SET_KINDS below). For every set and reranker the real pipeline runs once
(hybrid retrieval + memory, `bench run`'s run_set; results cached in OUT/runs) and records each row's evidence.

Then for each held-out set S, each reranker and each seed: a simulated review of a random 200-row sample of S (its
ground truth stands in for the reviewers' verdicts) joins the rows of every other set; the calibrator
(harmonia.pipeline.confidence) is fitted on those rows, and the threshold of S's kind is certified by
harmonia.pipeline.thresholds on the out-of-fold probabilities of that kind's rows (the other sets of the kind plus
S's sample) -- exactly what `harmonia bench calibrate` and a calibration from reviews do. The rest of S (never
seen by any fit) is then auto-approved at that threshold: its coverage and the precision of what was approved are
the figures. A kind whose rows certify no threshold approves nothing. One reliability diagram per set and reranker
(the held-out rows' calibrated probabilities against their accuracy) goes to OUT/loso_<set>.<reranker>.png.

Nothing here tunes anything on the held-out rows: the threshold is chosen before they are scored.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harmonia import db
from harmonia.config import load_settings
from harmonia.domain import SourceTargets
from harmonia.embedding.ingest import embed_concepts
from harmonia.embedding.model import Embedder
from harmonia.evaluation.calibrate import plot, precision_coverage, reliability
from harmonia.evaluation.curate import curate_maps_to_from_db, curate_usagi_from_db
from harmonia.evaluation.run import run_set, write_result
from harmonia.groundtruth import known_mappings
from harmonia.kinds import KindRegistry
from harmonia.paths import sample_dir
from harmonia.pipeline import confidence
from harmonia.pipeline.run import Pipeline
from harmonia.pipeline.thresholds import choose_threshold
from harmonia.rerank.classifier.checkpoint import checkpoint_from_settings, resolve_checkpoint, trained_sources
from harmonia.retrieval.memory import build_memory
from harmonia.store import memory as mem_store
from harmonia.store import migrations
from harmonia.store import vocab as vocab_store
from harmonia.vocabulary import load_vocabulary

# Each set's kind (harmonia.kinds): declared in the bench database before the runs, so retrieval searches the kind's
# domains, the guards know what a first choice may be, and the calibration is per kind.
SET_KINDS: dict[str, str] = {
    "ICD10": "diagnosis", "ICD10_dev": "diagnosis", "ICD10CM": "diagnosis", "ICD9CM": "diagnosis",
    "finomop_lab": "labs", "amstel_lab": "labs", "mimiciv_meas_lab_loinc": "labs", "mimiciv_meas_chart": "labs",
    "amstel_drug": "drugs", "mimiciv_drug_ndc": "drugs", "amstel_admission": "admission",
    "mimiciv_micro_organism": "microbiology", "UCUM": "units", "mimiciv_meas_unit": "units",
    "mimiciv_proc_datetimeevents": "procedure", "mimiciv_proc_itemid": "procedure", "mimiciv_drug_route": "routes",
}
CALIBRATION_ONLY = ("ICD10_dev",)  # development rows: calibrate with them, never measure on them
TEST_PART_ONLY = ("finomop_lab.usagi.csv.gz",)  # its development part trained the embedder (and the classifier)
USAGI = ("finomop_lab.usagi.csv.gz", "amstel_lab.dev.usagi.csv.gz", "amstel_drug.dev.usagi.csv.gz",
         "amstel_admission.dev.usagi.csv.gz")


def prepare_sets(conn: Any, seed: int, min_rows: int, max_rows: int, icd10_dev: int = 0,
                 trained: frozenset[str] = frozenset()) -> dict[str, list[SourceTargets]]:
    """name -> rows (shuffled by the curation, at most max_rows); with `icd10_dev`, also that many ICD10
    development-part sources as the set `ICD10_dev` (calibration rows only, never held out: what `bench calibrate`
    fits on before mapping ICD10)."""
    out: dict[str, list[SourceTargets]] = {}
    cs = curate_maps_to_from_db(conn, seed=seed, per_vocab=None)
    if icd10_dev:
        # never a source the classifier trained on: its confidence there says nothing about new codes
        out["ICD10_dev"] = [r for r in cs.parts["dev"] if r.source_vocab == "ICD10"
                            and f"{r.source_vocab}:{r.source_code}" not in trained][:icd10_dev]
    by_vocab: dict[str, list[SourceTargets]] = {}
    # ICD10: its test part only (the classifier trained on its development part). The other vocabularies: both
    # parts (too few sources otherwise); the memory never answers a source with itself, and their development
    # parts' other sources are remembered exactly as they are for test-part rows.
    for part in ("test", "dev"):
        for r in cs.parts[part]:
            if part == "test" or r.source_vocab != "ICD10":
                by_vocab.setdefault(r.source_vocab, []).append(r)
    for vocab, rows in sorted(by_vocab.items()):
        if len(rows) >= min_rows and vocab in SET_KINDS:
            out[vocab] = rows[:max_rows]
    for name in USAGI:
        us = curate_usagi_from_db(conn, sample_dir() / "benchmark" / name, seed=seed)
        # The lab set's development part trained the fine-tuned embedder (and a classifier trained with
        # --pairs-from): its test part only. The ICU halves: none of them is remembered or trained on.
        rows = us.parts["test"] if name in TEST_PART_ONLY else us.parts["dev"] + us.parts["test"]
        random.Random(seed).shuffle(rows)
        out[name.split(".")[0]] = rows[:max_rows]
    return out


def run_all(a: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    base = load_settings({"data_dir": a.data_dir, "retrieval_mode": "hybrid"})
    runs_dir = Path(a.out) / "runs"
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with db.connect(base.database, autocommit=True) as conn:
        migrations.migrate(conn)
        if vocab_store.counts(conn)["concept"] == 0:
            load_vocabulary(conn, sample_dir() / "vocab", progress=False)
        embedder = Embedder.from_settings(base)
        embed_concepts(conn, embedder, vocabularies=base.embedding.vocabularies,
                       batch_size=base.embedding.batch_size, progress=False, retrieval=base.retrieval)
        if not mem_store.count(conn, embedder.key):
            build_memory(conn, embedder, base, known_mappings(conn, base.embedding.vocabularies), progress=False)
        trained: frozenset[str] = frozenset()
        if "classifier" in (a.reranker or []):
            ck = resolve_checkpoint(a.checkpoint) if a.checkpoint else checkpoint_from_settings(base)
            trained = trained_sources(ck) or frozenset()
        sets = prepare_sets(conn, a.seed, a.min_rows, a.max_rows, a.icd10_dev, trained)
        reg = KindRegistry.from_settings(base, conn)
        for name, rows in sets.items():
            for vocab in {r.source_vocab for r in rows}:
                reg.declare(conn, vocab, SET_KINDS[name], declared_by="calibration_loso")
        print("sets:", ", ".join(f"{k} ({SET_KINDS[k]}, {len(v)})" for k, v in sets.items()), flush=True)
        for reranker in a.reranker or ["none"]:
            overrides: dict[str, Any] = {"data_dir": a.data_dir, "reranker": reranker, "retrieval_mode": "hybrid"}
            if reranker == "classifier" and a.checkpoint:
                overrides["classifier_checkpoint"] = a.checkpoint
            s = load_settings(overrides)
            with Pipeline.from_settings(conn, s) as pipe:
                for name, rows in sets.items():
                    path = runs_dir / f"{name}.{reranker}.json"
                    if path.exists():
                        results[(name, reranker)] = json.loads(path.read_text())
                        continue
                    r = run_set(pipe, rows, s, progress=False, set_path=name)
                    write_result(r, runs_dir, f"{name}.{reranker}")
                    results[(name, reranker)] = r
                    print(f"ran {name} {reranker}: {r['rows']} rows, top-1 {r['overall']['top1']:.3f}, "
                          f"{r['rows_per_s']} rows/s", flush=True)
    return results


def rows_of(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Approvable rows with their evidence (domain fit recomputed for the set's kind) and verdict; rows that can
    never be approved (no first choice, a fault) count in the coverage only."""
    kind = SET_KINDS[name]
    out = []
    for r in result["rows_detail"]:
        if r.get("trained_on"):  # the reranker learnt this very row: it is no new code, neither fit nor measured
            continue
        cal = r.get("calibration") or {}
        ev = cal.get("evidence")
        approvable = r.get("reason") in ("approved", "low_confidence", "uncalibrated") and bool(r.get("top5"))
        if approvable and isinstance(ev, dict):
            ev = dict(ev)
            domains = KindRegistry().kind_named(kind).domains
            if cal.get("domain") and domains:
                ev["domain_fit"] = float(cal["domain"] in domains)
        else:
            ev = None
        out.append({"set": name, "kind": kind, "key": f"{r['source_vocab']}:{r['source_code']}",
                    "ok": bool(r["hit1"]), "ev": ev})
    return out


def loso(results: dict[tuple[str, str], dict[str, Any]], reranker: str, sample: int, seeds: Sequence[int],
         target: float, out_dir: Path) -> list[dict[str, Any]]:
    sets = {name: rows_of(name, res) for (name, rr), res in results.items() if rr == reranker}
    lines = []
    for held in sets:
        if held in CALIBRATION_ONLY:
            continue
        per_seed = []
        probs_all: list[float] = []
        ok_all: list[bool] = []
        for seed in seeds:
            rows = sets[held]
            idx = list(range(len(rows)))
            random.Random(seed).shuffle(idx)
            n_rev = min(sample, len(rows) // 2)  # a small set: half of it reviewed, half measured
            reviewed = [rows[i] for i in idx[:n_rev]]
            rest = [rows[i] for i in idx[n_rev:]]
            train = [r for name, rs in sets.items() if name != held for r in rs if r["ev"] is not None]
            train += [r for r in reviewed if r["ev"] is not None]
            ev = [r["ev"] for r in train]
            ok = [r["ok"] for r in train]
            kinds = [r["kind"] for r in train]
            oof = confidence.cross_fit(ev, ok, kinds, [r["key"] for r in train], reranker, seed=seed)
            cal = confidence.fit(ev, ok, kinds, reranker)
            kind = SET_KINDS[held]
            sel = [i for i, r in enumerate(train) if r["kind"] == kind]
            choice = choose_threshold(oof[sel], [ok[i] for i in sel], target=target)
            scored = [r for r in rest if r["ev"] is not None]
            p = cal.probabilities([r["ev"] for r in scored], [kind] * len(scored)) if scored else np.zeros(0)
            probs_all += list(p)
            ok_all += [r["ok"] for r in scored]
            if choice.threshold is None:
                approved = right = 0
            else:
                mask = p >= choice.threshold
                approved = int(mask.sum())
                right = int(sum(r["ok"] for r, m in zip(scored, mask, strict=True) if m))
            per_seed.append({"seed": seed, "threshold": choice.threshold, "bound": choice.bound,
                             "rows_behind": choice.rows, "approved": approved, "right": right, "rest": len(rest),
                             "why_none": choice.reason})
        cov = [s["approved"] / s["rest"] for s in per_seed if s["rest"]]
        precs = [s["right"] / s["approved"] for s in per_seed if s["approved"]]
        calibrated = sum(s["threshold"] is not None for s in per_seed)
        line = {"set": held, "kind": SET_KINDS[held], "reranker": reranker, "rows": len(sets[held]),
                "top1": float(np.mean([r["ok"] for r in sets[held]])), "seeds": len(per_seed),
                "calibrated_seeds": calibrated, "coverage": float(np.mean(cov)) if cov else 0.0,
                "precision": float(sum(s["right"] for s in per_seed) / sum(s["approved"] for s in per_seed))
                if any(s["approved"] for s in per_seed) else math.nan,
                "worst_precision": min(precs) if precs else math.nan, "per_seed": per_seed}
        lines.append(line)
        pts = precision_coverage(probs_all, ok_all)
        plot(pts, reliability(probs_all, ok_all), None, target, out_dir / f"loso_{held}.{reranker}.png",
             title=f"{held} ({SET_KINDS[held]}) held out - reranker {reranker}, {len(probs_all)} scored rows "
                   f"over {len(seeds)} seeds")
        print(f"{reranker} {held}: coverage {line['coverage']:.3f}, precision {line['precision']:.3f}, "
              f"calibrated in {calibrated}/{len(per_seed)} seeds", flush=True)
    return lines


def table(lines: list[dict[str, Any]], target: float) -> str:
    out = ["| held-out set | kind | reranker | rows | top-1 | seeds with a threshold | auto-approved (coverage) | "
           "precision of the approved | worst seed |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in lines:
        prec = "-" if math.isnan(x["precision"]) else f"{x['precision']:.3f}"
        worst = "-" if math.isnan(x["worst_precision"]) else f"{x['worst_precision']:.3f}"
        out.append(f"| {x['set']} | {x['kind']} | {x['reranker']} | {x['rows']} | {x['top1']:.3f} | "
                   f"{x['calibrated_seeds']}/{x['seeds']} | {x['coverage']:.1%} | {prec} | {worst} |")
    approving = [x for x in lines if not math.isnan(x["precision"])]
    out.append("")
    out.append(f"Goals: precision >= {target} on every held-out set that approved anything: "
               f"{'met' if all(x['precision'] >= target for x in approving) else 'NOT met'}; never below 0.95 "
               f"(worst seed): {'met' if all(x['worst_precision'] >= 0.95 for x in approving) else 'NOT met'}.")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="embedded database (reused) and settings live here")
    ap.add_argument("--reranker", action="append", choices=["none", "classifier"], help="repeatable; default none")
    ap.add_argument("--checkpoint", help="classifier checkpoint (default: the classifier_checkpoint setting)")
    ap.add_argument("--seed", type=int, default=13, help="curation seed")
    ap.add_argument("--seeds", type=int, default=3, help="review samples per held-out set")
    ap.add_argument("--sample", type=int, default=200, help="reviewed rows of the held-out set")
    ap.add_argument("--min-rows", type=int, default=50, help="fewest sources for a 'Maps to' set")
    ap.add_argument("--max-rows", type=int, default=600, help="most rows per set")
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--icd10-dev", type=int, default=0, help="also calibrate on this many ICD10 development-part "
                                                              "sources (the ICD10 test part stays held out)")
    ap.add_argument("--out", help="default: <data-dir>/loso")
    a = ap.parse_args()
    a.out = a.out or str(Path(a.data_dir) / "loso")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results = run_all(a)
    lines = []
    for reranker in a.reranker or ["none"]:
        lines += loso(results, reranker, a.sample, range(a.seeds), a.target, Path(a.out))
    md = table(lines, a.target)
    (Path(a.out) / "loso.md").write_text(md)
    (Path(a.out) / "loso.json").write_text(json.dumps(lines, indent=1, default=str))
    print()
    print(md)


if __name__ == "__main__":
    main()
