"""Shared fixtures: one embedded PostgreSQL per test session, a template database with the bundled sample
vocabulary loaded and embedded with the bundled model, and a fresh copy of it per test that needs one.

Embedding 32k concepts takes about a minute on 2 cores; the embeddings are cached under .pytest_cache (keyed
by model and vocabulary) so a second local run starts in seconds. CI starts from a fresh clone, without it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from harmonia import db
from harmonia.config import Settings, load_settings
from harmonia.paths import sample_dir
from harmonia.store import migrations

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "harmonia_template"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[db.EmbeddedServer]:
    # Not under pytest's basetemp: pytest prunes old numbered basetemps, which would delete the data directory
    # of a server that another, concurrent pytest run is still using.
    root = Path(tempfile.mkdtemp(prefix="harmonia-test-pg-"))
    pgdata = root / "pgdata"
    server = db.start_embedded(pgdata)
    yield server
    try:
        db.stop_embedded(pgdata)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_settings(url: str, data_dir: Path, **overrides: object) -> Settings:
    env = {"HARMONIA_DATABASE_URL": url, "HARMONIA_DATA_DIR": str(data_dir), "HARMONIA_CONFIG": ""}
    return load_settings(overrides, env=env)


def calibrate_as_is(conn: psycopg.Connection, data_path: Path, reranker: str, reranker_version: str, *,
                    threshold: float | None = 0.9, kind: str = "diagnosis", source_vocab: str = "") -> None:
    """Calibrate a reranker for tests whose subject is not the calibration: a stored calibrator that takes the
    reranker's own confidence as the probability (one feature, the confidence's logit, weight 1) and a certified
    threshold for `kind` (or for one source set), as `harmonia bench calibrate` would store them."""
    from harmonia.pipeline import confidence
    from harmonia.store import calibration

    cal = confidence.Calibrator(reranker=reranker, features=["raw_logit"], mean=[0.0], scale=[1.0], coef=[1.0],
                                kinds=[], kind_coef=[], intercept=0.0)
    confidence.save(cal, data_path)
    with conn.transaction():
        calibration.save_threshold(conn, calibration.StoredThreshold(
            reranker_version=reranker_version, calibrator_hash=cal.hash, kind=kind, source_vocab=source_vocab,
            threshold=threshold, target=0.98, alpha=0.05, bound=0.98, rows_behind=200, rows_correct=200,
            coverage=0.5, calibration_rows=400, method="test", origin="bench"))


def create_database(server: db.EmbeddedServer, name: str, template: str | None = None) -> str:
    with psycopg.connect(server.uri("postgres"), autocommit=True) as conn:
        q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            q = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        conn.execute(q)
    return server.uri(name)


def drop_database(server: db.EmbeddedServer, name: str) -> None:
    with psycopg.connect(server.uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _embedding_cache(conn: psycopg.Connection, model_key: str) -> Path:
    vocab_hash = conn.execute("SELECT md5(string_agg(concept_id::text || concept_name, ',' ORDER BY concept_id)) "
                              "FROM vocab.concept WHERE standard_concept = 'S'").fetchone()[0]
    # the table's columns are in the key: a cache of an older layout is never copied into a newer table
    columns = conn.execute("SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM "
                           "information_schema.columns WHERE table_schema = 'vocab' AND "
                           "table_name = 'concept_embedding'").fetchone()[0]
    key = hashlib.sha1(f"{model_key}|{vocab_hash}|{columns}".encode()).hexdigest()[:16]
    d = REPO / ".pytest_cache" / "harmonia"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"embeddings-{key}.copy"


@pytest.fixture(scope="session")
def template_db(pg_server: db.EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated database with the sample vocabulary loaded and embedded; tests get copies of it."""
    from harmonia.embedding.ingest import embed_concepts
    from harmonia.embedding.model import Embedder
    from harmonia.vocabulary import load_vocabulary

    url = create_database(pg_server, TEMPLATE_DB)
    s = make_settings(url, tmp_path_factory.mktemp("data"))
    embedder = Embedder.from_settings(s)
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.migrate(conn)
        load_vocabulary(conn, sample_dir() / "vocab", progress=False)
        cache = _embedding_cache(conn, embedder.key)
        if cache.exists():
            from harmonia.store import embeddings as emb_store

            with conn.transaction():
                emb_store.register_model(conn, embedder.key, embedder.name_or_path, embedder.dim)
                with conn.cursor().copy("COPY vocab.concept_embedding FROM STDIN") as copy:
                    copy.write(cache.read_bytes())
        embed_concepts(conn, embedder, vocabularies=s.embedding.vocabularies, progress=False, retrieval=s.retrieval)
        if not cache.exists():
            with conn.cursor().copy("COPY vocab.concept_embedding TO STDOUT") as copy, \
                    open(cache, "wb") as fh:
                for block in copy:
                    fh.write(block)
    return url


@pytest.fixture
def fresh_db(pg_server: db.EmbeddedServer, template_db: str) -> Iterator[str]:
    """URL of a private copy of the template (vocabulary + embeddings), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=TEMPLATE_DB)
    yield url
    drop_database(pg_server, name)


@pytest.fixture
def empty_db(pg_server: db.EmbeddedServer) -> Iterator[str]:
    """URL of an empty, unmigrated database, dropped afterwards."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name)
    yield url
    drop_database(pg_server, name)


@pytest.fixture
def settings(fresh_db: str, tmp_path: Path) -> Settings:
    return make_settings(fresh_db, tmp_path)


@pytest.fixture
def conn(fresh_db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(fresh_db, autocommit=True) as c:
        yield c


@pytest.fixture(scope="session")
def embedder():
    from harmonia.embedding.model import Embedder

    return Embedder.from_settings(Settings())
