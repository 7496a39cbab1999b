"""SQL for the re-check of every map after a release (migrations/110_release.sql; harmonia.pipeline.recheck).

`affected` reads, in one statement, only the targets the release touched (harmonia.concept_map_target, every
mapping type): a target that is no longer a valid standard concept, or a MAPS_TO target that the source concept's
changed 'Maps to' (vocab_prev against vocab) no longer include, with everything a successor can come from.
Findings are kept per (release, code, old target); a new finding opens the code's review item with the proposals
as its candidates and the finding in its `proposal`. The map's status is set through harmonia.store.mapping
(set_status: version and history); its targets are never changed here (a successor is a proposal, whoever decided
the map).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from harmonia.domain import RankingEntry


@dataclass(frozen=True)
class AffectedMap:
    source_code: str
    source_vocab: str
    source_text: str | None
    decided_by: str
    target: int
    mapping_type: str
    status: str                     # the map's status before the re-check
    detail: str | None              # the target: deprecated | upgraded | non_standard | gone; None: still valid
    replaced_by: tuple[int, ...]    # the target's valid standard 'Concept replaced by' (or their 'Maps to')
    target_maps_to: tuple[int, ...]  # the target's valid standard 'Maps to'
    source_maps_to: tuple[int, ...]  # the source concept's valid standard 'Maps to' in the current release
    maps_to_changed: bool           # the source's 'Maps to' differ from the previous release's


def affected(conn: psycopg.Connection, release_id: int, *, with_previous: bool) -> list[AffectedMap]:
    """The maps this release touched (see the module doc), by source vocabulary and code."""
    vs = "t.standard_concept = 'S' AND t.invalid_reason IS NULL"
    old_mt = ("""SELECT r.concept_id_1 AS s, array_agg(DISTINCT r.concept_id_2 ORDER BY r.concept_id_2) AS t
                 FROM vocab_prev.concept_relationship r
                 WHERE r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
                   AND r.concept_id_1 <> r.concept_id_2 AND r.concept_id_1 IN (SELECT sid FROM src)
                 GROUP BY 1""" if with_previous else "SELECT NULL::int AS s, NULL::int[] AS t WHERE false")
    q = f"""
        WITH m AS (
            SELECT m.source_code, m.source_vocab, m.source_text, m.decided_by, tg.concept_id AS target,
                   tg.mapping_type, m.status
            FROM harmonia.concept_map m JOIN harmonia.concept_map_target tg ON tg.map_id = m.id
            WHERE m.status <> 'IGNORED'
        ), src AS (
            SELECT DISTINCT ON (m.source_code, m.source_vocab) m.source_code, m.source_vocab, s.concept_id AS sid
            FROM m JOIN vocab.concept s ON s.vocabulary_id = m.source_vocab AND s.concept_code = m.source_code
            ORDER BY m.source_code, m.source_vocab, s.concept_id
        ), new_mt AS (
            SELECT r.concept_id_1 AS s, array_agg(DISTINCT r.concept_id_2 ORDER BY r.concept_id_2) AS t,
                   array_agg(DISTINCT r.concept_id_2 ORDER BY r.concept_id_2)
                       FILTER (WHERE {vs}) AS valid
            FROM vocab.concept_relationship r JOIN vocab.concept t ON t.concept_id = r.concept_id_2
            WHERE r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
              AND r.concept_id_1 <> r.concept_id_2 AND r.concept_id_1 IN (SELECT sid FROM src)
            GROUP BY 1
        ), old_mt AS ({old_mt}
        ), a AS (
            SELECT m.*, c.invalid_reason, c.standard_concept, k.concept_id IS NOT NULL AS kept,
                   nm.t AS new_all, nm.valid AS new_valid,
                   (src.sid IS NOT NULL AND {"true" if with_previous else "false"}
                    AND coalesce(nm.t, '{{}}') IS DISTINCT FROM coalesce(om.t, '{{}}')) AS changed
            FROM m JOIN vocab.concept c ON c.concept_id = m.target
            LEFT JOIN vocab.concept_kept k ON k.release_id = %(rel)s AND k.concept_id = m.target
            LEFT JOIN src ON src.source_code = m.source_code AND src.source_vocab = m.source_vocab
            LEFT JOIN new_mt nm ON nm.s = src.sid
            LEFT JOIN old_mt om ON om.s = src.sid
        )
        SELECT a.source_code, a.source_vocab, a.source_text, a.decided_by, a.target, a.mapping_type, a.status,
               CASE WHEN a.kept THEN 'gone' WHEN a.invalid_reason = 'U' THEN 'upgraded'
                    WHEN a.invalid_reason IS NOT NULL THEN 'deprecated'
                    WHEN a.standard_concept IS DISTINCT FROM 'S' THEN 'non_standard' END AS detail,
               coalesce((SELECT array_agg(DISTINCT x) FROM (
                   SELECT t.concept_id AS x FROM vocab.concept_relationship r
                   JOIN vocab.concept t ON t.concept_id = r.concept_id_2
                   WHERE r.concept_id_1 = a.target AND r.relationship_id = 'Concept replaced by'
                     AND r.invalid_reason IS NULL AND {vs}
                   UNION
                   SELECT t.concept_id FROM vocab.concept_relationship r
                   JOIN vocab.concept_relationship r2 ON r2.concept_id_1 = r.concept_id_2
                        AND r2.relationship_id = 'Maps to' AND r2.invalid_reason IS NULL
                   JOIN vocab.concept t ON t.concept_id = r2.concept_id_2
                   WHERE r.concept_id_1 = a.target AND r.relationship_id = 'Concept replaced by'
                     AND r.invalid_reason IS NULL AND {vs}) z), '{{}}'),
               coalesce((SELECT array_agg(DISTINCT t.concept_id) FROM vocab.concept_relationship r
                         JOIN vocab.concept t ON t.concept_id = r.concept_id_2
                         WHERE r.concept_id_1 = a.target AND r.relationship_id = 'Maps to'
                           AND r.invalid_reason IS NULL AND r.concept_id_2 <> a.target AND {vs}), '{{}}'),
               coalesce(a.new_valid, '{{}}'), a.changed
        FROM a
        WHERE a.invalid_reason IS NOT NULL OR a.standard_concept IS DISTINCT FROM 'S'
           OR (a.mapping_type = 'MAPS_TO' AND a.changed AND cardinality(a.new_valid) > 0
               AND a.target <> ALL (a.new_all))
        ORDER BY a.source_vocab, a.source_code, a.target"""
    rows = conn.execute(q, {"rel": release_id}).fetchall()
    return [AffectedMap(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], tuple(r[8]), tuple(r[9]), tuple(r[10]),
                        r[11]) for r in rows]


@dataclass(frozen=True)
class Finding:
    source_code: str
    source_vocab: str
    source_text: str | None
    reason: str                      # invalid_target | maps_to_changed
    detail: str                      # deprecated | upgraded | non_standard | gone | maps_to_changed
    old_concept_id: int
    proposed: tuple[int, ...]
    proposed_by: str | None          # 'Concept replaced by' | 'Maps to' | 'retrieval'; None: nothing found
    decided_by: str


def insert_findings(conn: psycopg.Connection, release_id: int, findings: Sequence[Finding]) -> list[Finding]:
    """Record findings; return those that are new for this release (a second re-check finds them again and
    records nothing)."""
    if not findings:
        return []
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _finding_in (source_code text, source_vocab text, reason text, "
                 "detail text, old_concept_id integer, proposed integer[], proposed_by text, decided_by text) "
                 "ON COMMIT DROP")
    with conn.cursor().copy("COPY _finding_in FROM STDIN") as copy:
        for f in findings:
            copy.write_row((f.source_code, f.source_vocab, f.reason, f.detail, f.old_concept_id, list(f.proposed),
                            f.proposed_by, f.decided_by))
    rows = conn.execute(
        """INSERT INTO harmonia.recheck_finding (release_id, source_code, source_vocab, reason, detail,
               old_concept_id, proposed_concept_ids, proposed_by, decided_by)
           SELECT %s, source_code, source_vocab, reason, detail, old_concept_id, proposed, proposed_by, decided_by
           FROM _finding_in
           ON CONFLICT (release_id, source_code, source_vocab, old_concept_id) DO NOTHING
           RETURNING source_code, source_vocab, old_concept_id""", (release_id,)).fetchall()
    conn.execute("DROP TABLE _finding_in")
    new = {(r[0], r[1], r[2]) for r in rows}
    return [f for f in findings if (f.source_code, f.source_vocab, f.old_concept_id) in new]


def set_proposals(conn: psycopg.Connection, release_id: int, findings: Sequence[Finding]) -> None:
    """Store the proposals that came after the finding was recorded (a fresh retrieval)."""
    with conn.cursor() as cur:
        cur.executemany(
            """UPDATE harmonia.recheck_finding SET proposed_concept_ids = %s, proposed_by = %s
               WHERE release_id = %s AND source_code = %s AND source_vocab = %s AND old_concept_id = %s""",
            [(list(f.proposed), f.proposed_by, release_id, f.source_code, f.source_vocab, f.old_concept_id)
             for f in findings])


def open_reviews(conn: psycopg.Connection, items: Sequence[tuple[Finding, list[RankingEntry], dict[str, Any]]],
                 model_version: str) -> int:
    """Open (or re-open) the review item of each finding's code with the proposals first and the current target
    last; the finding goes into the item's `proposal` (under "recheck"), the item's `extra` (the source's own
    columns, copied into the map on a decision) is left as it was. A flagged item stays flagged."""
    if not items:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO harmonia.review_queue (source_code, source_vocab, source_text, candidates_json,
                   confidence, model_version, reason, priority, proposal)
               VALUES (%s, %s, %s, %s, NULL, %s, %s, 1, %s)
               ON CONFLICT (source_code, source_vocab) DO UPDATE SET
                   source_text = coalesce(EXCLUDED.source_text, harmonia.review_queue.source_text),
                   candidates_json = EXCLUDED.candidates_json, confidence = NULL,
                   model_version = EXCLUDED.model_version, reason = EXCLUDED.reason, error = NULL,
                   proposal = EXCLUDED.proposal, resolved_by = NULL, resolved_at = NULL, updated_at = now(),
                   priority = greatest(harmonia.review_queue.priority, 1),
                   status = CASE WHEN harmonia.review_queue.status = 'flagged' THEN 'flagged' ELSE 'open' END""",
            [(f.source_code, f.source_vocab, f.source_text, json.dumps(ranking), model_version, f.reason,
              json.dumps({"recheck": details})) for f, ranking, details in items])
    return len(items)


def finding_counts(conn: psycopg.Connection, release_id: int) -> dict[tuple[str, str], int]:
    """(reason, detail) -> findings of the release."""
    rows = conn.execute("""SELECT reason, detail, count(*) FROM harmonia.recheck_finding WHERE release_id = %s
                           GROUP BY 1, 2 ORDER BY 1, 2""", (release_id,)).fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def findings_of(conn: psycopg.Connection, release_id: int) -> list[Finding]:
    rows = conn.execute(
        """SELECT f.source_code, f.source_vocab, m.source_text, f.reason, f.detail, f.old_concept_id,
                  f.proposed_concept_ids, f.proposed_by, f.decided_by
           FROM harmonia.recheck_finding f LEFT JOIN harmonia.concept_map m
             ON m.source_code = f.source_code AND m.source_vocab = f.source_vocab
           WHERE f.release_id = %s ORDER BY f.source_vocab, f.source_code""", (release_id,)).fetchall()
    return [Finding(r[0], r[1], r[2], r[3], r[4], r[5], tuple(r[6]), r[7], r[8]) for r in rows]


def map_maps_to(conn: psycopg.Connection, source_vocab: str, limit: int | None = None) -> int:
    """Approve the vocabulary's own 'Maps to' of a source vocabulary as maps (one target per source, the lowest
    id; at most `limit` maps, lowest source ids first; the mapping tables' triggers add the target rows): a map
    table to re-check in tests and the release benchmark, never in production."""
    cur = conn.execute(
        """INSERT INTO harmonia.concept_map (source_code, source_vocab, source_text, omop_concept_id, decided_by,
               model_version)
           SELECT code, vocab, name, target, 'auto', 'vocabulary:Maps to' FROM (
               SELECT DISTINCT ON (s.concept_id) s.concept_code AS code, s.vocabulary_id AS vocab,
                      s.concept_name AS name, t.concept_id AS target
               FROM vocab.concept s JOIN vocab.concept_relationship r ON r.concept_id_1 = s.concept_id
               JOIN vocab.concept t ON t.concept_id = r.concept_id_2
               WHERE s.vocabulary_id = %s AND r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
                 AND s.concept_id <> t.concept_id AND t.standard_concept = 'S' AND t.invalid_reason IS NULL
               ORDER BY s.concept_id, t.concept_id LIMIT %s) x
           ON CONFLICT (source_code, source_vocab) DO NOTHING""", (source_vocab, limit))
    return cur.rowcount
