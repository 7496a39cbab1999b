"""What a reviewer can do, independent of HTTP: each decision runs in one transaction that locks the review item,
writes the concept map (same FK and uniqueness as auto-approval), appends to its history and resolves the item."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from harmonia import db
from harmonia.config import DatabaseSettings, Settings
from harmonia.domain import Concept, RankingRecord
from harmonia.retrieval.base import Retriever
from harmonia.store import concepts as concept_store
from harmonia.store import review as store
from harmonia.store.review import ReviewItem

log = logging.getLogger(__name__)

NO_MATCH_CONCEPT_ID = 0  # OMOP's "No matching concept"


class ReviewError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ReviewError):
    status = 404


class Invalid(ReviewError):
    status = 422


def check_concept(conn: psycopg.Connection, concept_id: int) -> Concept:
    """The concept, or Invalid naming why it cannot be a target (checked before the insert; the FK backs it)."""
    c = concept_store.get_concepts(conn, [concept_id]).get(concept_id)
    if c is None:
        raise Invalid(f"concept_id {concept_id} does not exist in vocab.concept")
    if concept_id != NO_MATCH_CONCEPT_ID and (c.standard_concept != "S" or c.invalid_reason):
        raise Invalid(f"concept_id {concept_id} ({c.concept_name}) is not a valid standard concept")
    return c


def _ranking(item: ReviewItem) -> RankingRecord:
    # Same shape as Decision.ranking_json, so exports read reviewer and auto maps alike.
    return {"model_version": item["model_version"], "confidence": item["confidence"], "ranked": item["candidates"],
            "reason": item["reason"], "source_frequency": item["source_frequency"],
            "review_item_id": item["id"]}


def decide(conn: psycopg.Connection, item_id: int, reviewer_id: int, kind: Literal["approve", "choose", "no_match"],
           *, concept_id: int | None = None, rank: int | None = None, note: str | None = None) -> dict[str, Any]:
    """Approve a suggestion (by rank 1..N or its concept id), choose another concept, or mark no match."""
    with conn.transaction():
        item = store.get_item(conn, item_id, lock=True)
        if item is None:
            raise NotFound(f"review item {item_id} not found")
        suggested = [c.get("concept_id") for c in item["candidates"]]
        if kind == "approve":
            if rank is not None:
                if not 1 <= rank <= len(suggested):
                    raise Invalid(f"rank {rank}: review item {item_id} has {len(suggested)} suggestion(s)")
                concept_id = suggested[rank - 1]
            elif concept_id is None:
                raise Invalid("approve needs rank or concept_id")
            elif concept_id not in suggested:
                raise Invalid(f"concept_id {concept_id} is not one of review item {item_id}'s suggestions; "
                              "use choose for another concept")
        elif kind == "no_match":
            concept_id = NO_MATCH_CONCEPT_ID
        elif concept_id is None:
            raise Invalid("choose needs concept_id")
        assert concept_id is not None
        check_concept(conn, concept_id)
        key = (item["source_code"], item["source_vocab"])
        old = store.get_map(conn, key=key, lock=True)
        old_id = old["omop_concept_id"] if old else None
        if concept_id == NO_MATCH_CONCEPT_ID:
            action = "no_match"
        elif concept_id in suggested and old_id in (None, concept_id):
            action = "approve"
        else:
            action = "correct"  # another concept than the model's, or a change to an existing map
        # The model's confidence belongs to its top-1; a reviewer's other choice carries none.
        confidence = item["confidence"] if suggested and concept_id == suggested[0] else None
        try:
            map_id = store.upsert_reviewed_map(
                conn, source_code=key[0], source_vocab=key[1], source_text=item["source_text"],
                concept_id=concept_id, confidence=confidence, model_version=item["model_version"],
                ranking=_ranking(item), reviewer_id=reviewer_id)
        except pg_errors.ForeignKeyViolation as exc:  # a concept deleted between the check and the insert
            raise Invalid(f"concept_id {concept_id} violates the concept map's foreign key: "
                          f"{exc.diag.message_detail or exc}") from exc
        store.add_history(conn, source_code=key[0], source_vocab=key[1], action=action, old_concept_id=old_id,
                          new_concept_id=concept_id, confidence=confidence, model_version=item["model_version"],
                          reviewer_id=reviewer_id, note=note)
        store.resolve_item(conn, item_id, reviewer_id)
        return {"action": action, "item": store.get_item(conn, item_id), "map": store.get_map(conn, map_id)}


def flag(conn: psycopg.Connection, item_id: int, reviewer_id: int, note: str | None = None) -> dict[str, Any]:
    """Set an item aside for a second look; the map (if any) is untouched."""
    with conn.transaction():
        item = store.get_item(conn, item_id, lock=True)
        if item is None:
            raise NotFound(f"review item {item_id} not found")
        current = store.get_map(conn, key=(item["source_code"], item["source_vocab"]))
        cid = current["omop_concept_id"] if current else None
        store.flag_item(conn, item_id)
        store.add_history(conn, source_code=item["source_code"], source_vocab=item["source_vocab"], action="flag",
                          old_concept_id=cid, new_concept_id=cid, confidence=item["confidence"],
                          model_version=item["model_version"], reviewer_id=reviewer_id, note=note)
        return {"action": "flag", "item": store.get_item(conn, item_id)}


def revoke(conn: psycopg.Connection, map_id: int, reviewer_id: int, note: str | None = None) -> dict[str, Any]:
    """Remove an approved map; its review item (if any) opens again so the code gets a new decision."""
    with conn.transaction():
        m = store.get_map(conn, map_id, lock=True)
        if m is None:
            raise NotFound(f"concept map {map_id} not found")
        store.delete_map(conn, map_id)
        store.add_history(conn, source_code=m["source_code"], source_vocab=m["source_vocab"], action="revoke",
                          old_concept_id=m["omop_concept_id"], new_concept_id=None, confidence=m["confidence"],
                          model_version=m["model_version"], reviewer_id=reviewer_id, note=note)
        reopened = store.reopen_item(conn, m["source_code"], m["source_vocab"])
        return {"action": "revoke", "map": m, "reopened_item_id": reopened}


def item_detail(conn: psycopg.Connection, item_id: int) -> dict[str, Any]:
    item = store.get_item(conn, item_id)
    if item is None:
        raise NotFound(f"review item {item_id} not found")
    key = (item["source_code"], item["source_vocab"])
    return {**item, "map": store.get_map(conn, key=key), "history": store.history(conn, *key)}


RetrieverFactory = Callable[[psycopg.Connection], Retriever]


class ReviewService:
    """Shared state of one server process: a connection pool and the concept search (a retriever on its own
    connection, built by `make_retriever` on first use)."""

    def __init__(self, database: DatabaseSettings, make_retriever: RetrieverFactory) -> None:
        self.database = database
        self.make_retriever = make_retriever
        self._pool: ConnectionPool | None = None
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
