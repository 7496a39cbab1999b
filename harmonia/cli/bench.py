"""`harmonia bench curate | run | calibrate`: the acceptance benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import bench_app, connect, declare_kinds, fail, settings
from harmonia.config import Settings
from harmonia.groundtruth import DEFAULT_SEED
from harmonia.pipeline.run import Pipeline

console = Console()
GATE_EXIT_CODE = 3  # distinct from 1 (error) and 2 (usage) so CI can tell a failed gate apart


def _bench_dir(s: Settings, out: Path | None) -> Path:
    return out if out is not None else s.data_path / "bench"


# -------------------------------------------------------------------------------------------------- curate


@bench_app.command("curate")
def curate(seed: int = typer.Option(DEFAULT_SEED, help="Seed of the dev/test split and of the sampling."),
           out: Path = typer.Option(None, help="Output folder (default: <data_dir>/bench)."),
           per_vocab: int = typer.Option(500, help="Most sources per source vocabulary in each part of the "
                                                   "'Maps to' set (0: all). Usagi sets are kept whole."),
           vocabulary: list[str] = typer.Option(None, "--vocabulary",
                                                help="Only sources of this vocabulary_id (repeatable)."),
           usagi: list[Path] = typer.Option(None, "--usagi", help="External ground truth: a Usagi CSV (approved "
                                                                  "rows; .gz OK). Repeatable."),
           maps_to: bool = typer.Option(True, "--maps-to/--no-maps-to",
                                        help="Curate the set from the vocabulary's own 'Maps to' rows."),
           name: str = typer.Option("maps_to", help="Name of the 'Maps to' set (files NAME.dev.csv, NAME.test.csv)."),
           ) -> None:
    """Build dev/test benchmark sets from 'Maps to' ground truth (and Usagi files) as CSV."""
    from harmonia.evaluation.curate import CuratedSet, curate_maps_to_from_db, curate_usagi_from_db
    from harmonia.groundtruth import GroundTruthError, write_set
    from harmonia.store import vocab as vocab_store

    s = settings()
    out_dir = _bench_dir(s, out)
    sets: list[CuratedSet] = []
    with connect(s) as conn:
        if vocab_store.counts(conn)["concept"] == 0:
            fail("no vocabulary loaded: run `harmonia vocab load DIR` (or `harmonia quickstart`) first")
        try:
            if maps_to:
                sets.append(curate_maps_to_from_db(conn, seed=seed, per_vocab=per_vocab or None,
                                                   vocabularies=vocabulary or None, name=name))
            sets.extend(curate_usagi_from_db(conn, path, seed=seed) for path in usagi or [])
        except GroundTruthError as exc:
            fail(str(exc))
    if not sets:
        fail("nothing to curate: --maps-to is off and no --usagi file was given")
    t = Table(title=f"benchmark sets (seed {seed}) in {out_dir}")
    for col in ("file", "rows", "same name", "multi-target", "per source vocabulary"):
        t.add_column(col)
    for cs in sets:
        for part, rows in cs.parts.items():
            path = write_set(rows, out_dir / f"{cs.name}.{part}.csv")
            p = cs.summary[part]
            biggest = sorted(p["per_vocab"].items(), key=lambda kv: -kv[1])
            more = f" +{len(biggest) - 3} more" if len(biggest) > 3 else ""
            t.add_row(path.name, str(p["rows"]), str(p["same_name"]), str(p["multi_target"]),
                      ", ".join(f"{k}={v}" for k, v in biggest[:3]) + more)
        summary_path = out_dir / f"{cs.name}.summary.json"
        summary_path.with_suffix(".tmp").write_text(json.dumps(cs.summary, indent=1))
        summary_path.with_suffix(".tmp").replace(summary_path)
        if "rows_dropped_no_valid_target" in cs.summary:
            console.print(f"{cs.name}: {cs.summary['sources_read']} source codes read; "
                          f"{cs.summary['rows_dropped_no_valid_target']} dropped (no target is a valid standard "
                          f"concept of the loaded vocabulary), {cs.summary['targets_dropped_not_in_vocabulary']} "
                          "such targets dropped")
    console.print(t)
    console.print("'same name': sources whose name equals a target's name (flag same_name=1 in the CSV); "
                  "`bench run --exclude-same-name` scores the rest only.")


# ----------------------------------------------------------------------------------------------------- run


def _make_pipeline(conn: psycopg.Connection, s: Settings, use_cache: bool) -> Pipeline:
    from harmonia.rerank.llm.reranker import LLMReranker

    pipe = Pipeline.from_settings(conn, s)
    if not use_cache and isinstance(pipe.reranker, LLMReranker):
        pipe.reranker.use_cache = False  # ask afresh (and do not overwrite the cache)
    return pipe


@bench_app.command("run")
def run(set_path: Path = typer.Argument(..., help="A set CSV written by `bench curate`."),
        reranker: str = typer.Option(None, help="none | llm | classifier (default: the reranker setting)."),
        max_rows: int = typer.Option(None, help="Only the first N rows (sets are shuffled: a random sample)."),
        concurrency: int = typer.Option(None, help="LLM calls in flight (default: llm_concurrency)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Ask the LLM afresh instead of using its cache."),
        out: Path = typer.Option(None, help="Output folder (default: <data_dir>/bench/runs)."),
        gate: str = typer.Option(None, help="dev | hard: exit with code 3 when the set misses that gate."),
        exclude_same_name: bool = typer.Option(False, help="Skip sources whose name equals a target's name."),
        batch_size: int = typer.Option(None, help="Rows per pipeline call (default: 32, or 4x concurrency)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
        kind: str = typer.Option(None, help="The set's kind (labs, drugs, ...): declared for its source "
                                            "vocabularies, so retrieval, calibration and guards use it."),
        ) -> None:
    """Run the real pipeline over a set (nothing is persisted) and report top-1, top-5, MRR, recall@K."""
    from harmonia.evaluation.run import check_gate, markdown, run_set, write_result
    from harmonia.groundtruth import GroundTruthError, read_set
    from harmonia.retrieval.base import RetrievalError

    if gate is not None and gate not in ("dev", "hard"):
        fail(f"--gate {gate!r}: use dev or hard")
    s = settings(reranker=reranker, llm_concurrency=concurrency)
    try:
        rows = read_set(set_path)
    except GroundTruthError as exc:
        fail(str(exc))
    if exclude_same_name:
        rows = [r for r in rows if not r.same_name]
    if max_rows:
        rows = rows[:max_rows]
    if not rows:
        fail(f"{set_path}: no rows to run")
    with connect(s) as conn:
        declare_kinds(conn, s, [r.source_vocab for r in rows], kind)
        try:
            pipe = _make_pipeline(conn, s, use_cache=not no_cache)
        except RetrievalError as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - no key, no checkpoint, bad provider: one clear line
            fail(f"cannot start the {s.rerank.kind} reranker: {type(exc).__name__}: {exc}")
        with pipe:
            result = run_set(pipe, rows, s, batch_size=batch_size or max(32, 4 * s.llm.concurrency),
                             progress=progress, set_path=str(set_path))
    result["exclude_same_name"] = exclude_same_name
    stem = set_path.name.removesuffix(".gz").removesuffix(".csv") + f".{s.rerank.kind}"
    json_path, md_path = write_result(result, out if out is not None else _bench_dir(s, None) / "runs", stem)
    print(markdown(result))
    console.print(f"results: {json_path} (every row), {md_path}")
    if gate:
        failed = check_gate(result, gate, s.benchmark)
        if failed:
            typer.secho(f"gate {gate} FAILED: " + "; ".join(failed), fg=typer.colors.RED, err=True)
            raise typer.Exit(GATE_EXIT_CODE)
        console.print(f"gate {gate} passed")


# ----------------------------------------------------------------------------------------------- calibrate


@bench_app.command("calibrate")
def calibrate(run_json: list[Path] = typer.Argument(..., help="Result JSONs written by `bench run` on development "
                                                              "parts, all with one reranker version."),
              target: float = typer.Option(None, help="Auto-approved precision to certify (default: "
                                                      "bench_target_precision, 0.98)."),
              alpha: float = typer.Option(0.05, help="1 - confidence level of the lower bound (0.05: 95%)."),
              write: bool = typer.Option(True, "--write/--no-write",
                                         help="Store the calibrator in the data directory and the thresholds in the "
                                              "database (--no-write: only report)."),
              out: Path = typer.Option(None, help="Folder for the table and plots (default: next to the first run)."),
              check: list[Path] = typer.Option(None, "--check", help="Another run (e.g. a test part) to report the "
                                                                     "calibration on. Repeatable."),
              ) -> None:
    """Fit the reranker's calibrator (evidence -> P(first choice right), cross-fitted) and certify per kind of
    source the smallest threshold whose 95% lower bound on precision reaches the target."""
    from harmonia.evaluation.calibrate import (
        CalibrationError,
        as_point,
        calibrate_runs,
        check_run,
        choice_markdown,
        plot,
        store,
    )

    s = settings()
    target = s.benchmark.target_precision if target is None else target
    if not 0.0 < target < 1.0:
        fail(f"--target {target}: must be in (0, 1)")
    if not 0.0 < alpha < 0.5:
        fail(f"--alpha {alpha}: must be in (0, 0.5)")

    def read(path: Path) -> dict:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"{path}: cannot read a bench run result ({exc})")
        if not isinstance(result, dict) or not isinstance(result.get("rows_detail"), list):
            fail(f"{path}: not a `bench run` result (no rows_detail)")
        return result

    results = [read(p) for p in run_json]
    try:
        cal = calibrate_runs(results, target=target, alpha=alpha)
    except CalibrationError as exc:
        fail(str(exc))
    out_dir = out if out is not None else run_json[0].parent
    stem = run_json[0].name.removesuffix(".json")
    md = choice_markdown(cal)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.calibration.md").write_text(md)
    (out_dir / f"{stem}.calibration.json").write_text(json.dumps({
        "calibrator": cal.calibrator.to_json(), "reranker_version": cal.reranker_version, "target": target,
        "alpha": alpha, "runs": [str(p) for p in run_json], "skipped": cal.skipped,
        "kinds": {k: {"rows": v.rows, "approvable": v.approvable, "choice": v.choice.to_dict(),
                      "reliability": v.reliability} for k, v in cal.kinds.items()}}, indent=1))
    for k in cal.kinds.values():
        plot(k.points, k.reliability, as_point(k), target, out_dir / f"{stem}.{k.kind}.calibration.png",
             title=f"{k.kind} - {cal.reranker_version}, {k.rows} rows (out-of-fold probabilities)")
    print(md)
    console.print(f"table: {out_dir / (stem + '.calibration.md')}; plots: {out_dir}/{stem}.<kind>.calibration.png")
    floor = s.router.auto_approve_threshold
    thresholds = {k: (max(v.choice.threshold, floor) if v.choice.threshold is not None else None)
                  for k, v in cal.kinds.items()}
    for path in check or []:
        for kind, c in sorted(check_run(read(path), cal.calibrator, thresholds).items()):
            prec = f"precision {c['right'] / c['approved']:.3f}" if c["approved"] else "nothing approved"
            console.print(f"on {path.name}, {kind}: {c['approved']} of {c['rows']} auto-approved "
                          f"({c['approved'] / c['rows']:.1%}), {c['right']} right ({prec})", markup=False)
    if write:
        with connect(s) as conn:
            cal_path = store(conn, cal, s.data_path)
        console.print(f"calibrator {cal.calibrator.hash} written to {cal_path}; thresholds for "
                      f"{', '.join(cal.kinds) or 'no kind'} stored for `{cal.reranker_version}`", markup=False)
