"""SQL for replacing the vocabulary atomically and for reading it.

A load COPYs into tables of a staging schema built LIKE the live ones, then, in the same transaction, gives them
the live tables' constraints and indexes, checks that every approved map still points at a concept, swaps them in
and re-creates the foreign keys that point into the vocabulary. Any error rolls the whole thing back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from harmonia.domain import MapsToEdge
from harmonia.store.common import scalar

LIVE = "vocab"
STAGING = "vocab_staging"


class VocabSwapError(RuntimeError):
    pass


@dataclass
class Stage:
    conn: psycopg.Connection
    tables: list[str]

    def copy_in(self, table: str, columns: list[str]) -> AbstractContextManager[psycopg.Copy]:
        """COPY into the staging table (tab-separated text; write rows with `.write(bytes)`)."""
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        # CSV with a quote character that never occurs: fields pass through verbatim, empty means NULL.
        stmt = sql.SQL("COPY {}.{} ({}) FROM STDIN WITH (FORMAT csv, DELIMITER E'\\t', QUOTE E'\\x01', "
                       "NULL '')").format(sql.Identifier(STAGING), sql.Identifier(table), cols)
        return self.conn.cursor().copy(stmt)

    def finish(self, row_counts: dict[str, int], source_dir: str) -> None:
        conn = self.conn
        for t in self.tables:
            _copy_constraints_and_indexes(conn, t)
        fks = _foreign_keys_into(conn, self.tables)
        _check_maps_survive(conn)
        for fk in fks:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.SQL(fk["table"]), sql.Identifier(fk["name"])))
        for t in self.tables:
            conn.execute(sql.SQL("DROP TABLE {}.{}").format(sql.Identifier(LIVE), sql.Identifier(t)))
            conn.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                sql.Identifier(STAGING), sql.Identifier(t), sql.Identifier(LIVE)))
        for fk in fks:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(fk["table"]), sql.Identifier(fk["name"]), sql.SQL(fk["definition"])))
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(STAGING)))
        conn.execute("INSERT INTO vocab.load_log (source_dir, row_counts) VALUES (%s, %s)",
                     (source_dir, json.dumps(row_counts)))


@contextmanager
def staged_replace(conn: psycopg.Connection, tables: list[str]) -> Iterator[Stage]:
    """One transaction: staging tables like the live ones; commit swaps them in, an exception changes nothing."""
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(STAGING)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(STAGING)))
        for t in tables:
            conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE {}.{} INCLUDING DEFAULTS INCLUDING GENERATED "
                                 "INCLUDING IDENTITY INCLUDING COMMENTS)").format(
                sql.Identifier(STAGING), sql.Identifier(t), sql.Identifier(LIVE), sql.Identifier(t)))
        yield Stage(conn, tables)
    conn.execute("ANALYZE vocab.concept")


def _copy_constraints_and_indexes(conn: psycopg.Connection, table: str) -> None:
    live = f"{LIVE}.{table}"
    rows = conn.execute(
        """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
           WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'c', 'x') ORDER BY contype""",
        (live,)).fetchall()
    for name, definition in rows:
        conn.execute(sql.SQL("ALTER TABLE {}.{} ADD CONSTRAINT {} {}").format(
            sql.Identifier(STAGING), sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)))
    idx = conn.execute(
        """SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
           WHERE i.indrelid = %s::regclass
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)""",
        (live,)).fetchall()
    pattern = re.compile(rf" ON (ONLY )?{LIVE}\.{re.escape(table)} ")
    for (definition,) in idx:
        new, n = pattern.subn(rf" ON \g<1>{STAGING}.{table} ", definition, count=1)
        if n != 1:
            raise VocabSwapError(f"cannot re-target index definition: {definition}")
        conn.execute(new)


def _foreign_keys_into(conn: psycopg.Connection, tables: list[str]) -> list[dict[str, str]]:
    rows = conn.execute(
        """SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
           FROM pg_constraint c JOIN pg_class r ON r.oid = c.confrelid
           JOIN pg_namespace n ON n.oid = r.relnamespace
           WHERE c.contype = 'f' AND n.nspname = %s AND r.relname = ANY(%s)""",
        (LIVE, tables)).fetchall()
    return [{"table": t, "name": n, "definition": d} for t, n, d in rows]


def _check_maps_survive(conn: psycopg.Connection) -> None:
    exists = conn.execute("SELECT to_regclass('harmonia.concept_map')").fetchone()
    if not exists or exists[0] is None:
        return
    lost = conn.execute(
        f"""SELECT m.source_code, m.source_vocab, m.omop_concept_id FROM harmonia.concept_map m
            WHERE NOT EXISTS (SELECT 1 FROM {STAGING}.concept c WHERE c.concept_id = m.omop_concept_id)
            LIMIT 6""").fetchall()
    if lost:
        shown = ", ".join(f"{c}/{v} -> {cid}" for c, v, cid in lost[:5])
        raise VocabSwapError(
            f"the new vocabulary lacks concepts that approved maps point to ({shown}{' …' if len(lost) > 5 else ''}); "
            "nothing was changed. Revoke or re-map those codes first, or load a vocabulary that has them.")


_COPY_LINE = re.compile(r"COPY \w+, line (\d+)")


def describe_copy_error(exc: psycopg.Error, header_lines: int = 1) -> str:
    """Turn a COPY error into 'line N: reason' with N counted in the file (header included)."""
    diag = exc.diag
    where = diag.context or ""
    m = _COPY_LINE.search(where)
    msg = diag.message_primary or str(exc)
    if m:
        return f"line {int(m.group(1)) + header_lines}: {msg}"
    return msg


# ------------------------------------------------------------------------------------------------ reading


def counts(conn: psycopg.Connection) -> dict[str, int]:
    out = {}
    for t in ("concept", "concept_relationship", "concept_synonym", "concept_ancestor", "vocabulary", "domain",
              "concept_class", "relationship"):
        out[t] = scalar(conn.execute(sql.SQL("SELECT count(*) FROM vocab.{}").format(sql.Identifier(t))))
    out["standard_valid"] = scalar(conn.execute(
        "SELECT count(*) FROM vocab.concept WHERE standard_concept = 'S' AND invalid_reason IS NULL"))
    return out


def maps_to_edges(conn: psycopg.Connection, source_vocabularies: Sequence[str] | None = None) -> list[MapsToEdge]:
    """Ground truth: every 'Maps to' from a non-standard concept to a different valid standard concept, ordered by
    source then target. For benchmarks, training and building the mapping memory (development part only, see
    harmonia.groundtruth): retrieval never reads these edges directly."""
    q = """SELECT s.concept_id, s.concept_code, s.vocabulary_id, s.concept_name, s.domain_id, t.concept_id
           FROM vocab.concept_relationship r
           JOIN vocab.concept s ON s.concept_id = r.concept_id_1
           JOIN vocab.concept t ON t.concept_id = r.concept_id_2
           WHERE r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
             AND s.concept_id <> t.concept_id AND s.standard_concept IS DISTINCT FROM 'S'
             AND t.standard_concept = 'S' AND t.invalid_reason IS NULL"""
    params: tuple = ()
    if source_vocabularies:
        q += " AND s.vocabulary_id = ANY(%s)"
        params = (list(source_vocabularies),)
    q += " ORDER BY s.concept_id, t.concept_id"
    return [MapsToEdge(*r) for r in conn.execute(q, params).fetchall()]
