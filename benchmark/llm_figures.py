"""LLM reranker figures that need no real provider:

1. call size: characters of the system prompt, the tool definition and the user message for 50 candidates, over
   random sets of 50 standard concepts from the bundled sample vocabulary (the compact candidate format);
2. concurrency: wall time of `rerank_many` over N codes against the local stub (benchmark/stub_llm_server.py,
   OpenAI wire format, each answer delayed --delay s) for several llm_concurrency values, with the rate limiter
   off and on.

3. map throughput: `stream_decisions` (what `harmonia map` runs: a bounded pool fed one code at a time) over
   --map-codes codes against a stub answering in --map-delay s, at llm_concurrency --map-concurrency, in one
   process (retrieval replaced by fixed candidate lists; persisting is not timed).

    python benchmark/llm_figures.py [--codes 40] [--delay 0.25] [--sets 200] [--rpm 30]
                                    [--map-codes 2000 --map-delay 3 --map-concurrency 32]

--rpm adds a run at concurrency 16 under llm_requests_per_minute=RPM (with RPM < codes it takes over a minute:
the window is 60 s).

Token counts are what a provider reports; the stub's are character/4 guesses, so no token figure is printed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import statistics
import time
from collections.abc import Sequence

from stub_llm_server import serve  # sibling module: python puts the script's folder first on sys.path

from harmonia.config import load_settings
from harmonia.domain import Candidate, SourceKey, SourceTerm
from harmonia.paths import sample_dir
from harmonia.pipeline.run import Pipeline, stream_decisions
from harmonia.rerank.llm.prompt import Prompt
from harmonia.rerank.llm.reranker import LLMReranker
from harmonia.retrieval.base import Retriever


def standard_concepts() -> list[Candidate]:
    out = []
    with gzip.open(sample_dir() / "vocab" / "CONCEPT.csv.gz", "rt", encoding="utf-8") as fh:
        for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if r["standard_concept"] == "S" and not r["invalid_reason"]:
                out.append(Candidate(int(r["concept_id"]), r["concept_name"], r["domain_id"], r["vocabulary_id"],
                                     r["concept_class_id"], r["concept_code"], 0.5))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=40)
    ap.add_argument("--delay", type=float, default=0.25)
    ap.add_argument("--sets", type=int, default=200)
    ap.add_argument("--rpm", type=int, default=0, help="Also run under this requests-per-minute limit.")
    ap.add_argument("--map-codes", type=int, default=0, help="Codes for the map throughput run (0: skip).")
    ap.add_argument("--map-delay", type=float, default=3.0)
    ap.add_argument("--map-concurrency", type=int, default=32)
    ap.add_argument("--only-map", action="store_true", help="Only the map throughput run.")
    a = ap.parse_args()
    if a.only_map:
        map_throughput(a.map_codes or 2000, a.map_delay, a.map_concurrency)
        return

    server, state = serve(0, delay=a.delay, confidence=0.95)
    port = server.server_address[1]
    base = {"reranker": "llm", "llm_provider": "openai", "llm_model": "stub", "llm_api_key_env": "X_STUB_KEY",
            "llm_base_url": f"http://127.0.0.1:{port}/v1"}
    env = {"HARMONIA_CONFIG": ""}
    import os

    os.environ["X_STUB_KEY"] = "stub"
    prompt = Prompt.load("v1")
    rr = LLMReranker.from_settings(load_settings(base, env=env))
    pool = standard_concepts()
    rng = random.Random(7)
    sizes = []
    for i in range(a.sets):
        cands = rng.sample(pool, 50)
        sizes.append(len(rr.user_message(SourceTerm(f"S{i}", "ICD10", "Type 2 diabetes mellitus without "
                                                    "complications"), cands)))
    tool_chars = len(json.dumps({"name": prompt.tool_name, "description": prompt.tool_description,
                                 "input_schema": prompt.schema}))
    print(f"prompt v1-{prompt.hash}: system prompt {len(prompt.system)} chars, tool definition {tool_chars} chars")
    print(f"user message, 50 candidates ({a.sets} random sets of {len(pool):,} sample standard concepts): "
          f"mean {statistics.mean(sizes):,.0f} chars, max {max(sizes):,} chars")
    rr.close()

    items = [(SourceTerm(f"C{i}", "local", f"code {i}"), rng.sample(pool, 50)) for i in range(a.codes)]
    print(f"\nrerank_many over {a.codes} codes, stub answers in {a.delay}s each (OpenAI wire format, real SDK):")
    for conc, rpm in [(1, 0), (4, 0), (8, 0), (16, 0)] + ([(16, a.rpm)] if a.rpm else []):
        s = load_settings({**base, "llm_concurrency": conc, "llm_requests_per_minute": rpm}, env=env)
        rr = LLMReranker.from_settings(s, use_cache=False)
        before = state.requests
        t0 = time.perf_counter()
        results = rr.rerank_many(items)
        took = time.perf_counter() - t0
        rr.close()
        ok = sum(r.error is None for r in results)
        print(f"  llm_concurrency={conc:>2} requests_per_minute={rpm or 'off':>4}: {took:6.2f}s "
              f"({a.codes / took:5.1f} codes/s), {ok}/{a.codes} ok, {state.requests - before} calls, "
              f"peak in flight {state.max_in_flight}")
        state.max_in_flight = 0
    server.shutdown()
    if a.map_codes:
        map_throughput(a.map_codes, a.map_delay, a.map_concurrency)


class FixedRetriever(Retriever):
    """Retrieval replaced by fixed candidate lists (the figure is the reranker pool's, not retrieval's)."""

    def __init__(self, pool: list[Candidate], seed: int = 11) -> None:
        self.pool, self.rng = pool, random.Random(seed)

    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False,
                    source_keys: Sequence[SourceKey | None] | None = None) -> list[list[Candidate]]:
        return [self.rng.sample(self.pool, 50) for _ in texts]


def map_throughput(codes: int, delay: float, concurrency: int) -> None:
    import os

    os.environ.setdefault("X_STUB_KEY", "stub")
    server, state = serve(0, delay=delay, confidence=0.95)
    s = load_settings({"reranker": "llm", "llm_provider": "openai", "llm_model": "stub",
                       "llm_api_key_env": "X_STUB_KEY", "llm_concurrency": concurrency,
                       "llm_base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"}, env={"HARMONIA_CONFIG": ""})
    pipe = Pipeline(FixedRetriever(standard_concepts()), LLMReranker.from_settings(s, use_cache=False), s.router,
                    s.rerank)
    terms = [SourceTerm(f"M{i}", "local", f"code {i}") for i in range(codes)]
    t0 = time.perf_counter()
    ok = 0
    for d in stream_decisions(pipe, terms):
        ok += d.error is None
    took = time.perf_counter() - t0
    pipe.close()
    server.shutdown()
    ideal = codes / concurrency * delay
    print(f"\nmap throughput (stream_decisions, one process): {codes} codes, stub answers in {delay:g}s, "
          f"llm_concurrency={concurrency}: {took:.1f}s = {took / 60:.2f} min ({codes / took:.1f} codes/s; "
          f"ideal {ideal:.1f}s), {ok}/{codes} ok, {state.requests} calls, peak in flight {state.max_in_flight}")


if __name__ == "__main__":
    main()
