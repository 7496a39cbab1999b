"""What a reviewer can do, independent of HTTP: each decision runs in one transaction that locks the review item
and the code's map, checks the version the reviewer decided on, writes the map's status and targets (same FK and
checks as auto-approval), appends to its history and resolves (or flags) the item."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from typing import Any, Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from harmonia import db
from harmonia.config import DatabaseSettings, Settings
from harmonia.domain import Concept, Equivalence, MapStatus, RankingRecord
from harmonia.kinds import KindRegistry
from harmonia.retrieval.base import Retriever
from harmonia.store import concepts as concept_store
from harmonia.store import kinds as kinds_store
from harmonia.store import mapping as map_store
from harmonia.store import review as store
from harmonia.store import users as user_store
from harmonia.store.review import ReviewItem

log = logging.getLogger(__name__)

DecisionKind = Literal["approve", "choose", "no_match", "ignore", "flag", "targets"]


class ReviewError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"detail": self.message}


class NotFound(ReviewError):
    status = 404


class Invalid(ReviewError):
    status = 422


class Conflict(ReviewError):
    """409: the decision cannot be made as sent. `reason`: stale (the code changed since the reviewer looked; the
    current state comes with it), domain_conflict (send again with confirm to go ahead), nothing_to_undo, changed
    (undo: someone changed the code since)."""

    status = 409

    def __init__(self, message: str, reason: str, current: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.current = current

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.message, "reason": self.reason}
        if self.current is not None:
            out["current"] = self.current
        return out


def check_concept(known: Mapping[int, Concept], concept_id: int, mapping_type: str = "MAPS_TO") -> Concept:
    """The concept (from `known`, the concepts read for the decision), or Invalid naming why it cannot be a target
    of this mapping type (checked before the write; the FK backs it)."""
    c = known.get(concept_id)
    problem = map_store.target_problem(c, concept_id, mapping_type)
    if problem or c is None:
        raise Invalid(problem or f"concept_id {concept_id} does not exist")
    return c


def _ranking(item: ReviewItem) -> RankingRecord:
    # Same shape as Decision.ranking_json, so exports read reviewer and auto maps alike.
    return {"model_version": item["model_version"], "confidence": item["confidence"], "ranked": item["candidates"],
            "reason": item["reason"], "source_frequency": item["source_frequency"],
            "review_item_id": item["id"]}


def domains_for(item: ReviewItem, declared: Mapping[str, str]) -> tuple[str, ...]:
    """The domains a target of this source should be in: its kind's (built in or declared: ICD10 Condition,
    Observation; labs Measurement), else the model's first suggestion's; none known: anything goes. `declared`:
    the database's declared kinds, read with the rest of the request (never cached: a declaration counts at once)."""
    domains = KindRegistry(declared=dict(declared)).kind_of(item["source_vocab"]).domains
    if domains:
        return domains
    return (item["top_domain"],) if item["top_domain"] else ()


def _detail(item: ReviewItem, state: map_store.MapState | None, declared: Mapping[str, str],
            history: list[map_store.HistoryEntry]) -> dict[str, Any]:
    return {**item, "map": state.to_dict() if state else None, "version": state.version if state else 0,
            "expected_domains": list(domains_for(item, declared)), "history": history}


def item_detail(conn: psycopg.Connection, item_id: int) -> dict[str, Any]:
    """One item with its code's map, version, expected domains and history, read in one round trip."""
    with conn.pipeline():
        item_l = store.get_item_later(conn, item_id)
        state_l = map_store.get_state_later(conn, review_item_id=item_id)
        declared_l = kinds_store.declared_later(conn)
        history_l = map_store.history_later(conn, review_item_id=item_id)
        item = item_l()
        if item is None:
            raise NotFound(f"review item {item_id} not found")
        return _detail(item, state_l(), declared_l(), history_l())


def _same_outcome(a: map_store.MapState, b: map_store.MapState) -> bool:
    return (a.status == b.status and a.comment == b.comment and len(a.targets) == len(b.targets)
            and all(x.same(y) for x, y in zip(a.targets, b.targets, strict=True))
            and (bool(a.targets) or a.code_equivalence == b.code_equivalence))


def decide(conn: psycopg.Connection, item_id: int, reviewer_id: int, kind: DecisionKind, *,
           concept_id: int | None = None, rank: int | None = None, note: str | None = None,
           version: int | None = None, targets: Sequence[map_store.Target] | None = None,
           equivalence: Equivalence | None = None, comment: str | None = None, confirm: bool = False,
           request_id: str | None = None) -> dict[str, Any]:
    """One reviewer decision on a review item, in one transaction that locks the item and the code's map:
    approve a suggestion (by rank 1..N and/or its concept id, which must agree), choose another concept, give the
    code several targets (`targets`), mark no match (no targets, UNMATCHED), ignore or flag it.

    `version`: the map's version the reviewer saw (0: no map yet); a different current one is a Conflict (stale)
    with the current state, unless the code is already exactly as this decision would leave it by this reviewer (a
    repeated request: nothing is written). `request_id`: a request seen before from this reviewer is a no-op.
    A first MAPS_TO target outside the source's expected domains needs `confirm`."""
    wanted = [i for i in (concept_id, *(t.concept_id for t in targets or ())) if i is not None]
    # The decision's reads go in one round trip (a pipeline): the item and its code's map, locked in that order;
    # a repeated request id; the concepts it may target; the declared kinds; the reviewer; the time; the history
    # (for a 409's current state). Its writes take two more: the map, its targets and the read-back; then the
    # history row, the item's update and the commit.
    with conn.pipeline(), conn.transaction():
        item_l = store.get_item_later(conn, item_id, lock=True)
        seen_l = map_store.request_seen_later(conn, reviewer_id, request_id) if request_id else None
        cur_l = map_store.get_state_later(conn, review_item_id=item_id, lock=True)
        known_l = concept_store.concepts_of_decision_later(conn, wanted, item_id)
        declared_l = kinds_store.declared_later(conn)
        user_l = user_store.get_user_later(conn, reviewer_id)
        now_l = map_store.db_now_later(conn)
        history_l = map_store.history_later(conn, review_item_id=item_id)
        item = item_l()
        if item is None:
            raise NotFound(f"review item {item_id} not found")
        cur, known, declared, user, history = cur_l(), known_l(), declared_l(), user_l(), history_l()
        key = (item["source_code"], item["source_vocab"])
        if seen_l is not None and seen_l():
            return {"action": "unchanged", "repeated": True, **_detail(item, cur, declared, history)}
        suggested = [c.get("concept_id") for c in item["candidates"]]
        new_targets, status, action = _targets_for(known, item, cur, kind, suggested, concept_id=concept_id,
                                                   rank=rank, targets=targets, equivalence=equivalence)
        name = user["name"] if user else f"user {reviewer_id}"
        base = cur or map_store.MapState(source_code=key[0], source_vocab=key[1], created_by=name)
        primary = next((t.concept_id for t in new_targets if t.mapping_type == "MAPS_TO"), 0)
        # The model's confidence belongs to its top-1; a reviewer's other choice carries none.
        confidence = item["confidence"] if suggested and primary == suggested[0] else None
        new = replace(base, source_text=item["source_text"] or base.source_text, status=status,
                      targets=new_targets, equivalence="UNMATCHED" if kind == "no_match" else base.equivalence,
                      comment=comment if comment is not None else base.comment, status_set_by=name,
                      status_set_at=None, decided_by="reviewer", reviewer_id=reviewer_id, reviewed_at=now_l(),
                      confidence=confidence, match_score=None if cur is None else base.match_score,
                      model_version=item["model_version"], source_frequency=item["source_frequency"],
                      auto_concept_ids=[int(c) for c in suggested if c is not None] or base.auto_concept_ids,
                      extra=item["extra"] or base.extra, ranking=dict(_ranking(item)))
        current_version = cur.version if cur else 0
        if version is not None and version != current_version:
            if cur is not None and cur.reviewer_id == reviewer_id and _same_outcome(cur, new):
                return {"action": "unchanged", "repeated": True, **_detail(item, cur, declared, history)}
            raise Conflict(f"{key[1]}/{key[0]} changed while you looked (you decided on version {version}, it is "
                           f"at version {current_version}{f', set by {cur.status_set_by}' if cur else ''})",
                           "stale", _detail(item, cur, declared, history))
        if kind in ("approve", "choose", "targets") and not confirm:
            _check_domain(item, new_targets, domains_for(item, declared), known)
        if kind == "approve" and cur is not None and cur.primary not in (0, primary):
            action = "correct"
        try:
            stored = map_store.write_map(conn, new, expected_version=current_version, action=action,
                                         reviewer_id=reviewer_id, note=note, request_id=request_id,
                                         history_confidence=confidence, old=cur)
        except map_store.StaleVersion as exc:
            raise Conflict(str(exc), "stale", _detail(item, exc.current, declared,
                                                      map_store.history(conn, *key))) from exc
        except pg_errors.ForeignKeyViolation as exc:  # a concept deleted between the check and the insert
            raise Invalid(f"a target violates the concept map's foreign key: "
                          f"{exc.diag.message_detail or exc}") from exc
        if status == "FLAGGED":
            store.flag_item(conn, item_id)
        else:
            store.resolve_item(conn, item_id, reviewer_id)
        after_l = store.get_item_later(conn, item_id)
    # Read after the commit, which went out with the item's update.
    return {"action": action, "item": after_l(), "map": stored.to_dict(), "version": stored.version}


def _targets_for(known: Mapping[int, Concept], item: ReviewItem, cur: map_store.MapState | None, kind: DecisionKind,
                 suggested: list[Any], *, concept_id: int | None, rank: int | None,
                 targets: Sequence[map_store.Target] | None, equivalence: Equivalence | None
                 ) -> tuple[list[map_store.Target], MapStatus, str]:
    """The targets, status and history action of a decision; Invalid for a bad request."""
    item_id = item["id"]
    eq: Equivalence = equivalence or "EQUAL"
    if kind == "approve":
        if rank is not None:
            if not 1 <= rank <= len(suggested):
                raise Invalid(f"rank {rank}: review item {item_id} has {len(suggested)} suggestion(s)")
            by_rank = suggested[rank - 1]
            if concept_id is not None and concept_id != by_rank:
                raise Invalid(f"rank {rank} is concept_id {by_rank}, not {concept_id}: send one, or both agreeing")
            concept_id = by_rank
        elif concept_id is None:
            raise Invalid("approve needs rank or concept_id")
        elif concept_id not in suggested:
            raise Invalid(f"concept_id {concept_id} is not one of review item {item_id}'s suggestions; "
                          "use choose for another concept")
        assert concept_id is not None
        check_concept(known, concept_id)
        return [map_store.Target(concept_id, "MAPS_TO", eq)], "APPROVED", "approve"
    if kind == "choose":
        if concept_id is None:
            raise Invalid("choose needs concept_id")
        check_concept(known, concept_id)
        action = "approve" if concept_id in suggested and (cur is None or cur.primary in (0, concept_id)) \
            else "correct"
        return [map_store.Target(concept_id, "MAPS_TO", eq)], "APPROVED", action
    if kind == "targets":
        if not targets:
            raise Invalid("targets needs at least one target (no match: use no-match)")
        seen: set[tuple[int, str]] = set()
        for i, t in enumerate(targets, 1):
            problem = map_store.target_problem(known.get(t.concept_id), t.concept_id, t.mapping_type)
            if problem:
                raise Invalid(f"target {i}: {problem}")
            if (t.concept_id, t.mapping_type) in seen:
                raise Invalid(f"target {i}: concept_id {t.concept_id} is already a {t.mapping_type} target")
            seen.add((t.concept_id, t.mapping_type))
        if not any(t.mapping_type == "MAPS_TO" for t in targets):
            raise Invalid("targets need at least one MAPS_TO target (a value or unit belongs to one)")
        old = cur.targets if cur else []
        kept = [next((o for o in old if o.same(t)), None) for t in targets]  # keep who created what, and when
        out = [k or replace(t, created_by="", created_at=None) for k, t in zip(kept, targets, strict=True)]
        first = next(t.concept_id for t in targets if t.mapping_type == "MAPS_TO")
        action = "approve" if first in suggested and (cur is None or cur.primary in (0, first)) else "correct"
        return out, "APPROVED", action
    if kind == "no_match":
        return [], "APPROVED", "no_match"
    keep = list(cur.targets) if cur else []
    if kind == "ignore":
        return keep, "IGNORED", "ignore"
    return keep, "FLAGGED", "flag"


def _check_domain(item: ReviewItem, targets: Sequence[map_store.Target], expected: Sequence[str],
                  known: Mapping[int, Concept]) -> None:
    if not expected:
        return
    for t in targets:
        if t.mapping_type != "MAPS_TO":
            continue
        c = known.get(t.concept_id)
        if c is not None and c.domain_id not in expected:
            raise Conflict(f"concept_id {t.concept_id} ({c.concept_name}) is in domain {c.domain_id}; "
                           f"{item['source_vocab']}/{item['source_code']} is expected in "
                           f"{' or '.join(expected)}. Confirm to map it anyway.", "domain_conflict")


def flag(conn: psycopg.Connection, item_id: int, reviewer_id: int, note: str | None = None, *,
         version: int | None = None, request_id: str | None = None) -> dict[str, Any]:
    """Set a code aside for a second look: status FLAGGED (out of the approved set and the exports), targets kept."""
    return decide(conn, item_id, reviewer_id, "flag", note=note, version=version, request_id=request_id)


def revoke(conn: psycopg.Connection, map_id: int, reviewer_id: int, note: str | None = None, *,
           version: int | None = None) -> dict[str, Any]:
    """Remove a map; its review item (if any) opens again so the code gets a new decision."""
    with conn.transaction():
        m = map_store.get_state(conn, map_id=map_id, lock=True)
        if m is None:
            raise NotFound(f"concept map {map_id} not found")
        if version is not None and version != m.version:
            raise Conflict(f"{m.source_vocab}/{m.source_code} changed (you saw version {version}, it is at "
                           f"{m.version})", "stale", m.to_dict())
        map_store.delete_map(conn, m.key, expected_version=m.version, action="revoke", reviewer_id=reviewer_id,
                             note=note)
        reopened = store.reopen_item(conn, m.source_code, m.source_vocab)
        return {"action": "revoke", "map": m.to_dict(), "reopened_item_id": reopened}


_ITEM_STATUS_OF = {"APPROVED": "resolved", "IGNORED": "resolved", "FLAGGED": "flagged"}


def undo(conn: psycopg.Connection, reviewer_id: int) -> dict[str, Any]:
    """Take back the reviewer's last change that is still the code's latest: the map returns to the state before
    it (no map, if there was none) and its review item to the matching state. A history row records the undo."""
    with conn.transaction():
        last = map_store.last_change_by(conn, reviewer_id)
        if last is None:
            raise Conflict("nothing to undo", "nothing_to_undo")
        key = (last["source_code"], last["source_vocab"])
        cur = map_store.get_state(conn, key, lock=True)
        # Safe only while the code is as that change left it (an undo of a later change may have put it back).
        if (cur.snapshot() if cur else None) != last["new_state"]:
            raise Conflict(f"{key[1]}/{key[0]} was changed after your decision; undo would overwrite that",
                           "changed")
        before = last["old_state"]
        if before is None:
            map_store.delete_map(conn, key, expected_version=None, action="undo", reviewer_id=reviewer_id,
                                 note=f"undo of history {last['id']}")
            item_status = "open"
        else:
            assert cur is not None
            map_store.write_map(conn, cur.restored(before), expected_version=cur.version, action="undo",
                                reviewer_id=reviewer_id, note=f"undo of history {last['id']}")
            item_status = _ITEM_STATUS_OF.get(str(before.get("status")), "open")
        map_store.mark_undone(conn, last["id"], map_store.last_history_id(conn, key))
        item = store.item_by_key(conn, key, lock=True)
        if item is not None:
            store.set_item_status(conn, item["id"], item_status, reviewer_id if item_status == "resolved" else None)
        return {"action": "undo", "undone": last["action"], "source_code": key[0], "source_vocab": key[1],
                "item_id": item["id"] if item else None,
                "item": item_detail(conn, item["id"]) if item else None}


RetrieverFactory = Callable[[psycopg.Connection], Retriever]


class ReviewService:
    """Shared state of one server process: a connection pool (the endpoints, in worker threads), an async one (the
    token check of every request, on the event loop) and the concept search (a retriever on its own connection,
    built by `make_retriever` on first use)."""

    def __init__(self, database: DatabaseSettings, make_retriever: RetrieverFactory) -> None:
        self.database = database
        self.make_retriever = make_retriever
        self._pool: ConnectionPool | None = None
        self._apool: AsyncConnectionPool | None = None
        self._retriever: Retriever | None = None
        self._retriever_conn: psycopg.Connection | None = None
        self._search_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReviewService:
        """The service on the configured database, searching with the configured retriever."""

        def make_retriever(conn: psycopg.Connection) -> Retriever:
            from harmonia.embedding.model import Embedder
            from harmonia.retrieval import make_retriever

            return make_retriever(conn, Embedder.from_settings(settings), settings)

        return cls(settings.database, make_retriever)

    def open(self) -> None:
        if self._pool is None:
            self._pool = ConnectionPool(db.database_url(self.database), min_size=1, max_size=self.database.pool_size,
                                        kwargs={"autocommit": True}, open=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._drop_retriever()

    async def aopen(self) -> None:
        """Open the async pool (in the event loop that will use it)."""
        if self._apool is None:
            self._apool = AsyncConnectionPool(db.database_url(self.database), min_size=1,
                                              max_size=self.database.pool_size, kwargs={"autocommit": True},
                                              open=False)
            await self._apool.open()

    async def aclose(self) -> None:
        if self._apool is not None:
            await self._apool.close()
            self._apool = None

    @asynccontextmanager
    async def aconnection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        await self.aopen()
        assert self._apool is not None
        async with self._apool.connection() as conn:
            yield conn

    def _drop_retriever(self) -> None:
        if self._retriever is not None:
            self._retriever.close()
        if self._retriever_conn is not None:
            self._retriever_conn.close()
        self._retriever_conn = self._retriever = None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        self.open()
        assert self._pool is not None
        with self._pool.connection() as conn:
            yield conn

    def search(self, text: str, k: int, *, domains: Sequence[str] | None = None,
               vocabularies: Sequence[str] | None = None) -> list[dict[str, Any]]:
        # One retriever (embedder + its own connection) per process; searches take turns on it.
        with self._search_lock:
            if self._retriever is None:
                self._retriever_conn = db.connect(self.database, autocommit=True)
                try:
                    self._retriever = self.make_retriever(self._retriever_conn)
                except BaseException:
                    self._drop_retriever()
                    raise
            try:
                found = self._retriever.search(text, k, domains=domains or None, vocabularies=vocabularies or None)
            except psycopg.OperationalError:
                self._drop_retriever()
                raise
        return [c.to_dict() for c in found]
