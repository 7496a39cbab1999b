"""SQL for the LLM call log, the LLM response cache and the answer log (migrations/010_llm.sql,
095_llm_evidence.sql)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from harmonia.store.common import one, scalar


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
    server: str | None = None
    sampling: dict[str, Any] | None = None
    request_sha256: str | None = None
    mode: str | None = None
    answer: dict[str, Any] | None = None


@dataclass
class AnswerRecord:
    """One rerank answer for a source code (harmonia.llm_answer): what links a decision to its calls."""

    source_code: str
    source_vocab: str
    model_version: str
    outcome: str
    request_sha256: str | None = None
    call_id: int | None = None
    call_ids: list[int] = field(default_factory=list)
    cache_hit: bool = False
    error: str | None = None
    confidence_reported: float | None = None
    invented_ids: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    # responses may hold values json cannot encode (bytes, datetimes): keep them as text rather than fail
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(_jsonable(value))


def log_call(conn: psycopg.Connection, r: CallRecord) -> int:
    """Append one call; returns its id."""
    return int(scalar(conn.execute(
        """INSERT INTO harmonia.llm_call (provider, model, prompt_version, prompt_hash, source_code, source_vocab,
               payload_sha256, attempt, request, response, input_tokens, output_tokens, latency_ms, error_kind,
               error, server, sampling, request_sha256, mode, answer)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (r.provider, r.model, r.prompt_version, r.prompt_hash, r.source_code, r.source_vocab, r.payload_sha256,
         r.attempt, Jsonb(_jsonable(r.request)), _jsonb(r.response), r.input_tokens, r.output_tokens,
         r.latency_ms, r.error_kind, r.error, r.server, _jsonb(r.sampling), r.request_sha256, r.mode,
         _jsonb(r.answer)))))


def mark_call(conn: psycopg.Connection, call_id: int, error_kind: str, error: str) -> None:
    """A logged call whose answer was unusable (a schema violation): counted as a failure from then on."""
    conn.execute("UPDATE harmonia.llm_call SET error_kind = %s, error = %s WHERE id = %s AND error_kind IS NULL",
                 (error_kind, error[:2000], call_id))


def log_answer(conn: psycopg.Connection, r: AnswerRecord) -> int:
    return int(scalar(conn.execute(
        """INSERT INTO harmonia.llm_answer (source_code, source_vocab, model_version, request_sha256, call_id,
               call_ids, cache_hit, outcome, error, confidence_reported, invented_ids, details)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (r.source_code, r.source_vocab, r.model_version, r.request_sha256, r.call_id, r.call_ids, r.cache_hit,
         r.outcome, r.error, r.confidence_reported, r.invented_ids, Jsonb(_jsonable(r.details))))))


def get_call(conn: psycopg.Connection, call_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM harmonia.llm_call WHERE id = %s", (call_id,)).fetchone()


def get_answer(conn: psycopg.Connection, answer_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM harmonia.llm_answer WHERE id = %s", (answer_id,)).fetchone()


def latest_answer(conn: psycopg.Connection, source_code: str, source_vocab: str) -> dict[str, Any] | None:
    """The newest answer for a source code (what its current decision was made from)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("""SELECT * FROM harmonia.llm_answer WHERE source_code = %s AND source_vocab = %s
                              ORDER BY at DESC, id DESC LIMIT 1""", (source_code, source_vocab)).fetchone()


def synonyms(conn: psycopg.Connection, concept_ids: list[int], per_concept: int = 3) -> dict[int, list[str]]:
    """Up to `per_concept` synonyms of each concept (shortest first), for the v2 prompt."""
    rows = conn.execute(
        """SELECT concept_id, array_agg(name ORDER BY length(name), name) FROM (
               SELECT DISTINCT s.concept_id, s.concept_synonym_name AS name
               FROM vocab.concept_synonym s JOIN vocab.concept c USING (concept_id)
               WHERE s.concept_id = ANY(%s) AND lower(s.concept_synonym_name) <> lower(c.concept_name)) t
           GROUP BY concept_id""", (concept_ids,)).fetchall()
    return {int(r[0]): list(r[1])[:per_concept] for r in rows}


def cache_get(conn: psycopg.Connection, prompt_hash: str, provider: str, model: str,
              request_sha256: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The cached answer of an exact request. The key's payload_sha256 column holds the request hash, which
    covers the server and the sampling parameters besides the messages."""
    row = conn.execute(
        """SELECT output, usage FROM harmonia.llm_cache
           WHERE prompt_hash = %s AND provider = %s AND model = %s AND payload_sha256 = %s""",
        (prompt_hash, provider, model, request_sha256)).fetchone()
    return (row[0], row[1]) if row else None


def cache_put(conn: psycopg.Connection, prompt_hash: str, provider: str, model: str, request_sha256: str,
              output: dict[str, Any], usage: dict[str, Any]) -> None:
    conn.execute(
        """INSERT INTO harmonia.llm_cache (prompt_hash, provider, model, payload_sha256, output, usage)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (prompt_hash, provider, model, payload_sha256)
           DO UPDATE SET output = EXCLUDED.output, usage = EXCLUDED.usage, created_at = now()""",
        (prompt_hash, provider, model, request_sha256, Jsonb(output), Jsonb(_jsonable(usage))))


def call_stats(conn: psycopg.Connection, since: str | None = None) -> list[dict[str, Any]]:
    """Per provider and model: calls, failures (errors and schema violations), tokens and mean latency in the log
    (optionally since a timestamp), for cost reports."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """SELECT provider, model, count(*) AS calls, count(error_kind) AS errors,
                      count(*) FILTER (WHERE error_kind = 'schema_violation') AS schema_violations,
                      coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
                      coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
                      coalesce(avg(latency_ms), 0)::float AS mean_latency_ms
               FROM harmonia.llm_call WHERE %s::timestamptz IS NULL OR at >= %s::timestamptz
               GROUP BY provider, model ORDER BY provider, model""", (since, since)).fetchall()
    return [dict(r) for r in rows]


def call_count(conn: psycopg.Connection) -> int:
    return int(one(conn.execute("SELECT count(*) FROM harmonia.llm_call"))[0])
