-- When each queued request arrived (issue 11): the age of the oldest request
-- waiting for a worker stage is a metric, and transfer_request had no time at
-- all (finalization_request.ts and pending_balance_change.committed_at are
-- set by peers, not by this shard). The default fills the column, so no
-- function changes. A constant default is stored in the catalog: rows queued
-- before the migration read the time it ran, and no table is rewritten.

ALTER TABLE pyswpt.transfer_request ADD COLUMN enqueued_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE pyswpt.finalization_request ADD COLUMN enqueued_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE pyswpt.pending_balance_change ADD COLUMN enqueued_at timestamptz NOT NULL DEFAULT now();

COMMENT ON COLUMN pyswpt.transfer_request.enqueued_at IS
    'When the consumer queued the request (its transaction''s time).';
COMMENT ON COLUMN pyswpt.finalization_request.enqueued_at IS
    'When the consumer queued the request (its transaction''s time); ts is the coordinator''s.';
COMMENT ON COLUMN pyswpt.pending_balance_change.enqueued_at IS
    'When the consumer registered the change (its transaction''s time); committed_at is the sender shard''s.';
