"""SQL for the work queue (harmonia.source_queue) drained by `harmonia worker`.

An item is pending -> in_progress (leased to one worker until lease_expires_at) -> approved | in_review | failed.
Claims use FOR UPDATE SKIP LOCKED, so two workers never take the same row; every later write checks that the
caller still owns the lease, so a worker whose lease was taken over cannot overwrite the new owner's work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from harmonia.domain import SourceTerm
from harmonia.store.common import one, scalar

CHANNEL = "harmonia_queue"
FINAL_STATES = ("approved", "in_review", "failed")


@dataclass
class QueueItem:
    id: int
    term: SourceTerm
    attempts: int                  # including the current one
    last_error: str | None = None


@dataclass
class EnqueueCounts:
    new: int = 0
    duplicate: int = 0             # already in the queue (any state): left as it is
    ids: list[int] = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return self.new + self.duplicate


def enqueue(conn: psycopg.Connection, terms: Sequence[SourceTerm]) -> EnqueueCounts:
    """Insert terms, skipping (source_code, source_vocab) pairs already queued. One statement, so the insert
    trigger sends one NOTIFY and a concurrent enqueue of the same code cannot insert it twice."""
    out = EnqueueCounts()
    if not terms:
        return out
    rows = conn.execute(
        """INSERT INTO harmonia.source_queue (source_code, source_vocab, source_text, source_frequency, extra)
           SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::jsonb[])
           ON CONFLICT (source_code, source_vocab) DO NOTHING RETURNING id""",
        ([t.source_code for t in terms], [t.source_vocab for t in terms], [t.source_text for t in terms],
         [t.source_frequency for t in terms], [json.dumps(t.extra) for t in terms])).fetchall()
    out.ids = [r[0] for r in rows]
    out.new = len(rows)
    out.duplicate = len(terms) - out.new
    return out


def listen(conn: psycopg.Connection) -> None:
    """Subscribe `conn` (autocommit) to the queue's notifications: the insert trigger NOTIFYs on CHANNEL."""
    conn.execute(f"LISTEN {CHANNEL}")


def claim(conn: psycopg.Connection, owner: str, limit: int, lease_s: float) -> list[QueueItem]:
    """Lease up to `limit` items: pending ones (past their retry time) and in-progress ones whose lease expired
    (their worker died). Counts the attempt. Commits before returning, so the lease is visible to all."""
    with conn.transaction():
        rows = conn.execute(
            """WITH c AS (
                   SELECT id FROM harmonia.source_queue
                   WHERE (state = 'pending' AND (retry_at IS NULL OR retry_at <= now()))
                      OR (state = 'in_progress' AND lease_expires_at < now())
                   ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
               UPDATE harmonia.source_queue q
               SET state = 'in_progress', lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s),
                   attempts = q.attempts + 1, retry_at = NULL, updated_at = now()
               FROM c WHERE q.id = c.id
               RETURNING q.id, q.source_code, q.source_vocab, q.source_text, q.source_frequency, q.extra,
                         q.attempts, q.last_error""",
            (limit, owner, lease_s)).fetchall()
    items = [QueueItem(id=r[0], term=SourceTerm(source_code=r[1], source_vocab=r[2], source_text=r[3],
                                                  source_frequency=r[4], extra=r[5] or {}),
                       attempts=r[6], last_error=r[7]) for r in rows]
    return sorted(items, key=lambda i: i.id)


def renew(conn: psycopg.Connection, owner: str, ids: Sequence[int], lease_s: float) -> set[int]:
    """Extend the lease of the items still owned; returns their ids (the others were lost)."""
    if not ids:
        return set()
    rows = conn.execute(
        """UPDATE harmonia.source_queue SET lease_expires_at = now() + make_interval(secs => %s)
           WHERE id = ANY(%s) AND lease_owner = %s AND state = 'in_progress' RETURNING id""",
        (lease_s, list(ids), owner)).fetchall()
    return {r[0] for r in rows}


def lock_owned(conn: psycopg.Connection, item_id: int, owner: str) -> bool:
    """Inside the caller's transaction: lock the item if this owner still holds it. While locked no one can
    claim it, so what the caller writes next and the state it sets commit together or not at all."""
    row = conn.execute(
        """SELECT 1 FROM harmonia.source_queue WHERE id = %s AND lease_owner = %s AND state = 'in_progress'
           FOR UPDATE""", (item_id, owner)).fetchone()
    return row is not None


def finish(conn: psycopg.Connection, item_id: int, owner: str, state: str, error: str | None = None) -> bool:
    """Set a final state (approved | in_review | failed); part of the caller's transaction."""
    if state not in FINAL_STATES:
        raise ValueError(f"{state!r} is not a final queue state")
    row = conn.execute(
        """UPDATE harmonia.source_queue
           SET state = %s, lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now(),
               last_error = coalesce(%s, last_error)
           WHERE id = %s AND lease_owner = %s AND state = 'in_progress' RETURNING id""",
        (state, error, item_id, owner)).fetchone()
    return row is not None


def release_failed(conn: psycopg.Connection, item_id: int, owner: str, error: str, retry_after_s: float) -> bool:
    """A failed attempt: back to pending with the error, claimable again after `retry_after_s`."""
    row = conn.execute(
        """UPDATE harmonia.source_queue
           SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, last_error = %s,
               retry_at = now() + make_interval(secs => %s), updated_at = now()
           WHERE id = %s AND lease_owner = %s AND state = 'in_progress' RETURNING id""",
        (error, retry_after_s, item_id, owner)).fetchone()
    return row is not None


def outstanding(conn: psycopg.Connection) -> dict[str, Any]:
    """What is left to do: pending items (and when the next retry is due) and items leased to a worker."""
    r = one(conn.execute(
        """SELECT count(*) FILTER (WHERE state = 'pending'),
                  count(*) FILTER (WHERE state = 'in_progress'),
                  min(retry_at) FILTER (WHERE state = 'pending')
           FROM harmonia.source_queue WHERE state IN ('pending', 'in_progress')"""))
    return {"pending": r[0], "in_progress": r[1], "next_retry_at": r[2]}


def status(conn: psycopg.Connection, windows_min: Sequence[int] = (1, 5, 15)) -> dict[str, Any]:
    """Everything `harmonia status` shows."""
    by_state: dict[str, int] = {s: 0 for s in ("pending", "in_progress", *FINAL_STATES)}
    for state, n in conn.execute("SELECT state, count(*) FROM harmonia.source_queue GROUP BY state"):
        by_state[state] = n
    throughput = {}
    for m in windows_min:
        n = scalar(conn.execute("SELECT count(*) FROM harmonia.source_queue WHERE finished_at > now() - make_interval("
                         "mins => %s)", (m,)))
        throughput[m] = n
    oldest = conn.execute(
        """SELECT source_code, source_vocab, enqueued_at, extract(epoch FROM now() - enqueued_at), attempts
           FROM harmonia.source_queue WHERE state IN ('pending', 'in_progress')
           ORDER BY enqueued_at, id LIMIT 1""").fetchone()
    leases = one(conn.execute(
        """SELECT count(DISTINCT lease_owner), count(*) FILTER (WHERE lease_expires_at < now())
           FROM harmonia.source_queue WHERE state = 'in_progress'"""))
    retrying = scalar(conn.execute(
        "SELECT count(*) FROM harmonia.source_queue WHERE state = 'pending' AND attempts > 0"))
    review = {s: 0 for s in ("open", "flagged", "resolved")}
    for st, n in conn.execute("SELECT status, count(*) FROM harmonia.review_queue GROUP BY status"):
        review[st] = n
    return {
        "queue": by_state,
        "throughput_per_min": {m: n / m for m, n in throughput.items()},
        "finished_in_window": throughput,
        "oldest_unfinished": None if oldest is None else {
            "source_code": oldest[0], "source_vocab": oldest[1], "enqueued_at": oldest[2].isoformat(),
            "age_s": float(oldest[3]), "attempts": oldest[4]},
        "workers_holding_leases": leases[0],
        "expired_leases": leases[1],
        "pending_retries": retrying,
        "review_queue": review,
        "concept_map": scalar(conn.execute("SELECT count(*) FROM harmonia.concept_map")),
    }


def audit(conn: psycopg.Connection, source_vocab: str) -> dict[str, Any]:
    """Checks after a run over one source vocabulary: every item in one final state, none mapped twice, one
    auto_approve in the history per approved code (benchmark/worker_faults.py)."""
    by_state: dict[str, int] = dict(conn.execute(
        "SELECT state, count(*) FROM harmonia.source_queue WHERE source_vocab = %s GROUP BY state",
        (source_vocab,)).fetchall())
    q = """SELECT
             (SELECT count(*) FROM harmonia.source_queue WHERE source_vocab = %(v)s),
             (SELECT count(*) FROM (SELECT 1 FROM harmonia.concept_map WHERE source_vocab = %(v)s
                                    GROUP BY source_code HAVING count(*) > 1) d),
             (SELECT count(*) FROM harmonia.concept_map WHERE source_vocab = %(v)s),
             (SELECT count(*) FROM harmonia.source_queue q WHERE q.source_vocab = %(v)s AND q.state = 'approved'
                AND NOT EXISTS (SELECT 1 FROM harmonia.concept_map m
                                WHERE m.source_code = q.source_code AND m.source_vocab = q.source_vocab)),
             (SELECT count(*) FROM harmonia.concept_map m WHERE m.source_vocab = %(v)s
                AND NOT EXISTS (SELECT 1 FROM harmonia.source_queue q WHERE q.source_code = m.source_code
                                AND q.source_vocab = m.source_vocab AND q.state = 'approved')),
             (SELECT count(*) FROM (SELECT 1 FROM harmonia.concept_map_history WHERE source_vocab = %(v)s
                                    AND action = 'auto_approve' GROUP BY source_code HAVING count(*) > 1) h),
             (SELECT count(*) FROM harmonia.concept_map_history WHERE source_vocab = %(v)s
                AND action = 'auto_approve'),
             (SELECT count(*) FROM harmonia.source_queue q WHERE q.source_vocab = %(v)s
                AND q.state IN ('in_review', 'failed')
                AND NOT EXISTS (SELECT 1 FROM harmonia.review_queue r WHERE r.source_code = q.source_code
                                AND r.source_vocab = q.source_vocab)),
             (SELECT coalesce(sum(attempts), 0) FROM harmonia.source_queue WHERE source_vocab = %(v)s),
             (SELECT count(*) FROM harmonia.source_queue WHERE source_vocab = %(v)s AND attempts > 1),
             (SELECT max(attempts) FROM harmonia.source_queue WHERE source_vocab = %(v)s)"""
    r = one(conn.execute(q, {"v": source_vocab}))
    return {"states": by_state, "items": r[0], "codes_mapped_twice": r[1], "concept_map_rows": r[2],
            "approved_without_map": r[3], "map_without_approved_item": r[4], "codes_with_two_auto_approvals": r[5],
            "auto_approve_history_rows": r[6], "review_states_without_review_item": r[7], "attempts_total": r[8],
            "items_attempted_more_than_once": r[9], "max_attempts": r[10]}
