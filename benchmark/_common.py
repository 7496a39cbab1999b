"""Helpers for benchmark scripts: a database to run against (given URL, or a throwaway embedded server)."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from harmonia import db
from harmonia.store.server import ensure_database


@contextlib.contextmanager
def database(url: str | None, keep_dir: str | None = None) -> Iterator[str]:
    """`url` as given, or a fresh database on an embedded server in a temporary (or kept) directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="harmonia-bench-") as tmp:
        root = Path(keep_dir) if keep_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        server = db.start_embedded(root / "pgdata")
        try:
            with psycopg.connect(server.uri("postgres"), autocommit=True) as c:
                ensure_database(c, "bench")
            yield server.uri("bench")
        finally:
            if not keep_dir:
                db.stop_embedded(root / "pgdata")


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else values[0]
