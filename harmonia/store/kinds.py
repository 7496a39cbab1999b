"""SQL for declared source kinds (harmonia.source_set, migration 087)."""

from __future__ import annotations

import psycopg


def declared(conn: psycopg.Connection) -> dict[str, str]:
    """source_vocab -> declared kind name."""
    return {str(v): str(k) for v, k in conn.execute("SELECT source_vocab, kind FROM harmonia.source_set")}


def declare(conn: psycopg.Connection, source_vocab: str, kind: str, declared_by: str = "") -> None:
    conn.execute("""INSERT INTO harmonia.source_set (source_vocab, kind, declared_by) VALUES (%s, %s, %s)
                    ON CONFLICT (source_vocab) DO UPDATE SET kind = EXCLUDED.kind,
                        declared_by = EXCLUDED.declared_by, declared_at = now()""",
                 (source_vocab, kind, declared_by))
