"""Embedded server reuse, stale handle cleanup, migrations."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from harmonia import db
from harmonia.store import migrations


def test_migrations_are_idempotent_and_recorded(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        first = migrations.migrate(conn)
        assert first[:3] == ["001_vocab", "002_embeddings", "003_app"]
        assert migrations.migrate(conn) == []
        assert migrations.applied(conn) == first
        tables = {r[0] for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname IN ('vocab', 'harmonia')")}
        for t in ("vocab.concept", "vocab.concept_relationship", "vocab.concept_synonym", "vocab.vocabulary",
                  "vocab.domain", "vocab.concept_class", "vocab.relationship", "vocab.concept_embedding",
                  "harmonia.users", "harmonia.concept_map", "harmonia.source_queue", "harmonia.review_queue"):
            assert t in tables
        # the concept map's constraints, as the schema promises
        defs = {r[0] for r in conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'harmonia.concept_map'::regclass")}
        assert "FOREIGN KEY (omop_concept_id) REFERENCES vocab.concept(concept_id)" in defs
        assert "UNIQUE (source_code, source_vocab)" in defs
        assert any("confidence >= (0)" in d for d in defs)


def test_embedded_server_is_reused(pg_server: db.EmbeddedServer) -> None:
    again = db.start_embedded(pg_server.pgdata)
    assert again.uri_base == pg_server.uri_base
    pid_file = (pg_server.pgdata / "postmaster.pid").read_text().splitlines()[0]
    with psycopg.connect(again.uri("postgres")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert (pg_server.pgdata / "postmaster.pid").read_text().splitlines()[0] == pid_file


def test_stale_owner_pids_are_pruned(tmp_path: Path) -> None:
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".handle_pids.json").write_text(json.dumps([dead.pid, __import__("os").getpid()]))
    assert db.prune_stale_handles(tmp_path) == [dead.pid]
    assert json.loads((tmp_path / ".handle_pids.json").read_text()) == [__import__("os").getpid()]
