-- Whether the transaction that wrote an outbox row flushed the WAL before its
-- commit became visible. Unless synchronous_commit is off, a commit is on
-- disk before another session can see its rows, so a row the flusher takes
-- from such a transaction is already durable: the flusher needs its
-- durability barrier only for the rows of asynchronous commits, the
-- workers'. Most rows come from the consumers' windows, which commit
-- synchronously; the barrier's position covered every WAL record written
-- before the flusher's snapshot, so it flushed the WAL of transactions still
-- running in nearly every round. With a synchronous standby every row counts
-- as not flushed, as the barrier always waited for the standby: a commit
-- whose wait for it was cancelled is visible before the standby has it.
--
-- The column is added with FALSE, which fills the rows already queued (a
-- worker may have written them, and the migration's own setting says nothing
-- of theirs), and in the same statement given the default that every insert
-- evaluates in the writer's session. No table is rewritten.

ALTER TABLE pyswpt.rejected_transfer_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.prepared_transfer_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.finalized_transfer_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.account_transfer_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.account_update_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.account_purge_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.rejected_config_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );

ALTER TABLE pyswpt.pending_balance_change_signal
    ADD COLUMN flushed_at_commit boolean NOT NULL DEFAULT FALSE,
    ALTER COLUMN flushed_at_commit
    SET DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    );
