"""Scale benchmark (issue 18): the bundled sample enlarged to 1M or 2.5M valid standard concepts plus as many
synonyms, loaded, embedded, indexed and searched.

    nice -n 19 python benchmark/scale.py --concepts 1000000 --keep /tmp/scale1m            # every stage
    flock /work/wt/quiet.lock python benchmark/scale.py --concepts 1000000 --keep /tmp/scale1m --stages measure

Stages (each is skipped when its output is already in --keep, so a re-measure rebuilds nothing):
- make:    writes an Athena-format release into KEEP/release: the sample's own rows unchanged (so the ICD10 'Maps to'
           and the lab set keep their targets), plus synthetic valid standard concepts whose names recombine the
           sample's real words (a real concept's name of the same domain and vocabulary with about half its words
           swapped for other words of that domain) and one synonym each (the name re-ordered Athena style:
           "tail, head").
- load:    `harmonia vocab load` of that release (rows/s), which also builds the release's BM25 index.
- embed:   the REAL concepts encoded by the bundled MiniLM (rows/s); the SYNTHETIC concepts get their template
           concept's vector plus a random perturbation (noise of norm --noise, then re-normalised), said so in the
           output: encoding millions of rows on 2 shared cores takes hours (see the embed figure).
- index:   the HNSW index (--m, --ef-construction, --maintenance-work-mem, --workers): build time, peak memory of
           the server processes, index size.
- memory:  the mapping memory (`harmonia memory build`).
- lexical: (only when named) each lexical generator alone: latency, recall@50 and top-1; needs no vectors.
- measure: vector top-50 p50/p95 and recall vs exact, with and without a domain filter; lexical p50/p95 of each
           generator (pg_trgm and BM25); hybrid + memory p50/p95 with each; recall@50 and top-1 of the ICD10 test
           part and the lab set with each generator; database size on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import typing
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import psycopg
from _common import percentile  # sibling module: python puts the script's folder first on sys.path

from harmonia import db
from harmonia.config import Settings, load_settings
from harmonia.paths import sample_dir
from harmonia.store import server, sizes
from harmonia.store.server import ensure_database

SYN_BASE = 1_000_000_000  # synthetic concept ids: SYN_BASE + i (the sample has none there; its local ids are > 2e9)
SYN_END = SYN_BASE + 100_000_000
RELEASE_DATE, END_DATE = "20261201", "20991231"
WORD = re.compile(r"^[A-Za-z][a-z]{3,}$")
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- make


def read_rows(path: Path) -> tuple[str, list[list[str]]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header = fh.readline()
        return header, [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def recombine(name: str, pool: list[str], rng: random.Random) -> str:
    """About half the name's content words swapped for other words of its domain (at least one)."""
    words = name.split(" ")
    slots = [i for i, w in enumerate(words) if WORD.match(w)]
    if not slots:
        return f"{name} {rng.choice(pool).lower()}"
    swap = [i for i in slots if rng.random() < 0.5] or [rng.choice(slots)]
    for i in swap:
        w = rng.choice(pool)
        words[i] = w if words[i][0].isupper() else w.lower()
    return " ".join(words)


def synonym_of(name: str, rng: random.Random) -> str:
    """Athena-style re-ordering: "Fracture of left humerus" -> "left humerus, fracture of"."""
    words = name.split(" ")
    if len(words) < 2:
        return name.lower()
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[cut:]) + ", " + " ".join(words[:cut]).lower()


def make_release(out: Path, concepts: int, vocabularies: list[str], seed: int) -> dict:
    rng = random.Random(seed)
    src = sample_dir() / "vocab"
    header, rows = read_rows(src / "CONCEPT.csv.gz")
    templates = [r for r in rows if r[5] == "S" and r[9] == "" and r[3] in vocabularies]
    real_standard = sum(1 for r in rows if r[5] == "S" and r[9] == "")
    pools: dict[str, list[str]] = defaultdict(list)
    for r in templates:
        pools[r[2]].extend(w for w in r[1].split(" ") if WORD.match(w))
    ids = {int(r[0]) for r in rows}
    n_syn = max(concepts - real_standard, 0)
    assert not any(SYN_BASE <= i < SYN_BASE + n_syn for i in ids), "synthetic id range is taken"
    out.mkdir(parents=True, exist_ok=True)
    template_ids = np.empty(n_syn, dtype=np.int64)
    with gzip.open(out / "CONCEPT.csv.gz", "wt", encoding="utf-8", compresslevel=1) as fc, \
            gzip.open(out / "CONCEPT_SYNONYM.csv.gz", "wt", encoding="utf-8", compresslevel=1) as fs:
        fc.write(header)
        fs.write("concept_id\tconcept_synonym_name\tlanguage_concept_id\n")
        for r in rows:
            fc.write("\t".join(r) + "\n")
        for i in range(n_syn):
            t = templates[rng.randrange(len(templates))]
            template_ids[i] = int(t[0])
            name = recombine(t[1], pools[t[2]], rng)
            cid = SYN_BASE + i
            fc.write(f"{cid}\t{name}\t{t[2]}\t{t[3]}\t{t[4]}\tS\tHS{i}\t{RELEASE_DATE}\t{END_DATE}\t\n")
            fs.write(f"{cid}\t{synonym_of(name, rng)}\t4180186\n")
    shutil.copyfile(src / "CONCEPT_RELATIONSHIP.csv.gz", out / "CONCEPT_RELATIONSHIP.csv.gz")
    (out / "VOCABULARY.csv").write_text(
        "vocabulary_id\tvocabulary_name\tvocabulary_reference\tvocabulary_version\tvocabulary_concept_id\n"
        f"None\tOMOP Standardized Vocabularies\tHarmonia\tHarmonia sample scaled to {concepts:,} "
        f"(seed {seed})\t44819096\n", encoding="utf-8")
    np.save(out / "templates.npy", template_ids)
    info = {"concepts": concepts, "real_standard": real_standard, "synthetic": n_syn, "synonyms": n_syn,
            "seed": seed}
    (out / "made.json").write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------------- helpers


def server_rss(pgdata: Path) -> int:
    """Resident memory of the embedded server's processes (postmaster and children), bytes."""
    pid_file = pgdata / "postmaster.pid"
    try:
        root = psutil.Process(int(pid_file.read_text().split()[0]))
        procs = [root, *root.children(recursive=True)]
    except (OSError, psutil.Error, ValueError):
        return 0
    total = 0
    for p in procs:
        # USS: memory only this process holds; shared buffers would be counted once per process in RSS.
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().uss
    return total


class PeakMemory:
    """Samples the server's memory every half second while a stage runs."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata, self.peak, self._stop = pgdata, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.pgdata))
            self._stop.wait(0.5)

    def __enter__(self) -> PeakMemory:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def load_avg() -> str:
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------------- stages



def measured_sets(conn: typing.Any, s: typing.Any, a: argparse.Namespace) -> tuple[list, list, list[str]]:
    """The ICD10 and lab test rows every measuring stage scores, and the texts its latency is timed on."""
    from retrieval_figures import icd10_test, lab_rows

    print(f"before measuring: {load_avg()}", flush=True)
    icd = icd10_test(conn, s.embedding.vocabularies, a.n_icd, 13)
    labs, _ = lab_rows(conn, sample_dir() / "benchmark" / "finomop_lab.usagi.csv.gz", s.embedding.vocabularies,
                       "test")
    if a.n_lab and len(labs) > a.n_lab:
        labs = random.Random(13).sample(labs, a.n_lab)
    texts = [r.source_text for r in icd[:a.latency_n // 2]] + [r.source_text for r in labs[:a.latency_n // 2]]
    return icd, labs, texts

def stage_load(keep: Path, s: Settings, conn: psycopg.Connection) -> None:
    from harmonia.retrieval import bm25
    from harmonia.store import migrations
    from harmonia.vocabulary import load_vocabulary

    migrations.migrate(conn)
    r = load_vocabulary(conn, keep / "release", progress=False)
    total = r.total_rows
    print(f"FIGURE load: {r.rows['concept']:,} concepts, {r.rows.get('concept_synonym', 0):,} synonyms, "
          f"{total:,} rows in {r.seconds:.0f}s = {total / r.seconds:,.0f} rows/s ({load_avg()})", flush=True)
    t = time.perf_counter()
    ix = bm25.build_index(conn, s)
    print(f"FIGURE BM25 index: {ix.documents:,} names and synonyms in {time.perf_counter() - t:.0f}s, "
          f"{gib(ix.bytes)} on disk ({ix.path})", flush=True)


def stage_embed(keep: Path, s: Settings, conn: psycopg.Connection, noise: float, seed: int,
                real_vectors: Path | None) -> None:
    from harmonia.embedding.model import Embedder
    from harmonia.store import embeddings as emb_store

    emb = Embedder.from_settings(s)
    with conn.transaction():
        emb_store.register_model(conn, emb.key, emb.name_or_path, emb.dim)
    todo = [r for r in emb_store.concepts_to_embed(conn, emb.key, s.embedding.vocabularies)
            if not SYN_BASE <= r[0] < SYN_END]
    fresh = emb_store.count(conn, emb.key) == 0
    cache = real_vectors / f"{emb.key.replace('/', '_')}.npz" if real_vectors else None
    if todo and cache and cache.exists():
        z = np.load(cache)
        by_id = dict(zip(z["ids"].tolist(), z["vectors"], strict=True))
        hit = [r for r in todo if r[0] in by_id]
        for i in range(0, len(hit), 10_000):
            chunk = hit[i:i + 10_000]
            emb_store.write_batch(conn, emb.key, [c[0] for c in chunk], [c[1] for c in chunk],
                                  np.stack([by_id[c[0]] for c in chunk]), fresh=fresh)
        print(f"real concepts: {len(hit):,} vectors of the same encoder from {cache} (encoded by an earlier run)")
        todo = [r for r in todo if r[0] not in by_id]
    t0 = time.perf_counter()
    bs = s.embedding.batch_size
    for i in range(0, len(todo), bs):  # sorted by name length (concepts_to_embed): little padding
        chunk = todo[i:i + bs]
        vecs = emb.encode_documents([c[1] for c in chunk], batch_size=bs)
        emb_store.write_batch(conn, emb.key, [c[0] for c in chunk], [c[1] for c in chunk], vecs, fresh=fresh)
    if todo:
        dt = time.perf_counter() - t0
        print(f"FIGURE embed (real concepts, encoder): {len(todo):,} in {dt:.0f}s = {len(todo) / dt:,.0f} rows/s "
              f"({load_avg()})", flush=True)
    if cache and not cache.exists():
        ids_all, vecs_all = sizes.vectors_outside(conn, emb.key, SYN_BASE, SYN_END)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ids=ids_all, vectors=vecs_all)
    templates = np.load(keep / "release" / "templates.npy")
    have = sizes.embedded_ids_in(conn, emb.key, SYN_BASE, SYN_END)
    ids = [r for r in sizes.concept_names_in(conn, SYN_BASE, SYN_END) if r[0] not in have]
    if not ids:
        return
    real_ids, real_vecs = sizes.vectors_outside(conn, emb.key, SYN_BASE, SYN_END)
    real_vec = dict(zip(real_ids.tolist(), real_vecs, strict=True))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(0, len(ids), 50_000):
        chunk = ids[i:i + 50_000]
        base = np.stack([real_vec[int(templates[c[0] - SYN_BASE])] for c in chunk])
        g = rng.standard_normal(base.shape).astype(np.float32)
        g *= noise / np.linalg.norm(g, axis=1, keepdims=True)
        v = base + g
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        emb_store.write_batch(conn, emb.key, [c[0] for c in chunk], [c[1] for c in chunk], v, fresh=True)
    print(f"synthetic vectors: {len(ids):,} = the template concept's MiniLM vector + noise of norm {noise} "
          f"(cosine to the template ~{1 / np.sqrt(1 + noise**2):.2f}), NOT encoded; written in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)


def stage_index(keep: Path, s: Settings, conn: psycopg.Connection, a: argparse.Namespace) -> None:
    from harmonia.embedding.model import Embedder
    from harmonia.store import embeddings as emb_store

    emb = Embedder.from_settings(s)
    t0 = time.perf_counter()
    moved = emb_store.sync_domains(conn, emb.key)  # rows written before migration 140 get their domain
    if moved:
        print(f"domains copied onto {moved:,} embedding rows in {time.perf_counter() - t0:.0f}s", flush=True)
    name = emb_store.index_name(emb.key, a.storage)
    if sizes.relation_size(conn, f"vocab.{name}") is None:
        build_global(keep, conn, emb, a, name)
    if a.domain_indexes:
        t0 = time.perf_counter()
        with PeakMemory(keep / "pgdata") as pm:
            made = emb_store.ensure_domain_indexes(
                conn, emb.key, emb.dim, a.domain_indexes, m=a.m, ef_construction=a.ef_construction,
                maintenance_work_mem=a.maintenance_work_mem, workers=a.workers, storage=a.storage)
        dt = time.perf_counter() - t0
        total = sum(sizes.relation_size(conn, f"vocab.{x}") or 0 for x in made.values())
        print(f"FIGURE HNSW domain indexes ({a.storage}, {a.domain_indexes}): {', '.join(made)}: {dt / 60:.1f} min, "
              f"peak server memory {gib(pm.peak)}, indexes {gib(total)} ({load_avg()})", flush=True)


def build_global(keep: Path, conn: psycopg.Connection, emb: typing.Any, a: argparse.Namespace, name: str) -> None:
    from harmonia.store import embeddings as emb_store

    n = emb_store.count(conn, emb.key)
    t0 = time.perf_counter()
    with PeakMemory(keep / "pgdata") as pm:
        emb_store.ensure_index(conn, emb.key, emb.dim, m=a.m, ef_construction=a.ef_construction,
                               maintenance_work_mem=a.maintenance_work_mem, workers=a.workers, storage=a.storage)
    dt = time.perf_counter() - t0
    size = sizes.relation_size(conn, f"vocab.{name}") or 0
    print(f"FIGURE HNSW build: {n:,} vectors ({a.storage}), m={a.m} ef_construction={a.ef_construction} "
          f"maintenance_work_mem={a.maintenance_work_mem} workers={a.workers}: {dt / 60:.1f} min, "
          f"peak server memory (USS sum) {gib(pm.peak)}, index {gib(size)} ({load_avg()})", flush=True)


def stage_memory(s: Settings, conn: psycopg.Connection) -> None:
    from harmonia.embedding.model import Embedder
    from harmonia.groundtruth import known_mappings
    from harmonia.retrieval.memory import build_memory
    from harmonia.store import memory as mem_store

    emb = Embedder.from_settings(s)
    if sum(mem_store.count(conn, emb.key).values()):
        return
    r = build_memory(conn, emb, s, known_mappings(conn, s.embedding.vocabularies), progress=False)
    print(f"memory: {r.rows:,} sources in {r.seconds:.0f}s", flush=True)


def lexical_retriever(s: Settings, conn: psycopg.Connection, gen: str) -> typing.Any:
    """The lexical retriever of a generator: trigram, bm25, or bm25-words (BM25 without the trigram field for
    words no name contains: what bm25 was before it)."""
    import dataclasses

    from harmonia.retrieval.lexical import LexicalRetriever

    sg = dataclasses.replace(s, retrieval=dataclasses.replace(s.retrieval, lexical_generator=gen.split("-")[0]))
    return variant(LexicalRetriever.from_settings(conn, None, sg), conn, gen)


def variant(lex: typing.Any, conn: psycopg.Connection, gen: str) -> typing.Any:
    """bm25-words: without the trigram field (before 3 Dec); bm25-deep: every filter, the configured vocabularies
    included, reads twice as deep (before 4 Dec; in the hybrid also no lexical scoring of the vector candidates
    while the lexical query runs)."""
    from harmonia.retrieval import bm25

    if gen in ("bm25-words", "bm25-deep"):
        ix = lex.bm25.index_for(conn) if lex.bm25 is not None else None
        assert ix is not None, "no BM25 index of this release"
        ix.use_grams = gen != "bm25-words"
        ix.loose_filter = 1.1 if gen == "bm25-deep" else bm25.LOOSE_FILTER
    return lex


def bm25_parts(lex: typing.Any, conn: psycopg.Connection, texts: list[str], k: int, sets: typing.Any) -> None:
    """Where a BM25 lexical query's time goes, at each depth (index documents read per query, in multiples of k;
    6 is what every search read before 4 Dec, when the configured-vocabulary filter doubled the default 3): the
    Tantivy read alone, then the SQL re-score of what it found; and what the depth does to recall@50 and top-1."""
    from harmonia.metrics import aggregate, score_row
    from harmonia.store import lexical as lex_store

    ix = lex.bm25.index_for(conn)
    if ix is None:
        return
    vocabularies = lex.vocabularies(None)

    def run(t: str, factor: int) -> list[int]:
        ids = ix.search(t, factor * k)
        return [c.concept_id for c in lex_store.rescore(conn, t, ids, k, vocabularies=vocabularies,
                                                        boost_name=lex.cfg.boost_name,
                                                        boost_synonym=lex.cfg.boost_synonym)]

    for factor in (1, 2, 3, 6):
        tl, rl = [], []
        for t in texts:
            t0 = time.perf_counter()
            ids = ix.search(t, factor * k)
            t1 = time.perf_counter()
            lex_store.rescore(conn, t, ids, k, vocabularies=vocabularies, boost_name=lex.cfg.boost_name,
                              boost_synonym=lex.cfg.boost_synonym)
            tl.append((t1 - t0) * 1000)
            rl.append((time.perf_counter() - t1) * 1000)
        quality = []
        for set_name, rows in sets:
            m = aggregate([score_row(g, g, r.targets) for r, g in
                           zip(rows, [run(r.source_text, factor)[:50] for r in rows], strict=True)])
            quality.append(f"{set_name} recall@50 {m.recall:.3f} top-1 {m.top1:.3f}")
        print(f"FIGURE bm25 parts, depth {factor}x{k}: index p50 {percentile(tl, 50):.1f} / p95 "
              f"{percentile(tl, 95):.1f} ms, SQL re-score p50 {percentile(rl, 50):.1f} / p95 {percentile(rl, 95):.1f} "
              f"ms; {'; '.join(quality)}", flush=True)


def stage_lexical(s: Settings, conn: psycopg.Connection, a: argparse.Namespace) -> None:
    """Lexical only (no vectors needed): each generator's latency and its own recall@50 / top-1."""
    from harmonia.metrics import aggregate, score_row

    icd, labs, texts = measured_sets(conn, s, a)
    k = s.retrieval.lexical_k
    for gen in a.generators:
        lex = lexical_retriever(s, conn, gen)
        for t in texts[:10]:
            lex.rows(t, k)
        ll = []
        for t in texts:
            t0 = time.perf_counter()
            lex.rows(t, k)
            ll.append((time.perf_counter() - t0) * 1000)
        print(f"FIGURE {gen}: lexical top-{k} p50 {percentile(ll, 50):.1f} ms, p95 {percentile(ll, 95):.1f} ms, "
              f"max {max(ll):.0f} ms (n={len(ll)}: {len(texts) // 2} ICD10 + {len(texts) - len(texts) // 2} lab "
              "names)", flush=True)
        if lex.bm25 is not None:
            bm25_parts(lex, conn, texts, k, (("ICD10", icd), ("labs", labs)))
        for set_name, rows in (("ICD10->SNOMED test", icd), ("labs (test)", labs)):
            got = [[c.concept_id for c in lex.rows(r.source_text, k)][:50] for r in rows]
            m = aggregate([score_row(g, g, r.targets) for r, g in zip(rows, got, strict=True)])
            print(f"FIGURE quality {gen} | {set_name} | lexical only | n={m.n} | recall@50 {m.recall:.3f} | "
                  f"top-1 {m.top1:.3f} | top-5 {m.top5:.3f}", flush=True)
    print(f"after measuring: {load_avg()}", flush=True)


def stage_measure(s: Settings, conn: psycopg.Connection, a: argparse.Namespace) -> None:
    import dataclasses

    from retrieval_figures import score

    from harmonia.embedding.model import Embedder
    from harmonia.retrieval.hybrid import FusionWeights, HybridRetriever, fused_ranking
    from harmonia.store import embeddings as emb_store

    emb = Embedder.from_settings(s)
    dim = emb_store.model_dim(conn, emb.key)
    assert dim
    icd, labs, texts = measured_sets(conn, s, a)
    vecs = emb.encode_queries(texts)
    print(f"shared_buffers {server.show(conn, 'shared_buffers')}", flush=True)
    if a.prewarm:
        t = time.perf_counter()
        names = [emb_store.index_name(emb.key, a.storage), *emb_store.domain_indexes(conn, emb.key).values()]
        pages = sum(server.prewarm(conn, f"vocab.{n}") for n in names)
        print(f"prewarmed {len(names)} indexes: {pages} pages in {time.perf_counter() - t:.0f}s", flush=True)
    # Vector: top-50 by the index against exact search, with no filter and with the query's domain, at each
    # ef_search of --ef-search (the exact top-50 is computed once per query and filter).
    efs = a.ef_search or [s.retrieval.hnsw_ef_search]
    nq = min(len(vecs), a.exact_n)
    indexed = set(emb_store.domain_indexes(conn, emb.key))
    filters: list[tuple[str, list[str] | None]] = [("no filter", None), ("Measurement (labs)", ["Measurement"]),
                                                   ("Drug+Observation+Device (drugs)", ["Drug", "Observation",
                                                                                        "Device"])]
    for label, domains in filters:
        exact_ids = [{c.concept_id for c in emb_store.vector_search(conn, emb.key, dim, v, 50, exact=True,
                                                                    domains=domains)} for v in vecs[:nq]]
        ways = [False] + ([True] if domains and set(domains) <= indexed else [])
        for ef, by_domain in ((ef, b) for b in ways for ef in efs):
            lat, hit, short = [], 0, 0
            for v in vecs[:10]:
                emb_store.vector_search(conn, emb.key, dim, v, 50, ef_search=ef, domains=domains,
                                        storage=a.storage, by_domain=by_domain)
            for j, v in enumerate(vecs):
                t = time.perf_counter()
                got = emb_store.vector_search(conn, emb.key, dim, v, 50, ef_search=ef, domains=domains,
                                              storage=a.storage, by_domain=by_domain)
                lat.append((time.perf_counter() - t) * 1000)
                short += len(got) < 50
                if j < nq:
                    hit += len({c.concept_id for c in got} & exact_ids[j])
            how = ", per-domain graphs" if by_domain else (", whole index" if domains else "")
            print(f"FIGURE vector top-50 ({a.storage}), {label}{how}, ef_search={ef}: p50 {percentile(lat, 50):.1f} "
                  f"ms, p95 {percentile(lat, 95):.1f} ms (n={len(lat)}); recall vs exact {hit / (50 * nq):.4f} "
                  f"(n={nq}); queries with < 50 rows: {short}", flush=True)
    if "vector-only" in a.skip:
        return
    w = FusionWeights.of(s.retrieval)
    w0 = dataclasses.replace(w, boost_memory=0.0)
    for gen in a.generators:
        sg = dataclasses.replace(s, retrieval=dataclasses.replace(s.retrieval, lexical_generator=gen.split("-")[0]))
        with HybridRetriever.from_settings(conn, emb, sg) as r:
            lex = variant(r.lexical_retriever, conn, gen)
            r.early_lexical = gen != "bm25-deep"
            for t in texts[:10]:
                lex.rows(t, s.retrieval.lexical_k)
            ll = []
            for t in texts:
                t0 = time.perf_counter()
                lex.rows(t, s.retrieval.lexical_k)
                ll.append((time.perf_counter() - t0) * 1000)
            hl = []
            for t, v in zip(texts, vecs, strict=True):
                t0 = time.perf_counter()
                r.search_encoded(t, v, 50)
                hl.append((time.perf_counter() - t0) * 1000)
            print(f"FIGURE {gen}: lexical top-{s.retrieval.lexical_k} p50 {percentile(ll, 50):.1f} ms, "
                  f"p95 {percentile(ll, 95):.1f} ms; hybrid + memory (excl. query encoding) "
                  f"p50 {percentile(hl, 50):.1f} ms, p95 {percentile(hl, 95):.1f} ms, max {max(hl):.0f} ms "
                  f"(n={len(hl)}: {len(texts) // 2} ICD10 + {len(texts) - len(texts) // 2} lab names)", flush=True)
            for set_name, rows in (("ICD10->SNOMED test", icd), ("labs (test)", labs)):
                pools = []
                for i in range(0, len(rows), 64):
                    chunk = rows[i:i + 64]
                    pools.extend(zip(chunk, r.pools([x.source_text for x in chunk],
                                                    source_keys=[x.key for x in chunk]), strict=True))
                for mode, order in (("lexical only", lambda p: p.lexical_order),
                                    ("hybrid", lambda p: fused_ranking(p, w0, 50).tolist()),
                                    ("hybrid + memory", lambda p: fused_ranking(p, w, 50).tolist())):
                    m = score(pools, order)
                    print(f"FIGURE quality {gen} | {set_name} | {mode} | n={m['n']} | recall@50 {m['recall@50']:.3f}"
                          f" | top-1 {m['top-1']:.3f} | top-5 {m['top-5']:.3f}", flush=True)
    size = sizes.database_size(conn)
    print(f"FIGURE database size on disk: {gib(size)}; after measuring: {load_avg()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=1_000_000, help="valid standard concepts in all")
    ap.add_argument("--keep", type=Path, required=True, help="working folder: release, database, index")
    ap.add_argument("--stages", default="make,load,embed,index,memory,measure")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--noise", type=float, default=0.6, help="norm of the synthetic vectors' perturbation")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--maintenance-work-mem", default="4GB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--domain-indexes", default=["auto"], type=lambda v: [x for x in v.split(",") if x],
                    help="index stage: partial HNSW indexes per domain (auto, a list, or '' for none)")
    ap.add_argument("--storage", default="vector", choices=["vector", "halfvec"],
                    help="what the HNSW index keeps (index stage builds it, dropping the other; measure uses it)")
    ap.add_argument("--generators", default="trigram,bm25", type=lambda v: v.split(","),
                    help="of trigram, bm25, bm25-words (BM25 without the trigram field for unknown words)")
    ap.add_argument("--n-icd", type=int, default=1000)
    ap.add_argument("--n-lab", type=int, default=0, help="lab test rows sampled (0: all)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--exact-n", type=int, default=50, help="queries checked against exact search")
    ap.add_argument("--real-vectors", type=Path, help="folder caching the real concepts' encoded vectors (reused "
                    "by runs at other sizes; the first run encodes and writes them)")
    ap.add_argument("--ef-search", type=lambda v: [int(x) for x in v.split(",")], default=[],
                    help="hnsw.ef_search values to measure the vector search at, e.g. 100,200,400,800 (default: "
                         "the hnsw_ef_search setting)")
    ap.add_argument("--skip", type=lambda v: v.split(","), default=[],
                    help="vector-only: the measure stage stops after the vector figures")
    ap.add_argument("--shared-buffers", default="", help="set the embedded server's shared_buffers (e.g. 4GB; "
                    "restarts it) before the stages")
    ap.add_argument("--prewarm", action="store_true", help="measure: load the HNSW index into shared_buffers "
                    "first (pg_prewarm)")
    ap.add_argument("--stop", action="store_true", help="stop the embedded server at the end")
    a = ap.parse_args()
    stages = a.stages.split(",")
    keep = a.keep.resolve()
    keep.mkdir(parents=True, exist_ok=True)
    data = keep / "harmonia"
    os.environ["HARMONIA_DATA_DIR"] = str(data)
    s = load_settings({"data_dir": str(data)})
    if "make" in stages and not (keep / "release" / "made.json").exists():
        t = time.perf_counter()
        info = make_release(keep / "release", a.concepts, s.embedding.vocabularies, a.seed)
        print(f"release written in {time.perf_counter() - t:.0f}s: {info}", flush=True)
    pg = db.start_embedded(keep / "pgdata")
    with psycopg.connect(pg.uri("postgres"), autocommit=True) as c:
        ensure_database(c, "bench")
        now = server.show(c, "shared_buffers")
        if a.shared_buffers and now.lower() != a.shared_buffers.lower():
            # shared_buffers takes a restart; the server's own default (128MB) holds a fraction of a 1M index
            server.set_system(c, "shared_buffers", a.shared_buffers)
    if a.shared_buffers and now.lower() != a.shared_buffers.lower():
        db.stop_embedded(keep / "pgdata")
        pg = db.start_embedded(keep / "pgdata")
        print(f"shared_buffers {now} -> {a.shared_buffers} (server restarted)", flush=True)
    url = pg.uri("bench")
    s = load_settings({"data_dir": str(data), "database_url": url, "hnsw_storage": a.storage})
    with psycopg.connect(url, autocommit=True) as conn:
        from harmonia.store import migrations

        migrations.migrate(conn)
        loaded = sizes.has_concepts_in(conn, SYN_BASE, SYN_END)
        if "load" in stages and not loaded:
            stage_load(keep, s, conn)
        if "embed" in stages:
            stage_embed(keep, s, conn, a.noise, a.seed, a.real_vectors)
        if "index" in stages:
            stage_index(keep, s, conn, a)
        if "memory" in stages:
            stage_memory(s, conn)
        if "lexical" in stages:
            stage_lexical(s, conn, a)
        if "measure" in stages:
            stage_measure(s, conn, a)
    if a.stop:
        db.stop_embedded(keep / "pgdata")


if __name__ == "__main__":
    if "--help" not in sys.argv:
        subprocess.run(["uptime"], check=False)
    main()
