-- Vocabulary releases (issue 16): which release is loaded, which one it replaced, and the release every map,
-- decision and review item was made against. A load fills vocab_staging, then in one transaction swaps it in and
-- keeps the replaced release's concept and concept_relationship tables in vocab_prev (for `harmonia vocab diff` and
-- the re-check); harmonia/store/vocab.py.
CREATE TABLE IF NOT EXISTS vocab.release (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    label          text NOT NULL,       -- the 'None' vocabulary's version in VOCABULARY, else sha256:<12 hex>
    content_sha256 text,                -- of the loaded rows (NULL: recorded by this migration, content unknown)
    versions       jsonb NOT NULL DEFAULT '{}'::jsonb,   -- vocabulary_id -> vocabulary_version (VOCABULARY file)
    source_dir     text NOT NULL,
    row_counts     jsonb NOT NULL DEFAULT '{}'::jsonb,
    kept_concepts  integer NOT NULL DEFAULT 0,           -- concepts the files lack that maps still point at
    previous_id    bigint REFERENCES vocab.release (id),
    is_current     boolean NOT NULL DEFAULT false,
    loaded_at      timestamptz NOT NULL DEFAULT now(),
    rechecked_at   timestamptz                            -- the last re-check of every map against it
);
CREATE UNIQUE INDEX IF NOT EXISTS release_one_current_idx ON vocab.release (is_current) WHERE is_current;

-- Concepts a release's files lack that a map (any FOREIGN KEY into vocab.concept) still referenced: carried into
-- the new vocab.concept marked gone (invalid_reason 'D'), so the key holds and the re-check flags the map.
CREATE TABLE IF NOT EXISTS vocab.concept_kept (
    release_id bigint NOT NULL REFERENCES vocab.release (id) ON DELETE CASCADE,
    concept_id integer NOT NULL,
    PRIMARY KEY (release_id, concept_id)
);

CREATE OR REPLACE FUNCTION vocab.current_release_id() RETURNS bigint
    LANGUAGE sql STABLE
    RETURN (SELECT id FROM vocab.release WHERE is_current);

-- A vocabulary loaded before this migration: recorded as an unidentified release, so existing rows get one.
INSERT INTO vocab.release (label, source_dir, row_counts, is_current, loaded_at)
SELECT 'unidentified (loaded before releases were recorded)', coalesce(l.source_dir, ''),
       coalesce(l.row_counts, '{}'::jsonb), true, coalesce(l.loaded_at, now())
FROM (SELECT 1) one
LEFT JOIN LATERAL (SELECT source_dir, row_counts, loaded_at FROM vocab.load_log ORDER BY id DESC LIMIT 1) l ON true
WHERE EXISTS (SELECT 1 FROM vocab.concept) AND NOT EXISTS (SELECT 1 FROM vocab.release);

-- The release a row was made against. Set by triggers, so every writer of these tables records it without knowing:
-- a map on insert and whenever its target or its review changes, a review item whenever it is (re)opened, a history
-- row on insert.
ALTER TABLE harmonia.concept_map ADD COLUMN IF NOT EXISTS vocab_release_id bigint REFERENCES vocab.release (id);
ALTER TABLE harmonia.concept_map_history ADD COLUMN IF NOT EXISTS vocab_release_id bigint
    REFERENCES vocab.release (id);
ALTER TABLE harmonia.review_queue ADD COLUMN IF NOT EXISTS vocab_release_id bigint REFERENCES vocab.release (id);
UPDATE harmonia.concept_map SET vocab_release_id = vocab.current_release_id() WHERE vocab_release_id IS NULL;
UPDATE harmonia.concept_map_history SET vocab_release_id = vocab.current_release_id() WHERE vocab_release_id IS NULL;
UPDATE harmonia.review_queue SET vocab_release_id = vocab.current_release_id() WHERE vocab_release_id IS NULL;

CREATE OR REPLACE FUNCTION harmonia.stamp_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.vocab_release_id := vocab.current_release_id();
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION harmonia.stamp_map_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Read through jsonb so that a later migration dropping or renaming one of these columns cannot break writes.
    IF TG_OP = 'INSERT' OR to_jsonb(NEW) -> 'omop_concept_id' IS DISTINCT FROM to_jsonb(OLD) -> 'omop_concept_id'
       OR to_jsonb(NEW) -> 'reviewed_at' IS DISTINCT FROM to_jsonb(OLD) -> 'reviewed_at' THEN
        NEW.vocab_release_id := vocab.current_release_id();
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS concept_map_release ON harmonia.concept_map;
CREATE TRIGGER concept_map_release BEFORE INSERT OR UPDATE ON harmonia.concept_map
    FOR EACH ROW EXECUTE FUNCTION harmonia.stamp_map_release();
DROP TRIGGER IF EXISTS concept_map_history_release ON harmonia.concept_map_history;
CREATE TRIGGER concept_map_history_release BEFORE INSERT ON harmonia.concept_map_history
    FOR EACH ROW EXECUTE FUNCTION harmonia.stamp_release();
DROP TRIGGER IF EXISTS review_queue_release ON harmonia.review_queue;
CREATE TRIGGER review_queue_release BEFORE INSERT OR UPDATE OF status, reason
    ON harmonia.review_queue FOR EACH ROW EXECUTE FUNCTION harmonia.stamp_release();

-- What the re-check found: one row per (release, map, old target). A finding opens a review item once; running the
-- re-check again counts it but never re-opens an item a reviewer has resolved (harmonia/store/recheck.py).
CREATE TABLE IF NOT EXISTS harmonia.recheck_finding (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    release_id           bigint NOT NULL REFERENCES vocab.release (id),
    source_code          text NOT NULL,
    source_vocab         text NOT NULL,
    reason               text NOT NULL CHECK (reason IN ('invalid_target', 'maps_to_changed')),
    detail               text NOT NULL,     -- deprecated, upgraded, non_standard, gone, maps_to_changed
    old_concept_id       integer NOT NULL,  -- the map's target when found
    proposed_concept_ids integer[] NOT NULL DEFAULT '{}',
    proposed_by          text,              -- 'Concept replaced by', 'Maps to', 'retrieval'; NULL: none found
    decided_by           text NOT NULL,     -- the map's: auto or reviewer (a reviewer's map is never replaced)
    found_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (release_id, source_code, source_vocab, old_concept_id)
);
CREATE INDEX IF NOT EXISTS recheck_finding_source_idx ON harmonia.recheck_finding (source_code, source_vocab);
