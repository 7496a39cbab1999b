-- Queue additions for `harmonia worker` (issue 6): a retry delay, a wake-up signal on enqueue and an index for
-- the throughput figure of `harmonia status`.

-- A failed attempt puts the item back to pending but not before this time (a short, growing back-off), so a
-- provider outage does not burn every attempt in a few seconds.
ALTER TABLE harmonia.source_queue ADD COLUMN IF NOT EXISTS retry_at timestamptz;

-- Idle workers LISTEN on harmonia_queue; any insert (CLI, API, an ETL writing SQL directly) wakes them at once.
-- Statement-level, so a bulk insert sends one notification, not one per row.
CREATE OR REPLACE FUNCTION harmonia.source_queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('harmonia_queue', 'enqueued');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS source_queue_notify ON harmonia.source_queue;
CREATE TRIGGER source_queue_notify AFTER INSERT ON harmonia.source_queue
    FOR EACH STATEMENT EXECUTE FUNCTION harmonia.source_queue_notify();

CREATE INDEX IF NOT EXISTS source_queue_finished_idx ON harmonia.source_queue (finished_at)
    WHERE finished_at IS NOT NULL;
