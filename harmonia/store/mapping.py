"""SQL for the mapping system of record: one row per source code (harmonia.concept_map) with its status, comment,
assigned reviewer, who set the status and when, and a version; zero or more targets (harmonia.concept_map_target),
each with a mapping type and an equivalence; and the history of every change with the state before and after.

Every write goes through `write_map` / `delete_map`: they check the version the change was made on (StaleVersion
otherwise), bump it, replace the targets and append a history row. The caller owns the transaction.

`concept_map.omop_concept_id` mirrors the first MAPS_TO target (0: none), kept in step by triggers (migration 100),
for readers that know one target per code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict, get_args

import psycopg
from psycopg import pq

from harmonia.domain import (
    Concept,
    Decision,
    Equivalence,
    MappingType,
    MapStatus,
    RankingEntry,
    SourceKey,
)
from harmonia.store.common import one, scalar

STATUSES: tuple[MapStatus, ...] = get_args(MapStatus)
MAPPING_TYPES: tuple[MappingType, ...] = get_args(MappingType)
EQUIVALENCES: tuple[Equivalence, ...] = get_args(Equivalence)
NO_MATCH_CONCEPT_ID = 0  # OMOP's "No matching concept": the mirror of a code without a MAPS_TO target

# Domains that are never the target of a map: the vocabulary's own bookkeeping (a Type Concept such as "Case Report
# Form" says where a record came from, not what it is).
NEVER_TARGET_DOMAINS = frozenset({"Type Concept", "Metadata", "Relationship", "Vocabulary", "Domain",
                                  "Concept Class", "Cost", "Currency"})
VALUE_DOMAINS = frozenset({"Meas Value", "Meas Value Operator"})
UNIT_DOMAIN = "Unit"


def target_problem(concept: Concept | None, concept_id: int, mapping_type: str) -> str | None:
    """Why a concept cannot be a target of this mapping type (None: it can): it must exist, be a valid standard
    concept, and its domain must suit the mapping type (a unit for MAPS_TO_UNIT; never a unit or a bare value for
    MAPS_TO; never the vocabulary's bookkeeping domains)."""
    if mapping_type not in MAPPING_TYPES:
        return f"mapping type {mapping_type!r} is not one of {', '.join(MAPPING_TYPES)}"
    if concept is None:
        return f"concept_id {concept_id} does not exist in vocab.concept"
    if concept_id == NO_MATCH_CONCEPT_ID:
        return "concept 0 (no matching concept) is not a target: a code without a match has no targets"
    if not concept.is_valid_standard:
        return f"concept_id {concept_id} ({concept.concept_name}) is not a valid standard concept"
    d = concept.domain_id
    if mapping_type == "MAPS_TO_UNIT":
        return None if d == UNIT_DOMAIN else \
            f"concept_id {concept_id} ({concept.concept_name}) is in domain {d}; MAPS_TO_UNIT needs a Unit"
    if d in NEVER_TARGET_DOMAINS or d == UNIT_DOMAIN or (mapping_type == "MAPS_TO" and d in VALUE_DOMAINS):
        return f"concept_id {concept_id} ({concept.concept_name}) is in domain {d}, not a {mapping_type} target"
    return None


@dataclass
class Target:
    """One target of a source code. The concept's name, domain and vocabulary are read with it (not stored)."""

    concept_id: int
    mapping_type: MappingType = "MAPS_TO"
    equivalence: Equivalence = "UNREVIEWED"
    created_by: str = "harmonia"
    created_at: datetime | None = None
    concept_name: str = ""
    domain_id: str = ""
    vocabulary_id: str = ""
    valid_standard: bool = True  # the concept is (still) a valid standard concept

    def stored(self) -> dict[str, Any]:
        """What the history keeps of it (and undo restores)."""
        return {"concept_id": self.concept_id, "mapping_type": self.mapping_type, "equivalence": self.equivalence,
                "created_by": self.created_by,
                "created_at": self.created_at.isoformat() if self.created_at else None}

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> Target:
        at = d.get("created_at")
        return cls(concept_id=int(d["concept_id"]), mapping_type=d.get("mapping_type", "MAPS_TO"),
                   equivalence=d.get("equivalence", "UNREVIEWED"), created_by=d.get("created_by") or "harmonia",
                   created_at=datetime.fromisoformat(at) if at else None)

    def same(self, other: Target) -> bool:
        return (self.concept_id, self.mapping_type, self.equivalence) == \
            (other.concept_id, other.mapping_type, other.equivalence)


# The fields of a code's state that the history snapshots and undo restores.
_STATE_FIELDS = ("status", "equivalence", "comment", "assigned_reviewer", "status_set_by", "status_set_at",
                 "decided_by", "reviewer_id", "reviewed_at", "confidence", "model_version")


@dataclass
class MapState:
    """A source code's map: its status and targets, and what Usagi keeps about it. `version` 0 = not stored."""

    source_code: str
    source_vocab: str
    source_text: str | None = None
    status: MapStatus = "UNCHECKED"
    targets: list[Target] = field(default_factory=list)
    equivalence: Equivalence = "UNREVIEWED"  # of a code without targets (UNMATCHED: no match); else the first's
    comment: str | None = None
    assigned_reviewer: str | None = None
    status_set_by: str | None = None
    status_set_at: datetime | None = None
    decided_by: str = "auto"          # auto | reviewer | import
    reviewer_id: int | None = None
    reviewer: str | None = None       # the reviewer's name (read only)
    reviewed_at: datetime | None = None
    confidence: float | None = None
    match_score: float | None = None  # Usagi's matchScore (None: the confidence)
    model_version: str | None = None
    source_frequency: int | None = None
    auto_concept_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ranking: dict[str, Any] | None = None  # candidate_ranking_json
    created_by: str = "harmonia"
    created_at: datetime | None = None
    updated_at: datetime | None = None
    version: int = 0
    id: int | None = None

    @property
    def key(self) -> SourceKey:
        return (self.source_code, self.source_vocab)

    @property
    def primary(self) -> int:
        """The first MAPS_TO target's concept id (0: none), what omop_concept_id mirrors."""
        return next((t.concept_id for t in self.targets if t.mapping_type == "MAPS_TO"), NO_MATCH_CONCEPT_ID)

    @property
    def code_equivalence(self) -> Equivalence:
        return self.targets[0].equivalence if self.targets else self.equivalence

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in _STATE_FIELDS:
            v = getattr(self, f)
            out[f] = v.isoformat() if isinstance(v, datetime) else v
        out["equivalence"] = self.code_equivalence
        out["targets"] = [t.stored() for t in self.targets]
        return out

    def restored(self, snap: dict[str, Any]) -> MapState:
        """This state with a snapshot's fields put back (undo)."""
        vals: dict[str, Any] = {}
        for f in _STATE_FIELDS:
            v = snap.get(f)
            if f in ("status_set_at", "reviewed_at") and isinstance(v, str):
                v = datetime.fromisoformat(v)
            vals[f] = v
        return replace(self, **vals, targets=[Target.from_stored(t) for t in snap.get("targets", [])])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ranking", None)
        d["omop_concept_id"] = self.primary
        return d


class StaleVersion(Exception):
    """A change made on a version that is no longer current; `current` is the state now (None: no map)."""

    def __init__(self, expected: int, current: MapState | None) -> None:
        super().__init__(f"the map changed: the change was made on version {expected}, it is now at version "
                         f"{current.version if current else 0}")
        self.expected = expected
        self.current = current


def _num(v: Decimal | float | None) -> float | None:
    return float(v) if isinstance(v, Decimal) else v


_COLS = """m.id, m.source_code, m.source_vocab, m.source_text, m.status, m.equivalence, m.comment,
    m.assigned_reviewer, m.status_set_by, m.status_set_at, m.decided_by, m.reviewer_id, u.name, m.reviewed_at,
    m.confidence, m.match_score, m.model_version, m.source_frequency, m.auto_concept_ids, m.extra,
    m.candidate_ranking_json, m.created_by, m.created_at, m.updated_at, m.version"""
_FROM = "harmonia.concept_map m LEFT JOIN harmonia.users u ON u.id = m.reviewer_id"


def _state(r: Sequence[Any]) -> MapState:
    return MapState(id=r[0], source_code=r[1], source_vocab=r[2], source_text=r[3], status=r[4], equivalence=r[5],
                    comment=r[6], assigned_reviewer=r[7], status_set_by=r[8], status_set_at=r[9], decided_by=r[10],
                    reviewer_id=r[11], reviewer=r[12], reviewed_at=r[13], confidence=_num(r[14]),
                    match_score=r[15], model_version=r[16], source_frequency=r[17],
                    auto_concept_ids=list(r[18]) if r[18] is not None else None, extra=r[19] or {}, ranking=r[20],
                    created_by=r[21], created_at=r[22], updated_at=r[23], version=r[24])


_TARGET_COLS = """t.map_id, t.concept_id, t.mapping_type, t.equivalence, t.created_by, t.created_at,
    c.concept_name, c.domain_id, c.vocabulary_id, c.standard_concept = 'S' AND c.invalid_reason IS NULL"""
_TARGET_FROM = "harmonia.concept_map_target t JOIN vocab.concept c ON c.concept_id = t.concept_id"


def _target(r: Sequence[Any]) -> Target:
    return Target(concept_id=r[1], mapping_type=r[2], equivalence=r[3], created_by=r[4], created_at=r[5],
                  concept_name=r[6], domain_id=r[7], vocabulary_id=r[8], valid_standard=bool(r[9]))


def targets_of(conn: psycopg.Connection, map_ids: Iterable[int]) -> dict[int, list[Target]]:
    """The targets of these maps, in order, with their concepts' names, domains and vocabularies."""
    ids = sorted(set(map_ids))
    out: dict[int, list[Target]] = {i: [] for i in ids}
    if not ids:
        return out
    rows = conn.execute(
        f"SELECT {_TARGET_COLS} FROM {_TARGET_FROM} WHERE t.map_id = ANY(%s) ORDER BY t.map_id, t.position",
        (ids,)).fetchall()
    for r in rows:
        out[r[0]].append(_target(r))
    return out


def _with_targets(conn: psycopg.Connection, states: list[MapState]) -> list[MapState]:
    tg = targets_of(conn, [s.id for s in states if s.id is not None])
    for s in states:
        s.targets = tg.get(s.id or -1, [])
    return states


def get_state_later(conn: psycopg.Connection, key: SourceKey | None = None, *, map_id: int | None = None,
                    review_item_id: int | None = None, lock: bool = False) -> Callable[[], MapState | None]:
    """Send the queries for a code's map (by key, by map id, or of a review item's code) and its targets now; read
    them when called. In a pipeline (`conn.pipeline()`) they travel in one round trip with the queries around them;
    the targets are read after the map row (and its lock, with `lock`), so they are the locked map's."""
    params: tuple[Any, ...]
    if map_id is not None:
        cond, params = "m.id = %s", (map_id,)
    elif review_item_id is not None:
        cond, params = ("""(m.source_code, m.source_vocab) = (SELECT q.source_code, q.source_vocab
                               FROM harmonia.review_queue q WHERE q.id = %s)"""), (review_item_id,)
    else:
        assert key is not None
        cond, params = "m.source_code = %s AND m.source_vocab = %s", key
    row_cur = conn.execute(f"SELECT {_COLS} FROM {_FROM} WHERE {cond} {'FOR UPDATE OF m' if lock else ''}", params)
    targets_cur = conn.execute(
        f"""SELECT {_TARGET_COLS} FROM {_TARGET_FROM}
            WHERE t.map_id = (SELECT m.id FROM harmonia.concept_map m WHERE {cond}) ORDER BY t.position""", params)

    def read() -> MapState | None:
        row = row_cur.fetchone()
        targets = [_target(r) for r in targets_cur.fetchall()]
        if row is None:
            return None
        state = _state(row)
        state.targets = targets
        return state

    return read


def get_state(conn: psycopg.Connection, key: SourceKey | None = None, *, map_id: int | None = None,
              lock: bool = False) -> MapState | None:
    """A code's map with its targets (None: the code has none); `lock` holds the row until the transaction ends."""
    with conn.pipeline():
        return get_state_later(conn, key, map_id=map_id, lock=lock)()


def list_states(conn: psycopg.Connection, *, source_vocab: str | None = None,
                statuses: Sequence[str] | None = None) -> list[MapState]:
    """Every map (of a source set, of these statuses) with its targets, by source set and code."""
    where, params = ["TRUE"], []  # type: tuple[list[str], list[Any]]
    if source_vocab:
        where.append("m.source_vocab = %s")
        params.append(source_vocab)
    if statuses:
        where.append("m.status = ANY(%s)")
        params.append(list(statuses))
    rows = conn.execute(f"SELECT {_COLS} FROM {_FROM} WHERE {' AND '.join(where)} "
                        "ORDER BY m.source_vocab COLLATE \"C\", m.source_code COLLATE \"C\"", params).fetchall()
    return _with_targets(conn, [_state(r) for r in rows])


def _history(conn: psycopg.Connection, key: SourceKey, action: str, old: MapState | None, new: MapState | None, *,
             actor: str | None, reviewer_id: int | None, note: str | None, request_id: str | None,
             confidence: float | None = None, model_version: str | None = None) -> None:
    ref = new or old
    conn.execute(
        """INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, old_concept_id,
               new_concept_id, confidence, model_version, reviewer_id, note, old_status, new_status, version,
               old_state, new_state, actor, request_id)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (key[0], key[1], action, old.primary if old else None, new.primary if new else None,
         None if confidence is None else round(confidence, 4),
         model_version if model_version is not None else (ref.model_version if ref else None), reviewer_id, note,
         old.status if old else None, new.status if new else None, new.version if new else None,
         json.dumps(old.snapshot()) if old else None, json.dumps(new.snapshot()) if new else None, actor,
         request_id))


class _Unread:
    """write_map's `old` when the caller has not read the code's state."""


UNREAD = _Unread()


def write_map(conn: psycopg.Connection, new: MapState, *, expected_version: int | None, action: str,
              actor: str | None = None, reviewer_id: int | None = None, note: str | None = None,
              request_id: str | None = None, history_confidence: float | None = None, stamp: bool = True,
              old: MapState | None | _Unread = UNREAD) -> MapState:
    """Store a code's whole state (fields and targets) and append a history row; returns the stored state.

    `expected_version`: the version the change was made on (0: made when the code had no map); another one raises
    StaleVersion with the current state. None skips the check (the caller holds the row locked and decided on it).
    `stamp`: an empty status_set_at becomes now (an import keeps it empty). Targets are validated by the caller
    (`target_problem`); the foreign key is the last line. `old`: the code's state as the caller read it in this
    transaction with its row locked (None: it had no map), so it is not read again.

    The writes and the read-back of the stored state go in one round trip (a pipeline); the history row goes in a
    second, or, inside the caller's pipeline, with the caller's next one: a decision's latency is mostly round
    trips."""
    key = new.key
    if isinstance(old, _Unread):
        old = get_state(conn, key, lock=True)
    current = old.version if old else 0
    if expected_version is not None and expected_version != current:
        raise StaleVersion(expected_version, old)
    eq = new.targets[0].equivalence if new.targets else new.equivalence
    # status_set_at: as given; when empty, now (with stamp) or left empty (an import).
    vals = (new.source_text, new.status, eq, new.comment, new.assigned_reviewer, new.status_set_by,
            new.status_set_at, stamp, new.decided_by, new.reviewer_id, new.reviewed_at,
            None if new.confidence is None else round(new.confidence, 4), new.match_score, new.model_version,
            new.source_frequency, new.auto_concept_ids, json.dumps(new.extra),
            None if new.ranking is None else json.dumps(new.ranking))
    rows = [(i, t.concept_id, t.mapping_type, t.equivalence, t.created_by, t.created_at)
            for i, t in enumerate(new.targets)]
    targets = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(6)]
    unnest = """unnest(%s::smallint[], %s::integer[], %s::text[], %s::text[], %s::text[], %s::timestamptz[])
                AS x(p, c, t, e, b, a)"""
    # In the caller's pipeline (a reviewer's decision) the history row goes out with the caller's next round trip;
    # a nested pipeline block would end with a round trip of its own.
    in_pipeline = conn.pgconn.pipeline_status != pq.PipelineStatus.OFF
    with nullcontext() if in_pipeline else conn.pipeline():
        if old is None:
            # The map and its targets in one statement: if another transaction created the code's map since we
            # looked, nothing is written (no row comes back) and the change was made on nothing.
            write = conn.execute(
                f"""WITH m AS (
                        INSERT INTO harmonia.concept_map (source_code, source_vocab, omop_concept_id, source_text,
                            status, equivalence, comment, assigned_reviewer, status_set_by, status_set_at,
                            decided_by, reviewer_id, reviewed_at, confidence, match_score, model_version,
                            source_frequency, auto_concept_ids, extra, candidate_ranking_json, created_by, created_at)
                        VALUES (%s, %s, 0, %s, %s, %s, %s, %s, %s,
                                coalesce(%s::timestamptz, CASE WHEN %s THEN now() END), %s, %s, %s, %s, %s, %s, %s,
                                %s, %s, %s, %s, coalesce(%s, now()))
                        ON CONFLICT (source_code, source_vocab) DO NOTHING RETURNING id),
                    t AS (
                        INSERT INTO harmonia.concept_map_target (map_id, position, concept_id, mapping_type,
                            equivalence, created_by, created_at)
                        SELECT m.id, x.p, x.c, x.t, x.e, x.b, coalesce(x.a, now()) FROM m, {unnest})
                    SELECT id FROM m""",
                (key[0], key[1], *vals, new.created_by, new.created_at, *targets))
        else:
            assert old.id is not None
            write = conn.execute(
                """UPDATE harmonia.concept_map SET source_text = %s, status = %s, equivalence = %s, comment = %s,
                       assigned_reviewer = %s, status_set_by = %s,
                       status_set_at = coalesce(%s::timestamptz, CASE WHEN %s THEN now() END), decided_by = %s,
                       reviewer_id = %s, reviewed_at = %s, confidence = %s, match_score = %s, model_version = %s,
                       source_frequency = %s, auto_concept_ids = %s, extra = %s,
                       candidate_ranking_json = coalesce(%s, candidate_ranking_json), version = version + 1,
                       updated_at = now()
                   WHERE id = %s RETURNING id""", (*vals, old.id))
            if [t.stored() for t in old.targets] != [t.stored() for t in new.targets] or \
                    any(a.created_at is None for a in new.targets):
                conn.execute("DELETE FROM harmonia.concept_map_target WHERE map_id = %s", (old.id,))
                conn.execute(
                    f"""INSERT INTO harmonia.concept_map_target (map_id, position, concept_id, mapping_type,
                            equivalence, created_by, created_at)
                        SELECT %s, x.p, x.c, x.t, x.e, x.b, coalesce(x.a, now()) FROM {unnest}""",
                    (old.id, *targets))
        read_back = get_state_later(conn, key)
        written = write.fetchone()
        stored = read_back()
        if written is None:  # the code's map is another transaction's
            raise StaleVersion(0, stored)
        assert stored is not None
        _history(conn, key, action, old, stored, actor=actor, reviewer_id=reviewer_id, note=note,
                 request_id=request_id, confidence=history_confidence)
    return stored


def delete_map(conn: psycopg.Connection, key: SourceKey, *, expected_version: int | None, action: str,
               actor: str | None = None, reviewer_id: int | None = None, note: str | None = None,
               request_id: str | None = None) -> MapState | None:
    """Remove a code's map (revoke; undo of its first decision), with a history row; returns what was removed."""
    old = get_state(conn, key, lock=True)
    if expected_version is not None and expected_version != (old.version if old else 0):
        raise StaleVersion(expected_version, old)
    if old is None:
        return None
    conn.execute("DELETE FROM harmonia.concept_map WHERE id = %s", (old.id,))
    _history(conn, key, action, old, None, actor=actor, reviewer_id=reviewer_id, note=note, request_id=request_id,
             confidence=old.confidence)
    return old


def set_status(conn: psycopg.Connection, key: SourceKey, status: MapStatus, *, actor: str, action: str | None = None,
               note: str | None = None, reviewer_id: int | None = None, expected_version: int | None = None
               ) -> MapState:
    """Set a stored map's status (e.g. INVALID_TARGET or FLAGGED after a vocabulary re-check), keeping its targets;
    the history says who (`actor`) and why (`note`). KeyError when the code has no map."""
    cur = get_state(conn, key, lock=True)
    if cur is None:
        raise KeyError(f"{key[1]}/{key[0]} has no map")
    new = replace(cur, status=status, status_set_by=actor, status_set_at=None)
    return write_map(conn, new, expected_version=expected_version, action=action or f"status_{status.lower()}",
                     actor=actor, reviewer_id=reviewer_id, note=note)


def set_targets(conn: psycopg.Connection, key: SourceKey, targets: Sequence[Target], *, actor: str,
                action: str = "retarget", status: MapStatus | None = None, note: str | None = None,
                reviewer_id: int | None = None, expected_version: int | None = None) -> MapState:
    """Replace a stored map's targets (and optionally its status), with a history row. KeyError: no map."""
    cur = get_state(conn, key, lock=True)
    if cur is None:
        raise KeyError(f"{key[1]}/{key[0]} has no map")
    new = replace(cur, targets=list(targets), status=status or cur.status,
                  status_set_by=actor if status else cur.status_set_by, status_set_at=None if status else
                  cur.status_set_at)
    return write_map(conn, new, expected_version=expected_version, action=action, actor=actor,
                     reviewer_id=reviewer_id, note=note)


def existing_maps(conn: psycopg.Connection, keys: Iterable[SourceKey]) -> set[SourceKey]:
    """The codes that have a map (whatever its status): a re-run never routes them again."""
    keys = list(keys)
    if not keys:
        return set()
    rows = conn.execute(
        """SELECT m.source_code, m.source_vocab FROM harmonia.concept_map m
           JOIN unnest(%s::text[], %s::text[]) AS k(code, vocab)
             ON m.source_code = k.code AND m.source_vocab = k.vocab""",
        ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
    return {(r[0], r[1]) for r in rows}


def _proposal(d: Decision) -> dict[str, Any]:
    by_id = {c.concept_id: c for c in d.candidates}
    extra = []
    for a in d.additional:
        c = by_id.get(a.concept_id)
        extra.append({"concept_id": a.concept_id, "mapping_type": a.mapping_type, "equivalence": a.equivalence,
                      "rationale": a.rationale, "concept_name": c.concept_name if c else "",
                      "domain_id": c.domain_id if c else "", "vocabulary_id": c.vocabulary_id if c else ""})
    out: dict[str, Any] = {}
    if d.equivalence:
        out["equivalence"] = d.equivalence
    if extra:
        out["additional"] = extra
    return out


def record_decision(conn: psycopg.Connection, d: Decision) -> str:
    """Persist one routing decision; the caller owns the transaction. Returns 'approved', 'review' or
    'already_mapped' (a map for this code exists: a re-run never overwrites it, least of all a reviewer's)."""
    t = d.term
    if d.action == "approve":
        assert d.concept_id is not None
        if get_state(conn, t.key) is not None:
            return "already_mapped"
        # A calibrated approval vouches the first choice is the map (EQUAL unless the reranker says otherwise)
        targets = [Target(d.concept_id, "MAPS_TO", d.equivalence or "EQUAL")]
        targets += [Target(a.concept_id, a.mapping_type, a.equivalence) for a in d.additional
                    if a.concept_id != d.concept_id]
        new = MapState(source_code=t.source_code, source_vocab=t.source_vocab, source_text=t.source_text,
                       status="APPROVED", targets=targets, status_set_by="harmonia", decided_by="auto",
                       comment=f"model_version={d.model_version}",  # what approved it, in Usagi's comment
                       confidence=d.confidence, model_version=d.model_version, source_frequency=t.source_frequency,
                       auto_concept_ids=[r["concept_id"] for r in d.ranking], extra=dict(t.extra),
                       ranking=dict(d.ranking_json()))
        try:
            with conn.transaction():  # a savepoint: a concurrent insert of the same code is not an error here
                write_map(conn, new, expected_version=0, action="auto_approve", actor="harmonia",
                          history_confidence=d.confidence)
        except StaleVersion:
            return "already_mapped"
        conn.execute(
            """UPDATE harmonia.review_queue SET status = 'resolved', resolved_at = now(), updated_at = now()
               WHERE source_code = %s AND source_vocab = %s AND status <> 'resolved'""",
            (t.source_code, t.source_vocab))
        return "approved"
    if get_state(conn, t.key) is not None:
        return "already_mapped"
    enqueue_review(conn, t.source_code, t.source_vocab, t.source_text, t.source_frequency, t.extra,
                   d.ranking, d.confidence, d.model_version, d.reason, d.error, proposal=_proposal(d))
    return "review"


def enqueue_review(conn: psycopg.Connection, source_code: str, source_vocab: str, source_text: str | None,
                   source_frequency: int | None, extra: dict[str, Any], ranking: Sequence[RankingEntry],
                   confidence: float | None, model_version: str | None, reason: str, error: str | None,
                   proposal: dict[str, Any] | None = None) -> int:
    """Open (or refresh) the review item for a code; a flagged item stays flagged. Returns its id."""
    row = one(conn.execute(
        """INSERT INTO harmonia.review_queue (source_code, source_vocab, source_text, source_frequency, extra,
               candidates_json, confidence, model_version, reason, error, proposal)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (source_code, source_vocab) DO UPDATE SET
               source_text = EXCLUDED.source_text, source_frequency = EXCLUDED.source_frequency,
               extra = EXCLUDED.extra, candidates_json = EXCLUDED.candidates_json,
               confidence = EXCLUDED.confidence, model_version = EXCLUDED.model_version,
               reason = EXCLUDED.reason, error = EXCLUDED.error, proposal = EXCLUDED.proposal, updated_at = now(),
               status = CASE WHEN harmonia.review_queue.status = 'flagged' THEN 'flagged' ELSE 'open' END
           RETURNING id""",
        (source_code, source_vocab, source_text, source_frequency, json.dumps(extra), json.dumps(list(ranking)),
         None if confidence is None else round(confidence, 4), model_version, reason, error,
         json.dumps(proposal or {}))))
    return int(row[0])


def summary_counts(conn: psycopg.Connection) -> dict[str, int]:
    by_status: dict[str, int] = dict(conn.execute(
        "SELECT status, count(*) FROM harmonia.concept_map GROUP BY 1").fetchall())
    return {
        "concept_map": sum(by_status.values()),
        **{f"maps_{s.lower()}": int(by_status.get(s, 0)) for s in STATUSES},
        "review_open": scalar(conn.execute(
            "SELECT count(*) FROM harmonia.review_queue WHERE status <> 'resolved'")),
    }


# ------------------------------------------------------------------------------------ reviewers' decisions


@dataclass(frozen=True)
class ReviewerApproval:
    """A map a reviewer decided (approved or corrected): the source text and the concept chosen."""

    source_code: str
    source_vocab: str
    source_text: str
    concept_id: int


@dataclass(frozen=True)
class ReviewerCorrection:
    """A correction: the suggestion a reviewer replaced (old_concept_id) by another concept."""

    source_code: str
    source_vocab: str
    source_text: str
    old_concept_id: int
    new_concept_id: int | None


def reviewer_approvals(conn: psycopg.Connection) -> list[ReviewerApproval]:
    """Approved maps a reviewer decided, one per code with its first MAPS_TO target (known mappings, training
    positives); a flagged, ignored or invalid map is not known to be right."""
    rows = conn.execute(
        """SELECT source_code, source_vocab, source_text, omop_concept_id FROM harmonia.concept_map
           WHERE decided_by = 'reviewer' AND status = 'APPROVED' AND source_text IS NOT NULL AND source_text <> ''
           ORDER BY source_vocab, source_code""").fetchall()
    return [ReviewerApproval(*r) for r in rows]


def reviewer_corrections(conn: psycopg.Connection) -> list[ReviewerCorrection]:
    """Corrections with the source text (from the map, else from the review item), in history order: the rejected
    suggestions are hard negatives for training."""
    rows = conn.execute(
        """SELECT h.source_code, h.source_vocab, coalesce(m.source_text, q.source_text), h.old_concept_id,
                  h.new_concept_id
           FROM harmonia.concept_map_history h
           LEFT JOIN harmonia.concept_map m ON m.source_code = h.source_code AND m.source_vocab = h.source_vocab
           LEFT JOIN harmonia.review_queue q ON q.source_code = h.source_code AND q.source_vocab = h.source_vocab
           WHERE h.action = 'correct' AND h.old_concept_id IS NOT NULL AND h.old_concept_id <> 0
             AND h.old_concept_id IS DISTINCT FROM h.new_concept_id
           ORDER BY h.id""").fetchall()
    return [ReviewerCorrection(*r) for r in rows if r[2]]


class HistoryEntry(TypedDict):
    """A concept_map_history row."""

    id: int
    source_code: str
    source_vocab: str
    action: str
    old_concept_id: int | None
    new_concept_id: int | None
    old_status: str | None
    new_status: str | None
    version: int | None
    confidence: float | None
    model_version: str | None
    reviewer: str | None
    actor: str | None
    note: str | None
    at: datetime
    old_state: dict[str, Any] | None
    new_state: dict[str, Any] | None


_HISTORY = """SELECT h.id, h.source_code, h.source_vocab, h.action, h.old_concept_id, h.new_concept_id,
        h.old_status, h.new_status, h.version, h.confidence, h.model_version, u.name, h.actor, h.note, h.at,
        h.old_state, h.new_state
    FROM harmonia.concept_map_history h LEFT JOIN harmonia.users u ON u.id = h.reviewer_id"""


def _entry(r: Sequence[Any]) -> HistoryEntry:
    return HistoryEntry(id=r[0], source_code=r[1], source_vocab=r[2], action=r[3], old_concept_id=r[4],
                        new_concept_id=r[5], old_status=r[6], new_status=r[7], version=r[8], confidence=_num(r[9]),
                        model_version=r[10], reviewer=r[11], actor=r[12], note=r[13], at=r[14], old_state=r[15],
                        new_state=r[16])


def history_later(conn: psycopg.Connection, key: SourceKey | None = None, *, review_item_id: int | None = None
                  ) -> Callable[[], list[HistoryEntry]]:
    """Send the query now, read the history of a code (or of a review item's code) when called (one round trip
    with the others of a pipeline)."""
    if review_item_id is not None:
        cur = conn.execute(f"""{_HISTORY} WHERE (h.source_code, h.source_vocab) = (
                                   SELECT q.source_code, q.source_vocab FROM harmonia.review_queue q WHERE q.id = %s)
                               ORDER BY h.id""", (review_item_id,))
    else:
        assert key is not None
        cur = conn.execute(f"{_HISTORY} WHERE h.source_code = %s AND h.source_vocab = %s ORDER BY h.id", key)
    return lambda: [_entry(r) for r in cur.fetchall()]


def history(conn: psycopg.Connection, source_code: str, source_vocab: str) -> list[HistoryEntry]:
    return history_later(conn, (source_code, source_vocab))()


def add_history(conn: psycopg.Connection, *, source_code: str, source_vocab: str, action: str,
                old_concept_id: int | None, new_concept_id: int | None, confidence: float | None,
                model_version: str | None, reviewer_id: int | None, note: str | None,
                status: str | None = None) -> None:
    """A history row for something that changed no map (a review item flagged before any map existed)."""
    conn.execute(
        """INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, old_concept_id,
               new_concept_id, confidence, model_version, reviewer_id, note, old_status, new_status)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (source_code, source_vocab, action, old_concept_id, new_concept_id,
         None if confidence is None else round(confidence, 4), model_version, reviewer_id, note, status, status))


def request_seen_later(conn: psycopg.Connection, reviewer_id: int, request_id: str) -> Callable[[], bool]:
    """Send the query now; when called: this reviewer already made a change with this request id (a repeated
    request: do nothing again)."""
    cur = conn.execute("SELECT 1 FROM harmonia.concept_map_history WHERE reviewer_id = %s AND request_id = %s",
                       (reviewer_id, request_id))
    return lambda: cur.fetchone() is not None


def request_seen(conn: psycopg.Connection, reviewer_id: int, request_id: str) -> bool:
    """This reviewer already made a change with this request id (a repeated request: do nothing again)."""
    return request_seen_later(conn, reviewer_id, request_id)()


def last_change_by(conn: psycopg.Connection, reviewer_id: int) -> HistoryEntry | None:
    """The reviewer's most recent change to a map that has not been undone (undo takes it back)."""
    row = conn.execute(
        f"""{_HISTORY} WHERE h.reviewer_id = %s AND h.action <> 'undo' AND h.undone_by IS NULL
              AND (h.old_state IS NOT NULL OR h.new_state IS NOT NULL)
            ORDER BY h.id DESC LIMIT 1""", (reviewer_id,)).fetchone()
    return _entry(row) if row else None


def mark_undone(conn: psycopg.Connection, history_id: int, undo_history_id: int) -> None:
    conn.execute("UPDATE harmonia.concept_map_history SET undone_by = %s WHERE id = %s",
                 (undo_history_id, history_id))


def last_history_id(conn: psycopg.Connection, key: SourceKey) -> int:
    return int(scalar(conn.execute(
        "SELECT max(id) FROM harmonia.concept_map_history WHERE source_code = %s AND source_vocab = %s", key)))


def states_by_ids(conn: psycopg.Connection, map_ids: Sequence[int]) -> list[MapState]:
    """These maps with their targets, in the order of the ids given."""
    if not map_ids:
        return []
    rows = conn.execute(f"SELECT {_COLS} FROM {_FROM} WHERE m.id = ANY(%s)", (list(map_ids),)).fetchall()
    by_id = {s.id: s for s in _with_targets(conn, [_state(r) for r in rows])}
    return [by_id[i] for i in map_ids if i in by_id]


def insert_new_maps(conn: psycopg.Connection, states: Sequence[MapState], *, action: str, actor: str,
                    notes: Sequence[str | None]) -> int:
    """Store many codes that have no map yet, each with its targets and a history row, in a few statements (an
    import); the fields are stored as given (an empty status_set_at stays empty). A code that got a map meanwhile
    is a unique violation: the caller's transaction fails whole. Returns how many were stored. The arrays go in
    binary (%b): far quicker to send than text arrays."""
    if not states:
        return 0
    cols = list(zip(*[(s.source_code, s.source_vocab, s.source_text, s.status, s.code_equivalence, s.comment,
                       s.assigned_reviewer, s.status_set_by, s.status_set_at, s.decided_by, s.reviewer_id,
                       s.reviewed_at, None if s.confidence is None else round(s.confidence, 4), s.match_score,
                       s.model_version, s.source_frequency,
                       None if s.auto_concept_ids is None else "{" + ",".join(map(str, s.auto_concept_ids)) + "}",
                       json.dumps(s.extra), None if s.ranking is None else json.dumps(s.ranking), s.created_by,
                       s.created_at) for s in states], strict=True))
    rows = conn.execute(
        """INSERT INTO harmonia.concept_map (source_code, source_vocab, omop_concept_id, source_text, status,
               equivalence, comment, assigned_reviewer, status_set_by, status_set_at, decided_by, reviewer_id,
               reviewed_at, confidence, match_score, model_version, source_frequency, auto_concept_ids, extra,
               candidate_ranking_json, created_by, created_at)
           SELECT c, v, 0, t, st, eq, cm, ar, sb, sa, db, rid, ra, cf, ms, mv, sf, ai::integer[], ex::jsonb,
                  rk::jsonb, cb, coalesce(ca, now())
           FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                       %b::text[], %b::timestamptz[], %b::text[], %b::bigint[], %b::timestamptz[], %b::numeric[],
                       %b::float8[], %b::text[], %b::integer[], %b::text[], %b::text[], %b::text[], %b::text[],
                       %b::timestamptz[])
                AS x(c, v, t, st, eq, cm, ar, sb, sa, db, rid, ra, cf, ms, mv, sf, ai, ex, rk, cb, ca)
           RETURNING id, source_code, source_vocab""", [list(c) for c in cols]).fetchall()
    ids = {(r[1], r[2]): r[0] for r in rows}
    targets = [(ids[s.key], i, t.concept_id, t.mapping_type, t.equivalence, t.created_by, t.created_at)
               for s in states for i, t in enumerate(s.targets)]
    if targets:
        tcols = [list(c) for c in zip(*targets, strict=True)]
        conn.execute(
            """INSERT INTO harmonia.concept_map_target (map_id, position, concept_id, mapping_type, equivalence,
                   created_by, created_at)
               SELECT m, p, c, t, e, b, coalesce(a, now())
               FROM unnest(%b::bigint[], %b::smallint[], %b::integer[], %b::text[], %b::text[], %b::text[],
                           %b::timestamptz[]) AS x(m, p, c, t, e, b, a)""", tcols)
    hist = [(s.source_code, s.source_vocab, action, s.primary, s.status, json.dumps(s.snapshot()), actor, note)
            for s, note in zip(states, notes, strict=True)]
    hcols = [list(c) for c in zip(*hist, strict=True)]
    conn.execute(
        """INSERT INTO harmonia.concept_map_history (source_code, source_vocab, action, new_concept_id, new_status,
               version, new_state, actor, note)
           SELECT c, v, a, n, s, 1, ns::jsonb, ac, nt
           FROM unnest(%b::text[], %b::text[], %b::text[], %b::integer[], %b::text[], %b::text[], %b::text[],
                       %b::text[]) AS x(c, v, a, n, s, ns, ac, nt)""", hcols)
    return len(rows)


def enqueue_reviews(conn: psycopg.Connection, items: Sequence[dict[str, Any]]) -> None:
    """Open many review items at once (an import): each a dict of enqueue_review's arguments plus `status`."""
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO harmonia.review_queue (source_code, source_vocab, source_text, source_frequency, extra,
                   candidates_json, confidence, model_version, reason, error, status)
               VALUES (%(source_code)s, %(source_vocab)s, %(source_text)s, %(source_frequency)s, %(extra)s,
                       %(candidates)s, %(confidence)s, %(model_version)s, %(reason)s, NULL, %(status)s)
               ON CONFLICT (source_code, source_vocab) DO UPDATE SET
                   source_text = EXCLUDED.source_text, source_frequency = EXCLUDED.source_frequency,
                   extra = EXCLUDED.extra, candidates_json = EXCLUDED.candidates_json,
                   confidence = EXCLUDED.confidence, model_version = EXCLUDED.model_version,
                   reason = EXCLUDED.reason, status = EXCLUDED.status, resolved_by = NULL, resolved_at = NULL,
                   updated_at = now()""",
            [{**i, "extra": json.dumps(i["extra"]), "candidates": json.dumps(i["candidates"]),
              "confidence": None if i["confidence"] is None else round(i["confidence"], 4)} for i in items])


def db_now_later(conn: psycopg.Connection) -> Callable[[], datetime]:
    """Send the query now; when called: the transaction's time (what now() writes), for fields set in Python."""
    cur = conn.execute("SELECT now()")
    return lambda: scalar(cur)


def db_now(conn: psycopg.Connection) -> datetime:
    """The transaction's time (what now() writes), for fields set in Python."""
    return db_now_later(conn)()
