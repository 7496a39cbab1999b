"""SQL about the server itself: creating Harmonia's database on the embedded server, and what `db status` shows."""

from __future__ import annotations

import psycopg
from psycopg import sql


def ensure_database(conn: psycopg.Connection, name: str) -> bool:
    """Create database `name` unless it exists (`conn`: autocommit, to the maintenance database); True if created."""
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        return False
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return True


def server_version(conn: psycopg.Connection) -> str:
    """PostgreSQL's version line, e.g. 'PostgreSQL 18.1 on x86_64-pc-linux-gnu, ...'."""
    row = conn.execute("SELECT version()").fetchone()
    return str(row[0]) if row else ""


def extension_version(conn: psycopg.Connection, name: str) -> str | None:
    """The installed version of an extension (e.g. 'vector'), or None."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = %s", (name,)).fetchone()
    return str(row[0]) if row else None


def show(conn: psycopg.Connection, name: str) -> str:
    """A server setting's current value (SHOW)."""
    row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
    return str(row[0]) if row else ""


def set_system(conn: psycopg.Connection, name: str, value: str) -> None:
    """ALTER SYSTEM SET: written to postgresql.auto.conf; some settings (shared_buffers) take a restart."""
    conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))


def prewarm(conn: psycopg.Connection, relation: str) -> int:
    """Load a relation (an index) into shared_buffers with pg_prewarm; returns the pages read."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
    row = conn.execute("SELECT pg_prewarm(%s::regclass)", (relation,)).fetchone()
    return int(row[0]) if row else 0
