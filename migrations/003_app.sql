-- The application schema: reviewers, the concept map (what has been approved), its history, the queue of source
-- codes waiting to be mapped and the queue of codes waiting for a human.
CREATE SCHEMA IF NOT EXISTS harmonia;

CREATE TABLE harmonia.users (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    role        text NOT NULL DEFAULT 'reviewer' CHECK (role IN ('reader', 'reviewer', 'admin')),
    token_hash  text UNIQUE,         -- sha256 of the API token; the token itself is never stored
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

CREATE TABLE harmonia.concept_map (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_code            text NOT NULL,
    source_vocab           text NOT NULL,
    source_text            text,
    omop_concept_id        integer NOT NULL REFERENCES vocab.concept (concept_id),
    confidence             numeric(5, 4) CHECK (confidence >= 0 AND confidence <= 1),
    equivalence            text NOT NULL DEFAULT 'EQUAL',
    decided_by             text NOT NULL DEFAULT 'auto' CHECK (decided_by IN ('auto', 'reviewer')),
    reviewer_id            bigint REFERENCES harmonia.users (id),
    reviewed_at            timestamptz,
    model_version          text,
    candidate_ranking_json jsonb,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_code, source_vocab)
);
CREATE INDEX concept_map_concept_idx ON harmonia.concept_map (omop_concept_id);

-- Every change to the concept map: who changed what, from what.
CREATE TABLE harmonia.concept_map_history (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_code     text NOT NULL,
    source_vocab    text NOT NULL,
    action          text NOT NULL,   -- auto_approve, approve, correct, no_match, revoke, ...
    old_concept_id  integer,
    new_concept_id  integer,
    confidence      numeric(5, 4),
    model_version   text,
    reviewer_id     bigint REFERENCES harmonia.users (id),
    note            text,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX concept_map_history_source_idx ON harmonia.concept_map_history (source_code, source_vocab);

-- Source codes waiting to be mapped (drained by `harmonia worker`).
CREATE TABLE harmonia.source_queue (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_code      text NOT NULL,
    source_vocab     text NOT NULL,
    source_text      text NOT NULL,
    source_frequency integer,
    extra            jsonb NOT NULL DEFAULT '{}'::jsonb,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'in_progress', 'approved', 'in_review', 'failed')),
    lease_owner      text,
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (source_code, source_vocab)
);
CREATE INDEX source_queue_pending_idx ON harmonia.source_queue (id) WHERE state = 'pending';
CREATE INDEX source_queue_lease_idx ON harmonia.source_queue (lease_expires_at) WHERE state = 'in_progress';

-- Codes the router was not sure of, with what the model said.
CREATE TABLE harmonia.review_queue (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_code      text NOT NULL,
    source_vocab     text NOT NULL,
    source_text      text,
    source_frequency integer,
    extra            jsonb NOT NULL DEFAULT '{}'::jsonb,
    candidates_json  jsonb NOT NULL DEFAULT '[]'::jsonb,  -- top-N: concept_id, name, domain, vocabulary, score, rationale
    confidence       numeric(5, 4) CHECK (confidence >= 0 AND confidence <= 1),
    model_version    text,
    reason           text NOT NULL,   -- low_confidence, no_match, error, schema_violation, max_attempts
    error            text,
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'flagged', 'resolved')),
    resolved_by      bigint REFERENCES harmonia.users (id),
    resolved_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_code, source_vocab)
);
CREATE INDEX review_queue_status_idx ON harmonia.review_queue (status, id);
