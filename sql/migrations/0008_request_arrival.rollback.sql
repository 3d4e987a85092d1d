ALTER TABLE pyswpt.pending_balance_change DROP COLUMN enqueued_at;
ALTER TABLE pyswpt.finalization_request DROP COLUMN enqueued_at;
ALTER TABLE pyswpt.transfer_request DROP COLUMN enqueued_at;
