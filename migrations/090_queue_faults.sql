-- Workers that ride out faults (issue 19): what went wrong with an item is counted by cause, live workers
-- report a heartbeat, and the claim's plan does not grow with finished rows.

-- `attempts` still counts every claim. These say why an item came back:
--   failures           decide raised: the code's fault (worker_max_attempts of them: failed)
--   provider_failures  the reranker's provider failed it (rate limit, 5xx, timeout, connection): not the code's
--   deaths             its lease expired: the worker holding it died or stalled
--   solo_deaths        ... while it was held alone, the only evidence that the code itself kills workers
-- `leased_alone` says the current lease is for this item alone; `first_provider_failure_at` starts the patience
-- clock of a provider outage.
ALTER TABLE harmonia.source_queue
    ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS provider_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS deaths integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS solo_deaths integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS leased_alone boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS first_provider_failure_at timestamptz;

-- Pending items in claim order (when each became ready: enqueued, or its back-off over): the claim is a range scan
-- of this index, so its cost grows neither with finished rows nor with items waiting out a back-off.
CREATE INDEX IF NOT EXISTS source_queue_ready_idx
    ON harmonia.source_queue ((coalesce(retry_at, enqueued_at)), id) WHERE state = 'pending';

-- Each running worker's heartbeat (written by its lease thread), so `harmonia status` tells live workers from dead
-- ones holding leases that have not expired yet.
CREATE TABLE IF NOT EXISTS harmonia.queue_worker (
    owner          text PRIMARY KEY,
    host           text NOT NULL,
    pid            integer NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_s    real NOT NULL,         -- the interval it promises; stale after three of them
    state          text NOT NULL,         -- working | idle | paused (provider down) | db_outage | stopped
    stats          jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS queue_worker_heartbeat_idx ON harmonia.queue_worker (heartbeat_at);

-- `harmonia status`: the review queue by reason.
CREATE INDEX IF NOT EXISTS review_queue_reason_idx ON harmonia.review_queue (reason) WHERE status <> 'resolved';
