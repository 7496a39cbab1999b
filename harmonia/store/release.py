"""SQL for vocabulary releases (migrations/110_release.sql): which release is current, which one it replaced, and
what changed between them: concepts (vocab_prev.concept against vocab.concept) and 'Maps to' edges."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from harmonia.store.common import scalar

PREVIOUS = "vocab_prev"

# One concept may carry several changes (renamed and made non-standard); each is a row of the diff.
CONCEPT_CHANGES = ("added", "removed", "gone", "deprecated", "upgraded", "made_non_standard", "made_standard",
                   "renamed")


@dataclass(frozen=True)
class Release:
    id: int
    label: str
    content_sha256: str | None
    versions: dict[str, str]
    source_dir: str
    row_counts: dict[str, int]
    kept_concepts: int
    previous_id: int | None
    is_current: bool
    loaded_at: datetime
    rechecked_at: datetime | None


_COLS = ("id, label, content_sha256, versions, source_dir, row_counts, kept_concepts, previous_id, is_current, "
         "loaded_at, rechecked_at")


def _release(row: Any) -> Release:
    return Release(*row)


def current(conn: psycopg.Connection) -> Release | None:
    row = conn.execute(f"SELECT {_COLS} FROM vocab.release WHERE is_current").fetchone()
    return _release(row) if row else None


def current_stamp(conn: psycopg.Connection) -> tuple[int, str] | None:
    """(id, content sha256 or '') of the current release: cheap enough to ask before every search."""
    row = conn.execute("SELECT id, coalesce(content_sha256, '') FROM vocab.release WHERE is_current").fetchone()
    return (int(row[0]), str(row[1])) if row else None


def get(conn: psycopg.Connection, release_id: int) -> Release | None:
    row = conn.execute(f"SELECT {_COLS} FROM vocab.release WHERE id = %s", (release_id,)).fetchone()
    return _release(row) if row else None


def history(conn: psycopg.Connection) -> list[Release]:
    return [_release(r) for r in conn.execute(f"SELECT {_COLS} FROM vocab.release ORDER BY id").fetchall()]


def has_previous(conn: psycopg.Connection) -> bool:
    """Whether the replaced release's tables are there (there is none after the first load)."""
    return scalar(conn.execute("SELECT to_regclass('vocab_prev.concept') IS NOT NULL "
                               "AND to_regclass('vocab_prev.concept_relationship') IS NOT NULL"))


def mark_rechecked(conn: psycopg.Connection, release_id: int) -> None:
    conn.execute("UPDATE vocab.release SET rechecked_at = now() WHERE id = %s", (release_id,))


@dataclass(frozen=True)
class ConceptChange:
    change: str                 # one of CONCEPT_CHANGES
    concept_id: int
    vocabulary_id: str
    domain_id: str
    concept_name: str           # the current name (the previous one when removed)
    old_value: str | None       # renamed: the old name; standard/validity changes: the old flag
    new_value: str | None
    successors: tuple[int, ...]  # upgraded/deprecated: 'Concept replaced by'; made non-standard: its 'Maps to'


@dataclass(frozen=True)
class EdgeChange:
    change: str                 # added | removed
    source_vocabulary: str
    source_concept_id: int
    source_code: str
    target_concept_id: int


def concept_changes(conn: psycopg.Connection, release_id: int) -> list[ConceptChange]:
    """Every concept change between vocab_prev and vocab, ordered by change, then concept_id. A concept that the
    new files lack but maps still reference is 'gone' (kept, marked invalid), one they lack otherwise 'removed'."""
    q = f"""
        WITH j AS (
            SELECT coalesce(n.concept_id, p.concept_id) AS concept_id,
                   coalesce(n.vocabulary_id, p.vocabulary_id) AS vocabulary_id,
                   coalesce(n.domain_id, p.domain_id) AS domain_id,
                   coalesce(n.concept_name, p.concept_name) AS name,
                   p.concept_id IS NULL AS added, n.concept_id IS NULL AS removed,
                   k.concept_id IS NOT NULL AS kept,
                   p.concept_name AS p_name, n.concept_name AS n_name,
                   p.standard_concept AS p_std, n.standard_concept AS n_std,
                   p.invalid_reason AS p_inv, n.invalid_reason AS n_inv
            FROM {PREVIOUS}.concept p FULL JOIN vocab.concept n ON n.concept_id = p.concept_id
            LEFT JOIN vocab.concept_kept k ON k.release_id = %(rel)s AND k.concept_id = n.concept_id
            WHERE p.concept_id IS NULL OR n.concept_id IS NULL OR p.concept_name <> n.concept_name
               OR p.standard_concept IS DISTINCT FROM n.standard_concept
               OR p.invalid_reason IS DISTINCT FROM n.invalid_reason
        ), ch AS (
            SELECT j.*, v.change, v.old_value, v.new_value FROM j CROSS JOIN LATERAL (VALUES
                ('added', j.added, NULL, NULL),
                ('removed', j.removed, NULL, NULL),
                ('gone', j.kept AND j.p_inv IS DISTINCT FROM 'D', j.p_inv, 'D'),
                ('deprecated', NOT j.added AND NOT j.kept AND j.n_inv = 'D' AND j.p_inv IS DISTINCT FROM 'D',
                 j.p_inv, j.n_inv),
                ('upgraded', NOT j.added AND j.n_inv = 'U' AND j.p_inv IS DISTINCT FROM 'U', j.p_inv, j.n_inv),
                ('made_non_standard', NOT j.added AND NOT j.removed AND j.n_inv IS NULL AND j.p_std = 'S'
                 AND j.n_std IS DISTINCT FROM 'S', j.p_std, j.n_std),
                ('made_standard', NOT j.added AND NOT j.removed AND j.n_std = 'S' AND j.p_std IS DISTINCT FROM 'S',
                 j.p_std, j.n_std),
                ('renamed', j.p_name <> j.n_name, j.p_name, j.n_name)
            ) AS v(change, hit, old_value, new_value) WHERE v.hit
        )
        SELECT ch.change, ch.concept_id, ch.vocabulary_id, ch.domain_id, ch.name, ch.old_value, ch.new_value,
               CASE WHEN ch.change IN ('upgraded', 'deprecated', 'gone', 'made_non_standard') THEN
                   coalesce((SELECT array_agg(r.concept_id_2 ORDER BY r.concept_id_2)
                             FROM vocab.concept_relationship r
                             WHERE r.concept_id_1 = ch.concept_id AND r.invalid_reason IS NULL
                               AND r.concept_id_2 <> ch.concept_id
                               AND r.relationship_id = CASE WHEN ch.change = 'made_non_standard' THEN 'Maps to'
                                                            ELSE 'Concept replaced by' END), '{{}}')
               ELSE '{{}}' END
        FROM ch ORDER BY array_position(%(order)s::text[], ch.change), ch.concept_id"""
    rows = conn.execute(q, {"rel": release_id, "order": list(CONCEPT_CHANGES)}).fetchall()
    return [ConceptChange(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(r[7])) for r in rows]


def maps_to_changes(conn: psycopg.Connection) -> list[EdgeChange]:
    """'Maps to' edges (valid, not to itself) added and removed between vocab_prev and vocab, by source
    vocabulary, then source concept and target."""
    q = f"""
        WITH p AS (SELECT DISTINCT concept_id_1 AS s, concept_id_2 AS t FROM {PREVIOUS}.concept_relationship
                   WHERE relationship_id = 'Maps to' AND invalid_reason IS NULL AND concept_id_1 <> concept_id_2),
             n AS (SELECT DISTINCT concept_id_1 AS s, concept_id_2 AS t FROM vocab.concept_relationship
                   WHERE relationship_id = 'Maps to' AND invalid_reason IS NULL AND concept_id_1 <> concept_id_2),
             d AS (SELECT coalesce(n.s, p.s) AS s, coalesce(n.t, p.t) AS t,
                          CASE WHEN p.s IS NULL THEN 'added' ELSE 'removed' END AS change
                   FROM p FULL JOIN n ON n.s = p.s AND n.t = p.t WHERE p.s IS NULL OR n.s IS NULL)
        SELECT d.change, coalesce(c.vocabulary_id, pc.vocabulary_id, '?'), d.s,
               coalesce(c.concept_code, pc.concept_code, ''), d.t
        FROM d LEFT JOIN vocab.concept c ON c.concept_id = d.s
        LEFT JOIN {PREVIOUS}.concept pc ON pc.concept_id = d.s AND c.concept_id IS NULL
        ORDER BY 2, 3, 5, 1"""
    return [EdgeChange(*r) for r in conn.execute(q).fetchall()]


@dataclass(frozen=True)
class MemoryFollow:
    repointed: int   # rows whose targets changed: to a successor, or to their source's new 'Maps to'
    dropped: int     # rows left with no valid target


def memory_follow(conn: psycopg.Connection) -> MemoryFollow:
    """Bring the mapping memory to the current release, in the caller's transaction: a target that is no longer a
    valid standard concept is replaced by its valid standard 'Concept replaced by' / 'Maps to' (none: removed); a
    row remembered from the vocabulary's own 'Maps to' (origin 'vocabulary', keyed by its source concept_id) takes
    its source's current 'Maps to'; a row left without targets is dropped. Embeddings are of source texts, which a
    release does not change, so none is recomputed."""
    vs = "t.standard_concept = 'S' AND t.invalid_reason IS NULL"
    conn.execute(f"""
        CREATE TEMP TABLE _memory_follow ON COMMIT DROP AS
        WITH used AS (SELECT DISTINCT unnest(targets) AS id FROM vocab.mapping_memory),
        bad AS (SELECT u.id FROM used u LEFT JOIN vocab.concept t ON t.concept_id = u.id
                WHERE t.concept_id IS NULL OR NOT ({vs})),
        succ AS (SELECT b.id, array_agg(DISTINCT t.concept_id) AS ids FROM bad b
                 JOIN vocab.concept_relationship r ON r.concept_id_1 = b.id
                      AND r.relationship_id IN ('Concept replaced by', 'Maps to') AND r.invalid_reason IS NULL
                 JOIN vocab.concept t ON t.concept_id = r.concept_id_2 AND {vs} AND t.concept_id <> b.id
                 GROUP BY b.id),
        vmt AS (SELECT m.model, m.source_vocab, m.source_code, array_agg(DISTINCT t.concept_id) AS ids
                FROM vocab.mapping_memory m
                JOIN vocab.concept_relationship r ON r.concept_id_1 = (CASE WHEN m.source_key ~ '^[0-9]{{1,9}}$'
                     THEN m.source_key::integer END)
                     AND r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
                JOIN vocab.concept t ON t.concept_id = r.concept_id_2 AND {vs} AND t.concept_id <> r.concept_id_1
                WHERE m.origin = 'vocabulary' AND m.source_key ~ '^[0-9]{{1,9}}$'
                GROUP BY 1, 2, 3),
        nt AS (SELECT m.model, m.source_vocab, m.source_code,
                      (SELECT array_agg(x ORDER BY x) FROM unnest(m.targets) x) AS old,
                      coalesce(CASE WHEN m.origin = 'vocabulary' AND v.ids IS NOT NULL
                                    THEN (SELECT array_agg(x ORDER BY x) FROM unnest(v.ids) x) END,
                               (SELECT array_agg(DISTINCT y ORDER BY y) FROM unnest(m.targets) u(tid)
                                LEFT JOIN bad b ON b.id = u.tid LEFT JOIN succ s ON s.id = u.tid
                                CROSS JOIN LATERAL unnest(CASE WHEN b.id IS NULL THEN ARRAY[u.tid]
                                                               ELSE coalesce(s.ids, '{{}}') END) y),
                               '{{}}') AS new
               FROM vocab.mapping_memory m
               LEFT JOIN vmt v ON v.model = m.model AND v.source_vocab = m.source_vocab
                    AND v.source_code = m.source_code)
        SELECT * FROM nt WHERE new IS DISTINCT FROM old""")
    dropped = conn.execute(
        """DELETE FROM vocab.mapping_memory m USING _memory_follow f
           WHERE m.model = f.model AND m.source_vocab = f.source_vocab AND m.source_code = f.source_code
             AND cardinality(f.new) = 0""").rowcount
    repointed = conn.execute(
        """UPDATE vocab.mapping_memory m SET targets = f.new FROM _memory_follow f
           WHERE m.model = f.model AND m.source_vocab = f.source_vocab AND m.source_code = f.source_code
             AND cardinality(f.new) > 0""").rowcount
    conn.execute("DROP TABLE _memory_follow")
    if dropped or repointed:
        conn.execute("ANALYZE vocab.mapping_memory")
    return MemoryFollow(repointed=repointed, dropped=dropped)
