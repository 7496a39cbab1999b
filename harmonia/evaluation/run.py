"""Running the real pipeline (retrieve -> rerank -> route) over a benchmark set and scoring it.

Nothing is persisted into concept_map: the benchmark only calls Pipeline.decide. The pipeline sees the source
code, vocabulary and text of a row and nothing else, so it cannot read the row's own 'Maps to' edges.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmonia.domain import SourceTargets, SourceTerm
from harmonia.metrics import RowScore, aggregate, aggregate_by, score_row

if TYPE_CHECKING:
    from harmonia.config import BenchmarkSettings, LLMSettings, Settings
    from harmonia.pipeline.run import Pipeline

INPUT_TOKEN_KEYS = ("input_tokens", "prompt_tokens")
OUTPUT_TOKEN_KEYS = ("output_tokens", "completion_tokens")


def _tokens(usage: dict[str, Any], keys: Sequence[str]) -> int:
    return int(next((usage[k] for k in keys if isinstance(usage.get(k), int | float)), 0))


def _from_cache(usage: dict[str, Any]) -> bool:
    """Whether an answer came from the LLM cache (then it cost nothing)."""
    if usage.get("cache_hit") or usage.get("cached"):
        return True
    hits = usage.get("cache_hits")
    return isinstance(hits, int | float) and hits > 0 and hits >= usage.get("calls", 1)


def usage_summary(usages: Sequence[dict[str, Any]], n_rows: int, llm: LLMSettings) -> dict[str, Any]:
    """Tokens actually paid for (cache hits excluded) and the cost per 1,000 rows at the configured prices."""
    paid_in = paid_out = all_in = all_out = hits = calls = 0
    for u in usages:
        i, o = _tokens(u, INPUT_TOKEN_KEYS), _tokens(u, OUTPUT_TOKEN_KEYS)
        calls += int(u.get("calls", 1 if (i or o) else 0) or 0)
        if _from_cache(u):
            hits += 1
            cached = u.get("cached_usage")
            first: dict[str, Any] = cached if isinstance(cached, dict) else {}
            all_in += _tokens(first, INPUT_TOKEN_KEYS) or i  # what the cached answer cost when it was asked
            all_out += _tokens(first, OUTPUT_TOKEN_KEYS) or o
        else:
            all_in += i
            all_out += o
            paid_in += i
            paid_out += o
    cost = (paid_in * llm.price_input_per_mtok + paid_out * llm.price_output_per_mtok) / 1e6
    per_k = 1000.0 / n_rows if n_rows else 0.0
    return {"rows_from_cache": hits, "calls": calls, "input_tokens": paid_in, "output_tokens": paid_out,
            "input_tokens_incl_cached": all_in, "output_tokens_incl_cached": all_out, "cost": round(cost, 6),
            "input_tokens_per_1k_rows": round(paid_in * per_k, 1),
            "output_tokens_per_1k_rows": round(paid_out * per_k, 1),
            "cost_per_1k_rows": round(cost * per_k, 6),
            "prices_per_mtok": {"input": llm.price_input_per_mtok, "output": llm.price_output_per_mtok}}


def run_set(pipeline: Pipeline, rows: Sequence[SourceTargets], s: Settings, *, batch_size: int = 32,
            progress: bool = True, set_path: str = "") -> dict[str, Any]:
    """Decide every row, score it, and return the whole result (what goes into the JSON file). `s`: the settings
    the pipeline was built from, recorded with the result."""
    from tqdm import tqdm

    per_row: list[dict[str, Any]] = []
    scored: list[tuple[SourceTargets, RowScore]] = []
    trained = pipeline.reranker.trained_sources
    usages: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tqdm(total=len(rows), unit="row", desc=f"bench {s.rerank.kind}", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            terms = [SourceTerm(source_code=r.source_code, source_vocab=r.source_vocab, source_text=r.source_text)
                     for r in batch]
            for r, d in zip(batch, pipeline.decide(terms), strict=True):
                ranked = [x["concept_id"] for x in d.ranking]
                sc = score_row(ranked, [c.concept_id for c in d.candidates], r.targets)
                scored.append((r, sc))
                usages.append(d.usage or {})
                per_row.append({
                    "source_concept_id": r.source_concept_id, "source_code": r.source_code,
                    "source_vocab": r.source_vocab, "source_text": r.source_text, "source_domain": r.source_domain,
                    "targets": r.targets, "same_name": r.same_name, "top5": ranked[:5],
                    "confidence": d.confidence, "action": d.action, "reason": d.reason, "error": d.error,
                    "hit1": sc.hit1, "hit5": sc.hit5, "rr": sc.rr, "rank": sc.rank, "recall": sc.recall,
                    "retrieved": len(d.candidates), "usage": d.usage or {},
                    # the reranker learnt from this source: `bench calibrate` never fits on it
                    "trained_on": bool(trained) and f"{r.source_vocab}:{r.source_code}" in (trained or ()),
                    # kind, evidence, raw confidence: what `bench calibrate` fits the calibrator on
                    "calibration": d.calibration})
            bar.update(len(batch))
    seconds = time.perf_counter() - t0
    n = len(per_row)
    result: dict[str, Any] = {
        "set": set_path, "reranker": s.rerank.kind, "model_version": pipeline.reranker.model_version,
        "embedding_model": pipeline.retriever.embedder.key if pipeline.retriever.embedder else "",
        "retrieval_mode": s.retrieval.mode,
        "retrieval_top_k": s.retrieval.top_k, "rerank_top_n": s.rerank.top_n,
        "auto_approve_threshold": s.router.auto_approve_threshold, "rows": n,
        "reranker_training_sources": "unknown" if trained is None else len(trained), "seconds": round(seconds, 3),
        "rows_per_s": round(n / seconds, 3) if seconds > 0 else None,
        "overall": aggregate([sc for _, sc in scored]).to_dict(),
        # same-name sources are easy for retrieval: the figures without them, reported separately
        "same_name_rows": sum(r.same_name for r, _ in scored),
        "overall_excluding_same_name": aggregate([sc for r, sc in scored if not r.same_name]).to_dict(),
        "per_vocab": {k: v.to_dict() for k, v in aggregate_by(scored, lambda r: r.source_vocab).items()},
        "per_domain": {k: v.to_dict() for k, v in aggregate_by(scored, lambda r: r.source_domain or "-").items()},
        "errors": sum(1 for r in per_row if r["error"]),
        "auto_approved": sum(1 for r in per_row if r["action"] == "approve"),
        "rows_detail": per_row,
    }
    if s.rerank.kind == "llm":
        result["llm"] = usage_summary(usages, n, s.llm) | {"provider": s.llm.provider, "model": s.llm.model}
    return result


def markdown(result: dict[str, Any]) -> str:
    k = result.get("retrieval_top_k", 50)
    head = [f"Benchmark `{result['set']}` — reranker `{result['reranker']}` ({result['model_version']}), "
            f"{result['rows']} rows, {result['rows_per_s']} rows/s.", "",
            f"| group | n | top-1 | top-5 | MRR | recall@{k} |", "|---|---:|---:|---:|---:|---:|"]

    def line(name: str, a: dict[str, Any]) -> str:
        return f"| {name} | {a['n']} | {a['top1']:.3f} | {a['top5']:.3f} | {a['mrr']:.3f} | {a['recall']:.3f} |"

    body = [line("**overall**", result["overall"])]
    if result.get("same_name_rows"):
        body.append(line(f"without the {result['same_name_rows']} same-name rows",
                         result["overall_excluding_same_name"]))
    body += [line(f"vocab {v}", a) for v, a in result["per_vocab"].items()]
    body += [line(f"domain {d}", a) for d, a in result["per_domain"].items()]
    tail = []
    if "llm" in result:
        u = result["llm"]
        tail = ["", f"LLM {u['provider']}/{u['model']}: {u['calls']} calls, {u['rows_from_cache']} rows from cache; "
                    f"per 1,000 rows {u['input_tokens_per_1k_rows']:.0f} input + {u['output_tokens_per_1k_rows']:.0f} "
                    f"output tokens, cost {u['cost_per_1k_rows']:.4f} at {u['prices_per_mtok']['input']}/"
                    f"{u['prices_per_mtok']['output']} per million tokens."]
    return "\n".join(head + body + tail) + "\n"


def check_gate(result: dict[str, Any], gate: str, cfg: BenchmarkSettings) -> list[str]:
    """Failed gate conditions (empty: passed). 'dev' for the development-type sets, 'hard' for harder sets."""
    limits = {"dev": (cfg.gate_dev_top1, cfg.gate_dev_top5), "hard": (cfg.gate_hard_top1, cfg.gate_hard_top5)}
    if gate not in limits:
        raise ValueError(f"unknown gate {gate!r}: dev or hard")
    top1_min, top5_min = limits[gate]
    o = result["overall"]
    failed = []
    if o["top1"] < top1_min:
        failed.append(f"top-1 {o['top1']:.3f} < {top1_min:.2f} (bench_gate_{gate}_top1)")
    if o["top5"] < top5_min:
        failed.append(f"top-5 {o['top5']:.3f} < {top5_min:.2f} (bench_gate_{gate}_top5)")
    return failed


def write_result(result: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """The JSON (every row) and the Markdown table, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{stem}.json", out_dir / f"{stem}.md")
    for path, text in zip(paths, (json.dumps(result, indent=1, default=str), markdown(result)), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths
