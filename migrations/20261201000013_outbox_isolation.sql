-- Outbox failure isolation (issue 13). Each event carries its own verdict: a permanent rejection
-- parks it at once, an outage retries it with capped backoff and parks it only once it has been
-- failing for OUTBOX_PARK_AFTER_HOURS, counted from its first failure since the last re-drive.

-- First failure since the last re-drive (NULL while none); consecutive failures since then,
-- the exponent of the backoff (attempts keeps the lifetime count).
ALTER TABLE outbox_events ADD COLUMN failing_since TIMESTAMPTZ;
ALTER TABLE outbox_events ADD COLUMN failures INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0);
-- When the event was parked; its reason is last_error.
ALTER TABLE outbox_events ADD COLUMN parked_at TIMESTAMPTZ;
UPDATE outbox_events SET parked_at = next_attempt_at WHERE status = 'PARKED';
ALTER TABLE outbox_events ADD CONSTRAINT outbox_parked_at_iff_parked
    CHECK ((status = 'PARKED') = (parked_at IS NOT NULL));

-- Parked events, paged by id by ListParkedEvents and counted by the backlog gauge
-- without touching the delivered rows (the pending ones have outbox_pending_idx).
CREATE INDEX outbox_parked_idx ON outbox_events (id) WHERE status = 'PARKED';
-- Delivered rows are purged after OUTBOX_RETENTION_HOURS, oldest first, in bounded batches.
CREATE INDEX outbox_delivered_idx ON outbox_events (delivered_at) WHERE status = 'DELIVERED';
