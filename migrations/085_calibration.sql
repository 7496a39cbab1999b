-- Calibrated auto-approval thresholds (issue 14): per kind of source (source_vocab = '') or per source set with its
-- own reviewed sample, each tied to the reranker's model_version and the calibrator's hash. A decision whose
-- reranker, calibrator and kind/set have no row here is never auto-approved (review, reason 'uncalibrated').
CREATE TABLE IF NOT EXISTS harmonia.calibration_threshold (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reranker_version  text NOT NULL,
    calibrator_hash   text NOT NULL,
    kind              text NOT NULL,
    source_vocab      text NOT NULL DEFAULT '',  -- '' = every set of the kind
    threshold         double precision CHECK (threshold >= 0 AND threshold <= 1),  -- NULL: nothing certified
    target            double precision NOT NULL,
    alpha             double precision NOT NULL,
    bound             double precision,          -- lower confidence bound of the precision at the threshold
    rows_behind       integer NOT NULL,          -- calibration rows at or above the threshold
    rows_correct      integer NOT NULL,
    coverage          double precision,          -- share of the calibration rows at or above the threshold
    calibration_rows  integer NOT NULL,
    method            text NOT NULL,
    origin            text NOT NULL CHECK (origin IN ('bench', 'reviews')),
    details           jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (reranker_version, calibrator_hash, kind, source_vocab)
);
