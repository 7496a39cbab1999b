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
    overrides = {"worker_poll_s": 0.05, "worker_lease_s": 10.0, **{k: v for k, v in kw.items()
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
    assert all(reason == "max_attempts" and "3 attempts" in err and "provider exploded" in err
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
