"""SQL for the LLM call log and the LLM response cache (migrations/010_llm.sql)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from harmonia.store.common import one


@dataclass
class CallRecord:
    provider: str
    model: str
    prompt_version: str
    prompt_hash: str
    source_code: str | None
    source_vocab: str | None
    payload_sha256: str
    attempt: int
    request: dict[str, Any]
    response: dict[str, Any] | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: int | None = None
    error_kind: str | None = None
    error: str | None = None


def _jsonable(value: Any) -> Any:
    # responses may hold values json cannot encode (bytes, datetimes): keep them as text rather than fail
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def log_call(conn: psycopg.Connection, r: CallRecord) -> None:
    conn.execute(
        """INSERT INTO harmonia.llm_call (provider, model, prompt_version, prompt_hash, source_code, source_vocab,
               payload_sha256, attempt, request, response, input_tokens, output_tokens, latency_ms, error_kind,
               error)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (r.provider, r.model, r.prompt_version, r.prompt_hash, r.source_code, r.source_vocab, r.payload_sha256,
         r.attempt, Jsonb(_jsonable(r.request)), None if r.response is None else Jsonb(_jsonable(r.response)),
         r.input_tokens, r.output_tokens, r.latency_ms, r.error_kind, r.error))


def cache_get(conn: psycopg.Connection, prompt_hash: str, provider: str, model: str,
              payload_sha256: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    row = conn.execute(
        """SELECT output, usage FROM harmonia.llm_cache
           WHERE prompt_hash = %s AND provider = %s AND model = %s AND payload_sha256 = %s""",
        (prompt_hash, provider, model, payload_sha256)).fetchone()
    return (row[0], row[1]) if row else None


def cache_put(conn: psycopg.Connection, prompt_hash: str, provider: str, model: str, payload_sha256: str,
              output: dict[str, Any], usage: dict[str, Any]) -> None:
    conn.execute(
        """INSERT INTO harmonia.llm_cache (prompt_hash, provider, model, payload_sha256, output, usage)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (prompt_hash, provider, model, payload_sha256)
           DO UPDATE SET output = EXCLUDED.output, usage = EXCLUDED.usage, created_at = now()""",
        (prompt_hash, provider, model, payload_sha256, Jsonb(output), Jsonb(_jsonable(usage))))


def call_stats(conn: psycopg.Connection, since: str | None = None) -> dict[str, Any]:
    """Calls, errors, tokens and mean latency in the log (optionally since a timestamp), for cost reports."""
    row = one(conn.execute(
        """SELECT count(*), count(error_kind), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
                  coalesce(avg(latency_ms), 0)
           FROM harmonia.llm_call WHERE %s::timestamptz IS NULL OR at >= %s::timestamptz""",
        (since, since)))
    return {"calls": row[0], "errors": row[1], "input_tokens": int(row[2]), "output_tokens": int(row[3]),
            "mean_latency_ms": float(row[4])}
