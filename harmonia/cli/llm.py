"""`harmonia llm`: try the configured provider on one text, and report calls, tokens and cost from the call log."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import app, connect, fail, settings

console = Console()
llm_app = typer.Typer(help="The LLM reranker: try the provider, prompt version, call log and costs.",
                      no_args_is_help=True)
app.add_typer(llm_app, name="llm")


@llm_app.command("check")
def check(text: str = typer.Argument(..., help="Source text to map."),
          code: str = typer.Option("check", help="Source code to send with it."),
          source_vocab: str = typer.Option("local", help="Its vocabulary."),
          no_cache: bool = typer.Option(False, "--no-cache", help="Call the provider even on a cache hit."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Retrieve candidates for TEXT and rerank them with the configured provider; print what it said."""
    from harmonia.domain import SourceTerm
    from harmonia.embedding.model import Embedder
    from harmonia.pipeline.confidence import Calibration
    from harmonia.pipeline.run import route_calibrated
    from harmonia.rerank.llm.providers import ProviderFatal
    from harmonia.rerank.llm.reranker import LLMReranker
    from harmonia.retrieval import RetrievalError, make_retriever

    s = settings()
    with connect(s) as conn:
        try:
            with make_retriever(conn, Embedder.from_settings(s), s) as retriever:
                cands = retriever.search(text)
            rr = LLMReranker.from_settings(s, conn, use_cache=not no_cache)
        except (RetrievalError, ProviderFatal, ValueError) as exc:
            fail(str(exc))
        term = SourceTerm(code, source_vocab, text)
        with rr:
            result = rr.safe_rerank(term, cands)
        cal = Calibration.load(conn, s.data_path, rr.name, rr.model_version)
    d = route_calibrated(term, cands, result, cal, s.router.auto_approve_threshold, s.rerank.top_n)
    if as_json:
        print(json.dumps({"action": d.action, "reason": d.reason, **d.ranking_json()}, indent=1, default=str))
        return
    console.print(f"{d.model_version}: {d.action} ({d.reason}), confidence {d.confidence:.2f}, usage {d.usage}",
                  markup=False)
    if d.error:
        console.print(f"error: {d.error}", markup=False, style="red")
    if result.details:
        console.print(f"details: {result.details}", markup=False)
    t = Table()
    for col in ("#", "concept_id", "name", "domain", "vocabulary", "score", "rationale"):
        t.add_column(col)
    for i, r in enumerate(d.ranking, 1):
        t.add_row(str(i), str(r["concept_id"]), r["concept_name"], r["domain_id"], r["vocabulary_id"],
                  f"{r['score']:.2f}", r["rationale"])
    console.print(t)


@llm_app.command("prompt")
def prompt() -> None:
    """The prompt folder in use, its hash and the model_version decisions will carry."""
    from harmonia.paths import resource_dir
    from harmonia.rerank.llm.prompt import Prompt

    s = settings()
    p = Prompt.load(s.llm.prompt_version)
    print(f"prompts: {resource_dir('prompts') / p.version}")
    print(f"model_version: llm:{s.llm.provider}/{s.llm.model}:prompt={p.version}-{p.hash}")


@llm_app.command("stats")
def stats(since: str = typer.Option(None, help="Only calls at or after this timestamp (e.g. 2026-11-22).")) -> None:
    """Calls, failures, tokens, latency and estimated cost from the call log."""
    from harmonia.store import llm as llm_store

    s = settings()
    with connect(s) as conn:
        st = llm_store.call_stats(conn, since)
    cost = (st["input_tokens"] * s.llm.price_input_per_mtok + st["output_tokens"] * s.llm.price_output_per_mtok) / 1e6
    console.print(f"calls {st['calls']} (failed {st['errors']}), input tokens {st['input_tokens']:,}, "
                  f"output tokens {st['output_tokens']:,}, mean latency {st['mean_latency_ms']:.0f} ms, "
                  f"cost ${cost:,.4f} at ${s.llm.price_input_per_mtok:g}/${s.llm.price_output_per_mtok:g} "
                  "per million input/output tokens", markup=False)
