"""SQL for declared source kinds (harmonia.source_set, migration 087)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg


def declared_later(conn: psycopg.Connection) -> Callable[[], dict[str, str]]:
    """Send the query now, read the declarations when called (one round trip with the others of a pipeline)."""
    cur = conn.execute("SELECT source_vocab, kind FROM harmonia.source_set")
    return lambda: {str(v): str(k) for v, k in cur.fetchall()}


def declared(conn: psycopg.Connection) -> dict[str, str]:
    """source_vocab -> declared kind name."""
    return declared_later(conn)()


def declare(conn: psycopg.Connection, source_vocab: str, kind: str, declared_by: str = "") -> None:
    conn.execute("""INSERT INTO harmonia.source_set (source_vocab, kind, declared_by) VALUES (%s, %s, %s)
                    ON CONFLICT (source_vocab) DO UPDATE SET kind = EXCLUDED.kind,
                        declared_by = EXCLUDED.declared_by, declared_at = now()""",
                 (source_vocab, kind, declared_by))
