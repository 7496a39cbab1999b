"""Queue commands: `harmonia enqueue`, `harmonia worker`, `harmonia status`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import app, connect, declare_kinds, fail, read_sources, settings

console = Console(width=200)


@app.command()
def enqueue(path: Path = typer.Argument(..., exists=True, dir_okay=False,
                                        help="CSV of source codes (Usagi columns: sourceCode, sourceName, ...)."),
            source_vocab: str = typer.Option("local", help="Source vocabulary when the file has no column."),
            kind: str = typer.Option(None, help="The set's kind (labs, drugs, ...), declared for its source "
                                                "vocabularies before the workers route them.")) -> None:
    """Add source codes to the work queue (codes already queued are skipped); workers pick them up."""
    from harmonia.pipeline.worker import enqueue as enqueue_terms

    s = settings()
    src = read_sources(path, source_vocab)
    with connect(s) as conn:
        declare_kinds(conn, s, [t.source_vocab for t in src.terms] or [source_vocab], kind)
        counts = enqueue_terms(conn, src.terms)
    console.print(f"{src.rows} rows: {counts.new} queued, {counts.duplicate} already in the queue, "
                  f"{src.duplicates} repeated in the file, {len(src.problems)} invalid rows skipped")


@app.command()
def worker(concurrency: int = typer.Option(None, "--concurrency", "-c",
                                           help="LLM calls in flight (default: llm_concurrency)."),
           batch: int = typer.Option(None, "--batch", "-b", help="Items claimed per batch (default: "
                                                                "worker_batch_size)."),
           drain: bool = typer.Option(False, "--drain", help="Exit when nothing is pending or leased."),
           max_items: int = typer.Option(None, "--max-items", help="Exit after claiming this many items."),
           reranker: str = typer.Option(None, help="none | llm | classifier (default: the setting)."),
           as_json: bool = typer.Option(False, "--json", help="Print the final counts as JSON.")) -> None:
    """Drain the queue: claim, retrieve -> rerank -> route, persist. SIGTERM/Ctrl-C finish the items in hand."""
    from harmonia.pipeline.worker import Worker, run_until_signalled
    from harmonia.retrieval.base import RetrievalError

    s = settings(llm_concurrency=concurrency, reranker=reranker)
    if batch is not None and batch < 1:
        fail("--batch must be at least 1")
    logging.getLogger("harmonia.pipeline.worker").setLevel(logging.INFO)
    try:
        w = Worker.from_settings(s, batch_size=batch, drain=drain, max_items=max_items)
    except RetrievalError as exc:
        fail(str(exc))
    typer.echo(f"worker {w.owner} started (reranker={s.rerank.kind}, batch={w.batch_size}, "
               f"llm_concurrency={s.llm.concurrency}, lease={w.lease_s:g}s)", err=True)
    try:
        stats = run_until_signalled(w)
    finally:
        w.close()
    if as_json:
        print(json.dumps(stats.to_dict()))
    else:
        print(f"worker {stats.owner} done: claimed={stats.claimed} approved={stats.approved} "
              f"in_review={stats.in_review} failed={stats.failed} retried={stats.retried} "
              f"lost_lease={stats.lost_lease} batches={stats.batches} in {stats.seconds:.1f}s")
    sys.stdout.flush()


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """The queue by state, throughput over the last minutes, the oldest unfinished item, review and map counts."""
    from harmonia.store.queue import status as queue_status

    s = settings()
    with connect(s) as conn:
        st = queue_status(conn)
    if as_json:
        print(json.dumps(st, indent=1))
        return
    t = Table(title="queue")
    t.add_column("state")
    t.add_column("items", justify="right")
    for state, n in st["queue"].items():
        t.add_row(state, f"{n:,}")
    console.print(t)
    console.print("throughput: " + ", ".join(
        f"{st['throughput_per_min'][m]:.1f}/min over the last {m} min" for m in st["throughput_per_min"]))
    o = st["oldest_unfinished"]
    if o:
        console.print(f"oldest unfinished: {o['source_vocab']} {o['source_code']} enqueued {o['enqueued_at']} "
                      f"({o['age_s']:.0f}s ago, {o['attempts']} attempts)")
    else:
        console.print("oldest unfinished: none (queue drained)")
    console.print(f"leases: {st['workers_holding_leases']} worker(s) holding items, {st['expired_leases']} expired; "
                  f"{st['pending_retries']} pending after a failed attempt")
    r = st["review_queue"]
    console.print(f"review queue: {r['open']} open, {r['flagged']} flagged, {r['resolved']} resolved; "
                  f"concept map: {st['concept_map']:,} maps")
