-- Whether the transaction that wrote an outbox row flushes the WAL before its
-- commit becomes visible. With synchronous_commit on or remote_apply a commit
-- is on disk (and on a synchronous standby) before another session can see
-- its rows, so a row the flusher takes from such a transaction is already
-- durable: the flusher needs its durability barrier only for the rows of
-- asynchronous commits, the workers'. Most rows come from the consumers'
-- windows, which commit synchronously; the barrier's position covered every
-- WAL record written before the flusher's snapshot, so it flushed the WAL of
-- transactions still running in nearly every round.
--
-- The column is added with FALSE first, which fills the rows already queued
-- (a worker may have written them, and the migration's own setting says
-- nothing of theirs), then given the default that every insert evaluates in
-- the writer's session. Neither statement rewrites a table.

ALTER TABLE pyswpt.rejected_transfer_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.prepared_transfer_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.finalized_transfer_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.account_transfer_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.account_update_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.account_purge_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.rejected_config_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;
ALTER TABLE pyswpt.pending_balance_change_signal ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE;

ALTER TABLE pyswpt.rejected_transfer_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.prepared_transfer_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.finalized_transfer_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.account_transfer_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.account_update_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.account_purge_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.rejected_config_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
ALTER TABLE pyswpt.pending_balance_change_signal ALTER COLUMN flushed_at_commit
    SET DEFAULT (pg_catalog.current_setting('synchronous_commit') IN ('on', 'remote_apply'));
