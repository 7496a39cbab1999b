"""`harmonia llm`: try the configured provider on one text, and report calls, tokens and cost from the call log."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import app, connect, fail, settings

if TYPE_CHECKING:
    import psycopg

    from harmonia.config import Settings

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
    from harmonia.rerank.llm.providers import ProviderError, get_provider
    from harmonia.rerank.llm.reranker import LLMReranker

    s = settings()
    p = Prompt.load(s.llm.prompt_version)
    print(f"prompts: {resource_dir('prompts') / p.version}")
    try:
        rr = LLMReranker(s.llm, get_provider(s.llm), top_n=s.rerank.top_n, prompt=p)
    except ProviderError as exc:  # no key here: still show the folder and hash
        print(f"model_version: llm:{s.llm.provider}/{s.llm.model}@?:prompt={p.version}-{p.hash} ({exc})")
        return
    with rr:
        print(f"model_version: {rr.model_version}")


def price_table(s: Settings) -> dict[str, tuple[float, float]]:
    """llm_prices as {model: (input, output) per million tokens}; the configured model falls back to
    llm_price_input/output_per_mtok."""
    table: dict[str, tuple[float, float]] = {}
    for entry in s.llm.prices:
        model, _, prices = entry.partition("=")
        inp, _, out = prices.partition("/")
        try:
            table[model.strip()] = (float(inp), float(out))
        except ValueError:
            fail(f"setting 'llm_prices': {entry!r} is not MODEL=INPUT/OUTPUT (per million tokens)")
    table.setdefault(s.llm.model, (s.llm.price_input_per_mtok, s.llm.price_output_per_mtok))
    return table


@llm_app.command("stats")
def stats(since: str = typer.Option(None, help="Only calls at or after this date or time (e.g. 2026-11-22).")
          ) -> None:
    """Calls, failures (errors and schema violations), tokens, latency and cost per model from the call log, each
    model at its own price (llm_prices)."""
    from datetime import datetime

    from harmonia.store import llm as llm_store

    if since is not None:
        try:
            since = datetime.fromisoformat(since).isoformat()
        except ValueError:
            fail(f"--since {since!r} is not a date or time (e.g. 2026-11-22 or 2026-11-22T08:00)")
    s = settings()
    prices = price_table(s)
    with connect(s) as conn:
        rows = llm_store.call_stats(conn, since)
    total = 0.0
    unpriced = []
    for st in rows:
        price = prices.get(st["model"])
        if price is None:
            unpriced.append(st["model"])
            cost_text = "unpriced (add it to llm_prices)"
        else:
            cost = (st["input_tokens"] * price[0] + st["output_tokens"] * price[1]) / 1e6
            total += cost
            cost_text = f"cost ${cost:,.4f} at ${price[0]:g}/${price[1]:g} per million input/output tokens"
        console.print(f"{st['provider']}/{st['model']}: calls {st['calls']} (failed {st['errors']}, of which "
                      f"schema violations {st['schema_violations']}), input tokens {st['input_tokens']:,}, "
                      f"output tokens {st['output_tokens']:,}, mean latency {st['mean_latency_ms']:.0f} ms, "
                      f"{cost_text}", markup=False)
    calls = sum(r["calls"] for r in rows)
    failed = sum(r["errors"] for r in rows)
    console.print(f"total: calls {calls} (failed {failed}), cost ${total:,.4f}"
                  + (f" plus unpriced models {', '.join(unpriced)}" if unpriced else ""), markup=False)


def _call_id(conn: psycopg.Connection, ref: str) -> int:
    """A call id from a reference: 123 / c123 / call:123 (a call), a123 / d123 / decision:123 (an answer row of
    harmonia.llm_answer), or CODE@VOCAB (the newest answer for that source code)."""
    from harmonia.store import llm as llm_store

    low = ref.strip().lower()
    for prefix in ("call:", "c"):
        if low.startswith(prefix) and low[len(prefix):].isdigit():
            return int(low[len(prefix):])
    if low.isdigit():
        return int(low)
    answer = None
    for prefix in ("decision:", "answer:", "d", "a"):
        if low.startswith(prefix) and low[len(prefix):].isdigit():
            answer = llm_store.get_answer(conn, int(low[len(prefix):]))
            break
    else:
        if "@" in ref:
            code, _, vocab = ref.rpartition("@")
            answer = llm_store.latest_answer(conn, code, vocab)
        else:
            fail(f"{ref!r} is not a call id (123, c123), an answer id (d123) or CODE@VOCAB")
    if answer is None:
        fail(f"no LLM answer {ref!r} in the answer log")
    call_id = answer["call_id"] or (answer["call_ids"][-1] if answer["call_ids"] else None)
    if call_id is None:
        fail(f"answer {answer['id']} has no logged call (its log connection was down)")
    return int(call_id)


def _summary(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(answer, dict):
        return None
    ranked = answer.get("ranked")
    ranked = ranked if isinstance(ranked, list) else []
    return {"ranked": [r.get("concept_id") for r in ranked if isinstance(r, dict)],
            "confidence": answer.get("confidence"), "no_match": answer.get("no_match"),
            "equivalence": answer.get("equivalence"),
            "additional": [a.get("concept_id") for a in answer.get("additional") or [] if isinstance(a, dict)]}


@llm_app.command("replay")
def replay(ref: str = typer.Argument(..., help="A call id (123), an answer id (d123) or CODE@VOCAB."),
           offline: bool = typer.Option(False, "--offline", help="Re-validate the stored answer; send nothing."),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Re-send a logged request to the configured provider (or, --offline, re-validate the stored answer against
    the prompt's schema) and show what differs from the logged answer."""
    from harmonia.rerank.llm.prompt import Prompt
    from harmonia.rerank.llm.providers import ProviderError, get_provider
    from harmonia.rerank.llm.reranker import request_sha256
    from harmonia.store import llm as llm_store

    s = settings()
    with connect(s) as conn:
        call_id = _call_id(conn, ref)
        call = llm_store.get_call(conn, call_id)
        if call is None:
            fail(f"no call {call_id} in the call log")
        try:
            p = Prompt.load(call["prompt_version"])
        except FileNotFoundError:
            fail(f"call {call_id} used prompt {call['prompt_version']!r}, which this installation does not have")
        out: dict[str, Any] = {"call_id": call_id, "source": f"{call['source_code']}@{call['source_vocab']}",
                               "provider": call["provider"], "model": call["model"], "server": call["server"],
                               "mode": call["mode"], "logged_error": call["error_kind"],
                               "prompt": f"{call['prompt_version']}-{call['prompt_hash']}"}
        notes = []
        if p.hash != call["prompt_hash"]:
            notes.append(f"the prompt folder {p.version} changed since (hash now {p.hash})")
        stored = call["answer"]
        out["logged"] = _summary(stored)
        messages = call["request"]["messages"]
        if offline:
            out["problem"] = p.problem(stored, "(no answer was logged)")
            out["valid_now"] = out["problem"] is None
        else:
            cfg = s.llm
            cfg.provider, cfg.model = call["provider"], call["model"]
            try:
                provider = get_provider(cfg)
            except (ProviderError, ValueError) as exc:
                fail(f"cannot replay: {exc}")
            try:
                if call["server"] and provider.server != call["server"]:
                    notes.append(f"sent to {provider.server}, logged from {call['server']}")
                sha = request_sha256(provider, p, messages)
                out["same_request"] = sha == call["request_sha256"]
                try:
                    resp = provider.call(p.system, messages, p.schema, p.tool_name, p.tool_description)
                except ProviderError as exc:
                    fail(f"replay of call {call_id} failed: {type(exc).__name__}: {exc}")
                llm_store.log_call(conn, llm_store.CallRecord(
                    provider=provider.name, model=provider.model, prompt_version=p.version, prompt_hash=p.hash,
                    source_code=call["source_code"], source_vocab=call["source_vocab"],
                    payload_sha256=call["payload_sha256"], attempt=call["attempt"],
                    request={"messages": messages, "tool": p.tool_name, "replay_of": call_id},
                    response=resp.raw, input_tokens=resp.input_tokens, output_tokens=resp.output_tokens,
                    server=provider.server, sampling=provider.sampling(), request_sha256=sha, mode=resp.mode,
                    answer=resp.tool_input))
            finally:
                provider.close()
            out["replayed"] = _summary(resp.tool_input)
            out["replayed_mode"] = resp.mode
            out["problem"] = p.problem(resp.tool_input, resp.text)
            logged, now = out["logged"] or {}, out["replayed"] or {}
            out["differs"] = sorted(k for k in set(logged) | set(now) if logged.get(k) != now.get(k))
        out["notes"] = notes
    if as_json:
        print(json.dumps(out, indent=1, default=str))
        return
    for k, v in out.items():
        console.print(f"{k}: {v}", markup=False)
