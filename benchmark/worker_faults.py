"""Fault and throughput figures for `harmonia worker` (issue 6).

    python benchmark/worker_faults.py [--data-dir DIR] [--codes 2000] [--workers 4] [--delay 3]
                                      [--kill-every 20] [--min-work 15] [--concurrency 16] [--batch 16] [--lease 20]

An embedded database in DIR (a temporary folder if not given; the sample vocabulary is loaded and embedded there
the first time, ~3+ minutes, so pass --data-dir to reuse it), a stub LLM provider answering every call in
--delay seconds (benchmark/stub_llm_server.py, OpenAI chat.completions wire format), and --workers
`harmonia worker --drain` processes with reranker=llm against it. Every --kill-every seconds the longest-running
worker past start-up gets SIGKILL and a new one is started in its place. When the queue is drained the run is
audited: every code in exactly one final state, none lost, none mapped twice, one auto_approve per approved code.
Goal: 2,000 codes with a 3 s stub drained in <= 10 minutes. Each run enqueues under its own source_vocab
("ICD10-run<timestamp>"), so runs on one data dir do not see each other's codes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stub_llm_server import serve  # sibling module: python puts the script's folder first on sys.path

from harmonia import db
from harmonia.config import load_settings
from harmonia.domain import SourceTerm
from harmonia.paths import sample_dir
from harmonia.pipeline.worker import enqueue
from harmonia.store import migrations
from harmonia.store import queue as qstore
from harmonia.store import vocab as vocab_store


def prepare(data_dir: Path) -> None:
    """Migrate, load and embed the bundled sample unless already done (idempotent)."""
    from harmonia.embedding.ingest import embed_concepts
    from harmonia.embedding.model import Embedder
    from harmonia.vocabulary import load_vocabulary

    s = load_settings(env={"HARMONIA_DATA_DIR": str(data_dir), "HARMONIA_CONFIG": ""})
    with db.connect(s.database, autocommit=True) as conn:
        migrations.migrate(conn)
        if vocab_store.counts(conn)["concept"] == 0:
            t0 = time.perf_counter()
            load_vocabulary(conn, sample_dir() / "vocab", progress=False)
            print(f"loaded the sample vocabulary in {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        r = embed_concepts(conn, Embedder.from_settings(s), vocabularies=s.embedding.vocabularies, progress=False,
                           retrieval=s.retrieval)
        print(f"embeddings: {r.written} new ({time.perf_counter() - t0:.0f}s), {r.total} in the index", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="Reuse this data dir (embedded database with the sample embedded).")
    ap.add_argument("--codes", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--delay", type=float, default=3.0, help="Stub LLM answer time, seconds.")
    ap.add_argument("--kill-every", type=float, default=20.0, help="Seconds between SIGKILLs (0: no kills).")
    ap.add_argument("--concurrency", type=int, default=16, help="LLM calls in flight per worker.")
    ap.add_argument("--batch", type=int, default=16, help="Items claimed per batch.")
    ap.add_argument("--min-work", type=float, default=15.0, help="Only kill a worker that has been working "
                                                                  "(past start-up) this many seconds.")
    ap.add_argument("--lease", type=float, default=20.0, help="worker_lease_s (a killed worker's items wait "
                                                               "this long before another takes them).")
    ap.add_argument("--timeout", type=float, default=1500.0, help="Give up after this many seconds.")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    tmp = None
    if a.data_dir:
        data_dir = Path(a.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="harmonia-faults-")
        data_dir = Path(tmp.name)
    t_prep = time.perf_counter()
    prepare(data_dir)
    print(f"prepared {data_dir} in {time.perf_counter() - t_prep:.0f}s", flush=True)

    s = load_settings(env={"HARMONIA_DATA_DIR": str(data_dir), "HARMONIA_CONFIG": ""})
    run_vocab = f"ICD10-run{int(time.time())}"
    with db.connect(s.database, autocommit=True) as conn:
        names: dict[str, str] = {}
        for e in vocab_store.maps_to_edges(conn, ["ICD10"]):
            names.setdefault(e.source_code, e.source_text)
        codes = sorted(names)
        random.Random(a.seed).shuffle(codes)
        terms = [SourceTerm(source_code=c, source_vocab=run_vocab, source_text=names[c]) for c in codes[: a.codes]]
        counts = enqueue(conn, terms)
    print(f"enqueued {counts.new} ICD10 codes as source_vocab {run_vocab!r}", flush=True)

    server, stub = serve(0, a.delay)
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

    def start() -> list:
        nonlocal seq
        seq += 1
        log_path = logs / f"{run_vocab}-{seq}.log"
        fh = open(log_path, "w")  # noqa: SIM115 - the child owns it
        return [subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), time.monotonic(), log_path, None]

    t0 = time.monotonic()
    procs = [start() for _ in range(a.workers)]
    kills = 0
    exits: list[int] = []
    next_kill = t0 + a.kill_every if a.kill_every > 0 else float("inf")
    last_report = t0
    with db.connect(s.database, autocommit=True) as conn:
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
            left = qstore.outstanding(conn)
            outstanding = left["pending"] + left["in_progress"]
            if not procs and outstanding == 0:
                break
            if now - t0 > a.timeout:
                print("timeout: stopping workers", flush=True)
                for entry in procs:
                    entry[0].send_signal(signal.SIGTERM)
                break
            # Only workers past start-up (model loaded, claiming) are killed: killing one still loading torch
            # tests nothing and, on a small machine, would starve the run.
            working = [x for x in procs if x[3] is not None and now - x[3] >= a.min_work]
            if now >= next_kill and outstanding > 0 and working:
                victim = min(working, key=lambda x: x[3])  # the one working longest
                victim[0].send_signal(signal.SIGKILL)
                victim[0].wait()
                kills += 1
                procs.remove(victim)
                procs.append(start())
                next_kill = now + a.kill_every
            elif not procs and outstanding > 0:  # all exited but work remains (should not happen): restart
                procs = [start() for _ in range(a.workers)]
            if now - last_report >= 30:
                st = qstore.status(conn)["queue"]
                print(f"  t={now - t0:5.0f}s  {st}  kills={kills}  llm_calls={stub.requests}", flush=True)
                last_report = now
        drain_s = time.monotonic() - t0
        audit = qstore.audit(conn, run_vocab)
    server.shutdown()

    final = sum(audit["states"].get(k, 0) for k in qstore.FINAL_STATES)
    checks = {
        "every code in exactly one final state": final == a.codes == audit["items"],
        "none lost (all enqueued codes present)": audit["items"] == counts.new,
        "none mapped twice (concept_map)": audit["codes_mapped_twice"] == 0,
        "concept_map rows == approved items": audit["approved_without_map"] == 0
        and audit["map_without_approved_item"] == 0,
        "one auto_approve per approved code": audit["codes_with_two_auto_approvals"] == 0
        and audit["auto_approve_history_rows"] == audit["states"].get("approved", 0),
        "every in_review/failed code has a review item": audit["review_states_without_review_item"] == 0,
    }
    print(json.dumps({"audit": audit, "workers_exit_codes": exits}, default=str))
    print(f"\n{a.codes} codes, {a.workers} workers (--concurrency {a.concurrency} --batch {a.batch}, lease "
          f"{a.lease:g}s), stub LLM {a.delay:g}s/call, "
          + (f"SIGKILL every {a.kill_every:g}s" if a.kill_every > 0 else "no kills"))
    print(f"drain time: {drain_s:.1f}s ({drain_s / 60:.2f} min) = {a.codes / drain_s * 60:.0f} codes/min; "
          f"goal <= 600s: {'met' if drain_s <= 600 else 'NOT met'}")
    print(f"workers killed: {kills}; items attempted more than once: {audit['items_attempted_more_than_once']} "
          f"(max attempts {audit['max_attempts']}); LLM calls served: {stub.requests} for {a.codes} codes")
    print(f"final states: {audit['states']}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    if tmp is not None:
        db.stop_embedded(data_dir / "pgdata")
        tmp.cleanup()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
