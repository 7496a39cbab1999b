-- The review API's hot reads (issue 15, decision latency): a reviewer's page of one source set's queue and its
-- count find the set's open items through this index instead of scanning every open item of every set; undo finds
-- a reviewer's last change through the second one.
CREATE INDEX IF NOT EXISTS review_queue_set_order_idx
    ON harmonia.review_queue (source_vocab, status, priority DESC, source_frequency DESC NULLS LAST, id);
CREATE INDEX IF NOT EXISTS concept_map_history_reviewer_idx
    ON harmonia.concept_map_history (reviewer_id, id) WHERE reviewer_id IS NOT NULL;
