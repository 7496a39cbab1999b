-- The mapping system of record (issue 15): a source code has zero or more targets, each with Usagi's mapping type
-- and an equivalence; the code has a Usagi status, a comment, an assigned reviewer, who set the status and when,
-- and a version that every change increments (a decision made on an older version is refused). Usagi's other
-- columns (sourceFrequency, sourceAutoAssignedConceptIds, matchScore, ADD_INFO:*, createdBy) are kept so that a
-- Usagi file round-trips. harmonia/store/mapping.py is the one writer.
--
-- concept_map.omop_concept_id stays (NOT NULL, FK) as a mirror of the code's first MAPS_TO target, 0 ("No matching
-- concept") when it has none: readers that know one target per code keep working. Triggers keep the mirror and the
-- targets in step in both directions, so a writer that only sets omop_concept_id gets one MAPS_TO target.

ALTER TABLE harmonia.concept_map
    ADD COLUMN IF NOT EXISTS status            text NOT NULL DEFAULT 'APPROVED',
    ADD COLUMN IF NOT EXISTS comment           text,
    ADD COLUMN IF NOT EXISTS assigned_reviewer text,
    ADD COLUMN IF NOT EXISTS status_set_by     text,          -- a user's name, 'harmonia' (router) or Usagi's
    ADD COLUMN IF NOT EXISTS status_set_at     timestamptz,
    ADD COLUMN IF NOT EXISTS version           integer NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS source_frequency  integer,
    ADD COLUMN IF NOT EXISTS auto_concept_ids  integer[],      -- Usagi's sourceAutoAssignedConceptIds
    ADD COLUMN IF NOT EXISTS match_score       double precision,  -- Usagi's matchScore (NULL: the confidence)
    ADD COLUMN IF NOT EXISTS extra             jsonb NOT NULL DEFAULT '{}'::jsonb,  -- Usagi's ADD_INFO:* columns
    ADD COLUMN IF NOT EXISTS created_by        text NOT NULL DEFAULT 'harmonia';

ALTER TABLE harmonia.concept_map DROP CONSTRAINT IF EXISTS concept_map_status_check;
ALTER TABLE harmonia.concept_map ADD CONSTRAINT concept_map_status_check
    CHECK (status IN ('UNCHECKED', 'APPROVED', 'FLAGGED', 'IGNORED', 'INVALID_TARGET'));
ALTER TABLE harmonia.concept_map DROP CONSTRAINT IF EXISTS concept_map_version_check;
ALTER TABLE harmonia.concept_map ADD CONSTRAINT concept_map_version_check CHECK (version >= 1);
-- The code's equivalence: of a code without targets (UNMATCHED: no match), else the first target's.
UPDATE harmonia.concept_map SET equivalence = 'UNMATCHED' WHERE omop_concept_id = 0;
ALTER TABLE harmonia.concept_map DROP CONSTRAINT IF EXISTS concept_map_equivalence_check;
ALTER TABLE harmonia.concept_map ADD CONSTRAINT concept_map_equivalence_check
    CHECK (equivalence IN ('EQUAL', 'EQUIVALENT', 'WIDER', 'NARROWER', 'INEXACT', 'UNMATCHED', 'UNREVIEWED'));
-- 'import': a code loaded from a Usagi file whose status nobody set (UNCHECKED).
ALTER TABLE harmonia.concept_map DROP CONSTRAINT IF EXISTS concept_map_decided_by_check;
ALTER TABLE harmonia.concept_map ADD CONSTRAINT concept_map_decided_by_check
    CHECK (decided_by IN ('auto', 'reviewer', 'import'));
CREATE INDEX IF NOT EXISTS concept_map_status_idx ON harmonia.concept_map (status, source_vocab);

CREATE TABLE IF NOT EXISTS harmonia.concept_map_target (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    map_id       bigint NOT NULL REFERENCES harmonia.concept_map (id) ON DELETE CASCADE,
    position     smallint NOT NULL CHECK (position >= 0),     -- the order a reviewer (or the file) gave
    concept_id   integer NOT NULL REFERENCES vocab.concept (concept_id) CHECK (concept_id <> 0),
    mapping_type text NOT NULL DEFAULT 'MAPS_TO' CHECK (mapping_type IN ('MAPS_TO', 'MAPS_TO_VALUE', 'MAPS_TO_UNIT')),
    equivalence  text NOT NULL DEFAULT 'UNREVIEWED'
                 CHECK (equivalence IN ('EQUAL', 'EQUIVALENT', 'WIDER', 'NARROWER', 'INEXACT', 'UNMATCHED',
                                        'UNREVIEWED')),
    created_by   text NOT NULL DEFAULT 'harmonia',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (map_id, position),
    UNIQUE (map_id, concept_id, mapping_type)
);
CREATE INDEX IF NOT EXISTS concept_map_target_concept_idx ON harmonia.concept_map_target (concept_id);

-- Today's rows: each map becomes one MAPS_TO target with its equivalence (no match, concept 0: no target, UNMATCHED).
INSERT INTO harmonia.concept_map_target (map_id, position, concept_id, mapping_type, equivalence, created_by,
                                         created_at)
SELECT m.id, 0, m.omop_concept_id, 'MAPS_TO', m.equivalence,
       CASE WHEN m.decided_by = 'reviewer' THEN coalesce(u.name, 'reviewer') ELSE 'harmonia' END,
       coalesce(m.reviewed_at, m.created_at)
FROM harmonia.concept_map m LEFT JOIN harmonia.users u ON u.id = m.reviewer_id
WHERE m.omop_concept_id <> 0
  AND NOT EXISTS (SELECT 1 FROM harmonia.concept_map_target t WHERE t.map_id = m.id);

UPDATE harmonia.concept_map m SET
    status_set_by = coalesce(m.status_set_by,
                             CASE WHEN m.decided_by = 'reviewer' THEN coalesce(u.name, 'reviewer') ELSE 'harmonia' END),
    status_set_at = coalesce(m.status_set_at, m.reviewed_at, m.created_at),
    source_frequency = coalesce(m.source_frequency,
        CASE WHEN m.candidate_ranking_json ->> 'source_frequency' ~ '^-?[0-9]{1,9}$'
             THEN (m.candidate_ranking_json ->> 'source_frequency')::integer END),
    auto_concept_ids = coalesce(m.auto_concept_ids,
        (SELECT array_agg((x ->> 'concept_id')::integer ORDER BY o)
           FROM jsonb_array_elements(CASE WHEN jsonb_typeof(m.candidate_ranking_json -> 'ranked') = 'array'
                                          THEN m.candidate_ranking_json -> 'ranked' ELSE '[]'::jsonb END)
                WITH ORDINALITY AS r(x, o)
          WHERE x ->> 'concept_id' ~ '^[0-9]{1,9}$'))
FROM harmonia.concept_map m2 LEFT JOIN harmonia.users u ON u.id = m2.reviewer_id
WHERE m2.id = m.id;

-- A code flagged for a second look is no longer approved: it leaves the approved set and the exports.
UPDATE harmonia.concept_map m SET status = 'FLAGGED'
FROM harmonia.review_queue q
WHERE q.source_code = m.source_code AND q.source_vocab = m.source_vocab AND q.status = 'flagged'
  AND m.status = 'APPROVED';

-- The mirror: omop_concept_id = the first MAPS_TO target, 0 when there is none.
CREATE OR REPLACE FUNCTION harmonia.concept_map_target_mirror() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mid bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.map_id ELSE NEW.map_id END;
BEGIN
    UPDATE harmonia.concept_map m SET omop_concept_id = coalesce(
        (SELECT t.concept_id FROM harmonia.concept_map_target t
          WHERE t.map_id = mid AND t.mapping_type = 'MAPS_TO' ORDER BY t.position LIMIT 1), 0)
    WHERE m.id = mid AND m.omop_concept_id IS DISTINCT FROM coalesce(
        (SELECT t.concept_id FROM harmonia.concept_map_target t
          WHERE t.map_id = mid AND t.mapping_type = 'MAPS_TO' ORDER BY t.position LIMIT 1), 0);
    IF TG_OP = 'UPDATE' AND OLD.map_id IS DISTINCT FROM NEW.map_id THEN
        UPDATE harmonia.concept_map m SET omop_concept_id = coalesce(
            (SELECT t.concept_id FROM harmonia.concept_map_target t
              WHERE t.map_id = OLD.map_id AND t.mapping_type = 'MAPS_TO' ORDER BY t.position LIMIT 1), 0)
        WHERE m.id = OLD.map_id;
    END IF;
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS concept_map_target_mirror ON harmonia.concept_map_target;
CREATE TRIGGER concept_map_target_mirror AFTER INSERT OR UPDATE OR DELETE ON harmonia.concept_map_target
    FOR EACH ROW EXECUTE FUNCTION harmonia.concept_map_target_mirror();

-- A writer that knows only omop_concept_id (older code, SQL by hand): its concept becomes the first MAPS_TO target.
CREATE OR REPLACE FUNCTION harmonia.concept_map_legacy_target() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN  -- the mirror above updating omop_concept_id: nothing to do
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.omop_concept_id <> 0
           AND NOT EXISTS (SELECT 1 FROM harmonia.concept_map_target t WHERE t.map_id = NEW.id) THEN
            INSERT INTO harmonia.concept_map_target (map_id, position, concept_id, mapping_type, equivalence)
            VALUES (NEW.id, 0, NEW.omop_concept_id, 'MAPS_TO', NEW.equivalence);
        END IF;
    ELSIF NEW.omop_concept_id IS DISTINCT FROM OLD.omop_concept_id THEN
        IF NEW.omop_concept_id = 0 THEN
            DELETE FROM harmonia.concept_map_target WHERE map_id = NEW.id AND mapping_type = 'MAPS_TO';
        ELSIF EXISTS (SELECT 1 FROM harmonia.concept_map_target t
                       WHERE t.map_id = NEW.id AND t.mapping_type = 'MAPS_TO') THEN
            UPDATE harmonia.concept_map_target SET concept_id = NEW.omop_concept_id
            WHERE id = (SELECT t.id FROM harmonia.concept_map_target t
                         WHERE t.map_id = NEW.id AND t.mapping_type = 'MAPS_TO' ORDER BY t.position LIMIT 1);
        ELSE
            INSERT INTO harmonia.concept_map_target (map_id, position, concept_id, mapping_type, equivalence)
            VALUES (NEW.id, coalesce((SELECT max(position) + 1 FROM harmonia.concept_map_target
                                       WHERE map_id = NEW.id), 0), NEW.omop_concept_id, 'MAPS_TO', 'UNREVIEWED');
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS concept_map_legacy_target ON harmonia.concept_map;
CREATE TRIGGER concept_map_legacy_target AFTER INSERT OR UPDATE OF omop_concept_id ON harmonia.concept_map
    FOR EACH ROW EXECUTE FUNCTION harmonia.concept_map_legacy_target();

-- History: every change with the code's state before and after (status, targets, comment, ...), the version it
-- made and, for a reviewer's decision, the request id that makes a repeated request a no-op.
ALTER TABLE harmonia.concept_map_history
    ADD COLUMN IF NOT EXISTS old_status text,
    ADD COLUMN IF NOT EXISTS new_status text,
    ADD COLUMN IF NOT EXISTS version    integer,
    ADD COLUMN IF NOT EXISTS old_state  jsonb,
    ADD COLUMN IF NOT EXISTS new_state  jsonb,
    ADD COLUMN IF NOT EXISTS actor      text,          -- who, when not a user (harmonia, import, recheck)
    ADD COLUMN IF NOT EXISTS request_id text,
    ADD COLUMN IF NOT EXISTS undone_by  bigint;       -- the history row of the undo that took this change back
CREATE UNIQUE INDEX IF NOT EXISTS concept_map_history_request_idx
    ON harmonia.concept_map_history (reviewer_id, request_id) WHERE request_id IS NOT NULL;
UPDATE harmonia.concept_map_history SET new_status = 'APPROVED'
WHERE new_status IS NULL AND action IN ('auto_approve', 'approve', 'correct', 'no_match');

-- The review queue: what the reranker proposed beside its first choice (its equivalence, additional targets), a
-- reviewer it is assigned to, a claim that expires, and an index for the default order (most frequent first).
ALTER TABLE harmonia.review_queue
    ADD COLUMN IF NOT EXISTS proposal         jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN IF NOT EXISTS assigned_to      bigint REFERENCES harmonia.users (id),
    ADD COLUMN IF NOT EXISTS claimed_by       bigint REFERENCES harmonia.users (id),
    ADD COLUMN IF NOT EXISTS claim_expires_at timestamptz;
CREATE INDEX IF NOT EXISTS review_queue_frequency_idx
    ON harmonia.review_queue (status, priority DESC, source_frequency DESC NULLS LAST, id);
