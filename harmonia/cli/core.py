"""Foundation commands: db, embed, search, map, export, config, quickstart (vocab: harmonia.cli.vocab)."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from harmonia import db
from harmonia.cli.app import app, config_app, connect, db_app, declare_kinds, embed_app, fail, read_sources, settings
from harmonia.config import Settings, docs_markdown, setting_specs
from harmonia.domain import SourceTargets
from harmonia.pipeline.run import MapSummary, Pipeline
from harmonia.store import migrations

console = Console()


# ------------------------------------------------------------------------------------------------------ db


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations (idempotent)."""
    s = settings()
    with db.connect(s.database, autocommit=True) as conn:
        applied = migrations.migrate(conn)
        console.print(f"applied {len(applied)} migration(s): {', '.join(applied) or '-'}; "
                      f"{len(migrations.applied(conn))} recorded")


@db_app.command("url")
def db_url() -> None:
    """Print the connection URL (starting the embedded server if needed)."""
    print(db.database_url(settings().database))


@db_app.command("status")
def db_status() -> None:
    """Server, migrations and row counts."""
    from harmonia.store import mapping
    from harmonia.store import server as server_store
    from harmonia.store import vocab as vocab_store

    s = settings()
    with connect(s) as conn:
        version = server_store.server_version(conn)
        ext = server_store.extension_version(conn, "vector")
        console.print(f"server: {version.split(',')[0]}; pgvector {ext or 'missing'}")
        console.print(f"embedded: {not s.database.url} (data dir {s.data_path})")
        console.print(f"migrations: {', '.join(migrations.applied(conn))}")
        console.print(f"vocabulary: {vocab_store.counts(conn)}")
        console.print(f"maps: {mapping.summary_counts(conn)}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server."""
    s = settings()
    if s.database.url:
        fail("database_url is set: Harmonia does not manage that server")
    stopped = db.stop_embedded(s.data_path / "pgdata")
    console.print("stopped" if stopped else "not running")


# --------------------------------------------------------------------------------------------------- embed


@embed_app.callback(invoke_without_command=True)
def embed(ctx: typer.Context,
          all_vocabularies: bool = typer.Option(False, "--all", help="Every valid standard concept."),
          batch_size: int = typer.Option(None, help="Concepts per batch (default: embedding_batch_size)."),
          model: str = typer.Option(None, help="Model name or path (default: embedding_model)."),
          progress: bool = typer.Option(True)) -> None:
    """Embed every valid standard concept of the configured vocabularies that lacks a current embedding."""
    if ctx.invoked_subcommand is not None:
        return
    from harmonia.embedding.ingest import embed_concepts
    from harmonia.embedding.model import Embedder

    s = settings(embedding_model=model)
    embedder = Embedder.from_settings(s)
    with connect(s) as conn:
        r = embed_concepts(conn, embedder, vocabularies=None if all_vocabularies else s.embedding.vocabularies,
                           batch_size=batch_size or s.embedding.batch_size, progress=progress, retrieval=s.retrieval)
    console.print(f"model {r.model} ({r.dim}-d): embedded {r.written:,} concepts in {r.batches} batches, "
                  f"{r.seconds:.1f}s ({r.rate:,.0f}/s); {r.total:,} in the index; {r.deleted} stale removed")


# -------------------------------------------------------------------------------------------------- search


@app.command()
def search(text: str = typer.Argument(..., help="Source text to look up."),
           k: int = typer.Option(None, "-k", help="How many (default: retrieval_top_k)."),
           domain: list[str] = typer.Option(None, "--domain", help="Only this domain_id (repeatable)."),
           vocabulary: list[str] = typer.Option(None, "--vocabulary", help="Only this vocabulary_id."),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the top-K standard concepts for a text."""
    from harmonia.embedding.model import Embedder
    from harmonia.retrieval import RetrievalError, make_retriever

    s = settings()
    with connect(s) as conn:
        try:
            r = make_retriever(conn, Embedder.from_settings(s), s)
        except RetrievalError as exc:
            fail(str(exc))
        with r:
            t0 = time.perf_counter()
            cands = r.search(text, k or s.retrieval.top_k, domains=domain or None, vocabularies=vocabulary or None)
            ms = (time.perf_counter() - t0) * 1000
    if as_json:
        print(json.dumps([c.to_dict() for c in cands], indent=1))
        return
    t = Table(title=f"{text!r}: {len(cands)} candidates ({ms:.0f} ms, incl. encoding)")
    for col in ("#", "concept_id", "name", "domain", "vocabulary", "class", "score"):
        t.add_column(col)
    for i, c in enumerate(cands, 1):
        t.add_row(str(i), str(c.concept_id), c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id,
                  f"{c.similarity:.3f}")
    console.print(t)


# ----------------------------------------------------------------------------------------------------- map


@app.command("map")
def map_file(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV of source codes (Usagi "
                                                                               "columns)."),
             source_vocab: str = typer.Option("local", help="Source vocabulary when the file has no column."),
             kind: str = typer.Option(None, help="The set's kind (diagnosis, procedure, labs, drugs, admission, "
                                                 "microbiology, ... or one of the configuration's [kinds]): "
                                                 "declared for its source vocabularies and kept."),
             reranker: str = typer.Option(None, help="none | llm | classifier (default: the setting)."),
             progress: bool = typer.Option(True)) -> None:
    """Map a file of source codes: retrieve -> rerank -> route -> persist; prints a reconciling summary."""
    from harmonia.pipeline.run import map_terms

    s = settings(reranker=reranker)
    src = read_sources(path, source_vocab)
    with connect(s) as conn:
        declare_kinds(conn, s, [t.source_vocab for t in src.terms] or [source_vocab], kind)
    with connect(s) as conn, _pipeline(conn, s) as pipe:
        summary = MapSummary(input_rows=src.rows, skipped_invalid=len(src.problems), duplicates=src.duplicates)
        map_terms(conn, pipe, src.terms, summary=summary, progress=progress,
                  fail_after=s.llm.fail_after if s.rerank.kind == "llm" else 0)
    _print_summary(summary, s.rerank.kind)
    if not summary.reconciles:
        fail("summary does not reconcile with the input count")
    if summary.stopped:  # fail fast: one line, the rest left pending, exit 3
        fail(f"{summary.stopped}; {summary.untouched} codes left untouched (not mapped, not in review)", code=3)
    if summary.errors:
        fail(f"{summary.errors} codes went to review with errors ({dict(summary.error_kinds)})", code=2)


def _quickstart_calibrate(conn: psycopg.Connection, pipe: Pipeline, s: Settings, rows: int, seed: int) -> None:
    """Calibrate the pipeline's reranker on `rows` development-part ICD10 sources (as `bench run` + `bench
    calibrate` would) and give the pipeline the result."""
    from harmonia.evaluation.calibrate import CalibrationError, calibrate_runs, choice_markdown, store
    from harmonia.evaluation.run import run_set
    from harmonia.groundtruth import maps_to_sources
    from harmonia.pipeline.confidence import Calibration

    dev = maps_to_sources(conn, ["ICD10"], part="dev")
    random.Random(seed).shuffle(dev)
    result = run_set(pipe, dev[:rows], s, set_path="ICD10 'Maps to' development part")
    try:
        cal = calibrate_runs([result], target=s.benchmark.target_precision)
    except CalibrationError as exc:
        console.print(f"no calibration ({exc}): nothing will be auto-approved", markup=False)
        return
    store(conn, cal, s.data_path)
    print(choice_markdown(cal))
    pipe.calibration = Calibration.load(conn, s.data_path, pipe.reranker.name, pipe.reranker.model_version)


def _pipeline(conn: psycopg.Connection, s: Settings) -> Pipeline:
    """The configured pipeline, or a clear error (no API key, no checkpoint, nothing embedded) and exit 1."""
    from harmonia.rerank.classifier.checkpoint import CheckpointError
    from harmonia.rerank.llm.providers.base import ProviderError
    from harmonia.retrieval.base import RetrievalError

    try:
        return Pipeline.from_settings(conn, s)
    except (ProviderError, RetrievalError, CheckpointError, ValueError) as exc:
        fail(f"cannot build the {s.rerank.kind!r} pipeline: {exc}")


def _print_summary(summary: MapSummary, reranker: str) -> None:
    console.print(
        f"input rows {summary.input_rows} = approved {summary.approved} + to review {summary.review} "
        f"(of which errors {summary.errors}) + already mapped {summary.already_mapped} "
        f"+ invalid rows skipped {summary.skipped_invalid} + duplicates {summary.duplicates}"
        + (f" + left untouched {summary.untouched}" if summary.untouched else "")
        + f"   [reranker={reranker}; reasons: {dict(summary.reasons)}]", markup=False)  # [..] is not rich markup


# -------------------------------------------------------------------------------------------------- export


@app.command("export")
def export(fmt: str = typer.Option("usagi", "--format", help="usagi | stcm"),
           output: Path = typer.Option(None, "--output", "-o", help="File to write (default: stdout)."),
           source_vocab: str = typer.Option(None, help="Only this source vocabulary."),
           status: list[str] = typer.Option(None, "--status", help="Usagi: the statuses to write (repeatable; "
                                                                  "default APPROVED; 'all': every code, a full "
                                                                  "Usagi save file). STCM: always APPROVED.")) -> None:
    """Write maps as a Usagi CSV (one row per target) or a SOURCE_TO_CONCEPT_MAP CSV (every MAPS_TO target)."""
    from harmonia.export import FORMATS, export_csv
    from harmonia.store.mapping import STATUSES

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}")
    wanted = [s.upper() for s in status or ["APPROVED"]]
    bad = [s for s in wanted if s not in (*STATUSES, "ALL")]
    if bad:
        fail(f"--status {bad[0]}: choose from {', '.join(STATUSES)} or all")
    with connect() as conn:
        # the statuses were checked against STATUSES above
        text = export_csv(conn, fmt, source_vocab, None if "ALL" in wanted else wanted)  # type: ignore[arg-type]
    if output:
        output.write_text(text)
        console.print(f"wrote {text.count(chr(10)) - 1} rows to {output}")
    else:
        sys.stdout.write(text)


# -------------------------------------------------------------------------------------------------- config


@config_app.command("show")
def config_show() -> None:
    """Every setting, its value and where the value came from."""
    s = settings()
    console.print(f"config file: {s.config_file}")
    t = Table()
    for col in ("setting", "value", "from"):
        t.add_column(col)
    for spec in setting_specs():
        v = s.get(spec.key)
        if "key" in spec.key and v and "env" not in spec.key:
            v = "***"
        t.add_row(spec.key, str(v), s.sources.get(spec.key, ""))
    console.print(t)


@config_app.command("set")
def config_set(key: str = typer.Argument(..., help="A setting's flat key (e.g. retrieval_top_k) or section.field."),
               value: str = typer.Argument(..., help="Its value (lists comma-separated).")) -> None:
    """Write one setting into the configuration file (the flat form, which every version reads)."""
    from harmonia.config import ConfigError, spec_for, write_settings

    try:
        spec = spec_for(key)
        s = settings(**{spec.key: value})  # checked like any other source: a bad value changes nothing
        path = write_settings({spec.key: s.get(spec.key)}, Path(s.config_file) if s.config_file else None)
    except ConfigError as exc:
        fail(str(exc))
    console.print(f"{spec.key} = {s.get(spec.key)!r} written to {path}", markup=False)


@config_app.command("docs")
def config_docs(output: Path = typer.Option(None, "-o")) -> None:
    """Write the settings reference (docs/configuration.md)."""
    text = docs_markdown()
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


# ---------------------------------------------------------------------------------------------- quickstart


_RERANKER_NOTE = {
    "none": "reranker=none: retrieval order, cosine similarity as confidence; works offline. Set reranker=llm "
            "(with an API key or a local Ollama) or train the local classifier (`harmonia reranker train`, then "
            "reranker=classifier) for better rankings.",
    "llm": "reranker=llm: each term's 50 candidates go to the configured LLM provider through a forced tool call.",
    "classifier": "reranker=classifier: the local fine-tuned cross-encoder scores the 50 candidates (offline).",
}


def sample_ground_truth(conn: psycopg.Connection, n: int, seed: int, vocabularies: list[str]
                        ) -> dict[tuple[str, str], SourceTargets]:
    """n source concepts of the benchmark's test part with 'Maps to' targets (any target counts), for scoring the
    quickstart only: nothing trained, tuned or remembered has seen them. Keyed by (source_code, source_vocab)."""
    from harmonia.groundtruth import maps_to_sources

    sources = maps_to_sources(conn, vocabularies, part="test")  # by source concept_id
    order = list(range(len(sources)))
    random.Random(seed).shuffle(order)
    return {sources[i].key: sources[i] for i in order[:n]}


@app.command()
def quickstart(n: int = typer.Option(200, help="How many sample ICD10 terms to map."),
               seed: int = typer.Option(42),
               show: int = typer.Option(8, help="How many terms to print with their top candidates."),
               reload: bool = typer.Option(False, help="Reload the bundled vocabulary even if one is loaded."),
               reranker: str = typer.Option(None, help="none | llm | classifier (default: the setting)."),
               retrieval: str = typer.Option("hybrid", help="Retrieval mode for this run: vector | lexical | "
                                             "hybrid (with the mapping memory)."),
               calibrate_rows: int = typer.Option(3000, help="ICD10 development-part sources the reranker is "
                                                             "calibrated on before mapping (0: keep the stored "
                                                             "calibration, if any).")) -> None:
    """The main job on the bundled sample: migrate, load, embed, remember the development part's mappings,
    calibrate on development-part ICD10 sources, map sample ICD10 terms of the test part, score them."""
    from harmonia.domain import SourceTerm
    from harmonia.embedding.ingest import embed_concepts
    from harmonia.embedding.model import Embedder
    from harmonia.groundtruth import known_mappings
    from harmonia.paths import sample_dir
    from harmonia.pipeline.run import map_terms
    from harmonia.retrieval.memory import build_memory
    from harmonia.store import memory as mem_store
    from harmonia.store import vocab as vocab_store
    from harmonia.vocabulary import load_vocabulary

    s = settings(reranker=reranker, retrieval_mode=retrieval)
    t_start = time.perf_counter()
    console.rule("1. database")
    with connect(s) as conn:
        console.print(f"{'external server' if s.database.url else 'embedded PostgreSQL + pgvector'} ready; "
                      f"migrations: {len(migrations.applied(conn))} applied")
        console.rule("2. vocabulary")
        counts = vocab_store.counts(conn)
        if counts["concept"] == 0 or reload:
            r = load_vocabulary(conn, sample_dir() / "vocab")
            console.print(f"loaded {r.total_rows:,} rows in {r.seconds:.1f}s from {r.directory}")
            if s.retrieval.lexical_generator == "bm25":
                from harmonia.retrieval.bm25 import build_index

                ix = build_index(conn, s)
                console.print(f"BM25 lexical index: {ix.documents:,} names and synonyms in {ix.seconds:.1f}s")
        else:
            console.print(f"vocabulary already loaded ({counts['concept']:,} concepts); --reload to load again")
        console.rule("3. embeddings")
        embedder = Embedder.from_settings(s)
        er = embed_concepts(conn, embedder, vocabularies=s.embedding.vocabularies, batch_size=s.embedding.batch_size,
                            retrieval=s.retrieval)
        console.print(f"{embedder.key}: {er.written:,} new, {er.total:,} embedded concepts")
        if s.retrieval.mode == "hybrid":
            console.rule("3b. mapping memory")
            if not mem_store.count(conn, embedder.key):
                maps = known_mappings(conn, s.embedding.vocabularies)
                mr = build_memory(conn, embedder, s, maps)
                console.print(f"remembered {mr.rows:,} mapped sources of the development part in {mr.seconds:.0f}s")
            else:
                console.print(f"{sum(mem_store.count(conn, embedder.key).values()):,} mapped sources remembered "
                              "(`harmonia memory build` rebuilds)")
        console.rule(f"4. map {n} ICD10 terms (reranker={s.rerank.kind})")
        console.print(_RERANKER_NOTE.get(s.rerank.kind, ""))
        truth = sample_ground_truth(conn, n, seed, ["ICD10"])
        terms = [SourceTerm(source_code=e.source_code, source_vocab=e.source_vocab, source_text=e.source_text)
                 for e in truth.values()]
        with _pipeline(conn, s) as pipe:
            if calibrate_rows:
                console.rule(f"4a. calibrate on {calibrate_rows} ICD10 development-part sources")
                _quickstart_calibrate(conn, pipe, s, calibrate_rows, seed)
            console.rule(f"4b. map {n} ICD10 test-part terms")
            summary = map_terms(conn, pipe, terms, summary=MapSummary(input_rows=len(terms)), skip_existing=False)
    hits1 = hits5 = recall = 0
    for i, d in enumerate(summary.decisions):
        targets = truth[d.term.key].targets
        top = [r["concept_id"] for r in d.ranking]
        ok1 = bool(top) and top[0] in targets
        hits1 += ok1
        hits5 += any(t in targets for t in top[:5])
        recall += any(c.concept_id in targets for c in d.candidates)
        if i < show:
            t = Table(title=f"{d.term.source_code} {d.term.source_text!r} -> {d.action} "
                            f"(confidence {d.confidence:.2f}, {d.reason})", title_justify="left")
            for col in ("#", "concept_id", "name", "domain", "vocabulary", "score", "truth"):
                t.add_column(col)
            for j, entry in enumerate(d.ranking[:3], 1):
                t.add_row(str(j), str(entry["concept_id"]), entry["concept_name"], entry["domain_id"],
                          entry["vocabulary_id"], f"{entry['score']:.3f}",
                          "✔" if entry["concept_id"] in targets else "")
            console.print(t)
    m = len(summary.decisions) or 1
    console.rule("5. results")
    _print_summary(summary, s.rerank.kind)
    approved = [d for d in summary.decisions if d.action == "approve"]
    right = sum(1 for d in approved if d.concept_id in truth[d.term.key].targets)
    console.print(f"[bold]auto-approved {len(approved)} of {len(summary.decisions)} test-part terms, {right} of "
                  f"them right" + (f" (precision {right / len(approved):.3f})" if approved else "") + "[/bold]; "
                  "the rest wait for a reviewer (`harmonia serve`)")
    console.print(f"[bold]top-1 {hits1 / m:.3f}   top-5 {hits5 / m:.3f}   recall@{s.retrieval.top_k} "
                  f"{recall / m:.3f}[/bold]   on {m} ICD10 -> standard 'Maps to' sources "
                  f"(test part; retrieval={s.retrieval.mode}, reranker={s.rerank.kind}, model {embedder.key})")
    console.print(f"finished in {time.perf_counter() - t_start:.0f}s. Next: `harmonia search \"text\"`, "
                  "`harmonia map codes.csv`, `harmonia export --format usagi`.")
