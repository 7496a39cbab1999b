"""SQL for the review queue as reviewers see it: items in frequency order, claims that expire, assignments and
progress per source set. The maps themselves are written by harmonia.store.mapping. The caller owns the
transaction (harmonia.review.service runs each decision in one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

import psycopg

from harmonia.domain import RankingEntry, SourceKey
from harmonia.store.common import scalar

STATUSES = ("open", "flagged", "resolved")


class ReviewItem(TypedDict):
    """A review_queue row as the API serves it."""

    id: int
    source_code: str
    source_vocab: str
    source_text: str | None
    source_frequency: int | None
    extra: dict[str, Any]
    candidates: list[RankingEntry]     # the router's ranking (empty when a fault left none)
    confidence: float | None
    model_version: str | None
    reason: str | None
    error: str | None
    status: str
    resolved_by: str | None            # the reviewer's name
    resolved_at: datetime | None
    created_at: datetime
    updated_at: datetime
    top_domain: str | None             # the domain of the model's top candidate
    proposal: dict[str, Any]           # the reranker's equivalence and additional targets
    assigned_to: str | None            # the reviewer it is assigned to (name)
    claimed_by: str | None             # who holds a live claim on it (name), until claim_expires_at
    claim_expires_at: datetime | None


_ITEM_COLS = """q.id, q.source_code, q.source_vocab, q.source_text, q.source_frequency, q.extra, q.candidates_json,
    q.confidence, q.model_version, q.reason, q.error, q.status, u.name, q.resolved_at, q.created_at, q.updated_at,
    q.candidates_json -> 0 ->> 'domain_id', q.proposal, ua.name,
    CASE WHEN q.claim_expires_at > now() THEN uc.name END,
    CASE WHEN q.claim_expires_at > now() THEN q.claim_expires_at END"""
_ITEM_FROM = """harmonia.review_queue q LEFT JOIN harmonia.users u ON u.id = q.resolved_by
    LEFT JOIN harmonia.users ua ON ua.id = q.assigned_to LEFT JOIN harmonia.users uc ON uc.id = q.claimed_by"""
# The queue's orders; a calibration sample (priority) always comes first.
ORDERS = {"frequency": "q.priority DESC, q.source_frequency DESC NULLS LAST, q.id",
          "oldest": "q.priority DESC, q.id",
          "confidence": "q.priority DESC, q.confidence DESC NULLS LAST, q.id"}


def _num(v: Decimal | float | None) -> float | None:
    return float(v) if isinstance(v, Decimal) else v


def _item(r: Sequence[Any]) -> ReviewItem:
    return ReviewItem(id=r[0], source_code=r[1], source_vocab=r[2], source_text=r[3], source_frequency=r[4],
                      extra=r[5], candidates=r[6], confidence=_num(r[7]), model_version=r[8], reason=r[9],
                      error=r[10], status=r[11], resolved_by=r[12], resolved_at=r[13], created_at=r[14],
                      updated_at=r[15], top_domain=r[16], proposal=r[17] or {}, assigned_to=r[18],
                      claimed_by=r[19], claim_expires_at=r[20])


def list_items(conn: psycopg.Connection, *, statuses: Sequence[str] = ("open", "flagged"),
               source_vocab: str | None = None, domain: str | None = None, min_confidence: float | None = None,
               max_confidence: float | None = None, limit: int = 50, offset: int = 0, order: str = "frequency",
               viewer_id: int | None = None, others_claims: bool = True, mine: bool = False
               ) -> tuple[int, list[ReviewItem]]:
    """One page of review items (a calibration sample first, then the most frequent codes) and the total matching.

    With `viewer_id`: `others_claims=False` leaves out what another reviewer holds a live claim on or was assigned;
    `mine` keeps only the viewer's live claims and assignments."""
    where: list[str] = ["q.status = ANY(%s)"]
    params: list[Any] = [list(statuses)]
    if source_vocab:
        where.append("q.source_vocab = %s")
        params.append(source_vocab)
    if domain:  # the domain of the model's top candidate
        where.append("q.candidates_json -> 0 ->> 'domain_id' = %s")
        params.append(domain)
    if min_confidence is not None:
        where.append("q.confidence >= %s")
        params.append(min_confidence)
    if max_confidence is not None:
        where.append("q.confidence <= %s")
        params.append(max_confidence)
    if viewer_id is not None and not others_claims:
        where.append("""(q.assigned_to IS NULL OR q.assigned_to = %s)
                        AND (q.claimed_by IS NULL OR q.claimed_by = %s OR q.claim_expires_at <= now())""")
        params += [viewer_id, viewer_id]
    if viewer_id is not None and mine:
        where.append("(q.assigned_to = %s OR (q.claimed_by = %s AND q.claim_expires_at > now()))")
        params += [viewer_id, viewer_id]
    cond = " AND ".join(where)
    with conn.pipeline():  # the count and the page in one round trip
        count = conn.execute(f"SELECT count(*) FROM harmonia.review_queue q WHERE {cond}", params)
        page = conn.execute(
            f"""SELECT {_ITEM_COLS} FROM {_ITEM_FROM}
                WHERE {cond} ORDER BY {ORDERS[order]} LIMIT %s OFFSET %s""", [*params, limit, offset])
        total = scalar(count)
        rows = page.fetchall()
    return total, [_item(r) for r in rows]


def get_item_later(conn: psycopg.Connection, item_id: int, *, lock: bool = False
                   ) -> Callable[[], ReviewItem | None]:
    """Send the query for an item now and read it when called: in a pipeline (`conn.pipeline()`) the queries sent
    before the first read travel in one round trip."""
    cur = conn.execute(f"SELECT {_ITEM_COLS} FROM {_ITEM_FROM} WHERE q.id = %s {'FOR UPDATE OF q' if lock else ''}",
                       (item_id,))
    return lambda: _item(row) if (row := cur.fetchone()) else None


def get_item(conn: psycopg.Connection, item_id: int, *, lock: bool = False) -> ReviewItem | None:
    return get_item_later(conn, item_id, lock=lock)()


def item_by_key(conn: psycopg.Connection, key: SourceKey, *, lock: bool = False) -> ReviewItem | None:
    row = conn.execute(f"""SELECT {_ITEM_COLS} FROM {_ITEM_FROM} WHERE q.source_code = %s AND q.source_vocab = %s
                           {'FOR UPDATE OF q' if lock else ''}""", key).fetchone()
    return _item(row) if row else None


def consistent_reads(conn: psycopg.Connection) -> None:
    """Make the rest of the caller's (new) transaction read one snapshot: an item and its map as of one moment."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


def item_facets(conn: psycopg.Connection) -> dict[str, list[str]]:
    """The source vocabularies and top-candidate domains present in the queue, for filter menus."""
    vocabs = [r[0] for r in conn.execute(
        "SELECT DISTINCT source_vocab FROM harmonia.review_queue ORDER BY 1").fetchall()]
    domains = [r[0] for r in conn.execute(
        """SELECT DISTINCT candidates_json -> 0 ->> 'domain_id' FROM harmonia.review_queue
           WHERE candidates_json -> 0 ->> 'domain_id' IS NOT NULL ORDER BY 1""").fetchall()]
    return {"source_vocab": vocabs, "domain": domains}


def resolve_item(conn: psycopg.Connection, item_id: int, reviewer_id: int | None) -> None:
    conn.execute("""UPDATE harmonia.review_queue SET status = 'resolved', resolved_by = %s, resolved_at = now(),
                        claimed_by = NULL, claim_expires_at = NULL, updated_at = now() WHERE id = %s""",
                 (reviewer_id, item_id))


def flag_item(conn: psycopg.Connection, item_id: int) -> None:
    conn.execute("""UPDATE harmonia.review_queue SET status = 'flagged', resolved_by = NULL, resolved_at = NULL,
                        claimed_by = NULL, claim_expires_at = NULL, updated_at = now() WHERE id = %s""", (item_id,))


def open_item(conn: psycopg.Connection, item_id: int) -> None:
    conn.execute("""UPDATE harmonia.review_queue SET status = 'open', resolved_by = NULL, resolved_at = NULL,
                        updated_at = now() WHERE id = %s""", (item_id,))


def set_item_status(conn: psycopg.Connection, item_id: int, status: str, reviewer_id: int | None) -> None:
    """Put an item in a given state (undo puts back the one before)."""
    if status == "resolved":
        resolve_item(conn, item_id, reviewer_id)
    elif status == "flagged":
        flag_item(conn, item_id)
    else:
        open_item(conn, item_id)


def reopen_item(conn: psycopg.Connection, source_code: str, source_vocab: str) -> int | None:
    row = conn.execute("""UPDATE harmonia.review_queue SET status = 'open', resolved_by = NULL, resolved_at = NULL,
                              updated_at = now() WHERE source_code = %s AND source_vocab = %s RETURNING id""",
                       (source_code, source_vocab)).fetchone()
    return row[0] if row else None


def claim(conn: psycopg.Connection, reviewer_id: int, n: int, ttl_s: float, *, source_vocab: str | None = None,
          order: str = "frequency") -> list[int]:
    """Claim the next `n` open items nobody else holds (unclaimed, expired, or assigned to this reviewer), in queue
    order, for `ttl_s` seconds; the reviewer's own live claims come first and are renewed. Two reviewers claiming
    at once never get the same item (SKIP LOCKED). Returns the claimed ids in queue order."""
    cond = ["q.status = 'open'", "(q.assigned_to IS NULL OR q.assigned_to = %(me)s)",
            "(q.claimed_by IS NULL OR q.claimed_by = %(me)s OR q.claim_expires_at <= now())"]
    params: dict[str, Any] = {"me": reviewer_id, "n": n, "ttl": ttl_s}
    if source_vocab:
        cond.append("q.source_vocab = %(vocab)s")
        params["vocab"] = source_vocab
    mine_first = "(q.claimed_by = %(me)s AND q.claim_expires_at > now()) DESC NULLS LAST"
    ids = [r[0] for r in conn.execute(
        f"""SELECT q.id FROM harmonia.review_queue q WHERE {' AND '.join(cond)}
            ORDER BY {mine_first}, {ORDERS[order]} LIMIT %(n)s FOR UPDATE OF q SKIP LOCKED""", params).fetchall()]
    conn.execute("""UPDATE harmonia.review_queue SET claimed_by = %s,
                        claim_expires_at = now() + make_interval(secs => %s) WHERE id = ANY(%s)""",
                 (reviewer_id, ttl_s, ids))
    return ids


def release_claims(conn: psycopg.Connection, reviewer_id: int, item_ids: Sequence[int] | None = None) -> int:
    """Give back the reviewer's claims (all, or on these items)."""
    q = "UPDATE harmonia.review_queue SET claimed_by = NULL, claim_expires_at = NULL WHERE claimed_by = %s"
    params: list[Any] = [reviewer_id]
    if item_ids is not None:
        q += " AND id = ANY(%s)"
        params.append(list(item_ids))
    return conn.execute(q, params).rowcount


def assign(conn: psycopg.Connection, item_ids: Sequence[int], user_id: int | None) -> int:
    """Assign items to a reviewer (None: to nobody)."""
    return conn.execute("UPDATE harmonia.review_queue SET assigned_to = %s, updated_at = now() WHERE id = ANY(%s)",
                        (user_id, list(item_ids))).rowcount


class Progress(TypedDict):
    source_vocab: str
    total: int       # review items of the set
    decided: int     # resolved
    open: int
    flagged: int


def progress(conn: psycopg.Connection) -> list[Progress]:
    """Decided / total review items per source set."""
    rows = conn.execute(
        """SELECT source_vocab, count(*), count(*) FILTER (WHERE status = 'resolved'),
                  count(*) FILTER (WHERE status = 'open'), count(*) FILTER (WHERE status = 'flagged')
           FROM harmonia.review_queue GROUP BY 1 ORDER BY 1""").fetchall()
    return [Progress(source_vocab=r[0], total=r[1], decided=r[2], open=r[3], flagged=r[4]) for r in rows]


# ------------------------------------------------------------------------------------------------ the maps


def like_escape(text: str) -> str:
    """A LIKE pattern that matches `text` literally (backslash is PostgreSQL's default LIKE escape)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_maps(conn: psycopg.Connection, *, source_vocab: str | None = None, decided_by: str | None = None,
              statuses: Sequence[str] | None = ("APPROVED",), search: str | None = None, limit: int = 50,
              offset: int = 0) -> tuple[int, list[int]]:
    """One page of map ids (by source set and code) and the total; `search` is a plain substring of the code, the
    source text or a target's name (LIKE's wildcards in it match themselves)."""
    where: list[str] = ["TRUE"]
    params: list[Any] = []
    if source_vocab:
        where.append("m.source_vocab = %s")
        params.append(source_vocab)
    if decided_by:
        where.append("m.decided_by = %s")
        params.append(decided_by)
    if statuses:
        where.append("m.status = ANY(%s)")
        params.append(list(statuses))
    if search:
        pat = "%" + like_escape(search) + "%"
        where.append("""(m.source_code ILIKE %s OR m.source_text ILIKE %s OR EXISTS (
                            SELECT 1 FROM harmonia.concept_map_target t
                            JOIN vocab.concept c ON c.concept_id = t.concept_id
                            WHERE t.map_id = m.id AND c.concept_name ILIKE %s))""")
        params += [pat] * 3
    cond = " AND ".join(where)
    total = scalar(conn.execute(f"SELECT count(*) FROM harmonia.concept_map m WHERE {cond}", params))
    rows = conn.execute(f"""SELECT m.id FROM harmonia.concept_map m WHERE {cond}
                            ORDER BY m.source_vocab, m.source_code LIMIT %s OFFSET %s""",
                        [*params, limit, offset]).fetchall()
    return total, [r[0] for r in rows]
