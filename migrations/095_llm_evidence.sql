-- The LLM path keeps its evidence: which server, sampling and request mode answered each call, the parsed answer,
-- a hash of the exact request (cache key, replay), and one row per rerank answer linking a source code's decision
-- to the calls behind it, with what the router cannot keep (invented ids, the confidence the model gave).
ALTER TABLE harmonia.llm_call
    ADD COLUMN IF NOT EXISTS server         text,
    ADD COLUMN IF NOT EXISTS sampling       jsonb,
    ADD COLUMN IF NOT EXISTS request_sha256 text,   -- sha256 of the exact request (provider, server, model,
                                                    -- sampling, prompt hash, messages)
    ADD COLUMN IF NOT EXISTS mode           text,   -- tool | json_schema | format | text: which request answered
    ADD COLUMN IF NOT EXISTS answer         jsonb;  -- the answer's JSON object as parsed (before validation)
CREATE INDEX IF NOT EXISTS llm_call_request_idx ON harmonia.llm_call (request_sha256);

CREATE TABLE IF NOT EXISTS harmonia.llm_answer (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                  timestamptz NOT NULL DEFAULT now(),
    source_code         text NOT NULL,
    source_vocab        text NOT NULL,
    model_version       text NOT NULL,
    request_sha256      text,              -- the first request's hash (the cache key)
    call_id             bigint,            -- the call whose answer was used (or the cached answer's call)
    call_ids            bigint[] NOT NULL DEFAULT '{}',  -- every call made for this answer (retries, re-ask)
    cache_hit           boolean NOT NULL DEFAULT false,
    outcome             text NOT NULL,     -- ok | invented_id | schema_violation | provider_fatal | timeout ...
    error               text,
    confidence_reported double precision,  -- what the model said, before anything was dropped
    invented_ids        bigint[] NOT NULL DEFAULT '{}',  -- ids the model gave that were not among the candidates
    details             jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS llm_answer_source_idx ON harmonia.llm_answer (source_code, source_vocab, at);
