"""SQL for the work queue (harmonia.source_queue) drained by `harmonia worker`.

An item is pending -> in_progress (leased to one worker until lease_expires_at) -> approved | in_review | failed.
Claims use FOR UPDATE SKIP LOCKED, so two workers never take the same row; every later write checks that the
caller still owns the lease, so a worker whose lease was taken over cannot overwrite the new owner's work.
Why an item came back is counted by cause (migration 090): `failures` (decide raised: the code's fault),
`provider_failures` (the reranker's provider failed), `deaths` (its lease expired) and `solo_deaths` (expired while
it was held alone). harmonia.queue_worker holds each running worker's heartbeat.
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
    attempts: int                  # claims, including the current one
    last_error: str | None = None
    failures: int = 0              # earlier attempts whose decide raised (the code's fault)
    provider_failures: int = 0     # earlier attempts the reranker's provider failed (not the code's fault)
    deaths: int = 0                # leases that expired (the worker holding it died or stalled), this one included
    solo_deaths: int = 0           # ... of them while it was held alone
    provider_failing_s: float | None = None  # seconds since the provider first failed it
    taken_over: bool = False       # this claim took it from an expired lease: it is held alone


_ITEM_COLUMNS = """q.id, q.source_code, q.source_vocab, q.source_text, q.source_frequency, q.extra, q.attempts,
                   q.last_error, q.failures, q.provider_failures, q.deaths, q.solo_deaths,
                   extract(epoch FROM now() - q.first_provider_failure_at)"""


def _item(r: Any, taken_over: bool = False) -> QueueItem:
    return QueueItem(id=r[0], term=SourceTerm(source_code=r[1], source_vocab=r[2], source_text=r[3],
                                              source_frequency=r[4], extra=r[5] or {}),
                     attempts=r[6], last_error=r[7], failures=r[8], provider_failures=r[9], deaths=r[10],
                     solo_deaths=r[11], provider_failing_s=None if r[12] is None else float(r[12]),
                     taken_over=taken_over)


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
    trigger sends one NOTIFY and a concurrent enqueue of the same code cannot insert it twice. Rows go in in key
    order: two enqueues of overlapping codes then take the unique index's locks in the same order and one waits
    for the other instead of deadlocking (in file order they deadlocked)."""
    out = EnqueueCounts()
    if not terms:
        return out
    terms = sorted(terms, key=lambda t: (t.source_code, t.source_vocab))
    rows = conn.execute(
        """INSERT INTO harmonia.source_queue (source_code, source_vocab, source_text, source_frequency, extra)
           SELECT c, v, t, f, e FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::jsonb[])
                WITH ORDINALITY AS u(c, v, t, f, e, n) ORDER BY n
           ON CONFLICT (source_code, source_vocab) DO NOTHING RETURNING id""",
        ([t.source_code for t in terms], [t.source_vocab for t in terms], [t.source_text for t in terms],
         [t.source_frequency for t in terms], [json.dumps(t.extra) for t in terms])).fetchall()
    out.ids = [r[0] for r in rows]
    out.new = len(rows)
    out.duplicate = len(terms) - out.new
    return out


def ping(conn: psycopg.Connection) -> None:
    """Raise (psycopg.OperationalError) unless the connection still reaches the server."""
    conn.execute("SELECT 1")


def listen(conn: psycopg.Connection) -> None:
    """Subscribe `conn` (autocommit) to the queue's notifications: the insert trigger NOTIFYs on CHANNEL."""
    conn.execute(f"LISTEN {CHANNEL}")


# The claim (see claim()): an expired lease taken over alone, else up to %(limit)s ready pending items.
_CLAIM = f"""WITH t AS (
        SELECT id FROM harmonia.source_queue
        WHERE state = 'in_progress' AND lease_expires_at < now()
        ORDER BY lease_expires_at LIMIT 1 FOR UPDATE SKIP LOCKED),
    taken AS (
        UPDATE harmonia.source_queue q
        SET lease_owner = %(owner)s, lease_expires_at = now() + make_interval(secs => %(lease)s),
            attempts = q.attempts + 1, deaths = q.deaths + 1,
            solo_deaths = q.solo_deaths + q.leased_alone::int, leased_alone = true, updated_at = now()
        FROM t WHERE q.id = t.id
        RETURNING {_ITEM_COLUMNS}, true),
    p AS (
        SELECT id FROM harmonia.source_queue
        WHERE state = 'pending' AND coalesce(retry_at, enqueued_at) <= now()
        ORDER BY coalesce(retry_at, enqueued_at), id
        LIMIT (SELECT CASE WHEN EXISTS (SELECT 1 FROM t) THEN 0 ELSE %(limit)s END)
        FOR UPDATE SKIP LOCKED),
    n AS (SELECT count(*) AS n FROM p),
    pending AS (
        UPDATE harmonia.source_queue q
        SET state = 'in_progress', lease_owner = %(owner)s,
            lease_expires_at = now() + make_interval(secs => %(lease)s), attempts = q.attempts + 1,
            retry_at = NULL, leased_alone = (n.n = 1), updated_at = now()
        FROM p, n WHERE q.id = p.id
        RETURNING {_ITEM_COLUMNS}, false)
    SELECT * FROM taken UNION ALL SELECT * FROM pending"""


def _claims_need_no_flush(conn: psycopg.Connection) -> None:
    """A claim's commit does not wait for its WAL flush (this transaction only). A claim lost in a server crash
    leaves the item as it was: its worker's outcome then finds the lease not its own and rolls back, so the cost is
    one decide repeated by another worker, never a code mapped twice, and every claim saves a disk flush."""
    conn.execute("SET LOCAL synchronous_commit = off")


def claim(conn: psycopg.Connection, owner: str, limit: int, lease_s: float) -> list[QueueItem]:
    """Lease items: one taken over from an expired lease (its worker died) if there is one, held alone so that a
    code that kills its worker cannot take a batch of healthy codes down with it (the death is counted, and a solo
    death when its dead worker held it alone); else up to `limit` pending items whose back-off is over, oldest
    ready first. One statement whose two scans are range scans of partial indexes (the lease index, and
    source_queue_ready_idx of migration 090): the plan reads neither finished rows nor items waiting out a
    back-off. Commits before returning (pipelined: one round trip), so the lease is visible to all."""
    with conn.pipeline(), conn.transaction():
        _claims_need_no_flush(conn)
        cur = conn.execute(_CLAIM, {"owner": owner, "lease": lease_s, "limit": limit})
    rows = cur.fetchall()
    return sorted((_item(r, taken_over=r[13]) for r in rows), key=lambda i: i.id)


def explain_claim(conn: psycopg.Connection, limit: int = 16) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim statement, run in a transaction rolled back afterwards (nothing is
    claimed; benchmark/worker_faults.py, the tests): every scan with the rows it read, buffers, time."""
    with conn.transaction(force_rollback=True):
        plan = one(conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {_CLAIM}",
                                {"owner": "explain", "lease": 60, "limit": limit}))[0][0]
    nodes: list[dict[str, Any]] = []

    def walk(n: dict[str, Any]) -> None:
        nodes.append(n)
        for c in n.get("Plans", []):
            walk(c)

    walk(plan["Plan"])
    scans = [n for n in nodes if n.get("Relation Name") and "Scan" in n["Node Type"]]  # of a table, not a CTE
    return {"scans": [{"node": n["Node Type"], "index": n.get("Index Name"),
                       "rows": n.get("Actual Rows", 0) * n.get("Actual Loops", 1),  # per loop in EXPLAIN
                       "removed_by_filter": n.get("Rows Removed by Filter", 0) * n.get("Actual Loops", 1)}
                      for n in scans],
            "shared_buffers": plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get("Shared Read Blocks", 0),
            "execution_ms": plan.get("Execution Time"), "plan": plan}


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
    """A failed attempt (decide raised): back to pending with the error, claimable again after `retry_after_s`."""
    row = conn.execute(
        """UPDATE harmonia.source_queue
           SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, last_error = %s,
               failures = failures + 1, retry_at = now() + make_interval(secs => %s), updated_at = now()
           WHERE id = %s AND lease_owner = %s AND state = 'in_progress' RETURNING id""",
        (error, retry_after_s, item_id, owner)).fetchone()
    return row is not None


def release_provider_failure(conn: psycopg.Connection, item_id: int, owner: str, error: str,
                             retry_after_s: float) -> bool:
    """The reranker's provider failed this attempt (rate limit, 5xx, timeout, connection): back to pending after
    `retry_after_s`, counted as a provider failure (not the code's); the first one starts the patience clock."""
    row = conn.execute(
        """UPDATE harmonia.source_queue
           SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, last_error = %s,
               provider_failures = provider_failures + 1,
               first_provider_failure_at = coalesce(first_provider_failure_at, now()),
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


def heartbeat(conn: psycopg.Connection, owner: str, host: str, pid: int, interval_s: float, state: str,
              stats: dict[str, Any]) -> None:
    """Record that this worker is alive (autocommit; called by its lease thread every `interval_s`)."""
    conn.execute(
        """INSERT INTO harmonia.queue_worker (owner, host, pid, heartbeat_s, state, stats)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now(), heartbeat_s = EXCLUDED.heartbeat_s,
               state = EXCLUDED.state, stats = EXCLUDED.stats""",
        (owner, host, pid, interval_s, state, json.dumps(stats)))


def live_workers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Workers whose heartbeat is at most three intervals old (and not stopped), with the items they hold."""
    rows = conn.execute(
        """SELECT w.owner, w.host, w.pid, w.state, w.started_at, extract(epoch FROM now() - w.heartbeat_at),
                  w.stats, (SELECT count(*) FROM harmonia.source_queue q
                            WHERE q.state = 'in_progress' AND q.lease_owner = w.owner)
           FROM harmonia.queue_worker w
           WHERE w.state <> 'stopped' AND w.heartbeat_at > now() - make_interval(secs => 3 * w.heartbeat_s)
           ORDER BY w.started_at""").fetchall()
    return [{"owner": r[0], "host": r[1], "pid": r[2], "state": r[3], "started_at": r[4].isoformat(),
             "heartbeat_age_s": round(float(r[5]), 1), "stats": r[6], "holding": r[7]} for r in rows]


def forget_workers(conn: psycopg.Connection, older_than_s: float = 86400.0) -> int:
    """Drop heartbeat rows of workers silent for `older_than_s` (they hold nothing: their leases expired)."""
    return conn.execute("DELETE FROM harmonia.queue_worker WHERE heartbeat_at < now() - make_interval(secs => %s)",
                        (older_than_s,)).rowcount


def provider_errors(conn: psycopg.Connection, minutes: int) -> dict[str, Any]:
    """The LLM provider's calls and failed calls over the last `minutes` (harmonia.llm_call)."""
    kinds: dict[str, int] = dict(conn.execute(
        """SELECT coalesce(error_kind, 'ok'), count(*) FROM harmonia.llm_call
           WHERE at > now() - make_interval(mins => %s) GROUP BY 1""", (minutes,)).fetchall())
    calls = sum(kinds.values())
    errors = calls - kinds.pop("ok", 0)
    return {"minutes": minutes, "calls": calls, "errors": errors,
            "error_rate": round(errors / calls, 4) if calls else None, "by_kind": kinds}


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
    workers = live_workers(conn)
    live = [w["owner"] for w in workers]
    leases = one(conn.execute(
        """SELECT count(DISTINCT lease_owner), count(*) FILTER (WHERE lease_expires_at < now()),
                  count(*) FILTER (WHERE lease_owner = ANY(%s)),
                  count(*) FILTER (WHERE lease_owner <> ALL(%s) AND lease_expires_at >= now())
           FROM harmonia.source_queue WHERE state = 'in_progress'""", (live, live)))
    retrying = one(conn.execute(
        """SELECT count(*) FILTER (WHERE failures > 0), count(*) FILTER (WHERE provider_failures > 0),
                  count(*) FILTER (WHERE deaths > 0), count(*) FILTER (WHERE retry_at > now())
           FROM harmonia.source_queue WHERE state = 'pending'"""))
    review = {s: 0 for s in ("open", "flagged", "resolved")}
    for st, n in conn.execute("SELECT status, count(*) FROM harmonia.review_queue GROUP BY status"):
        review[st] = n
    by_reason: dict[str, int] = dict(conn.execute(
        """SELECT reason, count(*) FROM harmonia.review_queue WHERE status <> 'resolved'
           GROUP BY reason ORDER BY count(*) DESC, reason""").fetchall())
    return {
        "queue": by_state,
        "throughput_per_min": {m: n / m for m, n in throughput.items()},
        "finished_in_window": throughput,
        "oldest_unfinished": None if oldest is None else {
            "source_code": oldest[0], "source_vocab": oldest[1], "enqueued_at": oldest[2].isoformat(),
            "age_s": float(oldest[3]), "attempts": oldest[4]},
        "live_workers": workers,
        "workers_holding_leases": leases[0],
        "expired_leases": leases[1],
        "held_by_live_workers": leases[2],
        "held_by_silent_workers": leases[3],  # no heartbeat: probably dead, reclaimed once the lease expires
        "pending_retries": retrying[0] + retrying[1],
        "pending_after": {"failure": retrying[0], "provider_failure": retrying[1], "worker_death": retrying[2],
                          "in_back_off": retrying[3]},
        "review_queue": review,
        "review_by_reason": by_reason,
        "provider": {m: provider_errors(conn, m) for m in (5, 15)},
        "concept_map": scalar(conn.execute("SELECT count(*) FROM harmonia.concept_map")),
    }


@dataclass
class PruneCounts:
    queue_rows: int = 0
    llm_calls: int = 0
    workers: int = 0


def prune(conn: psycopg.Connection, finished_days: float, llm_call_days: float, *, batch: int = 10_000,
          dry_run: bool = False) -> PruneCounts:
    """Delete finished queue rows (approved; in review or failed only once their review item is resolved) older
    than `finished_days` and LLM call-log rows older than `llm_call_days`, in batches of `batch` rows, each batch
    its own transaction (short locks). Never touches the concept map, its history or the review queue.
    A negative number of days keeps that table whole."""
    out = PruneCounts()
    finished_where = """state IN ('approved', 'in_review', 'failed')
               AND finished_at < now() - make_interval(secs => %(s)s)
               AND (state = 'approved' OR NOT EXISTS (
                   SELECT 1 FROM harmonia.review_queue r WHERE r.source_code = q.source_code
                   AND r.source_vocab = q.source_vocab AND r.status <> 'resolved'))"""
    if finished_days >= 0:
        secs = finished_days * 86400
        if dry_run:
            out.queue_rows = scalar(conn.execute(
                f"SELECT count(*) FROM harmonia.source_queue q WHERE {finished_where}", {"s": secs}))
        else:
            while True:
                with conn.transaction():
                    n = conn.execute(
                        f"""DELETE FROM harmonia.source_queue WHERE id IN (
                               SELECT id FROM harmonia.source_queue q WHERE {finished_where} LIMIT %(b)s)""",
                        {"s": secs, "b": batch}).rowcount
                out.queue_rows += n
                if n < batch:
                    break
    if llm_call_days >= 0:
        secs = llm_call_days * 86400
        if dry_run:
            out.llm_calls = scalar(conn.execute(
                "SELECT count(*) FROM harmonia.llm_call WHERE at < now() - make_interval(secs => %s)", (secs,)))
        else:
            while True:
                with conn.transaction():
                    n = conn.execute(
                        """DELETE FROM harmonia.llm_call WHERE id IN (
                               SELECT id FROM harmonia.llm_call WHERE at < now() - make_interval(secs => %s)
                               LIMIT %s)""", (secs, batch)).rowcount
                out.llm_calls += n
                if n < batch:
                    break
    if not dry_run:
        with conn.transaction():
            out.workers = forget_workers(conn)
    return out


def insert_finished(conn: psycopg.Connection, source_vocab: str, n: int, *, days_ago: float = 0.0) -> int:
    """Bulk-insert `n` approved (finished) rows under `source_vocab` in one statement: the backlog of a queue that
    has run for a long time (benchmark/worker_faults.py, tests). Returns the rows inserted."""
    return conn.execute(
        """INSERT INTO harmonia.source_queue (source_code, source_vocab, source_text, state, attempts, enqueued_at,
               updated_at, finished_at)
           SELECT 'F' || g, %s, 'finished ' || g, 'approved', 1, t, t, t
           FROM generate_series(1, %s) g, LATERAL (SELECT now() - make_interval(secs => %s) AS t) x
           ON CONFLICT (source_code, source_vocab) DO NOTHING""",
        (source_vocab, n, days_ago * 86400)).rowcount


def defer_pending(conn: psycopg.Connection, source_vocab: str, seconds: float) -> int:
    """Put a source set's pending items into a back-off of `seconds` (benchmarks: a queue with nothing ready)."""
    return conn.execute(
        """UPDATE harmonia.source_queue SET retry_at = now() + make_interval(secs => %s)
           WHERE source_vocab = %s AND state = 'pending'""", (seconds, source_vocab)).rowcount


def drop_items(conn: psycopg.Connection, source_vocab: str) -> int:
    """Delete a source set's queue rows, whatever their state (benchmarks: clean up what no worker is to see)."""
    return conn.execute("DELETE FROM harmonia.source_queue WHERE source_vocab = %s", (source_vocab,)).rowcount


def analyze(conn: psycopg.Connection) -> None:
    """Refresh the planner's statistics of the queue (after a bulk insert)."""
    conn.execute("ANALYZE harmonia.source_queue")


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
             (SELECT max(attempts) FROM harmonia.source_queue WHERE source_vocab = %(v)s),
             (SELECT coalesce(sum(deaths), 0) FROM harmonia.source_queue WHERE source_vocab = %(v)s),
             (SELECT coalesce(sum(provider_failures), 0) FROM harmonia.source_queue WHERE source_vocab = %(v)s),
             (SELECT count(*) FROM harmonia.review_queue WHERE source_vocab = %(v)s),
             (SELECT count(*) FROM harmonia.source_queue WHERE source_vocab = %(v)s AND deaths > 0),
             (SELECT coalesce(max(solo_deaths), 0) FROM harmonia.source_queue WHERE source_vocab = %(v)s)"""
    r = one(conn.execute(q, {"v": source_vocab}))
    return {"states": by_state, "items": r[0], "codes_mapped_twice": r[1], "concept_map_rows": r[2],
            "approved_without_map": r[3], "map_without_approved_item": r[4], "codes_with_two_auto_approvals": r[5],
            "auto_approve_history_rows": r[6], "review_states_without_review_item": r[7], "attempts_total": r[8],
            "items_attempted_more_than_once": r[9], "max_attempts": r[10], "deaths": r[11],
            "provider_failures": r[12], "review_items": r[13], "items_with_deaths": r[14],
            "max_solo_deaths": r[15], "review_reasons": dict(conn.execute(
                "SELECT reason, count(*) FROM harmonia.review_queue WHERE source_vocab = %s GROUP BY reason",
                (source_vocab,)).fetchall())}
