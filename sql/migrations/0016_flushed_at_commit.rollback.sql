-- Back to outbox rows without flushed_at_commit: the flusher then runs its
-- barrier for every burst, as before.

ALTER TABLE pyswpt.pending_balance_change_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.rejected_config_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.account_purge_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.account_update_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.account_transfer_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.finalized_transfer_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.prepared_transfer_signal DROP COLUMN flushed_at_commit;
ALTER TABLE pyswpt.rejected_transfer_signal DROP COLUMN flushed_at_commit;
