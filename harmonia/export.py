"""Exports of approved maps in the formats OMOP people use: Usagi CSV and SOURCE_TO_CONCEPT_MAP."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import psycopg

from harmonia.store import mapping as map_store
from harmonia.store.mapping import ApprovedMap

USAGI_COLUMNS = ["sourceCode", "sourceName", "sourceFrequency", "sourceAutoAssignedConceptIds", "matchScore",
                 "mappingStatus", "equivalence", "statusSetBy", "statusSetOn", "conceptId", "conceptName",
                 "domainId", "mappingType", "comment", "createdBy", "createdOn", "assignedReviewer"]
STCM_COLUMNS = ["source_code", "source_concept_id", "source_vocabulary_id", "source_code_description",
                "target_concept_id", "target_vocabulary_id", "valid_start_date", "valid_end_date",
                "invalid_reason"]
FORMATS = ("usagi", "stcm")


def _epoch_ms(ts: datetime | None) -> str:
    return str(int(ts.timestamp() * 1000)) if ts else ""


def usagi_rows(maps: Sequence[ApprovedMap]) -> list[dict[str, Any]]:
    out = []
    for m in maps:
        by = m["reviewer"] if m["decided_by"] == "reviewer" and m["reviewer"] else "harmonia"
        when = m["reviewed_at"] or m["created_at"]
        out.append({
            "sourceCode": m["source_code"], "sourceName": m["source_text"] or "",
            "sourceFrequency": m["source_frequency"] if m["source_frequency"] not in (None, "") else -1,
            "sourceAutoAssignedConceptIds": m["candidate_ids"] or "",
            "matchScore": f"{float(m['confidence']):.4f}" if m["confidence"] is not None else "",
            "mappingStatus": "APPROVED", "equivalence": m["equivalence"] or "EQUAL",
            "statusSetBy": by, "statusSetOn": _epoch_ms(when),
            "conceptId": m["omop_concept_id"], "conceptName": m["concept_name"], "domainId": m["domain_id"],
            "mappingType": "MAPS_TO", "comment": f"model_version={m['model_version'] or ''}",
            "createdBy": "harmonia", "createdOn": _epoch_ms(m["created_at"]), "assignedReviewer": "",
        })
    return out


def stcm_rows(maps: Sequence[ApprovedMap]) -> list[dict[str, Any]]:
    start = date(1970, 1, 1).isoformat()
    return [{
        "source_code": m["source_code"], "source_concept_id": 0, "source_vocabulary_id": m["source_vocab"],
        "source_code_description": m["source_text"] or "", "target_concept_id": m["omop_concept_id"],
        "target_vocabulary_id": m["vocabulary_id"], "valid_start_date": start, "valid_end_date": "2099-12-31",
        "invalid_reason": "",
    } for m in maps]


def export_csv(conn: psycopg.Connection, fmt: str, source_vocab: str | None = None) -> str:
    """The approved maps as CSV text in the given format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    maps = map_store.approved_maps(conn, source_vocab)
    rows, cols = (usagi_rows(maps), USAGI_COLUMNS) if fmt == "usagi" else (stcm_rows(maps), STCM_COLUMNS)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
