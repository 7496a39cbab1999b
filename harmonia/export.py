"""Maps in and out in the formats OMOP people use: a Usagi save file (written and read back, so a Usagi team moves
in and out without losing statuses, equivalences, comments, several targets per code or additional info columns)
and SOURCE_TO_CONCEPT_MAP (every MAPS_TO target of an approved code).

The Usagi round trip is lossless for what Harmonia writes: a file exported, imported into an empty database and
exported again is identical. Cells a spreadsheet would evaluate (starting with = + - @, a tab or a carriage return)
are written with a leading apostrophe, and so is a text that starts with one; reading takes exactly one off again.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg

from harmonia.domain import Concept, MapStatus, RankingEntry
from harmonia.store import concepts as concept_store
from harmonia.store import mapping as map_store
from harmonia.store import review as review_store
from harmonia.store.mapping import MapState, Target

ADD_INFO = "ADD_INFO:"
USAGI_HEAD = ["sourceCode", "sourceName", "sourceFrequency", "sourceAutoAssignedConceptIds"]
USAGI_TAIL = ["matchScore", "mappingStatus", "equivalence", "statusSetBy", "statusSetOn", "conceptId", "conceptName",
              "domainId", "mappingType", "comment", "createdBy", "createdOn", "assignedReviewer"]
USAGI_COLUMNS = USAGI_HEAD + USAGI_TAIL
STCM_COLUMNS = ["source_code", "source_concept_id", "source_vocabulary_id", "source_code_description",
                "target_concept_id", "target_vocabulary_id", "valid_start_date", "valid_end_date",
                "invalid_reason"]
FORMATS = ("usagi", "stcm")
STCM_DESCRIPTION_MAX = 255  # source_code_description is varchar(255) in the CDM
STCM_END = "2099-12-31"
UNMAPPED = "Unmapped"  # Usagi's name of the empty concept (conceptId 0) of a code without targets
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_TEXT_FIELDS = ("sourceCode", "sourceName", "statusSetBy", "conceptName", "comment", "createdBy",
                "assignedReviewer")


def safe_cell(value: str) -> str:
    """A text cell no spreadsheet evaluates: a leading apostrophe before = + - @ tab CR (and before an apostrophe,
    so that reading it back is exact)."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def read_cell(value: str) -> str:
    """What safe_cell wrote, back."""
    return value[1:] if value.startswith("'") else value


def _epoch_ms(ts: datetime | None) -> str:
    return str(round(ts.timestamp() * 1000)) if ts else ""


def _from_epoch_ms(text: str) -> datetime | None:
    return datetime.fromtimestamp(int(text) / 1000, tz=UTC) if text.strip() else None


def _score(m: MapState) -> str:
    v = m.match_score if m.match_score is not None else m.confidence
    return "" if v is None else repr(float(v))


# ------------------------------------------------------------------------------------------------------ Usagi out


def _unchecked_items(conn: psycopg.Connection, source_vocab: str | None) -> list[MapState]:
    """Review items whose code has no map yet, as Usagi's UNCHECKED rows: the model's first suggestion, unreviewed."""
    out = []
    offset = 0
    while True:
        _, items = review_store.list_items(conn, statuses=["open", "flagged"], source_vocab=source_vocab,
                                           limit=500, offset=offset, order="oldest")
        if not items:
            break
        offset += len(items)
        keys = map_store.existing_maps(conn, [(i["source_code"], i["source_vocab"]) for i in items])
        for it in items:
            if (it["source_code"], it["source_vocab"]) in keys:
                continue
            first = it["candidates"][0] if it["candidates"] else None
            targets = [Target(int(first["concept_id"]), "MAPS_TO", "UNREVIEWED", "harmonia", it["created_at"],
                              first["concept_name"], first["domain_id"], first["vocabulary_id"])] if first else []
            out.append(MapState(source_code=it["source_code"], source_vocab=it["source_vocab"],
                                source_text=it["source_text"],
                                status="FLAGGED" if it["status"] == "flagged" else "UNCHECKED", targets=targets,
                                confidence=it["confidence"], source_frequency=it["source_frequency"],
                                auto_concept_ids=[int(c["concept_id"]) for c in it["candidates"]],
                                extra=it["extra"], created_at=it["created_at"], version=0))
    return out


def usagi_rows(maps: Sequence[MapState]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns (ADD_INFO:* sorted, between the source's and the map's) and one row per target (one row with
    conceptId 0 for a code without targets)."""
    info = sorted({k for m in maps for k in m.extra})
    cols = USAGI_HEAD + [ADD_INFO + k for k in info] + USAGI_TAIL
    out = []
    for m in maps:
        src: dict[str, Any] = {
            "sourceCode": m.source_code, "sourceName": m.source_text or "",
            "sourceFrequency": m.source_frequency if m.source_frequency is not None else -1,
            "sourceAutoAssignedConceptIds": ";".join(str(c) for c in m.auto_concept_ids or []),
        }
        for k in info:
            v = m.extra.get(k)
            src[ADD_INFO + k] = "" if v is None else v if isinstance(v, str) else json.dumps(v)
        code = {"matchScore": _score(m), "mappingStatus": m.status, "statusSetBy": m.status_set_by or "",
                "statusSetOn": _epoch_ms(m.status_set_at), "comment": m.comment or "",
                "assignedReviewer": m.assigned_reviewer or ""}
        rows = [{"equivalence": t.equivalence, "conceptId": t.concept_id, "conceptName": t.concept_name,
                 "domainId": t.domain_id, "mappingType": t.mapping_type, "createdBy": t.created_by,
                 "createdOn": _epoch_ms(t.created_at)} for t in m.targets]
        if not rows:
            rows = [{"equivalence": m.equivalence, "conceptId": 0, "conceptName": UNMAPPED, "domainId": "",
                     "mappingType": "MAPS_TO", "createdBy": m.created_by, "createdOn": _epoch_ms(m.created_at)}]
        for r in rows:
            row = {**src, **code, **r}
            for f in (*_TEXT_FIELDS, *(ADD_INFO + k for k in info)):
                row[f] = safe_cell(str(row[f]))
            out.append(row)
    return cols, out


def usagi_maps(conn: psycopg.Connection, source_vocab: str | None = None,
               statuses: Sequence[MapStatus] | None = ("APPROVED",)) -> list[MapState]:
    """The maps a Usagi export writes: of these statuses (None: all, including review items not yet mapped)."""
    maps = map_store.list_states(conn, source_vocab=source_vocab, statuses=statuses)
    if statuses is None or "UNCHECKED" in statuses:
        maps += [m for m in _unchecked_items(conn, source_vocab) if statuses is None or m.status in statuses]
        maps.sort(key=lambda m: (m.source_vocab.encode(), m.source_code.encode()))  # as COLLATE "C"
    return maps


# ------------------------------------------------------------------------------------------------------- STCM out


def _description(text: str | None) -> str:
    """At most 255 characters (an ellipsis says it was cut), on one line, defused for spreadsheets."""
    text = safe_cell(" ".join((text or "").split()))
    return text if len(text) <= STCM_DESCRIPTION_MAX else text[:STCM_DESCRIPTION_MAX - 1] + "…"


def stcm_rows(conn: psycopg.Connection, maps: Sequence[MapState]) -> list[dict[str, Any]]:
    """Every MAPS_TO target of the (approved) maps, with the source's own concept where the source code is one of
    the vocabulary's (else 0), valid from the day the map was approved."""
    source_ids = concept_store.concept_ids_by_code(conn, [m.key for m in maps])
    out = []
    for m in maps:
        start = (m.status_set_at or m.reviewed_at or m.created_at or datetime(1970, 1, 1, tzinfo=UTC)).date()
        for t in m.targets:
            if t.mapping_type != "MAPS_TO":
                continue
            out.append({
                "source_code": safe_cell(m.source_code), "source_concept_id": source_ids.get(m.key, 0),
                "source_vocabulary_id": safe_cell(m.source_vocab),
                "source_code_description": _description(m.source_text),
                "target_concept_id": t.concept_id, "target_vocabulary_id": t.vocabulary_id,
                "valid_start_date": start.isoformat(), "valid_end_date": STCM_END,
                "invalid_reason": "" if t.valid_standard else "D",
            })
    return out


def export_csv(conn: psycopg.Connection, fmt: str, source_vocab: str | None = None,
               statuses: Sequence[MapStatus] | None = ("APPROVED",)) -> str:
    """The maps as CSV text in the given format. Usagi: of these statuses (default the approved ones; None: every
    code, a full Usagi save file); STCM: always only approved codes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    buf = io.StringIO()
    if fmt == "usagi":
        cols, rows = usagi_rows(usagi_maps(conn, source_vocab, statuses))
    else:
        cols, rows = STCM_COLUMNS, stcm_rows(conn, map_store.list_states(conn, source_vocab=source_vocab,
                                                                         statuses=["APPROVED"]))
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- Usagi in


class UsagiError(ValueError):
    """A Usagi file that cannot be imported; nothing was written. `problems`: 'line N: ...' each."""

    def __init__(self, path: str, problems: list[str]) -> None:
        shown = problems[:20]
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: cannot import:\n" + "\n".join(shown) + more)
        self.problems = problems


@dataclass
class ImportSummary:
    rows: int = 0
    codes: int = 0
    imported: int = 0
    skipped_existing: int = 0
    replaced: int = 0
    targets: int = 0
    invalid_target: int = 0         # codes set to INVALID_TARGET: a target is not a valid standard concept (any more)
    review_items: int = 0           # codes put in the review queue (UNCHECKED, FLAGGED, INVALID_TARGET)
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass
class _Code:
    line: int
    state: MapState
    rows: list[tuple[int, Target]]


_CODE_FIELDS = ("sourceName", "sourceFrequency", "sourceAutoAssignedConceptIds", "matchScore", "mappingStatus",
                "statusSetBy", "statusSetOn", "comment", "assignedReviewer")


def _parse(rows: Iterable[dict[str, str]], header: list[str], source_vocab: str) -> tuple[list[_Code], list[str]]:
    problems: list[str] = []
    for col in ("sourceCode", "sourceName", "conceptId"):
        if col not in header:
            problems.append(f"line 1: the header lacks column {col!r} "
                            f"(a Usagi save file has {', '.join(USAGI_COLUMNS)})")
    if problems:
        return [], problems
    info = [c for c in header if c.startswith(ADD_INFO)]
    codes: dict[str, _Code] = {}
    firsts: dict[str, dict[str, str]] = {}
    for n, raw in enumerate(rows, start=2):
        if None in raw:
            problems.append(f"line {n}: more cells than the header has columns")
            continue
        r = {k: (v or "") for k, v in raw.items()}
        code = read_cell(r["sourceCode"]).strip()
        if not code:
            problems.append(f"line {n}: sourceCode is empty")
            continue

        def bad(fld: str, why: str, n: int = n) -> None:
            problems.append(f"line {n}: {fld} {why}")

        try:
            cid = int(r["conceptId"] or "0")
        except ValueError:
            bad("conceptId", f"{r['conceptId']!r} is not an integer")
            continue
        mtype = r.get("mappingType") or "MAPS_TO"
        if mtype not in map_store.MAPPING_TYPES:
            bad("mappingType", f"{mtype!r} is not one of {', '.join(map_store.MAPPING_TYPES)}")
            continue
        eq = r.get("equivalence") or "UNREVIEWED"
        if eq not in map_store.EQUIVALENCES:
            bad("equivalence", f"{eq!r} is not one of {', '.join(map_store.EQUIVALENCES)}")
            continue
        try:
            created_on = _from_epoch_ms(r.get("createdOn", ""))
        except (ValueError, OverflowError, OSError):
            bad("createdOn", f"{r.get('createdOn')!r} is not a time in milliseconds since 1970")
            continue
        created_by = read_cell(r.get("createdBy", ""))
        if code in codes:
            first = firsts[code]
            differs = [f for f in (*_CODE_FIELDS, *info) if r.get(f, "") != first.get(f, "")]
            if differs:
                bad(differs[0], f"of source code {code!r} differs from line {codes[code].line}'s: a code's rows share "
                    "everything but the target")
                continue
            c = codes[code]
            if cid == 0 or not c.rows:
                bad("conceptId", f"0 (unmapped) and a target for source code {code!r}: a code has targets or none")
                continue
            c.rows.append((n, Target(cid, mtype, eq, created_by, created_on)))
            continue
        status = r.get("mappingStatus") or "UNCHECKED"
        if status not in map_store.STATUSES:
            bad("mappingStatus", f"{status!r} is not one of {', '.join(map_store.STATUSES)}")
            continue
        try:
            freq_text = r.get("sourceFrequency", "").strip()
            freq = int(freq_text) if freq_text else -1
        except ValueError:
            bad("sourceFrequency", f"{r.get('sourceFrequency')!r} is not an integer")
            continue
        try:
            auto = [int(x) for x in r.get("sourceAutoAssignedConceptIds", "").split(";") if x.strip()]
        except ValueError:
            bad("sourceAutoAssignedConceptIds", f"{r.get('sourceAutoAssignedConceptIds')!r} is not ';'-separated "
                "concept ids")
            continue
        try:
            score_text = r.get("matchScore", "").strip()
            score = float(score_text) if score_text else None
        except ValueError:
            bad("matchScore", f"{r.get('matchScore')!r} is not a number")
            continue
        try:
            set_on = _from_epoch_ms(r.get("statusSetOn", ""))
        except (ValueError, OverflowError, OSError):
            bad("statusSetOn", f"{r.get('statusSetOn')!r} is not a time in milliseconds since 1970")
            continue
        state = MapState(
            source_code=code, source_vocab=source_vocab, source_text=read_cell(r["sourceName"]),
            status=status,
            equivalence=eq,  # kept for a code without targets
            comment=read_cell(r.get("comment", "")) or None,
            assigned_reviewer=read_cell(r.get("assignedReviewer", "")) or None,
            status_set_by=read_cell(r.get("statusSetBy", "")) or None, status_set_at=set_on,
            decided_by="import" if status == "UNCHECKED" else "reviewer", match_score=score,
            source_frequency=None if freq == -1 else freq, auto_concept_ids=auto,
            extra={c[len(ADD_INFO):]: read_cell(r.get(c, "")) for c in info}, created_by=created_by or "import",
            created_at=created_on, model_version="usagi-import")
        codes[code] = _Code(n, state, [] if cid == 0 else
                            [(n, Target(cid, mtype, eq, created_by, created_on))])
        firsts[code] = r
    for c in codes.values():
        seen: dict[tuple[int, str], int] = {}
        for n, t in c.rows:
            if (t.concept_id, t.mapping_type) in seen:
                problems.append(f"line {n}: conceptId {t.concept_id} is already a {t.mapping_type} target of source "
                                f"code {c.state.source_code!r} (line {seen[(t.concept_id, t.mapping_type)]})")
            seen[(t.concept_id, t.mapping_type)] = n
    return list(codes.values()), problems


def _ranking(targets: Sequence[Target], auto: Sequence[int], concepts: dict[int, Concept]) -> list[RankingEntry]:
    """The review item's suggestions: the file's targets first, then the ids Usagi auto-assigned."""
    out: list[RankingEntry] = []
    seen: set[int] = set()
    for cid in [t.concept_id for t in targets if t.mapping_type == "MAPS_TO"] + list(auto):
        c = concepts.get(cid)
        if c is None or cid in seen or not c.is_valid_standard:
            continue
        seen.add(cid)
        out.append(RankingEntry(concept_id=cid, concept_name=c.concept_name, domain_id=c.domain_id,
                                vocabulary_id=c.vocabulary_id, concept_class_id=c.concept_class_id,
                                concept_code=c.concept_code, similarity=0.0, score=0.0,
                                rationale="from the Usagi file"))
    return out[:5]


def import_usagi(conn: psycopg.Connection, path: Path | str, source_vocab: str, *, text: str | None = None,
                 replace: bool = False, actor: str = "import") -> ImportSummary:
    """Load a Usagi save file into the maps (status, equivalence, comment, mapping types, statusSetBy/On, several
    rows per code, ADD_INFO columns) and the review queue (codes still UNCHECKED, FLAGGED or INVALID_TARGET), in
    one transaction: a bad file raises UsagiError naming each bad line and nothing is written. A code that already
    has a map is skipped (`replace`: overwritten, with history). A target that is not a valid standard concept (any
    more), or whose domain does not suit its mapping type, sets the code's status to INVALID_TARGET."""
    name = str(path)
    if text is None:
        text = Path(path).read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = list(reader.fieldnames or [])
    try:
        codes, problems = _parse(reader, header, source_vocab)
    except csv.Error as exc:
        raise UsagiError(name, [f"line {reader.line_num}: {exc}"]) from exc
    ids = {t.concept_id for c in codes for _, t in c.rows} | {a for c in codes for a in c.state.auto_concept_ids or []}
    concepts = concept_store.get_concepts(conn, ids)
    for c in codes:
        for n, t in c.rows:
            if t.concept_id not in concepts:
                problems.append(f"line {n}: conceptId {t.concept_id} does not exist in the vocabulary")
        if c.rows and not any(t.mapping_type == "MAPS_TO" for _, t in c.rows):
            problems.append(f"line {c.line}: source code {c.state.source_code!r} has no MAPS_TO target")
    if problems:
        raise UsagiError(name, problems)
    s = ImportSummary(rows=sum(max(len(c.rows), 1) for c in codes), codes=len(codes))
    fresh: list[MapState] = []
    notes: list[str | None] = []
    items: list[dict[str, Any]] = []
    with conn.transaction():
        existing = map_store.existing_maps(conn, [c.state.key for c in codes])
        for c in codes:
            st = c.state
            st.targets = [t for _, t in c.rows]
            for t in st.targets:
                con = concepts[t.concept_id]
                t.concept_name, t.domain_id, t.vocabulary_id = con.concept_name, con.domain_id, con.vocabulary_id
            bad = [p for t in st.targets if (p := map_store.target_problem(concepts[t.concept_id], t.concept_id,
                                                                            t.mapping_type))]
            note = f"imported from {Path(name).name} line {c.line}"
            if bad and st.status != "INVALID_TARGET":
                note += f"; its status {st.status} became INVALID_TARGET: {bad[0]}"
                st.status = "INVALID_TARGET"
            if st.key in existing:
                if not replace:
                    s.skipped_existing += 1
                    continue
                s.replaced += 1
                map_store.write_map(conn, st, expected_version=None, action="import", actor=actor, note=note,
                                    stamp=False)
            else:
                fresh.append(st)
                notes.append(note)
            s.imported += 1
            s.targets += len(st.targets)
            s.invalid_target += st.status == "INVALID_TARGET"
            s.by_status[st.status] = s.by_status.get(st.status, 0) + 1
            if st.status in ("UNCHECKED", "FLAGGED", "INVALID_TARGET"):
                conf = st.match_score if st.match_score is not None and 0 <= st.match_score <= 1 else None
                items.append({"source_code": st.source_code, "source_vocab": source_vocab,
                              "source_text": st.source_text, "source_frequency": st.source_frequency,
                              "extra": st.extra, "candidates": _ranking(st.targets, st.auto_concept_ids or [],
                                                                        concepts),
                              "confidence": conf, "model_version": "usagi-import",
                              "reason": "invalid_target" if st.status == "INVALID_TARGET" else "imported",
                              "status": "flagged" if st.status == "FLAGGED" else "open"})
        map_store.insert_new_maps(conn, fresh, action="import", actor=actor, notes=notes)
        map_store.enqueue_reviews(conn, items)
        s.review_items = len(items)
    return s


def today() -> str:
    return date.today().isoformat()
