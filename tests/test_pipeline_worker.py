"""Queue workers (issue 6) against the real embedded PostgreSQL: claiming, leases, crashes, signals, retries.

Several tests run workers in child processes (the Python API, as the CLI runs it, with a slow test reranker and a
fixed-candidate retriever so a child starts in a second or two without loading torch); the others run a worker
in this process with the real retriever.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from harmonia.domain import Candidate, RankedCandidate, RerankResult, SourceTerm
from harmonia.pipeline.confidence import Calibration
from harmonia.pipeline.run import Pipeline
from harmonia.pipeline.worker import Worker, enqueue
from harmonia.rerank.base import Reranker
from harmonia.retrieval.vector import VectorRetriever
from harmonia.store import queue as qstore
from harmonia.store import vocab as vocab_store
from tests.conftest import calibrate_as_is, make_settings

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, os, sys, time
import psycopg
from harmonia.config import load_settings
from harmonia.pipeline.confidence import Calibration
from harmonia.pipeline.run import Pipeline
from harmonia.domain import RankedCandidate, RerankResult
from harmonia.rerank.base import Reranker
from harmonia.domain import Candidate
from harmonia.pipeline.worker import Worker, run_until_signalled
from harmonia.retrieval.base import Retriever

cfg = json.loads(sys.argv[1])
s = load_settings(cfg["settings"], env={"HARMONIA_DATABASE_URL": cfg["url"], "HARMONIA_DATA_DIR": cfg["data_dir"],
                                        "HARMONIA_CONFIG": ""})
cand = Candidate(cfg["concept_id"], "fixed", "Condition", "SNOMED", "Clinical Finding", "0", 0.99)

class FixedRetriever(Retriever):
    def search_many(self, texts, k=None, **kw):
        return [[cand] for _ in texts]

class SlowReranker(Reranker):
    name = "slow-test"
    def rerank_many(self, items):
        print(json.dumps({"deciding": [t.source_code for t, _ in items]}), flush=True)
        time.sleep(cfg["delay"])
        return [RerankResult([RankedCandidate(c[0].concept_id, 0.99)], 0.99, "slow-test") for t, c in items]

cal = Calibration.load(psycopg.connect(cfg["url"], autocommit=True), s.data_path, "slow-test", "slow-test")
w = Worker.from_settings(s, pipeline=Pipeline(FixedRetriever(), SlowReranker(), s.router, s.rerank, cal),
                         batch_size=cfg["batch"], drain=True)
print(json.dumps({"ready": w.owner}), flush=True)
while cfg.get("go") and not os.path.exists(cfg["go"]):
    time.sleep(0.02)
stats = run_until_signalled(w)
w.close()
print(json.dumps({"stats": stats.to_dict()}), flush=True)
'''


# ------------------------------------------------------------------------------------------------ helpers


def sample_terms(conn: psycopg.Connection, n: int) -> list[SourceTerm]:
    seen: dict[str, SourceTerm] = {}
    for e in vocab_store.maps_to_edges(conn, ["ICD10"]):
        seen.setdefault(e.source_code, SourceTerm(source_code=e.source_code, source_vocab=e.source_vocab,
                                                  source_text=e.source_text))
        if len(seen) == n:
            break
    return list(seen.values())


def any_concept(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT concept_id FROM vocab.concept WHERE standard_concept = 'S' "
                        "AND invalid_reason IS NULL ORDER BY concept_id LIMIT 1").fetchone()[0]


def queue_rows(conn: psycopg.Connection) -> dict[str, dict]:
    rows = conn.execute("SELECT source_code, state, attempts, lease_owner, last_error FROM harmonia.source_queue")
    return {r[0]: {"state": r[1], "attempts": r[2], "owner": r[3], "error": r[4]} for r in rows}


def assert_mapped_once(conn: psycopg.Connection) -> None:
    """No code in the concept map twice, and one auto_approve in the history per approved code."""
    dup = conn.execute("SELECT source_code, count(*) FROM harmonia.concept_map GROUP BY 1, source_vocab "
                       "HAVING count(*) > 1").fetchall()
    assert dup == []
    hist = dict(conn.execute("SELECT source_code, count(*) FROM harmonia.concept_map_history "
                             "WHERE action = 'auto_approve' GROUP BY 1").fetchall())
    approved = {r[0] for r in conn.execute("SELECT source_code FROM harmonia.source_queue WHERE state = 'approved'")}
    mapped = {r[0] for r in conn.execute("SELECT source_code FROM harmonia.concept_map")}
    assert mapped == approved
    assert set(hist) == approved and set(hist.values()) <= {1}


class TopReranker(Reranker):
    """Ranks the retrieved candidates in order with confidence 0.99 (approve) or 0.5 (review) by code."""

    name = "top-test"

    def __init__(self, review_codes: set[str] = frozenset()) -> None:  # type: ignore[assignment]  # never mutated
        self.review_codes = review_codes
        self.calls = 0

    def rerank(self, term: SourceTerm, candidates: Sequence[Candidate]) -> RerankResult:
        self.calls += 1
        conf = 0.5 if term.source_code in self.review_codes else 0.99
        return RerankResult([RankedCandidate(c.concept_id, conf) for c in candidates[:5]], conf, self.name)


class FlakyReranker(Reranker):
    """Raises for every code in `always`; any other code fails its first two calls (the batch call and the
    one-by-one retry of its first attempt), then answers like TopReranker."""

    name = "flaky-test"

    def __init__(self, always: set[str]) -> None:
        self.always = always
        self.calls: dict[str, int] = {}

    def rerank_many(self, items: Sequence[tuple[SourceTerm, Sequence[Candidate]]]) -> list[RerankResult]:
        for t, _ in items:
            self.calls[t.source_code] = self.calls.get(t.source_code, 0) + 1
        for t, _ in items:
            if t.source_code in self.always:
                raise RuntimeError(f"provider exploded on {t.source_code}")
            if self.calls[t.source_code] <= 2:
                raise RuntimeError(f"transient fault on {t.source_code}")
        return [TopReranker().rerank(t, c) for t, c in items]


def make_worker(settings_url: str, tmp_path: Path, conn: psycopg.Connection, embedder, reranker: Reranker,
                calibrated: bool = True, **kw: object) -> Worker:
    """A worker whose pipeline takes the test reranker's confidence as calibrated (threshold 0.9 for diagnosis
    codes; the test rerankers answer as `top-test`), or has no calibration at all."""
    overrides = {"worker_poll_s": 0.05, "worker_lease_s": 10.0, "worker_retry_base_s": 0.05,
                 **{k: v for k, v in kw.items()
                                                                    if k.startswith("worker_")}}
    s = make_settings(settings_url, tmp_path, **overrides)
    if calibrated:
        calibrate_as_is(conn, tmp_path, reranker.name, "top-test")
    cal = Calibration.load(conn, tmp_path, reranker.name, "top-test")
    pipe = Pipeline(VectorRetriever.from_settings(conn, embedder, s), reranker, s.router, s.rerank, cal)
    rest = {k: v for k, v in kw.items() if not k.startswith("worker_")}
    return Worker.from_settings(s, pipeline=pipe, **rest)  # type: ignore[arg-type]  # the test passes typed options


def spawn_child(url: str, data_dir: Path, concept_id: int, *, delay: float, batch: int, lease_s: float = 10.0,
                go: Path | None = None) -> subprocess.Popen:
    with psycopg.connect(url) as conn:  # the child's reranker calibrated as it is (threshold 0.9)
        calibrate_as_is(conn, data_dir, "slow-test", "slow-test")
    cfg = {"url": url, "data_dir": str(data_dir), "concept_id": concept_id, "delay": delay, "batch": batch,
           "go": str(go) if go else None,
           "settings": {"worker_poll_s": 0.05, "worker_lease_s": lease_s, "worker_max_attempts": 3}}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, key: str, timeout: float = 90) -> dict:
    """Next stdout JSON line holding `key` (the child prints one line per event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]  # Popen(stdout=PIPE)
        if not line:
            raise AssertionError(f"child exited ({proc.poll()}): {proc.stderr.read()}")  # type: ignore[union-attr]  # PIPE
        msg = json.loads(line)
        if key in msg:
            return msg
    raise AssertionError(f"no {key!r} from the child in {timeout}s")


# ------------------------------------------------------------------------------------------------- tests


def test_enqueue_deduplicates_and_notifies(conn: psycopg.Connection) -> None:
    terms = sample_terms(conn, 10)
    with psycopg.connect(conn.info.dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {qstore.CHANNEL}")
        c = enqueue(conn, terms[:6] + terms[:2])
        assert (c.new, c.duplicate) == (6, 2)
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert got and got[0].channel == qstore.CHANNEL
    c = enqueue(conn, terms)
    assert (c.new, c.duplicate) == (4, 6)
    rows = queue_rows(conn)
    assert len(rows) == 10 and {r["state"] for r in rows.values()} == {"pending"}


def test_cli_enqueue_worker_status(fresh_db: str, tmp_path: Path, conn: psycopg.Connection) -> None:
    from harmonia.cli import app

    terms = sample_terms(conn, 6)
    csv = tmp_path / "codes.csv"
    lines = ["sourceCode,sourceName,sourceFrequency"] + [f"{t.source_code},\"{t.source_text}\",3" for t in terms]
    lines.insert(3, "BAD1,,4")          # line 4: empty name
    lines.append(f"{terms[0].source_code},again,1")  # repeated in the file
    csv.write_text("\n".join(lines) + "\n")
    env = {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_CONFIG": ""}
    runner = CliRunner()
    r = runner.invoke(app, ["enqueue", str(csv), "--source-vocab", "ICD10"], env=env)
    assert r.exit_code == 0, r.output
    assert "line 4: empty sourceName" in r.output
    assert "6 queued, 0 already in the queue, 1 repeated in the file, 1 invalid rows skipped" in r.output
    r = runner.invoke(app, ["enqueue", str(csv), "--source-vocab", "ICD10"], env=env)
    assert "0 queued, 6 already in the queue" in r.output

    r = runner.invoke(app, ["worker", "--drain", "--reranker", "none", "--batch", "4", "--json"], env=env)
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["claimed"] == 6 and stats["finished"] == 6 and stats["batches"] == 2

    r = runner.invoke(app, ["status", "--json"], env=env)
    st = json.loads(r.stdout)
    assert st["queue"]["pending"] == 0 and st["queue"]["in_progress"] == 0
    assert st["queue"]["approved"] + st["queue"]["in_review"] == 6
    assert st["finished_in_window"]["1"] == 6 and st["oldest_unfinished"] is None
    assert st["concept_map"] == st["queue"]["approved"]
    assert st["review_queue"]["open"] == st["queue"]["in_review"]
    r = runner.invoke(app, ["status"], env=env)
    assert r.exit_code == 0 and "throughput" in r.output and "queue drained" in r.output


def test_a_worker_without_calibration_approves_nothing(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                                       embedder) -> None:
    terms = sample_terms(conn, 6)
    enqueue(conn, terms)
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), calibrated=False, drain=True, batch_size=6)
    stats = w.run()
    w.close()
    assert (stats.claimed, stats.approved, stats.in_review) == (6, 0, 6)  # every answer 0.99 sure, none approved
    assert {r["state"] for r in queue_rows(conn).values()} == {"in_review"}
    assert conn.execute("SELECT count(*) FROM harmonia.concept_map").fetchone()[0] == 0
    assert {r[0] for r in conn.execute("SELECT reason FROM harmonia.review_queue")} == {"uncalibrated"}


def test_worker_persists_outcome_and_state(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                           embedder) -> None:
    terms = sample_terms(conn, 12)
    enqueue(conn, terms)
    review = {t.source_code for t in terms[:4]}
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(review), drain=True, batch_size=5)
    stats = w.run()
    w.close()
    assert (stats.claimed, stats.approved, stats.in_review, stats.batches) == (12, 8, 4, 3)
    rows = queue_rows(conn)
    assert {c for c, r in rows.items() if r["state"] == "in_review"} == review
    assert all(r["attempts"] == 1 and r["owner"] is None for r in rows.values())
    assert_mapped_once(conn)
    in_review = {r[0] for r in conn.execute("SELECT source_code FROM harmonia.review_queue")}
    assert in_review == review


@pytest.mark.slow
def test_several_processes_never_share_an_item(fresh_db: str, tmp_path: Path, conn: psycopg.Connection) -> None:
    terms = sample_terms(conn, 60)
    enqueue(conn, terms)
    go = tmp_path / "go"
    children = [spawn_child(fresh_db, tmp_path, any_concept(conn), delay=0.15, batch=3, go=go) for _ in range(3)]
    try:
        for ch in children:
            read_until(ch, "ready")
        go.touch()  # all three start claiming together
        seen: list[str] = []
        claimed = []
        for ch in children:
            out, err = ch.communicate(timeout=120)
            assert ch.returncode == 0, err
            msgs = [json.loads(x) for x in out.splitlines()]
            seen += [c for m in msgs if "deciding" in m for c in m["deciding"]]
            claimed.append(next(m["stats"] for m in msgs if "stats" in m)["claimed"])
    finally:
        for ch in children:
            ch.kill()
    assert sorted(seen) == sorted(t.source_code for t in terms)  # every item decided once, by one worker
    assert sum(claimed) == 60 and sum(1 for n in claimed if n) >= 2
    rows = queue_rows(conn)
    assert all(r["state"] == "approved" and r["attempts"] == 1 for r in rows.values())
    assert_mapped_once(conn)


@pytest.mark.slow
def test_sigterm_finishes_items_in_hand_and_sigkill_loses_nothing(fresh_db: str, tmp_path: Path,
                                                                   conn: psycopg.Connection, embedder) -> None:
    terms = sample_terms(conn, 30)
    enqueue(conn, terms)
    cid = any_concept(conn)
    # Killed mid-item: its batch stays leased to it until the lease expires; then another worker reclaims it.
    victim = spawn_child(fresh_db, tmp_path, cid, delay=60, batch=4, lease_s=60)
    victim_owner = read_until(victim, "ready")["ready"]
    in_hand_killed = read_until(victim, "deciding")["deciding"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    # Terminated mid-batch: finishes the 4 items it holds, claims nothing more, exits 0.
    term = spawn_child(fresh_db, tmp_path, cid, delay=1.0, batch=4)
    in_hand_termed = read_until(term, "deciding")["deciding"]
    term.send_signal(signal.SIGTERM)
    out, err = term.communicate(timeout=60)
    assert term.returncode == 0, err
    stats = json.loads(out.splitlines()[-1])["stats"]
    assert stats["claimed"] == 4 and stats["approved"] == 4 and stats["batches"] == 1
    rows = queue_rows(conn)
    assert all(rows[c]["state"] == "approved" for c in in_hand_termed)
    assert all(rows[c]["state"] == "in_progress" and rows[c]["owner"] == victim_owner
               for c in in_hand_killed)  # not lost, not taken while the lease runs
    conn.execute("UPDATE harmonia.source_queue SET lease_expires_at = now() WHERE lease_owner = %s",
                 (victim_owner,))  # its 60 s lease runs out (a test need not wait for it)

    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), drain=True, batch_size=8)
    stats2 = w.run()
    w.close()
    assert stats2.claimed == 30 - 4
    rows = queue_rows(conn)
    assert all(r["state"] == "approved" for r in rows.values())
    assert all(rows[c]["attempts"] == 2 for c in in_hand_killed)  # the killed attempt was counted
    assert_mapped_once(conn)


def test_expired_lease_is_reclaimed_not_before(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                               embedder) -> None:
    terms = sample_terms(conn, 5)
    enqueue(conn, terms)
    # A worker that claims and dies before persisting (crash between rerank and persist).
    ghost = qstore.claim(conn, "ghost", 5, lease_s=1.0)
    assert len(ghost) == 5 and qstore.claim(conn, "other", 5, lease_s=10) == []  # leased: not handed out twice
    t0 = time.monotonic()
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), drain=True)
    stats = w.run()
    w.close()
    assert stats.claimed == 5 and stats.approved == 5
    assert time.monotonic() - t0 >= 0.5  # waited for the lease to expire
    assert all(r["attempts"] == 2 and r["state"] == "approved" for r in queue_rows(conn).values())
    assert_mapped_once(conn)


def test_attempts_counted_and_final_failure_goes_to_review(fresh_db: str, tmp_path: Path,
                                                            conn: psycopg.Connection, embedder) -> None:
    terms = sample_terms(conn, 6)
    enqueue(conn, terms)
    bad = {terms[1].source_code, terms[4].source_code}
    w = make_worker(fresh_db, tmp_path, conn, embedder, FlakyReranker(bad), drain=True, batch_size=6,
                    worker_max_attempts=3)
    stats = w.run()
    w.close()
    rows = queue_rows(conn)
    for code, r in rows.items():
        if code in bad:
            assert (r["state"], r["attempts"]) == ("failed", 3)
            assert f"provider exploded on {code}" in r["error"]
        else:
            assert (r["state"], r["attempts"]) == ("approved", 2)
            assert f"transient fault on {code}" in r["error"]  # the failed attempt is on record
    review = {r[0]: (r[1], r[2]) for r in conn.execute(
        "SELECT source_code, reason, error FROM harmonia.review_queue")}
    assert set(review) == bad
    assert all(reason == "max_attempts" and "3 failed attempts" in err and "provider exploded" in err
               for reason, err in review.values())
    assert stats.failed == 2 and stats.approved == 4
    assert_mapped_once(conn)
    st = qstore.status(conn)
    assert st["queue"]["failed"] == 2 and st["review_queue"]["open"] == 2


def test_lost_lease_rolls_back_instead_of_mapping_twice(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                                        embedder) -> None:
    terms = sample_terms(conn, 3)
    enqueue(conn, terms)
    stolen = terms[1].source_code

    class Thief(TopReranker):
        def rerank_many(self, items):
            # While this worker decides, its lease on one item expires and another worker takes it.
            with psycopg.connect(conn.info.dsn, autocommit=True) as c2:
                c2.execute("UPDATE harmonia.source_queue SET lease_owner = 'thief' WHERE source_code = %s",
                           (stolen,))
            return super().rerank_many(items)

    w = make_worker(fresh_db, tmp_path, conn, embedder, Thief(), max_items=3)
    stats = w.run()
    w.close()
    assert stats.lost_lease == 1 and stats.approved == 2
    rows = queue_rows(conn)
    assert rows[stolen]["state"] == "in_progress" and rows[stolen]["owner"] == "thief"
    assert conn.execute("SELECT count(*) FROM harmonia.concept_map WHERE source_code = %s",
                        (stolen,)).fetchone()[0] == 0


def test_notify_wakes_an_idle_worker(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                     embedder) -> None:
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), max_items=3, worker_poll_s=60.0)
    th = threading.Thread(target=w.run)
    th.start()
    time.sleep(0.5)  # idle, listening
    with psycopg.connect(fresh_db, autocommit=True) as c2:
        enqueue(c2, sample_terms(c2, 3))
    th.join(timeout=30)  # with only the 60 s poll it would still be asleep
    alive = th.is_alive()
    if alive:
        w.stop()
        th.join()
    w.close()
    assert not alive and w.stats.approved == 3


def test_stop_while_idle_exits_promptly(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                        embedder) -> None:
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), worker_poll_s=60.0)
    th = threading.Thread(target=w.run)
    th.start()
    time.sleep(0.3)
    w.stop()
    th.join(timeout=5)
    assert not th.is_alive() and w.stats.claimed == 0
    w.close()


def test_worker_with_llm_reranker_against_stub_provider(fresh_db: str, tmp_path: Path,
                                                        conn: psycopg.Connection, monkeypatch) -> None:
    """The real LLM reranker (openai SDK) against the OpenAI-wire stub: calls run concurrently, outcomes land."""
    from benchmark.stub_llm_server import serve
    from harmonia.rerank.llm.prompt import Prompt

    server, stub = serve(0, delay=0.5, confidence=0.95)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
        s = make_settings(fresh_db, tmp_path, reranker="llm", llm_provider="openai", llm_model="stub-model",
                          llm_base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", llm_concurrency=4,
                          worker_poll_s=0.05)
        from tests.llm_stubs import model_version_of

        version = model_version_of(s)
        assert f"prompt=v1-{Prompt.load('v1').hash}" in version
        calibrate_as_is(conn, tmp_path, "llm", version)
        enqueue(conn, sample_terms(conn, 8))
        w = Worker.from_settings(s, drain=True, batch_size=8)
        stats = w.run()
        w.close()
    finally:
        server.shutdown()
    assert stats.approved == 8 and stub.requests == 8
    assert stub.max_in_flight == 4  # llm_concurrency calls in flight, no more
    mv = {r[0] for r in conn.execute("SELECT model_version FROM harmonia.concept_map")}
    assert len(mv) == 1 and mv.pop().startswith("llm:openai/stub-model")
    assert_mapped_once(conn)


# ------------------------------------------------------------------------- faults that are not the code's (issue 19)


def llm_worker_settings(fresh_db: str, tmp_path: Path, conn: psycopg.Connection, base_url: str,
                        **overrides: object):
    """Settings for a worker with the real LLM reranker (openai SDK) against a local stub, calibrated as it is."""
    from tests.llm_stubs import model_version_of

    options: dict[str, object] = {
        "reranker": "llm", "llm_provider": "openai", "llm_model": "stub-model", "llm_base_url": base_url,
        "llm_concurrency": 4, "llm_max_retries": 1, "llm_retry_max_wait_s": 0.05, "llm_timeout_s": 1.0,
        "worker_poll_s": 0.05, "worker_retry_base_s": 0.1, "worker_retry_max_s": 0.4}
    s = make_settings(fresh_db, tmp_path, **{**options, **overrides})
    calibrate_as_is(conn, tmp_path, "llm", model_version_of(s))  # provider, model, server, prompt, sampling
    return s


def test_provider_outage_defers_codes_and_pauses_claiming(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                                          monkeypatch) -> None:
    """The provider answers 500 for 1.5 s from its first call, then times out for 1 s, then answers: every code ends
    approved, none in review, although the codes it failed reached worker_max_attempts (1) long before."""
    from tests.llm_stubs import OpenAIStub, good_input, user_payload

    first: list[float] = []

    def step(request: dict) -> tuple:
        first.append(time.monotonic())  # the outage starts with the first call (the worker loads a model first)
        up = time.monotonic() - first[0]
        if up < 1.5:
            return ("status", 500)
        if up < 2.5:
            return ("timeout",)
        return ("tool", good_input([user_payload(request)[1][0]["id"]]))

    stub = OpenAIStub(("fn", step))
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    try:
        s = llm_worker_settings(fresh_db, tmp_path, conn, stub.base_url, worker_max_attempts=1,
                                worker_provider_patience_s=60, worker_breaker_failures=3,
                                worker_breaker_pause_s=0.3)
        enqueue(conn, sample_terms(conn, 12))
        w = Worker.from_settings(s, drain=True, batch_size=4)
        stats = w.run()
        w.close()
    finally:
        stub.close()
    rows = conn.execute("SELECT state, provider_failures, failures, last_error FROM harmonia.source_queue").fetchall()
    assert {r[0] for r in rows} == {"approved"} and stats.approved == 12
    assert conn.execute("SELECT count(*) FROM harmonia.review_queue").fetchone()[0] == 0
    assert all(r[2] == 0 for r in rows)  # never counted as the code's failure
    assert stats.deferred >= 3 and sum(1 for r in rows if r[1] >= 1) >= 3  # at the attempt limit, not in review
    # the breaker held the others back: far fewer provider failures than codes x outage rounds
    assert sum(r[1] for r in rows) == stats.deferred <= 8
    assert any("server_error" in (r[3] or "") or "timeout" in (r[3] or "") for r in rows)
    assert stats.breaker_pauses >= 1  # claiming paused while the provider was down
    assert_mapped_once(conn)


def test_provider_failures_past_patience_go_to_review_with_the_retrieval_top_five(
        fresh_db: str, tmp_path: Path, conn: psycopg.Connection, monkeypatch) -> None:
    from tests.llm_stubs import OpenAIStub

    stub = OpenAIStub(("status", 503))
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    try:
        s = llm_worker_settings(fresh_db, tmp_path, conn, stub.base_url, worker_max_attempts=2,
                                worker_provider_patience_s=0, worker_breaker_failures=0)
        enqueue(conn, sample_terms(conn, 3))
        w = Worker.from_settings(s, drain=True, batch_size=3)
        stats = w.run()
        w.close()
    finally:
        stub.close()
    assert stats.in_review == 3 and stats.provider_gave_up == 3 and stats.deferred == 3
    assert len(stub.requests) == 3 * 2 * 2  # two attempts of each code, each with the reranker's one retry
    rows = conn.execute("SELECT state, attempts, provider_failures, failures FROM harmonia.source_queue").fetchall()
    assert all(r == ("in_review", 2, 1, 0) for r in rows)
    for reason, error, cands in conn.execute("SELECT reason, error, candidates_json FROM harmonia.review_queue"):
        assert reason == "server_error" and error.startswith("2 provider attempts") and "ServerError" in error
        assert len(cands) == 5 and all(c["rationale"].startswith(("retrieval order", "retrieval rank")) for c in cands)
    assert conn.execute("SELECT count(*) FROM harmonia.concept_map").fetchone()[0] == 0


def test_breaker_probes_with_one_item_and_backs_off() -> None:
    from harmonia.pipeline.worker import ProviderBreaker

    b = ProviderBreaker(threshold=3, pause_s=0.2, max_pause_s=0.5)
    for _ in range(2):
        b.record(True)
    assert not b.is_open and b.limit(16) == 16
    b.record(True)
    assert b.is_open and 0.1 < b.wait_s() <= 0.2
    time.sleep(0.21)
    assert b.wait_s() == 0 and b.limit(16) == 1  # one probe
    b.record(True)  # the probe failed: a longer pause
    assert b.is_open and b.pause == 0.4 and b.wait_s() > 0.3
    time.sleep(0.41)
    assert b.limit(16) == 1
    b.record(False)  # the provider is back
    assert not b.is_open and b.limit(16) == 16 and b.consecutive == 0


def test_codes_of_dead_workers_are_retried_alone_and_never_fail(fresh_db: str, tmp_path: Path,
                                                                 conn: psycopg.Connection, embedder) -> None:
    terms = sample_terms(conn, 8)
    enqueue(conn, terms)
    # Three workers died in turn holding the same batch (as the old claim handed it out), a fourth one died
    # holding four other codes together.
    assert len(qstore.claim(conn, "ghost-1", 4, lease_s=60)) == 4
    assert len(qstore.claim(conn, "ghost-2", 4, lease_s=60)) == 4
    conn.execute("UPDATE harmonia.source_queue SET lease_expires_at = now() - interval '1 second', "
                 "deaths = CASE WHEN lease_owner = 'ghost-1' THEN 2 ELSE 0 END, "
                 "attempts = CASE WHEN lease_owner = 'ghost-1' THEN 3 ELSE 1 END")
    reranker = TopReranker()
    seen: list[int] = []
    orig = reranker.rerank_many

    def spy(items):
        seen.append(len(items))
        return orig(items)

    reranker.rerank_many = spy  # type: ignore[method-assign]  # count the batch sizes decided
    w = make_worker(fresh_db, tmp_path, conn, embedder, reranker, drain=True, batch_size=8, worker_max_attempts=1)
    stats = w.run()
    w.close()
    assert stats.approved == 8 and stats.failed == 0 and stats.poison == 0 and stats.taken_over == 8
    assert seen == [1] * 8  # each taken over alone, not as part of a batch
    rows = conn.execute("SELECT state, deaths, solo_deaths FROM harmonia.source_queue ORDER BY id").fetchall()
    assert [r[1] for r in rows] == [3] * 4 + [1] * 4 and all(r[0] == "approved" and r[2] == 0 for r in rows)
    assert_mapped_once(conn)


def test_a_code_that_kills_its_worker_alone_is_poison(fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                                      embedder) -> None:
    terms = sample_terms(conn, 4)
    enqueue(conn, terms[:1])
    assert qstore.claim(conn, "ghost-0", 8, lease_s=60)[0].term.source_code == terms[0].source_code  # alone
    for n in range(1, 3):  # it killed each worker that took it over, alone
        conn.execute("UPDATE harmonia.source_queue SET lease_expires_at = now() - interval '1 second'")
        item = qstore.claim(conn, f"ghost-{n}", 8, lease_s=60)[0]
        assert item.taken_over and (item.deaths, item.solo_deaths) == (n, n)
    conn.execute("UPDATE harmonia.source_queue SET lease_expires_at = now() - interval '1 second'")
    enqueue(conn, terms[1:])
    reranker = TopReranker()
    w = make_worker(fresh_db, tmp_path, conn, embedder, reranker, drain=True, batch_size=8, worker_max_attempts=3)
    stats = w.run()
    w.close()
    assert (stats.poison, stats.failed, stats.approved) == (1, 1, 3)
    assert reranker.calls == 3  # the poison code was not tried again
    rows = queue_rows(conn)
    assert rows[terms[0].source_code]["state"] == "failed"
    reason, error = conn.execute("SELECT reason, error FROM harmonia.review_queue").fetchone()
    assert reason == "max_attempts" and "died 3 times" in error


def _enqueue_into(dsn: str, terms: list[SourceTerm], go: threading.Barrier, results: list[object], i: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        go.wait()
        try:
            results[i] = enqueue(c, terms)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            results[i] = exc


def test_concurrent_enqueues_in_opposite_orders_never_deadlock(conn: psycopg.Connection) -> None:
    base = sample_terms(conn, 3000)
    for run in range(3):
        terms = [SourceTerm(source_code=t.source_code, source_vocab=f"ICD10-r{run}", source_text=t.source_text)
                 for t in base]
        orders = [terms, list(reversed(terms))]
        results: list[object] = [None, None]
        go = threading.Barrier(2)
        threads = [threading.Thread(target=_enqueue_into, args=(conn.info.dsn, orders[i], go, results, i))
                   for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert not any(isinstance(r, Exception) for r in results), results
        counts = [r for r in results if not isinstance(r, Exception)]
        assert sum(c.new for c in counts) == 3000 and sum(c.duplicate for c in counts) == 3000  # type: ignore[union-attr]  # EnqueueCounts
    assert conn.execute("SELECT count(*) FROM harmonia.source_queue").fetchone()[0] == 9000


def test_claim_reads_only_ready_pending_rows_however_many_are_finished(conn: psycopg.Connection) -> None:
    assert qstore.insert_finished(conn, "OLD", 100_000) == 100_000
    enqueue(conn, sample_terms(conn, 40))
    conn.execute("UPDATE harmonia.source_queue SET retry_at = now() + interval '1 hour' "
                 "WHERE state = 'pending' AND id % 2 = 0")  # half of them wait out a back-off
    qstore.analyze(conn)
    plan = qstore.explain_claim(conn, 16)
    scans = plan["scans"]
    # index scans only: the expired leases, the ready pending rows (which pending index the planner takes depends
    # on how many are pending), and the claimed rows by id: the 100,000 finished rows are never read
    assert all(x["node"] in ("Index Scan", "Index Only Scan") for x in scans), scans
    assert {x["index"] for x in scans} & {"source_queue_ready_idx", "source_queue_pending_idx"}
    assert "source_queue_lease_idx" in {x["index"] for x in scans}
    assert sum(x["rows"] + x["removed_by_filter"] for x in scans) <= 40 + 16
    assert plan["shared_buffers"] < 600  # the 16 updates included; a scan of the finished rows alone is ~1,500
    items = qstore.claim(conn, "w", 100, 10)
    assert len(items) == 20 and {i.term.source_vocab for i in items} == {"ICD10"}


def test_prune_keeps_maps_history_reviews_and_unresolved_items(fresh_db: str, tmp_path: Path,
                                                               conn: psycopg.Connection) -> None:
    from harmonia.cli import app
    from harmonia.store import llm as llm_store

    qstore.insert_finished(conn, "OLD", 500, days_ago=40)
    qstore.insert_finished(conn, "NEW", 300, days_ago=1)
    conn.execute("UPDATE harmonia.source_queue SET state = 'in_review' WHERE source_vocab = 'OLD' AND "
                 "source_code IN ('F1', 'F2')")
    conn.execute("INSERT INTO harmonia.review_queue (source_code, source_vocab, reason, status) VALUES "
                 "('F1', 'OLD', 'low_confidence', 'open'), ('F2', 'OLD', 'low_confidence', 'resolved')")
    for i in range(30):
        llm_store.log_call(conn, llm_store.CallRecord(
            provider="openai", model="m", prompt_version="v1", prompt_hash="h", source_code=f"C{i}",
            source_vocab="X", payload_sha256="s", attempt=1, request={}, error_kind="server_error" if i % 3 else None))
    conn.execute("UPDATE harmonia.llm_call SET at = now() - interval '100 days' WHERE source_code < 'C2'")
    old_calls = conn.execute("SELECT count(*) FROM harmonia.llm_call WHERE at < now() - interval '90 days'"
                             ).fetchone()[0]
    env = {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_CONFIG": ""}
    r = CliRunner().invoke(app, ["queue", "prune", "--dry-run", "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["queue_rows"] == 499 and json.loads(r.stdout)["llm_calls"] == old_calls
    assert conn.execute("SELECT count(*) FROM harmonia.source_queue").fetchone()[0] == 800  # a dry run
    r = CliRunner().invoke(app, ["queue", "prune", "--json"], env=env)
    got = json.loads(r.stdout)
    assert (got["queue_rows"], got["llm_calls"], got["finished_days"]) == (499, old_calls, 30)
    left = dict(conn.execute("SELECT source_vocab, count(*) FROM harmonia.source_queue GROUP BY 1").fetchall())
    assert left == {"OLD": 1, "NEW": 300}  # the unresolved review's item stays
    assert conn.execute("SELECT count(*) FROM harmonia.review_queue").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM harmonia.llm_call").fetchone()[0] == 30 - old_calls


def test_status_shows_live_workers_review_reasons_and_provider_errors(fresh_db: str, tmp_path: Path,
                                                                      conn: psycopg.Connection, embedder) -> None:
    from harmonia.cli import app
    from harmonia.store import llm as llm_store

    for i in range(4):
        llm_store.log_call(conn, llm_store.CallRecord(
            provider="openai", model="m", prompt_version="v1", prompt_hash="h", source_code=f"C{i}",
            source_vocab="X", payload_sha256="s", attempt=1, request={}, error_kind="timeout" if i else None))
    terms = sample_terms(conn, 4)
    enqueue(conn, terms)
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker({terms[0].source_code}), max_items=4,
                    worker_poll_s=0.2)
    th = threading.Thread(target=w.run)
    th.start()
    # a dead worker's lease, not yet expired
    conn.execute("INSERT INTO harmonia.source_queue (source_code, source_vocab, source_text, state, lease_owner, "
                 "lease_expires_at) VALUES ('DEAD1', 'ICD10', 'x', 'in_progress', 'dead-host:1:abc', "
                 "now() + interval '1 hour')")
    env = {"HARMONIA_DATABASE_URL": fresh_db, "HARMONIA_DATA_DIR": str(tmp_path), "HARMONIA_CONFIG": ""}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = qstore.status(conn)
            if st["queue"]["pending"] == 0 and st["queue"]["in_progress"] == 1:
                break
            time.sleep(0.1)
        st = json.loads(CliRunner().invoke(app, ["status", "--json"], env=env).stdout)
        text = CliRunner().invoke(app, ["status"], env=env).output
    finally:
        th.join(timeout=30)
        w.close()
    assert st["held_by_silent_workers"] == 1 and st["held_by_live_workers"] == 0
    assert st["review_by_reason"] == {"low_confidence": 1}
    assert st["provider"]["5"]["calls"] == 4 and st["provider"]["5"]["error_rate"] == 0.75
    assert "low_confidence 1" in text and "75% errors" in text and "1 by workers without a heartbeat" in text
    after = qstore.status(conn)
    assert after["live_workers"] == []  # stopped


def test_status_lists_a_running_worker(fresh_db: str, tmp_path: Path, conn: psycopg.Connection, embedder) -> None:
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), worker_poll_s=60.0)
    th = threading.Thread(target=w.run)
    th.start()
    try:
        time.sleep(0.5)
        live = qstore.live_workers(conn)
    finally:
        w.stop()
        th.join(timeout=10)
        w.close()
    assert [x["owner"] for x in live] == [w.owner] and live[0]["state"] == "idle"
    assert qstore.live_workers(conn) == []


def restart_server(pgdata: Path, down_s: float) -> None:
    """Stop the embedded server (fast shutdown: every session gets AdminShutdown), keep it down `down_s`, start it
    again in this process (stop_embedded forgets the cached handle, so the start is a real one)."""
    from harmonia import db

    db.stop_embedded(pgdata)
    time.sleep(down_s)
    db.start_embedded(pgdata)


@pytest.mark.slow
def test_worker_rides_out_database_restarts(pg_server, fresh_db: str, tmp_path: Path, conn: psycopg.Connection,
                                            embedder, monkeypatch) -> None:
    """The server restarts while a batch is at the LLM (its answers must still be persisted, once) and again while
    the worker waits idle; the worker reconnects, its call log writes again; a longer outage than
    worker_db_patience_s ends the worker with DatabaseUnavailable."""
    from benchmark.stub_llm_server import serve
    from harmonia.pipeline.worker import DatabaseUnavailable
    from harmonia.rerank.llm.reranker import LLMReranker
    from harmonia.retrieval import make_retriever

    server, stub = serve(0, delay=1.5, confidence=0.95)
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    s = llm_worker_settings(fresh_db, tmp_path, conn, f"http://127.0.0.1:{server.server_address[1]}/v1",
                            llm_timeout_s=10.0, worker_db_patience_s=60, worker_lease_s=30)
    from tests.llm_stubs import model_version_of

    version = model_version_of(s)
    built: list[Pipeline] = []

    def make_pipeline(c: psycopg.Connection) -> Pipeline:
        p = Pipeline(make_retriever(c, embedder, s), LLMReranker.from_settings(s, c), s.router, s.rerank,
                     Calibration.load(c, s.data_path, "llm", version))
        built.append(p)
        return p

    terms = sample_terms(conn, 12)
    enqueue(conn, terms[:8])
    w = Worker(s.worker, s.database, make_pipeline, batch_size=8, max_items=12)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while stub.requests < 8 and time.monotonic() < deadline:  # the batch is at the LLM
            time.sleep(0.05)
        restart_server(pg_server.pgdata, down_s=2.0)  # answers come back while the server is down
        deadline = time.monotonic() + 60
        while w.stats.finished < 8 and time.monotonic() < deadline and th.is_alive():
            time.sleep(0.1)
        assert w.stats.finished == 8, (w.stats, errors)
        time.sleep(0.5)  # idle, LISTENing
        restart_server(pg_server.pgdata, down_s=1.0)
        with psycopg.connect(fresh_db, autocommit=True) as c2:
            enqueue(c2, terms[8:])
        th.join(timeout=60)
    finally:
        if th.is_alive():
            w.stop()
            th.join(timeout=30)
    assert not errors and not th.is_alive()
    st = w.stats
    assert st.approved == 12 and st.db_outages >= 2 and st.reconnects >= 2 and st.lost_lease == 0
    assert stub.requests == 12  # no LLM answer thrown away and asked again
    with psycopg.connect(fresh_db, autocommit=True) as c:
        assert {r[0] for r in c.execute("SELECT state FROM harmonia.source_queue")} == {"approved"}
        assert_mapped_once(c)
        logged = c.execute("SELECT count(*) FROM harmonia.llm_call WHERE source_code = ANY(%s)",
                           ([t.source_code for t in terms[8:]],)).fetchone()[0]
    assert logged == 4  # the call log writes again on its new connection
    assert len(built) >= 3  # the pipeline was rebuilt on each fresh connection

    # An outage longer than worker_db_patience_s: the worker gives up (the CLI exits 1).
    w2 = Worker(s.worker, s.database, make_pipeline, batch_size=8)
    w2.db_patience_s = 2.0
    outcome: list[BaseException | None] = []
    th2 = threading.Thread(target=lambda: outcome.append(_run_catching(w2)))
    th2.start()
    time.sleep(0.5)
    from harmonia import db

    db.stop_embedded(pg_server.pgdata)
    try:
        th2.join(timeout=30)
    finally:
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from harmonia import db; "
                        "db.start_embedded(Path(sys.argv[1]))", str(pg_server.pgdata)], check=True, cwd=REPO,
                       timeout=60)
        w2.close()
        w.close()
        server.shutdown()
    assert not th2.is_alive() and isinstance(outcome[0], DatabaseUnavailable), outcome
    assert "unreachable" in str(outcome[0])


def _run_catching(w: Worker) -> BaseException | None:
    try:
        w.run()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_an_idle_worker_survives_losing_its_listen_connection(fresh_db: str, tmp_path: Path,
                                                              conn: psycopg.Connection, embedder) -> None:
    w = make_worker(fresh_db, tmp_path, conn, embedder, TopReranker(), max_items=3, worker_poll_s=0.2)
    errors: list[BaseException | None] = []
    th = threading.Thread(target=lambda: errors.append(_run_catching(w)))
    th.start()
    try:
        time.sleep(0.5)  # idle, listening
        conn.execute("SELECT pg_terminate_backend(%s)", (w._listen.info.backend_pid,))
        time.sleep(0.6)
        enqueue(conn, sample_terms(conn, 3))
        th.join(timeout=30)
    finally:
        if th.is_alive():
            w.stop()
            th.join(timeout=10)
        w.close()
    assert errors == [None] and w.stats.approved == 3 and w.stats.reconnects >= 1 and w.stats.db_outages >= 1
