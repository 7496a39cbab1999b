-- The LLM reranker's call log (every request, response, token count, latency and error, for replay and cost
-- reports) and its response cache (validated tool output per exact input).
CREATE TABLE IF NOT EXISTS harmonia.llm_call (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    provider       text NOT NULL,
    model          text NOT NULL,
    prompt_version text NOT NULL,
    prompt_hash    text NOT NULL,
    source_code    text,
    source_vocab   text,
    payload_sha256 text NOT NULL,      -- sha256 of the user message: joins the cache
    attempt        integer NOT NULL,   -- 1, 2, ... HTTP attempts for this code (retries and the re-ask)
    request        jsonb NOT NULL,     -- messages + tool name (the system prompt is prompts/<version>)
    response       jsonb,              -- the provider's response as it reported it
    input_tokens   integer,
    output_tokens  integer,
    latency_ms     integer,
    error_kind     text,               -- rate_limited, server_error, timeout, provider_fatal, schema_violation
    error          text
);
CREATE INDEX IF NOT EXISTS llm_call_at_idx ON harmonia.llm_call (at);
CREATE INDEX IF NOT EXISTS llm_call_source_idx ON harmonia.llm_call (source_code, source_vocab);

CREATE TABLE IF NOT EXISTS harmonia.llm_cache (
    prompt_hash    text NOT NULL,
    provider       text NOT NULL,
    model          text NOT NULL,
    payload_sha256 text NOT NULL,
    output         jsonb NOT NULL,     -- the schema-valid tool input
    usage          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prompt_hash, provider, model, payload_sha256)
);
