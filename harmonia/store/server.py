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
