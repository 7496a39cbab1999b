"""Applying migrations/: ordered SQL files (NNN_name.sql), each applied once in its own transaction and recorded
with its checksum. Two processes migrating at once take turns (an advisory lock)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

from harmonia.paths import resource_dir

log = logging.getLogger(__name__)

TABLE = "public.harmonia_migrations"
_LOCK = 7_314_159  # advisory lock id


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def list_migrations(directory: Path | None = None) -> list[Migration]:
    """The migration files, in order (default: the project's migrations/)."""
    directory = directory or resource_dir("migrations")
    out = []
    for p in sorted(directory.glob("*.sql")):
        version, _, name = p.stem.partition("_")
        if not version.isdigit():
            raise ValueError(f"migration file {p.name} must start with a number (e.g. 004_name.sql)")
        out.append(Migration(version=version, name=name, path=p))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migration files share a number in {directory}: {versions}")
    return out


def migrate(conn: psycopg.Connection, directory: Path | None = None) -> list[str]:
    """Apply every migration not yet recorded, each in its own transaction; return the versions applied."""
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute(f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
    for m in list_migrations(directory):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            row = conn.execute(f"SELECT checksum FROM {TABLE} WHERE version = %s", (m.version,)).fetchone()
            if row:
                if row[0] != m.checksum:
                    log.warning("migration %s_%s changed after it was applied; not re-applied", m.version, m.name)
                continue
            # A migration file is trusted SQL from the project: run as it is written.
            conn.execute(m.path.read_text())
            conn.execute(f"INSERT INTO {TABLE} (version, name, checksum) VALUES (%s, %s, %s)",
                         (m.version, m.name, m.checksum))
            applied_now.append(f"{m.version}_{m.name}")
    return applied_now


def applied(conn: psycopg.Connection) -> list[str]:
    """The migrations recorded as applied, in order ('001_vocab', ...)."""
    exists = conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()
    if not exists or exists[0] is None:
        return []
    return [f"{v}_{n}" for v, n in conn.execute(f"SELECT version, name FROM {TABLE} ORDER BY version")]
