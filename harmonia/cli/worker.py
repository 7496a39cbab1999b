"""Queue commands: `harmonia enqueue`, `harmonia worker`, `harmonia status`, `harmonia queue prune`."""

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
queue_app = typer.Typer(help="The work queue: retention.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


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
    from harmonia.pipeline.worker import DatabaseUnavailable, Worker, run_until_signalled
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
    except DatabaseUnavailable as exc:  # after worker_db_patience_s: the items in hand are reclaimed later
        w.close()
        fail(f"worker {w.owner}: {exc}")
    w.close()
    if as_json:
        print(json.dumps(stats.to_dict()))
    else:
        print(f"worker {stats.owner} done: claimed={stats.claimed} approved={stats.approved} "
              f"in_review={stats.in_review} failed={stats.failed} retried={stats.retried} "
              f"deferred={stats.deferred} taken_over={stats.taken_over} poison={stats.poison} "
              f"lost_lease={stats.lost_lease} batches={stats.batches} breaker_pauses={stats.breaker_pauses} "
              f"db_outages={stats.db_outages} in {stats.seconds:.1f}s")
    sys.stdout.flush()


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """The queue by state, throughput, the oldest unfinished item, live workers (heartbeat), the review queue by
    reason, the LLM provider's recent error rate, map counts."""
    from harmonia.store.queue import status as queue_status

    s = settings()
    with connect(s) as conn:
        st = queue_status(conn)
    if as_json:
        print(json.dumps(st, indent=1, default=str))
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
    workers = st["live_workers"]
    if workers:
        w = Table(title=f"live workers ({len(workers)})")
        for col in ("worker", "state", "holding", "heartbeat", "claimed", "finished", "deferred", "db outages"):
            w.add_column(col)
        for x in workers:
            ws = x["stats"]
            w.add_row(x["owner"], x["state"], str(x["holding"]), f"{x['heartbeat_age_s']:.0f}s ago",
                      str(ws.get("claimed", 0)), str(ws.get("finished", 0)), str(ws.get("deferred", 0)),
                      str(ws.get("db_outages", 0)))
        console.print(w)
    else:
        console.print("live workers: none")
    p = st["pending_after"]
    console.print(f"leases: {st['held_by_live_workers']} item(s) held by live workers, "
                  f"{st['held_by_silent_workers']} by workers without a heartbeat (reclaimed when the lease "
                  f"expires), {st['expired_leases']} expired; pending again after a failure: {p['failure']}, "
                  f"a provider failure: {p['provider_failure']}, a worker death: {p['worker_death']} "
                  f"({p['in_back_off']} waiting out a back-off)")
    for m, pe in st["provider"].items():
        rate = "no calls" if pe["error_rate"] is None else f"{pe['error_rate']:.0%} errors"
        kinds = ", ".join(f"{k} {n}" for k, n in pe["by_kind"].items())
        console.print(f"LLM provider, last {m} min: {pe['calls']} calls, {rate}" + (f" ({kinds})" if kinds else ""))
    r = st["review_queue"]
    reasons = ", ".join(f"{k} {n}" for k, n in st["review_by_reason"].items()) or "none"
    console.print(f"review queue: {r['open']} open, {r['flagged']} flagged, {r['resolved']} resolved; "
                  f"unresolved by reason: {reasons}; concept map: {st['concept_map']:,} maps")


@queue_app.command("prune")
def prune(finished_days: float = typer.Option(None, "--finished-days",
                                              help="Finished queue rows older than this (default: "
                                                   "worker_prune_finished_days; negative: keep)."),
          llm_call_days: float = typer.Option(None, "--llm-call-days",
                                              help="LLM call-log rows older than this (default: "
                                                   "worker_prune_llm_call_days; negative: keep)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Count what would go; delete nothing."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete old finished queue rows (approved; in review or failed once resolved) and old LLM call-log rows, in
    small batches. Concept maps, their history and the review queue are never pruned."""
    from dataclasses import asdict

    from harmonia.store.queue import prune as prune_rows

    s = settings()
    fd = s.worker.prune_finished_days if finished_days is None else finished_days
    ld = s.worker.prune_llm_call_days if llm_call_days is None else llm_call_days
    with connect(s) as conn:
        n = prune_rows(conn, fd, ld, dry_run=dry_run)
    if as_json:
        print(json.dumps({**asdict(n), "dry_run": dry_run, "finished_days": fd, "llm_call_days": ld}))
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {n.queue_rows:,} finished queue rows (older than {fd:g} days) and {n.llm_calls:,} LLM "
                  f"call-log rows (older than {ld:g} days); forgot {n.workers} silent workers")
