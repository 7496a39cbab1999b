"""Figures for the mapping system of record and the shared review (issue 15).

    python benchmark/review_figures.py [--data-dir DIR] [--rows 10000] [--reviewers 20] [--items 1000] [--think S]

An embedded database in DIR (a temporary folder if not given; the sample vocabulary is loaded there the first time).

1. Usagi: a generated save file of --rows rows (one code in five with a second, 'Maps to value' target; every
   status; comments; ADD_INFO columns) is imported (`harmonia.export.import_usagi`) and exported again (every
   status), timed; the export is imported under a second source set and exported again, and the two exports must be
   identical. Goal: import + export <= 10 s.
2. Review API: `harmonia serve` in its own process, --items review items, --reviewers reviewers (threads, one HTTP
   client each) working down the same queue: list the next items, open one of the first five at random (so they
   meet), approve it with the version they saw; a 409 means someone was faster. Decision latency (client side, each
   POST) p50/p95; afterwards every item must be decided exactly once: one map, one history row, one 200 per code.
   Goals: p95 <= 50 ms with 20 reviewers on 2 cores; zero lost or doubled decisions.
Each run uses source sets named after the time, so runs on one data dir do not see each other's rows. The 200s and
409s are also reported apart.

Closing numbers (2 Dec 2026, shared 2-core machine, `--rows 10000 --reviewers 20 --items 400 --think 1`): Usagi
import + export 2.7 s, round trip identical; decision latency p50 10.8 ms, p95 24.2 ms at load 7.8 and p50 8.1 ms,
p95 14.5 ms at load 2.3 (main's code before the change: p95 22.7 ms at load 3.4; 122 ms in an earlier loaded run);
`--think 0`: p95 106 ms; lost 0, doubled 0. docs/review.md has the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg

from harmonia import db
from harmonia.config import Settings, load_settings
from harmonia.domain import Concept
from harmonia.export import export_csv, import_usagi
from harmonia.paths import sample_dir
from harmonia.store import concepts as concept_store
from harmonia.store import mapping, migrations
from harmonia.store import review as review_store
from harmonia.store import users as user_store
from harmonia.store import vocab as vocab_store

STATUSES = ["APPROVED"] * 6 + ["UNCHECKED"] * 2 + ["FLAGGED", "IGNORED"]
EQUIV = ["EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT"]


def usagi_file(rows: int, concepts: list[Concept], values: list[Concept], rng: random.Random) -> str:
    header = ["sourceCode", "sourceName", "sourceFrequency", "sourceAutoAssignedConceptIds", "ADD_INFO:site",
              "ADD_INFO:unit", "matchScore", "mappingStatus", "equivalence", "statusSetBy", "statusSetOn",
              "conceptId", "conceptName", "domainId", "mappingType", "comment", "createdBy", "createdOn",
              "assignedReviewer"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    n = i = 0
    while n < rows:
        c = rng.choice(concepts)
        status = rng.choice(STATUSES)
        by, on = ("", "") if status == "UNCHECKED" else (rng.choice(["ann", "bob"]), str(1764600000000 + i * 1000))
        base = [f"SRC{i:06d}", f"source text {i} {c.concept_name[:40]}", str(rng.randint(1, 5000)),
                f"{c.concept_id};{rng.choice(concepts).concept_id}", rng.choice(["north", "south"]),
                rng.choice(["", "g/dL", "=1+1"]), f"{rng.random():.4f}", status]
        tail = [rng.choice(["", "checked", "see chart"]), "usagi", str(1764500000000 + i), ""]
        w.writerow(base + [rng.choice(EQUIV), by, on, c.concept_id, "", "", "MAPS_TO"] + tail)
        n += 1
        if n < rows and rng.random() < 0.2:
            v = rng.choice(values)
            w.writerow(base + ["EQUAL", by, on, v.concept_id, "", "", "MAPS_TO_VALUE"] + tail)
            n += 1
        i += 1
    return buf.getvalue()


def usagi_figures(conn: psycopg.Connection, rows: int, run: str) -> dict[str, float]:
    rng = random.Random(15)
    standard = concept_store.standard_concepts(conn)
    concepts = [c for c in standard if c.domain_id in ("Condition", "Measurement", "Observation", "Procedure")]
    values = [c for c in standard if c.domain_id == "Meas Value"]
    text = usagi_file(rows, concepts, values, rng)
    t0 = time.perf_counter()
    s = import_usagi(conn, Path(f"{run}.csv"), f"{run}-a", text=text)
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = export_csv(conn, "usagi", f"{run}-a", statuses=None)
    t_export = time.perf_counter() - t0
    import_usagi(conn, Path("first.csv"), f"{run}-b", text=first)
    second = export_csv(conn, "usagi", f"{run}-b", statuses=None)
    print(f"usagi: {s.rows:,} rows / {s.codes:,} codes imported in {t_import:.2f} s, exported in {t_export:.2f} s "
          f"(total {t_import + t_export:.2f} s; goal <= 10 s); round trip identical: {first == second}", flush=True)
    return {"import_s": t_import, "export_s": t_export, "identical": float(first == second)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api_figures(conn: psycopg.Connection, settings: Settings, data_dir: Path, reviewers: int, n_items: int, run: str,
                think: float) -> None:
    vocab = f"{run}-queue"
    cands = [c for c in concept_store.standard_concepts(conn) if c.domain_id == "Condition"][:50]
    ranking = [{"concept_id": c.concept_id, "concept_name": c.concept_name, "domain_id": c.domain_id,
                "vocabulary_id": c.vocabulary_id, "concept_class_id": c.concept_class_id,
                "concept_code": c.concept_code, "similarity": 0.5, "score": 0.5, "rationale": ""} for c in cands[:5]]
    with conn.transaction():
        for i in range(n_items):
            mapping.enqueue_review(conn, f"Q{i:05d}", vocab, f"queue code {i}", n_items - i, {}, ranking, 0.5,
                                   "bench", "low_confidence", None)
        tokens = [user_store.add_user(conn, f"{run}-r{k}", "reviewer")[1] for k in range(reviewers)]
    port = free_port()
    env = {**os.environ, "HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(data_dir)}
    server = subprocess.Popen([sys.executable, "-c", "from harmonia.cli import main; main()", "--database-url",
                               db.database_url(settings.database), "serve", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/api/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "me", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("harmonia serve did not start") from None
                time.sleep(0.2)
        latencies: list[float] = []
        by_status: dict[int, list[float]] = {}
        wins: dict[str, list[str]] = {}
        conflicts = [0]
        lock = threading.Lock()

        def reviewer(token: str, seed: int) -> None:
            rng = random.Random(seed)
            h = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=h, timeout=30) as c:
                while True:
                    items = c.get("review/items", params={"source_vocab": vocab, "limit": 5,
                                                          "available": True}).json()["items"]
                    if not items:
                        return
                    item = c.get(f"review/items/{rng.choice(items)['id']}").json()
                    if item["status"] != "open":  # decided since it was listed: a reviewer moves on
                        continue
                    if think:
                        time.sleep(rng.uniform(0, 2 * think))  # reading the item
                    t0 = time.perf_counter()
                    r = c.post(f"review/items/{item['id']}/approve",
                               json={"rank": rng.randint(1, 5), "version": item["version"]})
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        by_status.setdefault(r.status_code, []).append(dt)
                        if r.status_code == 200:
                            wins.setdefault(item["source_code"], []).append(token)
                        elif r.status_code == 409:
                            conflicts[0] += 1
                        else:
                            raise SystemExit(f"unexpected {r.status_code}: {r.text}")

        threads = [threading.Thread(target=reviewer, args=(t, k)) for k, t in enumerate(tokens)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(15)
    maps = {m.source_code: m for m in mapping.list_states(conn, source_vocab=vocab)}
    _, open_items = review_store.list_items(conn, statuses=["open", "flagged"], source_vocab=vocab, limit=1)
    doubled = sum(1 for w in wins.values() if len(w) > 1)
    histories = {code: len(mapping.history(conn, code, vocab)) for code in maps}
    lost = n_items - len(maps) + sum(1 for code in wins if code not in maps)
    doubled += sum(1 for n in histories.values() if n != 1)
    lat = sorted(latencies)
    p95 = lat[int(0.95 * (len(lat) - 1))] * 1000
    print(f"review API: {reviewers} reviewers (think time {think:g} s), {len(lat):,} decisions in {wall:.1f} s "
          f"({len(wins):,} won, "
          f"{conflicts[0]:,} got 409), decision latency p50 {statistics.median(lat) * 1000:.1f} ms, "
          f"p95 {p95:.1f} ms (goal <= 50 ms), max {lat[-1] * 1000:.1f} ms; items left open {len(open_items)}; "
          f"lost {lost}, doubled {doubled} (goal 0, 0)", flush=True)
    for code, ts in sorted(by_status.items()):
        ts.sort()
        print(f"  {code}: {len(ts):,} decisions, p50 {statistics.median(ts) * 1000:.1f} ms, "
              f"p95 {ts[int(0.95 * (len(ts) - 1))] * 1000:.1f} ms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--reviewers", type=int, default=20)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--think", type=float, default=0.0,
                    help="Mean seconds a reviewer reads an item before deciding (0: back to back, a stress test).")
    ap.add_argument("--skip-usagi", action="store_true")
    a = ap.parse_args()
    data_dir = a.data_dir or Path(tempfile.mkdtemp(prefix="harmonia-review-bench-"))
    settings = load_settings(env={"HARMONIA_DATA_DIR": str(data_dir), "HARMONIA_CONFIG": ""})
    run = f"B{int(time.time())}"
    with db.connect(settings.database, autocommit=True) as conn:
        migrations.migrate(conn)
        if vocab_store.counts(conn)["concept"] == 0:
            from harmonia.vocabulary import load_vocabulary

            t0 = time.perf_counter()
            load_vocabulary(conn, sample_dir() / "vocab", progress=False)
            print(f"loaded the sample vocabulary in {time.perf_counter() - t0:.0f} s", flush=True)
        if not a.skip_usagi:
            usagi_figures(conn, a.rows, run)
        api_figures(conn, settings, data_dir, a.reviewers, a.items, run, a.think)
    return 0


if __name__ == "__main__":
    sys.exit(main())
