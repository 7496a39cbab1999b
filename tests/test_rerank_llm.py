"""The LLM reranker's call log, response cache, concurrency and rate limiter (stub provider, real Postgres)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harmonia.config import Settings, load_settings
from harmonia.domain import Candidate, SourceTerm
from harmonia.rerank import make_reranker
from harmonia.rerank.llm.providers import ProviderFatal
from harmonia.rerank.llm.reranker import LLMReranker, Prompt, RateLimiter
from harmonia.retrieval.base import Retriever
from tests.conftest import make_settings
from tests.llm_stubs import AnthropicStub, OpenAIStub, Stub, candidates, good_input, user_payload

TERMS = [SourceTerm(f"C{i}", "local", f"term number {i}") for i in range(6)]


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    s = OpenAIStub(("fn", lambda req: ("tool", good_input([user_payload(req)[1][0]["id"]], 0.93))))
    yield s
    s.close()


def llm_settings(base: Settings | None, stub: OpenAIStub, tmp_path: Path, **kw: object) -> Settings:
    o = {"reranker": "llm", "llm_provider": "openai", "llm_model": "gpt-stub", "llm_base_url": stub.base_url,
         "llm_max_retries": 1, "llm_retry_max_wait_s": 0.05, "llm_timeout_s": 2.0, **kw}
    if base is None:
        return load_settings(o, env={"HARMONIA_CONFIG": "", "OPENAI_API_KEY": "sk-x"})
    return make_settings(base.database.url, tmp_path, **o)


def test_calls_are_logged_and_cache_hits_cost_no_call(settings: Settings, conn: psycopg.Connection,
                                                      stub: OpenAIStub, tmp_path: Path) -> None:
    s = llm_settings(settings, stub, tmp_path)
    rr = make_reranker(s, conn)
    assert isinstance(rr, LLMReranker) and rr.log_conn is not None
    cands = candidates(50)
    first = rr.rerank_many([(t, cands) for t in TERMS[:3]])
    assert len(stub.requests) == 3 and all(r.usage["cache_hit"] is False for r in first)
    assert all(f"prompt=v1-{Prompt.load('v1').hash}" in r.model_version for r in first)
    rows = conn.execute("SELECT source_code, attempt, input_tokens, output_tokens, latency_ms, error_kind, "
                        "request -> 'messages' -> 0 ->> 'role', response -> 'usage' ->> 'prompt_tokens', "
                        "prompt_hash FROM harmonia.llm_call ORDER BY source_code").fetchall()
    assert [r[0] for r in rows] == ["C0", "C1", "C2"]
    assert all(r[1] == 1 and r[2] == 1400 and r[3] == 100 and r[4] >= 0 and r[5] is None and r[6] == "user"
               and r[7] == "1400" and r[8] == rr.prompt.hash for r in rows)
    # the same inputs again: answered from the cache, no HTTP call, no tokens
    again = rr.rerank_many([(t, cands) for t in TERMS[:3]])
    assert len(stub.requests) == 3
    assert all(r.usage["cache_hit"] is True and r.usage["input_tokens"] == 0 for r in again)
    assert [r.ranked[0].concept_id for r in again] == [r.ranked[0].concept_id for r in first]
    assert all(r.confidence == 0.93 for r in again)
    # a different candidate list is a different input: a call
    rr.rerank(TERMS[0], cands[:10])
    assert len(stub.requests) == 4
    rr.close()
    # use_cache=False always calls the provider
    nocache = LLMReranker.from_settings(s, conn, use_cache=False)
    nocache.rerank(TERMS[0], cands)
    assert len(stub.requests) == 5
    nocache.close()
    assert conn.execute("SELECT count(*) FROM harmonia.llm_cache").fetchone()[0] == 4


def test_failed_attempts_are_logged_with_their_error(settings: Settings, conn: psycopg.Connection,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-ant-x")
    bad = AnthropicStub(("status", 503, {"retry-after": "0"}), ("tool", good_input([1000])))
    try:
        s = make_settings(settings.database.url, tmp_path, reranker="llm", llm_provider="anthropic",
                          llm_base_url=bad.base_url, llm_api_key_env="MY_KEY", llm_retry_max_wait_s=0.05)
        rr = LLMReranker.from_settings(s, conn)
        r = rr.rerank(TERMS[0], candidates(5))
        rr.close()
    finally:
        bad.close()
    assert r.error is None and r.usage["retries"] == 1 and r.usage["calls"] == 2
    rows = conn.execute("SELECT attempt, error_kind, error IS NOT NULL, response IS NULL FROM harmonia.llm_call "
                        "ORDER BY id").fetchall()
    assert rows == [(1, "server_error", True, True), (2, None, False, False)]
    # the key (from llm_api_key_env) went to the provider's auth header, and never into the log
    assert "sk-ant-x" in (bad.headers[0].get("x-api-key", "") + bad.headers[0].get("authorization", ""))
    logged = conn.execute("SELECT string_agg(request::text || coalesce(response::text, ''), '') "
                          "FROM harmonia.llm_call").fetchone()[0]
    assert "sk-ant-x" not in logged


def test_logging_failure_never_breaks_a_run(settings: Settings, conn: psycopg.Connection, stub: OpenAIStub,
                                            tmp_path: Path) -> None:
    rr = LLMReranker.from_settings(llm_settings(settings, stub, tmp_path), conn)
    conn.execute("DROP TABLE harmonia.llm_call")
    conn.execute("DROP TABLE harmonia.llm_cache")
    r = rr.rerank(TERMS[0], candidates(5))
    assert r.error is None and r.ranked[0].concept_id == 1000
    rr.log_conn.close()  # a dead connection too
    assert rr.rerank(TERMS[1], candidates(5)).error is None
    rr.close()


def test_rerank_many_runs_concurrently_in_order(tmp_path: Path) -> None:
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow(req: dict) -> tuple:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return ("tool", good_input([user_payload(req)[1][0]["id"]]))

    s = OpenAIStub(("fn", slow))
    try:
        rr = LLMReranker.from_settings(llm_settings(None, s, tmp_path, llm_concurrency=3))
        items = [(SourceTerm(f"K{i}", "local", f"t{i}"), candidates(3, start=100 * (i + 1))) for i in range(7)]
        t0 = time.monotonic()
        results = rr.rerank_many(items)
        took = time.monotonic() - t0
        rr.close()
    finally:
        s.close()
    assert [r.ranked[0].concept_id for r in results] == [100 * (i + 1) for i in range(7)]
    assert peak[0] == 3 and took < 7 * 0.2


def test_rate_limiter_spaces_requests_and_tokens() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(dt: float) -> None:
        slept.append(dt)
        now[0] += dt

    lim = RateLimiter(requests_per_minute=2, clock=lambda: now[0], sleep=sleep)
    lim.acquire(10)
    lim.acquire(10)
    assert not slept
    lim.acquire(10)  # the third request in a minute waits for the window to free a slot
    assert now[0] >= 60.0
    tok = RateLimiter(tokens_per_minute=1000, clock=lambda: now[0], sleep=sleep)
    start = now[0]
    e = tok.acquire(900)
    tok.settle(e, 300)  # the real count was smaller: room for more
    tok.acquire(600)
    assert now[0] == start
    tok.acquire(500)
    assert now[0] >= start + 60.0
    assert RateLimiter().acquire(10**9) is None  # 0 = unlimited


def test_without_a_key_the_llm_reranker_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    s = load_settings({"reranker": "llm", "llm_provider": "anthropic"}, env={"HARMONIA_CONFIG": ""})
    with pytest.raises(ProviderFatal, match="ANTHROPIC_API_KEY"):
        make_reranker(s)
    assert make_reranker(load_settings({"reranker": "none"}, env={"HARMONIA_CONFIG": ""})).model_version == "none"


def test_llm_check_and_stats_commands(fresh_db: str, stub: OpenAIStub, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harmonia.cli import app

    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_LLM_PROVIDER": "openai",
           "HARMONIA_LLM_MODEL": "gpt-stub", "HARMONIA_LLM_BASE_URL": stub.base_url, "OPENAI_API_KEY": "sk-x",
           "HARMONIA_LLM_PRICE_INPUT_PER_MTOK": "2", "HARMONIA_LLM_PRICE_OUTPUT_PER_MTOK": "10"}
    r = CliRunner().invoke(app, ["--database-url", fresh_db, "llm", "check", "Essential hypertension", "--json"],
                           env=env)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    # nothing calibrated for this model: the check shows what it would do, review (uncalibrated)
    assert (out["action"], out["reason"]) == ("review", "uncalibrated")
    assert out["confidence"] == 0.93 and len(out["ranked"]) == 1 and out["calibration"]["kind"] == "unknown"
    assert "hypertension" in out["ranked"][0]["concept_name"].lower()
    server = stub.base_url.removeprefix("http://")
    assert out["model_version"].startswith(f"llm:openai/gpt-stub@{server}:prompt=v1-")
    r = CliRunner().invoke(app, ["--database-url", fresh_db, "llm", "stats"], env=env)
    assert r.exit_code == 0, r.output
    # one call of 1400 + 100 tokens: 1400 * 2 / 1e6 + 100 * 10 / 1e6 = $0.0038
    out = " ".join(r.output.split())
    assert "openai/gpt-stub: calls 1 (failed 0, of which schema violations 0), input tokens 1,400, output " \
           "tokens 100" in out
    assert "cost $0.0038" in out and "total: calls 1 (failed 0), cost $0.0038" in out
    r = CliRunner().invoke(app, ["--database-url", fresh_db, "llm", "stats", "--since", "garbage"], env=env)
    assert r.exit_code == 1 and "--since 'garbage' is not a date" in r.output and "Traceback" not in r.output


def test_the_typed_answer_reads_what_the_v1_schema_admits() -> None:
    """The JSON Schema stays the gate; RerankAnswer names exactly its fields, and parses what it admits."""
    from harmonia.rerank.llm.prompt import RankedAnswer, RerankAnswer

    prompt = Prompt.load("v1")
    props = prompt.schema["properties"]
    assert set(props) <= set(RerankAnswer.model_fields) and set(prompt.schema["required"]) == set(props)
    assert set(Prompt.load("v2").schema["properties"]) == set(RerankAnswer.model_fields)
    assert set(props["ranked"]["items"]["properties"]) == set(RankedAnswer.model_fields)
    raw = {"ranked": [{"concept_id": 5, "score": 1, "rationale": "same"}], "confidence": 0.5, "no_match": False}
    assert prompt.validator.is_valid(raw)
    answer = prompt.parse(raw)
    assert answer.ranked[0].concept_id == 5 and answer.ranked[0].score == 1.0 and answer.confidence == 0.5
    assert not prompt.validator.is_valid({**raw, "confidence": 2})  # the schema refuses what the model would not
    assert prompt.hash == "b32e5db3"  # the v1 files are byte-identical: decisions keep their model_version


# ------------------------------------------------------------------------------------------ the evidence

def test_every_answer_links_to_its_calls_and_keeps_what_the_router_drops(settings: Settings,
                                                                         conn: psycopg.Connection,
                                                                         tmp_path: Path) -> None:
    bad = {"ranked": [{"concept_id": 1000, "score": 5, "rationale": "x"}], "confidence": 0.9, "no_match": False}
    s_ = OpenAIStub(("tool", bad), ("tool", good_input([1001])), ("tool", good_input([99999, 1002], 0.97)))
    try:
        rr = LLMReranker.from_settings(llm_settings(settings, s_, tmp_path), conn)
        ok = rr.rerank(TERMS[0], candidates(10))
        invented = rr.rerank(TERMS[1], candidates(10))
        rr.close()
    finally:
        s_.close()
    calls = conn.execute("SELECT id, error_kind, request_sha256, mode, answer -> 'confidence', server "
                         "FROM harmonia.llm_call ORDER BY id").fetchall()
    # the re-asked call is marked as a schema violation: a failure in the stats
    assert [c[1] for c in calls] == ["schema_violation", None, None] and all(c[3] == "tool" for c in calls)
    assert calls[0][2] != calls[1][2] and calls[2][5] == s_.base_url
    assert ok.usage["call_id"] == calls[1][0] and ok.usage["call_ids"] == [calls[0][0], calls[1][0]]
    assert ok.usage["request_sha256"] == calls[1][2] and ok.usage["answer_id"]
    rows = conn.execute("SELECT source_code, call_id, call_ids, outcome, confidence_reported, invented_ids "
                        "FROM harmonia.llm_answer ORDER BY id").fetchall()
    assert rows[0] == ("C0", calls[1][0], [calls[0][0], calls[1][0]], "ok", 0.95, [])
    assert rows[1] == ("C1", calls[2][0], [calls[2][0]], "invented_id", 0.97, [99999])
    assert invented.error_kind == "invented_id" and [r.concept_id for r in invented.ranked] == [1002]


def test_the_cache_key_includes_the_server_and_the_sampling(settings: Settings, conn: psycopg.Connection,
                                                            tmp_path: Path) -> None:
    a, b = (OpenAIStub(("tool", good_input([1000]))) for _ in range(2))
    try:
        for stub, kw in ((a, {}), (b, {}), (b, {"llm_temperature": 0.7})):
            rr = LLMReranker.from_settings(llm_settings(settings, stub, tmp_path, **kw), conn)
            assert rr.rerank(TERMS[0], candidates(5)).usage["cache_hit"] is False
            rr.close()
        assert (len(a.requests), len(b.requests)) == (1, 2)  # same model name, other server / sampling: a call
        rr = LLMReranker.from_settings(llm_settings(settings, b, tmp_path, llm_temperature=0.7), conn)
        assert rr.rerank(TERMS[0], candidates(5)).usage["cache_hit"] is True and "temperature=0.7" in \
            rr.model_version
        rr.close()
    finally:
        a.close()
        b.close()


def test_an_unexpected_exception_is_logged_and_keeps_the_retrieval_top_five(
        settings: Settings, conn: psycopg.Connection, stub: OpenAIStub, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rr = LLMReranker.from_settings(llm_settings(settings, stub, tmp_path), conn)

    def broken(*args: object, **kw: object) -> None:
        raise KeyError("choices")  # an SDK surprise after the HTTP call

    monkeypatch.setattr(rr.provider, "call", broken)
    r = rr.safe_rerank(TERMS[0], candidates(8))
    rr.close()
    assert r.error_kind == "reranker_exception" and "KeyError" in r.error and not r.retryable
    assert [c.concept_id for c in r.ranked] == [1000, 1001, 1002, 1003, 1004]
    row = conn.execute("SELECT error_kind, error FROM harmonia.llm_call").fetchone()
    assert row[0] == "reranker_exception" and "KeyError" in row[1]
    assert conn.execute("SELECT outcome FROM harmonia.llm_answer").fetchone()[0] == "reranker_exception"


def test_replay_resends_a_logged_request_or_revalidates_it_offline(fresh_db: str, conn: psycopg.Connection,
                                                                   tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harmonia.cli import app

    s_ = OpenAIStub(("tool", good_input([1000, 1001], 0.9)), ("tool", good_input([1001], 0.6)))
    try:
        rr = LLMReranker.from_settings(llm_settings(make_settings(fresh_db, tmp_path), s_, tmp_path), conn)
        r = rr.rerank(TERMS[0], candidates(5))
        rr.close()
        env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_LLM_PROVIDER": "openai",
               "HARMONIA_LLM_MODEL": "gpt-stub", "HARMONIA_LLM_BASE_URL": s_.base_url}
        base = ["--database-url", fresh_db, "llm", "replay"]
        out = CliRunner().invoke(app, [*base, f"d{r.usage['answer_id']}", "--offline", "--json"], env=env)
        assert out.exit_code == 0, out.output
        doc = json.loads(out.output[out.output.index("{"):])
        assert doc["valid_now"] is True and doc["logged"]["ranked"] == [1000, 1001] and len(s_.requests) == 1
        out = CliRunner().invoke(app, [*base, "C0@local", "--json"], env=env)
        assert out.exit_code == 0, out.output
        doc = json.loads(out.output[out.output.index("{"):])
        assert doc["same_request"] is True and doc["replayed"]["ranked"] == [1001]
        assert doc["differs"] == ["confidence", "ranked"] and len(s_.requests) == 2
        assert s_.requests[1]["messages"] == s_.requests[0]["messages"]
        out = CliRunner().invoke(app, [*base, "nonsense"], env=env)
        assert out.exit_code == 1 and "is not a call id" in out.output
    finally:
        s_.close()


def test_stats_price_each_model_from_the_price_table(fresh_db: str, conn: psycopg.Connection,
                                                     tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harmonia.cli import app

    s_ = OpenAIStub(("tool", good_input([1000])))
    try:
        for model in ("gpt-a", "gpt-b", "gpt-c"):
            rr = LLMReranker.from_settings(llm_settings(make_settings(fresh_db, tmp_path), s_, tmp_path,
                                                        llm_model=model), conn)
            rr.rerank(TERMS[0], candidates(5))
            rr.close()
    finally:
        s_.close()
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_LLM_MODEL": "gpt-c",
           "HARMONIA_LLM_PRICES": "gpt-a=1/10,gpt-b=2/20", "HARMONIA_LLM_PRICE_INPUT_PER_MTOK": "0",
           "HARMONIA_LLM_PRICE_OUTPUT_PER_MTOK": "0"}
    r = CliRunner().invoke(app, ["--database-url", fresh_db, "llm", "stats"], env=env)
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    # 1400 in + 100 out each: a = 0.0014 + 0.001, b = twice that, c = the configured model's flat price 0
    assert "openai/gpt-a: calls 1" in out and "cost $0.0024 at $1/$10" in out and "cost $0.0048 at $2/$20" in out
    assert "total: calls 3 (failed 0), cost $0.0072" in out


def test_prompt_v2_sends_every_piece_of_evidence(settings: Settings, conn: psycopg.Connection,
                                                  tmp_path: Path) -> None:
    v1 = Prompt.load("v1")
    assert v1.user_template is None and v1.hash == "b32e5db3"
    answer = {**good_input([4]), "equivalence": "WIDER", "additional": [
        {"concept_id": 5, "mapping_type": "MAPS_TO_VALUE", "equivalence": "EQUAL", "rationale": "the value"},
        {"concept_id": 77777, "mapping_type": "MAPS_TO", "equivalence": "EQUAL", "rationale": "invented"}]}
    s_ = OpenAIStub(("tool", answer))
    cid = conn.execute("SELECT min(concept_id) FROM vocab.concept").fetchone()[0]
    conn.execute("INSERT INTO vocab.concept_synonym (concept_id, concept_synonym_name, language_concept_id) "
                 "VALUES (%s, 'Natrium im Harn', 4182504)", (cid,))
    syn = (cid, "Natrium im Harn")
    cands = [Candidate(syn[0] if i == 1 else i + 3, f"Concept {i}", "Measurement", "LOINC", "Lab Test",
                       f"12{i}-4", 0.8 - i / 10) for i in range(3)]
    cands[2].evidence = {"memory_source": "NA-S@LAB: Natrium serum"}
    term = SourceTerm("NA-U", "LOCAL_LAB", "Natrium urine", extra={"unit": "mmol/L", "specimen": "urine"})
    try:
        rr = LLMReranker.from_settings(llm_settings(settings, s_, tmp_path, llm_prompt_version="v2"), conn)
        cands[0].concept_id, cands[2].concept_id = 4, 5
        r = rr.rerank(term, cands)
        rr.close()
    finally:
        s_.close()
    req = s_.requests[0]
    system, user = req["messages"][0]["content"], req["messages"][1]["content"]
    for rule in ("unspecified", "Laterality", "method-free", "panel", "Property from the unit", "strength",
                 "brand", "MAPS_TO_VALUE", "Worked examples", "`score`", "`confidence`", "equivalence"):
        assert rule in system, rule
    assert '"extra": {"unit": "mmol/L", "specimen": "urine"}' in user
    assert '1. {"id":4,"name":"Concept 0","code":"120-4","vocabulary":"LOINC","class":"Lab Test",' \
           '"domain":"Measurement","similarity":0.8}' in user
    assert f'2. {{"id":{syn[0]}' in user and json.dumps(syn[1], ensure_ascii=False) in user  # a synonym
    assert '"memory":{"memory_source":"NA-S@LAB: Natrium serum"}' in user and user.count("\n3. ") == 1
    params = req["tools"][0]["function"]["parameters"]["properties"]
    assert {"equivalence", "additional"} <= set(params)
    assert params["additional"]["items"]["properties"]["mapping_type"]["enum"] == ["MAPS_TO", "MAPS_TO_VALUE",
                                                                                   "MAPS_TO_UNIT"]
    # the typed answer: the first choice's equivalence, further targets among the candidates, invented ones kept
    # as evidence only
    assert r.error is None and r.equivalence == "WIDER" and r.ranked[0].concept_id == 4
    assert [(a.concept_id, a.mapping_type, a.equivalence) for a in r.additional] == [(5, "MAPS_TO_VALUE",
                                                                                       "EQUAL")]
    assert r.details["invented_ids"] == [77777] and f"prompt=v2-{Prompt.load('v2').hash}" in r.model_version


# ----------------------------------------------------------------------------- streaming map and fail-fast

class FixedRetriever(Retriever):
    """Retrieval replaced by a fixed candidate list (the subject here is the pool behind it)."""

    def __init__(self, cands: list[Candidate]) -> None:
        self.cands = cands

    def search_many(self, texts: Sequence[str], k: int | None = None, **kw: Any) -> list[list[Candidate]]:
        return [list(self.cands) for _ in texts]


def test_decisions_stream_so_one_slow_code_never_holds_the_others(tmp_path: Path) -> None:
    from harmonia.pipeline.run import Pipeline, stream_decisions

    def answer(req: dict) -> tuple:
        if user_payload(req)[0]["code"] == "SLOW":
            time.sleep(1.5)
        return ("tool", good_input([1000]))

    s_ = OpenAIStub(("fn", answer))
    try:
        s = llm_settings(None, s_, tmp_path, llm_concurrency=4)
        pipe = Pipeline(FixedRetriever(candidates(5)), LLMReranker.from_settings(s), s.router,
                        s.rerank)
        terms = [SourceTerm("SLOW", "local", "slow")] + [SourceTerm(f"F{i}", "local", f"fast {i}") for i in range(9)]
        order = [d.term.source_code for d in stream_decisions(pipe, terms, batch_size=3)]
        pipe.close()
    finally:
        s_.close()
    # the slow code came first and finished last; the nine behind it did not wait for it
    assert sorted(order) == sorted(t.source_code for t in terms) and order[-1] == "SLOW"


def test_map_stops_fast_on_a_dead_provider_and_leaves_the_rest_pending(settings: Settings,
                                                                       conn: psycopg.Connection,
                                                                       tmp_path: Path) -> None:
    from harmonia.pipeline.run import MapSummary, Pipeline, map_terms

    bad_key = OpenAIStub(("error", 401, "Incorrect API key provided"))
    try:
        s = llm_settings(settings, bad_key, tmp_path, llm_concurrency=2)
        pipe = Pipeline(FixedRetriever(candidates(5)), LLMReranker.from_settings(s, conn), s.router,
                        s.rerank)
        terms = [SourceTerm(f"K{i}", "local", f"term {i}") for i in range(40)]
        summary = map_terms(conn, pipe, terms, summary=MapSummary(input_rows=40), progress=False, fail_after=3)
        pipe.close()
    finally:
        bad_key.close()
    assert summary.stopped is not None and "3 consecutive provider failures (provider_fatal)" in summary.stopped
    assert "Incorrect API key" in summary.stopped and "\n" not in summary.stopped
    assert summary.untouched == 40 and summary.review == 0 and summary.reconciles
    assert len(bad_key.requests) < 10  # stopped, not sent everything
    assert conn.execute("SELECT count(*) FROM harmonia.review_queue").fetchone()[0] == 0
    # a run of such faults shorter than fail_after is persisted once another answer breaks it
    flaky = OpenAIStub(("error", 401, "bad key"), ("tool", good_input([1000], 0.4)))
    try:
        s = llm_settings(settings, flaky, tmp_path, llm_concurrency=1)
        pipe = Pipeline(FixedRetriever(candidates(5)),
                        LLMReranker.from_settings(s, conn, use_cache=False),
                        s.router, s.rerank)
        summary = map_terms(conn, pipe, terms[:3], summary=MapSummary(input_rows=3), progress=False, fail_after=3)
        pipe.close()
    finally:
        flaky.close()
    assert summary.stopped is None and summary.review == 3 and summary.errors == 1 and summary.untouched == 0
    assert summary.error_kinds == {"provider_fatal": 1}


def test_harmonia_map_exit_codes(fresh_db: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harmonia.cli import app

    f = tmp_path / "codes.csv"
    f.write_text("sourceCode,sourceName\n" + "".join(f"L{i},hypertension {i}\n" for i in range(8)))

    def run(stub: Stub, **env: str) -> tuple[int, str]:
        e = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_RERANKER": "llm",
             "HARMONIA_LLM_PROVIDER": "openai", "HARMONIA_LLM_MODEL": "gpt-stub", "HARMONIA_LLM_BASE_URL":
             stub.base_url, "HARMONIA_LLM_MAX_RETRIES": "0", "HARMONIA_LLM_CONCURRENCY": "1", **env}
        r = CliRunner().invoke(app, ["--database-url", fresh_db, "map", str(f), "--no-progress"], env=e)
        return r.exit_code, r.output

    dead = OpenAIStub(("tool", good_input([1])))
    dead.close()  # the server is down: connection errors
    code, out = run(dead, HARMONIA_LLM_FAIL_AFTER="2")
    assert code == 3 and "stopped after 2 consecutive provider failures (connection_error)" in out
    assert "8 codes left untouched" in " ".join(out.split())
    half = OpenAIStub(("fn", lambda req: ("status", 500) if user_payload(req)[0]["code"] in ("L1", "L2")
                       else ("tool", good_input([user_payload(req)[1][0]["id"]], 0.3))))
    try:
        code, out = run(half)
    finally:
        half.close()
    assert code == 2 and "2 codes went to review with errors ({'server_error': 2})" in out
    code, out = run(half, HARMONIA_LLM_API_KEY_FILE=str(tmp_path / "missing.key"))
    assert code == 1 and "llm_api_key_file': cannot read" in out and "Traceback" not in out
