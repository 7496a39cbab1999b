"""Foundation figures on the bundled sample: embedding ingest rate vs the model's raw encode rate, and top-50
retrieval latency (p50/p95) and recall against exact search.

    python benchmark/foundation.py [--data-dir DIR] [--queries 300] [--database-url URL]

With --data-dir the embedded database there is reused (load and embed happen only if missing, so the embedding
figure is only measured on a fresh directory). Goals (issue 2): ingest/raw >= 0.8; p50 <= 5 ms; recall >= 0.99.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import psycopg
from _common import database, percentile  # sibling module: python puts the script's folder first on sys.path

from harmonia.config import Settings
from harmonia.embedding.ingest import embed_concepts
from harmonia.embedding.model import Embedder
from harmonia.paths import sample_dir
from harmonia.store import embeddings as emb_store
from harmonia.store import migrations
from harmonia.store import vocab as vocab_store
from harmonia.vocabulary import load_vocabulary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="keep/reuse the embedded database here")
    ap.add_argument("--database-url")
    ap.add_argument("--queries", type=int, default=300)
    a = ap.parse_args()
    s = Settings()
    embedder = Embedder.from_settings(s)
    with database(a.database_url, a.data_dir) as url, psycopg.connect(url, autocommit=True) as conn:
        migrations.migrate(conn)
        if vocab_store.counts(conn)["concept"] == 0:
            r = load_vocabulary(conn, sample_dir() / "vocab", progress=False)
            print(f"vocabulary: {r.total_rows:,} rows in {r.seconds:.1f}s")
        todo = emb_store.concepts_to_embed(conn, embedder.key, s.embedding.vocabularies)
        if todo:
            texts = [t[1] for t in todo]
            er = embed_concepts(conn, embedder, vocabularies=s.embedding.vocabularies,
                                batch_size=s.embedding.batch_size,
                                progress=False, retrieval=s.retrieval)
            t = time.perf_counter()
            for i in range(0, len(texts), s.embedding.batch_size):  # same strings, order and batches
                embedder.encode_documents(texts[i:i + s.embedding.batch_size], s.embedding.batch_size)
            raw = len(texts) / (time.perf_counter() - t)
            loop = er.written / (er.seconds - er.index_seconds)
            print(f"embedding ingest: {er.written:,} concepts in {er.seconds:.1f}s = {er.rate:,.0f}/s "
                  f"(incl. COPY and the one-off HNSW build, {er.index_seconds:.1f}s); raw encode {raw:,.0f}/s; "
                  f"ratio {er.rate / raw:.2f} (goal >= 0.8); without the index build {loop:,.0f}/s, "
                  f"ratio {loop / raw:.2f}")
        else:
            print("embeddings already present: ingest rate not measured (use a fresh --data-dir)")
        names = sorted({e.source_text for e in vocab_store.maps_to_edges(conn, ["ICD10"])})
        queries = random.Random(1).sample(names, min(a.queries, len(names)))
        vecs = embedder.encode_queries(queries)
        dim = emb_store.model_dim(conn, embedder.key)
        assert dim
        for v in vecs[:20]:  # warm the index into shared buffers
            emb_store.vector_search(conn, embedder.key, dim, v, 50, ef_search=s.retrieval.hnsw_ef_search)
        lat, hits, rows_back = [], 0, []
        for v in vecs:
            t = time.perf_counter()
            approx = emb_store.vector_search(conn, embedder.key, dim, v, 50, ef_search=s.retrieval.hnsw_ef_search)
            lat.append((time.perf_counter() - t) * 1000)
            exact = emb_store.vector_search(conn, embedder.key, dim, v, 50, exact=True)
            hits += len({r[0] for r in approx} & {r[0] for r in exact})
            rows_back.append(len(approx))
        t = time.perf_counter()
        embedder.encode_queries(queries[:100])
        enc_ms = (time.perf_counter() - t) * 1000 / min(100, len(queries))
        print(f"retrieval top-50 over {emb_store.count(conn, embedder.key):,} concepts, {len(queries)} ICD10 names, "
              f"ef_search={s.retrieval.hnsw_ef_search}: p50 {percentile(lat, 50):.2f} ms, "
              f"p95 {percentile(lat, 95):.2f} ms "
              f"(database query; query encoding adds {enc_ms:.1f} ms/query in batches); "
              f"recall vs exact {hits / (50 * len(queries)):.4f}; rows returned min {int(np.min(rows_back))}")


if __name__ == "__main__":
    main()
