"""Fault and throughput figures for `harmonia worker` (issues 6 and 19): one verdict per scenario.

    python benchmark/worker_faults.py --data-dir DIR [--scenario NAME ...] [options]

Scenarios (default: all but `kills`; each bounded to about two minutes on 2 shared cores):
  outage     the LLM provider answers 500 for --outage-error s, then hangs for --outage-hang s (longer than
             llm_timeout_s), while --workers workers drain --codes codes. Goal: 0 codes sent to review by the outage
             (shorter than worker_provider_patience_s), 0 lost, 0 doubled.
  db         SIGKILL of the postmaster mid-drain, down --db-down s, restarted (crash recovery). Goal: every worker
             rides it out and exits 0, 0 lost, 0 doubled, no LLM answer asked twice.
  deaths     three workers SIGKILLed in turn while holding the codes of one batch, then a fourth drains. Goal: 0
             healthy codes failed (the old claim failed all 16 as max_attempts).
  enqueue    two connections enqueue the same --enqueue-codes codes in opposite orders, three times. Goal: no
             deadlock, every code queued once.
  claim      --finished finished rows (bulk-inserted by one statement) and --pending pending ones: claim latency
             and its EXPLAIN, then `queue prune` of the finished rows. Goal: claim p50 <= 5 ms.
  kills      the issue-6 run: `harmonia worker --drain` processes with the real retriever (torch, the embedded
             sample: prepared on first use, ~3+ minutes), the longest-working one SIGKILLed every --kill-every s.

The outage, db and deaths scenarios run light worker processes (this script with --child): the real Worker and
the real LLM reranker (openai SDK) against benchmark/stub_llm_server.py, and a retriever that reads each code's
'Maps to' target and four other concepts from the database for every batch (no model to load, so a process starts
in seconds and a database outage also hits the retrieval). The reranker is calibrated as it is (its confidence
taken as the probability, a threshold of 0.9 for the run's source set), so the stub's 0.95 answers are approved.
Each scenario enqueues under its own source_vocab, so runs on one data dir do not see each other's codes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import psycopg
from stub_llm_server import StubState, serve  # sibling module: python puts the script's folder first on sys.path

from harmonia import db
from harmonia.config import Settings, load_settings
from harmonia.domain import RETRYABLE_ERROR_KINDS, Candidate, SourceKey, SourceTerm
from harmonia.kinds import builtin_kind_of
from harmonia.paths import sample_dir
from harmonia.pipeline import confidence
from harmonia.pipeline.worker import EnqueueCounts, enqueue
from harmonia.rerank.llm.providers import get_provider
from harmonia.rerank.llm.reranker import LLMReranker
from harmonia.store import calibration as cal_store
from harmonia.store import concepts as concept_store
from harmonia.store import migrations
from harmonia.store import queue as qstore
from harmonia.store import vocab as vocab_store

SCRIPT = Path(__file__).resolve()
Verdict = list[tuple[str, bool]]


# ------------------------------------------------------------------------------------------- preparation


def base_settings(data_dir: Path) -> Settings:
    return load_settings(env={"HARMONIA_DATA_DIR": str(data_dir), "HARMONIA_CONFIG": ""})


def prepare(data_dir: Path, embed: bool) -> None:
    """Migrate and load the bundled sample unless already done; embed it only when asked (the kills scenario)."""
    from harmonia.vocabulary import load_vocabulary

    s = base_settings(data_dir)
    with db.connect(s.database, autocommit=True) as conn:
        migrations.migrate(conn)
        if vocab_store.counts(conn)["concept"] == 0:
            t0 = time.perf_counter()
            load_vocabulary(conn, sample_dir() / "vocab", progress=False)
            print(f"loaded the sample vocabulary in {time.perf_counter() - t0:.0f}s", flush=True)
        if embed:
            from harmonia.embedding.ingest import embed_concepts
            from harmonia.embedding.model import Embedder

            t0 = time.perf_counter()
            r = embed_concepts(conn, Embedder.from_settings(s), vocabularies=s.embedding.vocabularies,
                               progress=False, retrieval=s.retrieval)
            print(f"embeddings: {r.written} new ({time.perf_counter() - t0:.0f}s), {r.total} in the index",
                  flush=True)


def icd10_terms(conn: psycopg.Connection, n: int, vocab: str, seed: int) -> list[SourceTerm]:
    names: dict[str, str] = {}
    for e in vocab_store.maps_to_edges(conn, ["ICD10"]):
        names.setdefault(e.source_code, e.source_text)
    codes = sorted(names)
    random.Random(seed).shuffle(codes)
    return [SourceTerm(source_code=c, source_vocab=vocab, source_text=names[c]) for c in codes[:n]]


def calibrate_stub(conn: psycopg.Connection, data_path: Path, reranker_version: str, source_vocab: str) -> None:
    """The reranker's confidence taken as the probability, threshold 0.9 for this run's source set (what
    tests/conftest.py's calibrate_as_is does): the figures are about the queue, not the calibration."""
    cal = confidence.Calibrator(reranker="llm", features=["raw_logit"], mean=[0.0], scale=[1.0], coef=[1.0],
                                kinds=[], kind_coef=[], intercept=0.0)
    confidence.save(cal, data_path)
    kind = builtin_kind_of(source_vocab).name
    with conn.transaction():
        cal_store.save_threshold(conn, cal_store.StoredThreshold(
            reranker_version=reranker_version, calibrator_hash=cal.hash, kind=kind, source_vocab=source_vocab,
            threshold=0.9, target=0.98, alpha=0.05, bound=0.98, rows_behind=200, rows_correct=200, coverage=0.5,
            calibration_rows=400, method="benchmark", origin="bench"))


class Monitor:
    """The benchmark's own connection, reopened when the database restarts under it."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.conn: psycopg.Connection | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = db.connect(self.s.database, autocommit=True)
                return fn(self.conn, *args)
            except psycopg.OperationalError:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# ------------------------------------------------------------------------------------- light worker child


def child_main(cfg: dict[str, Any]) -> int:
    """A worker process: the real Worker and LLM reranker, a retriever that reads candidates from the database."""
    import logging

    from harmonia.pipeline.confidence import Calibration
    from harmonia.pipeline.run import Pipeline
    from harmonia.pipeline.worker import DatabaseUnavailable, Worker, run_until_signalled
    from harmonia.rerank import make_reranker
    from harmonia.retrieval.base import Retriever

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    s = load_settings(cfg["settings"], env={"HARMONIA_DATA_DIR": cfg["data_dir"], "HARMONIA_CONFIG": ""})
    with db.connect(s.database, autocommit=True) as conn:
        targets: dict[str, int] = {e.source_code: e.target_concept_id
                                   for e in vocab_store.maps_to_edges(conn, ["ICD10"])}

    class MapsToRetriever(Retriever):
        """Each code's 'Maps to' target and four more concepts, read from the database for every batch."""

        def __init__(self, conn: psycopg.Connection) -> None:
            self.conn = conn
            self.others = sorted(set(targets.values()))[:4]

        def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                        vocabularies: Sequence[str] | None = None, exact: bool = False,
                        source_keys: Sequence[SourceKey | None] | None = None) -> list[list[Candidate]]:
            keys = list(source_keys or [None] * len(texts))
            want = {targets[key[0]] for key in keys if key is not None and key[0] in targets} | set(self.others)
            found = concept_store.get_concepts(self.conn, want)
            out = []
            for key in keys:
                ids = [targets[key[0]]] if key is not None and key[0] in targets else []
                ids += [i for i in self.others if i not in ids]
                out.append([Candidate(concept_id=i, concept_name=found[i].concept_name, domain_id=found[i].domain_id,
                                      vocabulary_id=found[i].vocabulary_id,
                                      concept_class_id=found[i].concept_class_id,
                                      concept_code=found[i].concept_code, similarity=0.9 - 0.1 * n)
                            for n, i in enumerate(ids[:5]) if i in found])
            return out

    def make_pipeline(conn: psycopg.Connection) -> Pipeline:
        reranker = make_reranker(s, conn)
        cal = Calibration.load(conn, s.data_path, reranker.name, reranker.model_version)
        return Pipeline(MapsToRetriever(conn), reranker, s.router, s.rerank, cal)

    w = Worker(s.worker, s.database, make_pipeline, batch_size=cfg["batch"], drain=True)
    print(json.dumps({"ready": w.owner}), flush=True)
    try:
        stats = run_until_signalled(w)
    except DatabaseUnavailable as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    finally:
        w.close()
    print(json.dumps({"stats": stats.to_dict()}), flush=True)
    return 0


def stub_llm_settings(port: int) -> dict[str, Any]:
    """The LLM settings of the light workers: the real OpenAI reranker against the local stub on `port`."""
    return {"reranker": "llm", "llm_provider": "openai", "llm_model": "stub-model",
            "llm_base_url": f"http://127.0.0.1:{port}/v1"}


def stub_model_version(data_dir: Path, port: int) -> str:
    """The model_version the workers' reranker gives its decisions (provider, model, server, prompt, sampling)."""
    s = load_settings({"data_dir": str(data_dir), **stub_llm_settings(port)}, env={"HARMONIA_CONFIG": ""})
    return LLMReranker(s.llm, get_provider(s.llm), top_n=s.rerank.top_n).model_version


class Children:
    """Light worker processes (this script with --child), their logs and exit codes."""

    def __init__(self, data_dir: Path, port: int, name: str, overrides: dict[str, Any], batch: int) -> None:
        self.data_dir, self.name, self.batch = data_dir, name, batch
        self.settings = {**stub_llm_settings(port), "llm_concurrency": 16, "llm_timeout_s": 5.0,
                         "llm_max_retries": 2, "llm_retry_max_wait_s": 2.0, "worker_lease_s": 20.0,
                         "worker_poll_s": 0.5, "worker_retry_base_s": 2.0, "worker_retry_max_s": 20.0,
                         "worker_provider_patience_s": 300.0, "worker_breaker_failures": 5,
                         "worker_breaker_pause_s": 5.0, "worker_db_patience_s": 120.0, **overrides}
        self.procs: list[tuple[subprocess.Popen[str], Path]] = []
        (data_dir / "worker-logs").mkdir(exist_ok=True)

    def start(self) -> subprocess.Popen[str]:
        log = self.data_dir / "worker-logs" / f"{self.name}-{len(self.procs) + 1}.log"
        cfg = {"data_dir": str(self.data_dir), "batch": self.batch, "settings": self.settings}
        env = {**os.environ, "OPENAI_API_KEY": "stub-key", "HARMONIA_CONFIG": ""}
        p = subprocess.Popen([sys.executable, str(SCRIPT), "--child", json.dumps(cfg)], env=env, text=True,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the child owns it
        self.procs.append((p, log))
        return p

    def wait_ready(self, p: subprocess.Popen[str], timeout: float = 60) -> str:
        """The worker's owner name, once it is ready to claim."""
        log = next(lg for q, lg in self.procs if q is p)
        deadline = time.monotonic() + timeout
        while True:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith('{"ready"'):
                    return str(json.loads(line)["ready"])
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def wait_all(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p, _ in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
        return [p.poll() for p, _ in self.procs]

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for _, log in self.procs:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith('{"stats"'):
                    out.append(json.loads(line)["stats"])
        return out

    def kill_all(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def total(stats: list[dict[str, Any]], key: str) -> int:
    return sum(int(x.get(key, 0)) for x in stats)


def common_checks(audit: dict[str, Any], n: int, enqueued: int) -> Verdict:
    final = sum(audit["states"].get(k, 0) for k in qstore.FINAL_STATES)
    return [
        ("every code in exactly one final state", final == n == audit["items"]),
        ("none lost (all enqueued codes present)", audit["items"] == enqueued),
        ("none mapped twice", audit["codes_mapped_twice"] == 0 and audit["codes_with_two_auto_approvals"] == 0),
        ("concept_map rows == approved items", audit["approved_without_map"] == 0
         and audit["map_without_approved_item"] == 0),
        ("every in_review/failed code has a review item", audit["review_states_without_review_item"] == 0),
    ]


def start_run(a: argparse.Namespace, data_dir: Path, name: str, n: int, delay: float) -> tuple[
        str, EnqueueCounts, Any, StubState, Monitor]:
    s = base_settings(data_dir)
    vocab = f"ICD10-{name}{int(time.time())}"
    mon = Monitor(s)
    server, stub = serve(0, delay)
    version = stub_model_version(data_dir, server.server_address[1])
    mon(calibrate_stub, s.data_path, version, vocab)
    terms = mon(icd10_terms, n, vocab, a.seed)
    counts = mon(enqueue, terms)
    print(f"[{name}] enqueued {counts.new} codes as {vocab!r}; stub LLM {delay:g}s per call", flush=True)
    return vocab, counts, server, stub, mon


def drain_wait(mon: Monitor, children: Children, vocab: str, timeout: float, tick: Callable[[float], None]) -> float:
    t0 = time.monotonic()
    last = t0
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = time.monotonic()
        tick(now - t0)
        if all(p.poll() is not None for p, _ in children.procs):
            break
        if now - last >= 15:
            print(f"  t={now - t0:4.0f}s {mon(qstore.audit, vocab)['states']}", flush=True)
            last = now
    return time.monotonic() - t0


# -------------------------------------------------------------------------------------------- scenarios


def scenario_outage(a: argparse.Namespace, data_dir: Path) -> Verdict:
    vocab, counts, server, stub, mon = start_run(a, data_dir, "outage", a.codes, a.delay)
    kids = Children(data_dir, server.server_address[1], "outage", {}, a.batch)
    procs = [kids.start() for _ in range(a.workers)]
    for p in procs:
        kids.wait_ready(p)
    phases = [(a.outage_start, "error"), (a.outage_start + a.outage_error, "hang"),
              (a.outage_start + a.outage_error + a.outage_hang, "ok")]

    def tick(t: float) -> None:
        while phases and t >= phases[0][0]:
            at, mode = phases.pop(0)
            stub.mode = mode
            print(f"  t={t:4.0f}s provider: {mode}", flush=True)

    took = drain_wait(mon, kids, vocab, a.timeout, tick)
    stub.mode = "ok"
    exits = kids.wait_all(30)
    audit = mon(qstore.audit, vocab)
    reasons = audit["review_reasons"]
    stats = kids.stats()
    server.shutdown()
    mon.close()
    by_outage = sum(n for r, n in reasons.items() if r in RETRYABLE_ERROR_KINDS)
    print(f"[outage] {a.codes} codes, {a.workers} workers, provider 500 for {a.outage_error:g}s then hanging "
          f"{a.outage_hang:g}s (llm_timeout_s 5, worker_provider_patience_s 300): drained in {took:.0f}s; "
          f"states {audit['states']}; review reasons {reasons or '{}'}; provider failures recorded "
          f"{audit['provider_failures']} (deferred {total(stats, 'deferred')}); claiming paused "
          f"{total(stats, 'breaker_pauses')} times; LLM requests {stub.requests} ({stub.faults} during the outage)")
    return common_checks(audit, a.codes, counts.new) + [
        ("0 codes sent to review by the outage", by_outage == 0),
        ("workers exited 0", exits == [0] * len(exits)),
        ("the outage was felt (codes deferred)", audit["provider_failures"] > 0),
    ]


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def kill_and_restart_postmaster(pgdata: Path, down_s: float) -> float:
    """SIGKILL the postmaster, wait for its backends to go, keep it down `down_s`, start it again (a fresh
    process: this one caches the old server's handle). Returns the seconds the database was unreachable."""
    pid = postmaster_pid(pgdata)
    proc = psutil.Process(pid)
    backends = proc.children(recursive=True)
    t0 = time.monotonic()
    proc.kill()
    psutil.wait_procs([proc, *backends], timeout=30)
    time.sleep(down_s)
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from harmonia import db; "
                    "db.start_embedded(Path(sys.argv[1]))", str(pgdata)], check=True, timeout=120,
                   capture_output=True)
    return time.monotonic() - t0


def scenario_db(a: argparse.Namespace, data_dir: Path) -> Verdict:
    vocab, counts, server, stub, mon = start_run(a, data_dir, "db", a.codes, a.delay)
    kids = Children(data_dir, server.server_address[1], "db", {}, a.batch)
    procs = [kids.start() for _ in range(a.workers)]
    for p in procs:
        kids.wait_ready(p)
    pgdata = data_dir / "pgdata"
    downtime: list[float] = []

    def tick(t: float) -> None:
        if not downtime and t >= a.db_kill_at:
            print(f"  t={t:4.0f}s SIGKILL postmaster {postmaster_pid(pgdata)}", flush=True)
            downtime.append(kill_and_restart_postmaster(pgdata, a.db_down))
            print(f"  database back after {downtime[0]:.1f}s", flush=True)

    took = drain_wait(mon, kids, vocab, a.timeout, tick)
    exits = kids.wait_all(30)
    audit = mon(qstore.audit, vocab)
    stats = kids.stats()
    server.shutdown()
    mon.close()
    print(f"[db] {a.codes} codes, {a.workers} workers, postmaster SIGKILLed at {a.db_kill_at:g}s, unreachable "
          f"{downtime[0] if downtime else 0:.1f}s: drained in {took:.0f}s; exits {exits}; states {audit['states']}; "
          f"outages seen {total(stats, 'db_outages')}, reconnects {total(stats, 'reconnects')}, lost leases "
          f"{total(stats, 'lost_lease')}; LLM requests {stub.requests} for {a.codes} codes")
    return common_checks(audit, a.codes, counts.new) + [
        ("the postmaster was killed mid-drain", bool(downtime)),
        ("every worker rode it out (exit 0)", exits == [0] * len(exits) and total(stats, "db_outages") >= 1),
        ("no LLM answer thrown away and asked again", stub.requests == a.codes),
    ]


def scenario_deaths(a: argparse.Namespace, data_dir: Path) -> Verdict:
    n = a.batch * 3
    vocab, counts, server, stub, mon = start_run(a, data_dir, "deaths", n, 30.0)  # slow: workers die deciding
    kids = Children(data_dir, server.server_address[1], "deaths", {"worker_lease_s": 3.0}, a.batch)
    t0 = time.monotonic()
    for victims in range(1, 4):
        if victims > 1:
            time.sleep(3.5)  # the dead worker's leases expire: the next one takes its batch over
        p = kids.start()
        owner = kids.wait_ready(p)

        def holding(owner: str = owner) -> int:
            return sum(w["holding"] for w in mon(qstore.live_workers) if w["owner"] == owner)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not holding():
            time.sleep(0.1)
        time.sleep(0.5)  # at the LLM with the items in hand
        held = holding()
        p.kill()
        p.wait()
        print(f"  worker {victims} SIGKILLed holding {held} item(s)", flush=True)
    stub.delay = 0.2
    kids.start()
    took = drain_wait(mon, kids, vocab, a.timeout, lambda t: None)
    exits = kids.wait_all(30)
    audit = mon(qstore.audit, vocab)
    stats = kids.stats()
    server.shutdown()
    mon.close()
    print(f"[deaths] {n} codes, batch {a.batch}, three workers SIGKILLed in turn holding them, lease 3s: the "
          f"fourth drained in {took:.0f}s (all {time.monotonic() - t0:.0f}s); states {audit['states']}; deaths "
          f"{audit['deaths']} on {audit['items_with_deaths']} codes, most solo deaths of one code "
          f"{audit['max_solo_deaths']}; taken over alone {total(stats, 'taken_over')}")
    return common_checks(audit, n, counts.new) + [
        ("0 healthy codes failed", audit["states"].get("failed", 0) == 0),
        ("the deaths happened", audit["deaths"] >= 3 and exits[-1] == 0),
    ]


def scenario_enqueue(a: argparse.Namespace, data_dir: Path) -> Verdict:
    s = base_settings(data_dir)
    deadlocks = 0
    exact = True
    times = []
    for run in range(3):
        vocab = f"ENQ-{int(time.time())}-{run}"
        terms = [SourceTerm(source_code=f"C{i:06d}", source_vocab=vocab, source_text=f"code {i}")
                 for i in range(a.enqueue_codes)]
        orders = [terms, list(reversed(terms))]
        out: list[Any] = [None, None]
        go = threading.Barrier(2)

        def push(i: int, out: list[Any] = out, orders: list[list[SourceTerm]] = orders,
                 go: threading.Barrier = go) -> None:
            with db.connect(s.database, autocommit=True) as c:
                go.wait()
                try:
                    out[i] = enqueue(c, orders[i])
                except psycopg.Error as exc:
                    out[i] = exc

        t0 = time.perf_counter()
        threads = [threading.Thread(target=push, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        times.append(time.perf_counter() - t0)
        deadlocks += sum(1 for x in out if isinstance(x, psycopg.errors.DeadlockDetected))
        ok = [x for x in out if isinstance(x, EnqueueCounts)]
        with db.connect(s.database, autocommit=True) as c:
            items = qstore.audit(c, vocab)["items"]
            qstore.drop_items(c, vocab)  # no worker is to see them
        exact &= len(ok) == 2 and sum(x.new for x in ok) == a.enqueue_codes == items
    print(f"[enqueue] {a.enqueue_codes} codes enqueued by two connections in opposite orders, 3 runs: "
          f"{deadlocks} deadlocks; {max(times):.1f}s at most per run")
    return [("no deadlock", deadlocks == 0), ("every code queued exactly once", exact)]


def scenario_claim(a: argparse.Namespace, data_dir: Path) -> Verdict:
    s = base_settings(data_dir)
    run = int(time.time())
    with db.connect(s.database, autocommit=True) as conn:
        t0 = time.perf_counter()
        n = qstore.insert_finished(conn, f"FIN-{run}", a.finished, days_ago=40)
        pending = [SourceTerm(source_code=f"P{i:06d}", source_vocab=f"CLAIM-{run}", source_text=f"code {i}")
                   for i in range(a.pending)]
        enqueue(conn, pending)
        qstore.analyze(conn)
        print(f"[claim] inserted {n:,} finished rows and {a.pending:,} pending in {time.perf_counter() - t0:.0f}s",
              flush=True)
        plan = qstore.explain_claim(conn, 16)
        lat = []
        held: list[int] = []
        for _ in range(a.claims):
            t1 = time.perf_counter()
            items = qstore.claim(conn, "bench", 16, 60)
            lat.append((time.perf_counter() - t1) * 1000)
            held += [i.id for i in items]
        idle = []
        qstore.defer_pending(conn, f"CLAIM-{run}", 3600)  # nothing ready: what every idle worker polls
        for _ in range(50):
            t1 = time.perf_counter()
            qstore.claim(conn, "bench", 16, 60)
            idle.append((time.perf_counter() - t1) * 1000)
        idle_plan = qstore.explain_claim(conn, 16)
        qstore.drop_items(conn, f"CLAIM-{run}")  # no worker is to see them
        t1 = time.perf_counter()
        pruned = qstore.prune(conn, 30, -1)
        prune_s = time.perf_counter() - t1
    p50 = statistics.median(lat)
    p95 = sorted(lat)[int(len(lat) * 0.95) - 1]
    scan = plan["scans"]
    print(f"[claim] {n:,} finished rows, {a.pending:,} pending: claim of 16 p50 {p50:.2f} ms, p95 {p95:.2f} ms "
          f"({a.claims} claims); nothing ready (all in back-off): p50 {statistics.median(idle):.2f} ms")
    print(f"[claim] EXPLAIN: {json.dumps(scan)}; {plan['shared_buffers']} buffers, {plan['execution_ms']:.3f} ms; "
          f"nothing ready: {json.dumps(idle_plan['scans'])}, {idle_plan['shared_buffers']} buffers")
    print(f"[claim] queue prune --finished-days 30: {pruned.queue_rows:,} rows in {prune_s:.0f}s")
    reads = sum(x["rows"] + x["removed_by_filter"] for x in scan)
    return [("claim p50 <= 5 ms with the finished rows", p50 <= 5.0),
            ("the plan reads no finished row", reads <= a.pending and all(x["index"] for x in scan)),
            ("prune removed the old finished rows", pruned.queue_rows >= n)]


def scenario_kills(a: argparse.Namespace, data_dir: Path) -> Verdict:
    """The issue-6 run with real `harmonia worker` processes (see the module docstring)."""
    prepare(data_dir, embed=True)
    vocab, counts, server, stub, mon = start_run(a, data_dir, "kills", a.codes, a.delay)
    port = server.server_address[1]
    exe = str(Path(sys.executable).with_name("harmonia"))
    env = {**os.environ, "HARMONIA_DATA_DIR": str(data_dir), "HARMONIA_CONFIG": "", "HARMONIA_RERANKER": "llm",
           "HARMONIA_LLM_PROVIDER": "openai", "HARMONIA_LLM_MODEL": "stub-model",
           "HARMONIA_LLM_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": "stub-key",
           "HARMONIA_WORKER_LEASE_S": str(a.lease), "HARMONIA_WORKER_POLL_S": "1"}
    cmd = [exe, "worker", "--drain", "--concurrency", str(a.concurrency), "--batch", str(a.batch), "--json"]
    logs = data_dir / "worker-logs"
    logs.mkdir(exist_ok=True)
    seq = 0

    def start() -> list[Any]:
        nonlocal seq
        seq += 1
        log_path = logs / f"{vocab}-{seq}.log"
        fh = open(log_path, "w")  # noqa: SIM115 - the child owns it
        return [subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), time.monotonic(), log_path, None]

    t0 = time.monotonic()
    procs = [start() for _ in range(a.workers)]
    kills = 0
    exits: list[int] = []
    next_kill = t0 + a.kill_every if a.kill_every > 0 else float("inf")
    while True:
        time.sleep(0.5)
        now = time.monotonic()
        still = []
        for entry in procs:
            if entry[0].poll() is None:
                if entry[3] is None and "started" in entry[2].read_text(errors="replace"):
                    entry[3] = now  # model loaded, claiming from now on
                still.append(entry)
            else:
                exits.append(entry[0].returncode)
        procs = still
        left = mon(qstore.outstanding)
        outstanding = left["pending"] + left["in_progress"]
        if not procs and outstanding == 0:
            break
        if now - t0 > a.timeout:
            for entry in procs:
                entry[0].send_signal(signal.SIGTERM)
            break
        working = [x for x in procs if x[3] is not None and now - x[3] >= a.min_work]
        if now >= next_kill and outstanding > 0 and working:
            victim = min(working, key=lambda x: x[3])
            victim[0].send_signal(signal.SIGKILL)
            victim[0].wait()
            kills += 1
            procs.remove(victim)
            procs.append(start())
            next_kill = now + a.kill_every
        elif not procs and outstanding > 0:
            procs = [start() for _ in range(a.workers)]
    drain_s = time.monotonic() - t0
    audit = mon(qstore.audit, vocab)
    server.shutdown()
    mon.close()
    print(f"[kills] {a.codes} codes, {a.workers} workers, SIGKILL every {a.kill_every:g}s: drained in {drain_s:.0f}s "
          f"({kills} kills); states {audit['states']}; LLM calls {stub.requests}; exits {exits}")
    return common_checks(audit, a.codes, counts.new) + [
        ("0 healthy codes failed", audit["states"].get("failed", 0) == 0)]


SCENARIOS: dict[str, Callable[[argparse.Namespace, Path], Verdict]] = {
    "outage": scenario_outage, "db": scenario_db, "deaths": scenario_deaths, "enqueue": scenario_enqueue,
    "claim": scenario_claim, "kills": scenario_kills}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child_main(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="Reuse this data dir (embedded database with the sample loaded).")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="Run these (repeatable); default: all but kills.")
    ap.add_argument("--codes", type=int, default=400, help="Codes per worker scenario (outage, db, kills).")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--delay", type=float, default=2.0, help="Stub LLM answer time, seconds.")
    ap.add_argument("--batch", type=int, default=16, help="Items claimed per batch.")
    ap.add_argument("--concurrency", type=int, default=16, help="LLM calls in flight per worker (kills).")
    ap.add_argument("--outage-start", type=float, default=5.0)
    ap.add_argument("--outage-error", type=float, default=40.0, help="Seconds of HTTP 500.")
    ap.add_argument("--outage-hang", type=float, default=30.0, help="Seconds of hanging requests.")
    ap.add_argument("--db-kill-at", type=float, default=8.0)
    ap.add_argument("--db-down", type=float, default=5.0, help="Seconds the server stays down.")
    ap.add_argument("--enqueue-codes", type=int, default=5000)
    ap.add_argument("--finished", type=int, default=1_000_000, help="Finished rows for the claim scenario.")
    ap.add_argument("--pending", type=int, default=5000)
    ap.add_argument("--claims", type=int, default=200)
    ap.add_argument("--kill-every", type=float, default=20.0, help="kills: seconds between SIGKILLs.")
    ap.add_argument("--min-work", type=float, default=15.0, help="kills: only kill a worker working this long.")
    ap.add_argument("--lease", type=float, default=20.0, help="kills: worker_lease_s.")
    ap.add_argument("--timeout", type=float, default=600.0, help="Give up on a scenario after this many seconds.")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    tmp = None
    if a.data_dir:
        data_dir = Path(a.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="harmonia-faults-")
        data_dir = Path(tmp.name)
    prepare(data_dir, embed=False)
    names = a.scenario or [n for n in SCENARIOS if n != "kills"]
    verdicts: dict[str, Verdict] = {}
    try:
        for name in names:
            t0 = time.monotonic()
            verdicts[name] = SCENARIOS[name](a, data_dir)
            print(f"[{name}] {time.monotonic() - t0:.0f}s", flush=True)
    finally:
        if tmp is not None:
            db.stop_embedded(data_dir / "pgdata")
            tmp.cleanup()
    print("\nverdicts")
    ok = True
    for name, checks in verdicts.items():
        passed = all(c for _, c in checks)
        ok &= passed
        print(f"  {name}: {'PASS' if passed else 'FAIL'}")
        for what, c in checks:
            print(f"    [{'ok' if c else 'FAIL'}] {what}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
