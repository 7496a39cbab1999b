"""SQL for replacing the vocabulary atomically and for reading it.

A load COPYs into tables of a staging schema built LIKE the live ones (readers keep using the live release
meanwhile), then, in the same transaction, gives them the live tables' constraints and indexes, carries over the
concepts that maps still point at (marked gone), moves the replaced release's concept and concept_relationship to
vocab_prev, swaps the staged tables in, records the release and re-creates the foreign keys that point into the
vocabulary. Any error rolls the whole thing back: the old release stays in place and working.
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
PREVIOUS = "vocab_prev"  # the replaced release's concept and concept_relationship
KEPT_FOR_DIFF = ("concept", "concept_relationship")


class VocabSwapError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReleaseIdentity:
    """What names a release: the label (VOCABULARY's 'None' version, else a content hash), the hash of the loaded
    rows and every vocabulary's version."""

    label: str
    content_sha256: str
    versions: dict[str, str]


@dataclass(frozen=True)
class SwapReport:
    release_id: int
    previous_id: int | None
    kept: int  # concepts the files lacked that maps still point at: kept, marked gone


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

    def versions(self) -> dict[str, str]:
        """vocabulary_id -> vocabulary_version of the staged VOCABULARY rows (empty without that file)."""
        rows = self.conn.execute(sql.SQL("SELECT vocabulary_id, coalesce(vocabulary_version, '') FROM {}.vocabulary "
                                         "ORDER BY vocabulary_id").format(sql.Identifier(STAGING))).fetchall()
        return {r[0]: r[1] for r in rows}

    def finish(self, row_counts: dict[str, int], source_dir: str, identity: ReleaseIdentity) -> SwapReport:
        """Swap the staged tables in: constraints and indexes first, concepts that maps still reference kept (marked
        gone), the replaced release's concept and concept_relationship kept in vocab_prev, the release recorded
        as current, and the foreign keys into the vocabulary re-created (and so checked)."""
        conn = self.conn
        for t in self.tables:
            _copy_constraints_and_indexes(conn, t)
        fks = _foreign_keys_into(conn, self.tables)
        kept = _keep_referenced_concepts(conn, fks)
        for fk in fks:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.SQL(fk["table"]), sql.Identifier(fk["name"])))
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(PREVIOUS)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(PREVIOUS)))
        for t in self.tables:
            if t in KEPT_FOR_DIFF:
                conn.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                    sql.Identifier(LIVE), sql.Identifier(t), sql.Identifier(PREVIOUS)))
            else:
                conn.execute(sql.SQL("DROP TABLE {}.{}").format(sql.Identifier(LIVE), sql.Identifier(t)))
            conn.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                sql.Identifier(STAGING), sql.Identifier(t), sql.Identifier(LIVE)))
        _drop_secondary_indexes(conn, PREVIOUS)  # the previous release is only read whole (diff, re-check)
        for fk in fks:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(fk["table"]), sql.Identifier(fk["name"]), sql.SQL(fk["definition"])))
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(STAGING)))
        conn.execute("INSERT INTO vocab.load_log (source_dir, row_counts) VALUES (%s, %s)",
                     (source_dir, json.dumps(row_counts)))
        previous = conn.execute("SELECT id FROM vocab.release WHERE is_current").fetchone()
        previous_id = previous[0] if previous else None
        conn.execute("UPDATE vocab.release SET is_current = false WHERE is_current")
        release_id = scalar(conn.execute(
            """INSERT INTO vocab.release (label, content_sha256, versions, source_dir, row_counts, kept_concepts,
                   previous_id, is_current) VALUES (%s, %s, %s, %s, %s, %s, %s, true) RETURNING id""",
            (identity.label, identity.content_sha256, json.dumps(identity.versions), source_dir,
             json.dumps(row_counts), len(kept), previous_id)))
        if kept:
            conn.execute("INSERT INTO vocab.concept_kept (release_id, concept_id) SELECT %s, unnest(%s::int[])",
                         (release_id, kept))
        return SwapReport(release_id=release_id, previous_id=previous_id, kept=len(kept))


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
    conn.execute("ANALYZE vocab.concept_relationship")


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


def _drop_secondary_indexes(conn: psycopg.Connection, schema: str) -> None:
    rows = conn.execute(
        """SELECT n.nspname, ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
           WHERE n.nspname = %s AND NOT i.indisprimary""", (schema,)).fetchall()
    for nsp, name in rows:
        conn.execute(sql.SQL("DROP INDEX {}.{}").format(sql.Identifier(nsp), sql.Identifier(name)))


def _foreign_keys_into(conn: psycopg.Connection, tables: list[str]) -> list[dict[str, str]]:
    """Foreign keys from outside into the swapped tables, with the referencing column of single-column keys."""
    rows = conn.execute(
        """SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), r.relname,
                  CASE WHEN cardinality(c.conkey) = 1 THEN
                       (SELECT attname FROM pg_attribute WHERE attrelid = c.conrelid AND attnum = c.conkey[1])
                  END
           FROM pg_constraint c JOIN pg_class r ON r.oid = c.confrelid
           JOIN pg_namespace n ON n.oid = r.relnamespace
           WHERE c.contype = 'f' AND n.nspname = %s AND r.relname = ANY(%s)
             AND c.conrelid <> ALL (SELECT oid FROM pg_class WHERE relnamespace = n.oid AND relname = ANY(%s))""",
        (LIVE, tables, tables)).fetchall()
    return [{"table": t, "name": n, "definition": d, "into": into, "column": col or ""}
            for t, n, d, into, col in rows]


def _keep_referenced_concepts(conn: psycopg.Connection, fks: list[dict[str, str]]) -> list[int]:
    """Concepts a foreign key (a map) references that the new files lack: copied from the live release into the
    staged one marked gone (invalid_reason 'D'), so the key holds and the re-check flags what points at them."""
    refs = [sql.SQL("SELECT {} AS concept_id FROM {}").format(sql.Identifier(fk["column"]), sql.SQL(fk["table"]))
            for fk in fks if fk["into"] == "concept" and fk["column"]]
    if not refs:
        return []
    q = sql.SQL("""INSERT INTO {staging}.concept
                   SELECT c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id,
                          c.standard_concept, c.concept_code, c.valid_start_date,
                          least(c.valid_end_date, current_date), 'D'
                   FROM {live}.concept c
                   WHERE c.concept_id IN ({refs})
                     AND NOT EXISTS (SELECT 1 FROM {staging}.concept s WHERE s.concept_id = c.concept_id)
                   RETURNING concept_id""").format(
        staging=sql.Identifier(STAGING), live=sql.Identifier(LIVE), refs=sql.SQL(" UNION ").join(refs))
    return sorted(r[0] for r in conn.execute(q).fetchall())


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
