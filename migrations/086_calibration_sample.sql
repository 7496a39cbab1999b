-- Calibrating a new source set from reviews (issue 14): `harmonia calibrate sample` draws a random sample of a set's
-- pending decisions, stratified by confidence, and puts it at the head of the review queue (priority, in a random
-- order so that any prefix reviewers have judged is itself a random sample); `harmonia calibrate fit` certifies the
-- set's threshold from the verdicts on its upper stratum.
ALTER TABLE harmonia.review_queue ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0;  -- higher first

CREATE TABLE IF NOT EXISTS harmonia.calibration_sample (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_vocab         text NOT NULL,
    source_code          text NOT NULL,
    stratum              text NOT NULL CHECK (stratum IN ('high', 'low')),
    floor                double precision NOT NULL,   -- the strata's boundary: no threshold below it
    confidence           double precision NOT NULL,   -- the decision's calibrated probability when sampled
    proposed_concept_id  integer NOT NULL,            -- its first choice: the reviewer's verdict is on this
    model_version        text NOT NULL,               -- the decision's (reranker + calibrator)
    draw                 integer NOT NULL,            -- its place in the random review order
    sampled_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_vocab, source_code)
);
