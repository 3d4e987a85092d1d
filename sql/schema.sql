-- The data schema of pyswpt as the migrations leave it, in one file to read:
-- the tables with their constraints, indexes and comments, and the triggers
-- that wake the drivers. The migrations under migrations/ are what builds a
-- database; tests/sql/test_schema_file.py keeps this file equal to them.
-- Functions and views are re-created from functions/ on every apply.

CREATE SCHEMA pyswpt;

COMMENT ON SCHEMA pyswpt IS
    'pyswpt ledger data: tables, sequences, indexes and trigger functions, changed only by migrations. '
    'Callers use pyswpt_api.';

-- Accounts -------------------------------------------------------------------

-- The single-column invariants of the tables a transfer writes are constraints
-- of the columns' domains, not table CHECKs: PostgreSQL plans a table's CHECKs
-- again for every statement that writes it, a domain's once per session
-- (migration 0011).
CREATE DOMAIN pyswpt.account_principal AS bigint
    CONSTRAINT principal_is_contained CHECK (value > -9223372036854775808);
CREATE DOMAIN pyswpt.account_interest_rate AS real
    CONSTRAINT interest_rate_in_range CHECK (value BETWEEN -50.0 AND 100.0);
CREATE DOMAIN pyswpt.account_previous_interest_rate AS real
    CONSTRAINT previous_interest_rate_in_range CHECK (value BETWEEN -50.0 AND 100.0);
CREATE DOMAIN pyswpt.account_transfer_number AS bigint
    CONSTRAINT last_transfer_number_not_negative CHECK (value >= 0);
CREATE DOMAIN pyswpt.account_negligible_amount AS real
    CONSTRAINT negligible_amount_not_negative CHECK (value >= 0.0);
CREATE DOMAIN pyswpt.account_debtor_info_sha256 AS bytea
    CONSTRAINT debtor_info_sha256_is_32_bytes CHECK (octet_length(value) = 32);
CREATE DOMAIN pyswpt.account_total_locked_amount AS bigint
    CONSTRAINT total_locked_amount_not_negative CHECK (value >= 0);
CREATE DOMAIN pyswpt.account_pending_transfers_count AS integer
    CONSTRAINT pending_transfers_count_not_negative CHECK (value >= 0);
CREATE DOMAIN pyswpt.account_transfer_id AS bigint
    CONSTRAINT last_transfer_id_not_negative CHECK (value >= 0);
CREATE DOMAIN pyswpt.prepared_transfer_id AS bigint
    CONSTRAINT transfer_id_positive CHECK (value > 0);
CREATE DOMAIN pyswpt.prepared_transfer_demurrage_rate AS double precision
    CONSTRAINT demurrage_rate_in_range CHECK (value > -100.0 AND value <= 0.0);
CREATE DOMAIN pyswpt.prepared_transfer_locked_amount AS bigint
    CONSTRAINT locked_amount_not_negative CHECK (value >= 0);
CREATE DOMAIN pyswpt.finalization_request_committed_amount AS bigint
    CONSTRAINT committed_amount_not_negative CHECK (value >= 0);
CREATE DOMAIN pyswpt.pending_balance_change_principal_delta AS bigint
    CONSTRAINT principal_delta_not_zero CHECK (value <> 0);

CREATE TABLE pyswpt.account (
    debtor_id bigint NOT NULL,
    creditor_id bigint NOT NULL,
    creation_date date NOT NULL,
    last_change_seqnum integer NOT NULL,
    last_change_ts timestamptz NOT NULL,
    principal pyswpt.account_principal NOT NULL,
    interest_rate pyswpt.account_interest_rate NOT NULL,
    interest double precision NOT NULL,
    last_interest_rate_change_ts timestamptz NOT NULL,
    last_config_ts timestamptz NOT NULL,
    last_config_seqnum integer NOT NULL,
    last_transfer_number pyswpt.account_transfer_number NOT NULL,
    last_transfer_committed_at timestamptz NOT NULL,
    negligible_amount pyswpt.account_negligible_amount NOT NULL,
    config_flags integer NOT NULL,
    config_data text NOT NULL,
    debtor_info_iri text,
    debtor_info_content_type text,
    debtor_info_sha256 pyswpt.account_debtor_info_sha256,
    status_flags integer NOT NULL,
    total_locked_amount pyswpt.account_total_locked_amount NOT NULL,
    pending_transfers_count pyswpt.account_pending_transfers_count NOT NULL,
    last_transfer_id pyswpt.account_transfer_id NOT NULL,
    previous_interest_rate pyswpt.account_previous_interest_rate NOT NULL,
    last_heartbeat_ts timestamptz NOT NULL,
    last_interest_capitalization_ts timestamptz NOT NULL,
    last_deletion_attempt_ts timestamptz NOT NULL,
    pending_account_update boolean NOT NULL,
    PRIMARY KEY (debtor_id, creditor_id)
)
WITH (
    fillfactor = 80,
    toast_tuple_target = 420,
    autovacuum_vacuum_scale_factor = 0.08,
    autovacuum_vacuum_insert_scale_factor = 0.2
);

-- Root accounts carry RootConfigData here; kept out of line so that locking
-- and scanning ordinary accounts never reads it.
ALTER TABLE pyswpt.account ALTER COLUMN config_data SET STORAGE EXTERNAL;

COMMENT ON TABLE pyswpt.account IS
    'One row per (debtor_id, creditor_id). creditor_id 0 is the debtor''s root account. '
    'A deleted account keeps its row (status_flags bit 0) until it is purged.';
COMMENT ON COLUMN pyswpt.account.creation_date IS
    'UTC date the row was created; kept across resurrection, so it names one incarnation.';
COMMENT ON COLUMN pyswpt.account.last_change_seqnum IS
    'Incremented, wrapping at 32 bits, on every change announced by AccountUpdate.';
COMMENT ON COLUMN pyswpt.account.last_change_ts IS
    'Moment of the latest change; never moves back. Interest accrues from here.';
COMMENT ON COLUMN pyswpt.account.principal IS
    'Amount owed without interest. Never -2^63: overflow is contained (status_flags bit 1).';
COMMENT ON COLUMN pyswpt.account.interest_rate IS 'Annual rate in percent, single precision as in the reference.';
COMMENT ON COLUMN pyswpt.account.interest IS 'Interest accumulated up to last_change_ts, not yet capitalized.';
COMMENT ON COLUMN pyswpt.account.last_config_ts IS 'ts of the latest applied ConfigureAccount (1970 if none).';
COMMENT ON COLUMN pyswpt.account.last_config_seqnum IS 'seqnum of the latest applied ConfigureAccount.';
COMMENT ON COLUMN pyswpt.account.last_transfer_number IS 'Number of the latest AccountTransfer of this incarnation.';
COMMENT ON COLUMN pyswpt.account.config_flags IS 'From the latest config; bit 0 = scheduled for deletion.';
COMMENT ON COLUMN pyswpt.account.config_data IS
    'From the latest config; non-empty only for root accounts (RootConfigData).';
COMMENT ON COLUMN pyswpt.account.debtor_info_iri IS 'Copied from the root account''s config; NULL = none.';
COMMENT ON COLUMN pyswpt.account.status_flags IS 'Bit 0 = deleted, bit 1 = principal overflow was contained.';
COMMENT ON COLUMN pyswpt.account.total_locked_amount IS
    'Sum of locked_amount of the account''s prepared transfers, capped at 2^63-1.';
COMMENT ON COLUMN pyswpt.account.pending_transfers_count IS 'Number of the account''s prepared transfers.';
COMMENT ON COLUMN pyswpt.account.last_transfer_id IS
    'Last issued transfer_id; starts at days(creation_date) << 40 so ids never repeat across incarnations.';
COMMENT ON COLUMN pyswpt.account.previous_interest_rate IS 'Rate in force before last_interest_rate_change_ts.';
COMMENT ON COLUMN pyswpt.account.last_heartbeat_ts IS 'When the latest AccountUpdate was written to the outbox.';
COMMENT ON COLUMN pyswpt.account.pending_account_update IS
    'A change happened that no AccountUpdate announced yet; the accounts scanner sends it.';

-- Accounts with a change no AccountUpdate announced yet, by when they last
-- sent one: the prompt-updates loop of the workers finds the due ones here.
CREATE INDEX account_pending_update_idx
    ON pyswpt.account (last_heartbeat_ts)
    WHERE pending_account_update;

-- Request queues ---------------------------------------------------------------

CREATE TABLE pyswpt.transfer_request (
    debtor_id bigint NOT NULL,
    sender_creditor_id bigint NOT NULL,
    transfer_request_id bigserial NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    coordinator_id bigint NOT NULL,
    coordinator_request_id bigint NOT NULL,
    min_locked_amount bigint NOT NULL,
    max_locked_amount bigint NOT NULL,
    deadline timestamptz NOT NULL,
    recipient_creditor_id bigint NOT NULL,
    final_interest_rate_ts timestamptz NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (debtor_id, sender_creditor_id, transfer_request_id),
    CONSTRAINT locked_amounts_in_order
        CHECK (min_locked_amount >= 0 AND min_locked_amount <= max_locked_amount)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

COMMENT ON TABLE pyswpt.transfer_request IS
    'Queued PrepareTransfer requests whose recipient was found reachable. '
    'All requests of one sender are processed in one transaction under one account lock.';
COMMENT ON COLUMN pyswpt.transfer_request.enqueued_at IS
    'When the consumer queued the request (its transaction''s time).';

CREATE TABLE pyswpt.finalization_request (
    debtor_id bigint NOT NULL,
    sender_creditor_id bigint NOT NULL,
    transfer_id bigint NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    coordinator_id bigint NOT NULL,
    coordinator_request_id bigint NOT NULL,
    committed_amount pyswpt.finalization_request_committed_amount NOT NULL,
    transfer_note_format text NOT NULL,
    transfer_note text NOT NULL,
    ts timestamptz NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (debtor_id, sender_creditor_id, transfer_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

COMMENT ON TABLE pyswpt.finalization_request IS
    'Queued FinalizeTransfer requests, at most one per prepared transfer. '
    'committed_amount 0 dismisses the transfer.';
COMMENT ON COLUMN pyswpt.finalization_request.enqueued_at IS
    'When the consumer queued the request (its transaction''s time); ts is the coordinator''s.';

-- Prepared transfers -------------------------------------------------------------

CREATE TABLE pyswpt.prepared_transfer (
    debtor_id bigint NOT NULL,
    sender_creditor_id bigint NOT NULL,
    transfer_id pyswpt.prepared_transfer_id NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    coordinator_id bigint NOT NULL,
    coordinator_request_id bigint NOT NULL,
    recipient_creditor_id bigint NOT NULL,
    prepared_at timestamptz NOT NULL,
    final_interest_rate_ts timestamptz NOT NULL,
    demurrage_rate pyswpt.prepared_transfer_demurrage_rate NOT NULL,
    deadline timestamptz NOT NULL,
    locked_amount pyswpt.prepared_transfer_locked_amount NOT NULL,
    last_reminder_ts timestamptz,
    PRIMARY KEY (debtor_id, sender_creditor_id, transfer_id),
    FOREIGN KEY (debtor_id, sender_creditor_id)
        REFERENCES pyswpt.account (debtor_id, creditor_id) ON DELETE CASCADE
)
WITH (
    fillfactor = 100,
    autovacuum_vacuum_scale_factor = 0.2,
    autovacuum_vacuum_insert_scale_factor = 0.2
);

COMMENT ON TABLE pyswpt.prepared_transfer IS
    'Amounts locked on a sender account, waiting for a FinalizeTransfer. Nothing expires them; '
    'weekly PreparedTransfer reminders make the coordinator finalize them eventually.';
COMMENT ON COLUMN pyswpt.prepared_transfer.last_reminder_ts IS
    'When the latest reminder PreparedTransfer was written; NULL = none yet.';

-- Finds the prepared transfer of a coordinator's request, so that a redelivered
-- PrepareTransfer gets the same PreparedTransfer again instead of a second lock.

CREATE INDEX idx_prepared_transfer_request
    ON pyswpt.prepared_transfer (debtor_id, sender_creditor_id, coordinator_request_id);

-- Balance changes ------------------------------------------------------------------

CREATE TABLE pyswpt.registered_balance_change (
    debtor_id bigint NOT NULL,
    other_creditor_id bigint NOT NULL,
    change_id bigint NOT NULL,
    committed_at timestamptz NOT NULL,
    is_applied boolean NOT NULL,
    PRIMARY KEY (debtor_id, other_creditor_id, change_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_scale_factor = 0.1);

COMMENT ON TABLE pyswpt.registered_balance_change IS
    'Archive of every PendingBalanceChange ever accepted, so that a redelivered one is ignored. '
    'Applied rows committed before REMOVE_FROM_ARCHIVE_THRESHOLD_DATE are deleted by a scanner.';

CREATE TABLE pyswpt.pending_balance_change (
    debtor_id bigint NOT NULL,
    other_creditor_id bigint NOT NULL,
    change_id bigint NOT NULL,
    creditor_id bigint NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    transfer_note_format text NOT NULL,
    transfer_note text NOT NULL,
    committed_at timestamptz NOT NULL,
    principal_delta pyswpt.pending_balance_change_principal_delta NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (debtor_id, other_creditor_id, change_id),
    FOREIGN KEY (debtor_id, other_creditor_id, change_id)
        REFERENCES pyswpt.registered_balance_change (debtor_id, other_creditor_id, change_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE INDEX idx_changed_account ON pyswpt.pending_balance_change (debtor_id, creditor_id);

COMMENT ON TABLE pyswpt.pending_balance_change IS
    'Registered balance changes not yet applied; all changes of one account are applied at once.';
COMMENT ON COLUMN pyswpt.pending_balance_change.principal_delta IS
    'Positive: other_creditor_id paid this account. Negative: this account paid other_creditor_id.';
COMMENT ON COLUMN pyswpt.pending_balance_change.enqueued_at IS
    'When the consumer registered the change (its transaction''s time); committed_at is the sender shard''s.';

-- Outbox: one table per outgoing message type ------------------------------------------
-- A row is written in the transaction that causes the message and deleted by the
-- flusher after the broker confirmed it. flushed_at_commit says whether its writer's
-- commit reached the disk before it became visible (migration 0016): the flusher's
-- durability barrier is needed only for the rows of asynchronous commits.

CREATE TABLE pyswpt.rejected_transfer_signal (
    debtor_id bigint NOT NULL,
    sender_creditor_id bigint NOT NULL,
    signal_id bigserial NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    coordinator_id bigint NOT NULL,
    coordinator_request_id bigint NOT NULL,
    status_code varchar(30) NOT NULL,
    total_locked_amount bigint NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, sender_creditor_id, signal_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.prepared_transfer_signal (
    debtor_id bigint NOT NULL,
    sender_creditor_id bigint NOT NULL,
    signal_id bigserial NOT NULL,
    transfer_id bigint NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    coordinator_id bigint NOT NULL,
    coordinator_request_id bigint NOT NULL,
    locked_amount bigint NOT NULL,
    recipient_creditor_id bigint NOT NULL,
    prepared_at timestamptz NOT NULL,
    demurrage_rate double precision NOT NULL,
    deadline timestamptz NOT NULL,
    final_interest_rate_ts timestamptz NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, sender_creditor_id, signal_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.finalized_transfer_signal (
    debtor_id bigint NOT NULL,
    sender_creditor_id bigint NOT NULL,
    transfer_id bigint NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    coordinator_id bigint NOT NULL,
    coordinator_request_id bigint NOT NULL,
    prepared_at timestamptz NOT NULL,
    finalized_at timestamptz NOT NULL,
    committed_amount bigint NOT NULL,
    total_locked_amount bigint NOT NULL,
    status_code varchar(30) NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, sender_creditor_id, transfer_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.account_transfer_signal (
    debtor_id bigint NOT NULL,
    creditor_id bigint NOT NULL,
    creation_date date NOT NULL,
    transfer_number bigint NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    committed_at timestamptz NOT NULL,
    acquired_amount bigint NOT NULL,
    other_creditor_id bigint NOT NULL,
    transfer_note_format text NOT NULL,
    transfer_note text NOT NULL,
    principal bigint NOT NULL,
    previous_transfer_number bigint NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, creditor_id, creation_date, transfer_number)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.account_update_signal (
    debtor_id bigint NOT NULL,
    creditor_id bigint NOT NULL,
    signal_id bigserial NOT NULL,
    last_change_ts timestamptz NOT NULL,
    last_change_seqnum integer NOT NULL,
    principal bigint NOT NULL,
    interest double precision NOT NULL,
    interest_rate real NOT NULL,
    last_interest_rate_change_ts timestamptz NOT NULL,
    last_transfer_number bigint NOT NULL,
    last_transfer_committed_at timestamptz NOT NULL,
    last_config_ts timestamptz NOT NULL,
    last_config_seqnum integer NOT NULL,
    creation_date date NOT NULL,
    negligible_amount real NOT NULL,
    config_data text NOT NULL,
    config_flags integer NOT NULL,
    debtor_info_iri text,
    debtor_info_content_type text,
    debtor_info_sha256 bytea,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, creditor_id, signal_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.account_purge_signal (
    debtor_id bigint NOT NULL,
    creditor_id bigint NOT NULL,
    creation_date date NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, creditor_id, creation_date)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.rejected_config_signal (
    debtor_id bigint NOT NULL,
    creditor_id bigint NOT NULL,
    signal_id bigserial NOT NULL,
    config_ts timestamptz NOT NULL,
    config_seqnum integer NOT NULL,
    config_flags integer NOT NULL,
    config_data text NOT NULL,
    negligible_amount real NOT NULL,
    rejection_code varchar(30) NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, creditor_id, signal_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE pyswpt.pending_balance_change_signal (
    debtor_id bigint NOT NULL,
    other_creditor_id bigint NOT NULL,
    change_id bigserial NOT NULL,
    creditor_id bigint NOT NULL,
    coordinator_type varchar(30) NOT NULL,
    transfer_note_format text NOT NULL,
    transfer_note text NOT NULL,
    committed_at timestamptz NOT NULL,
    principal_delta bigint NOT NULL,
    inserted_at timestamptz NOT NULL,
    flushed_at_commit boolean NOT NULL DEFAULT (
        pg_catalog.current_setting('synchronous_commit') <> 'off'
        AND pg_catalog.current_setting('synchronous_standby_names') = ''
    ),
    PRIMARY KEY (debtor_id, other_creditor_id, change_id)
)
WITH (fillfactor = 100, autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_threshold = -1);

COMMENT ON TABLE pyswpt.rejected_transfer_signal IS 'Outbox: RejectedTransfer to to_coordinators.';
COMMENT ON TABLE pyswpt.prepared_transfer_signal IS
    'Outbox: PreparedTransfer (first message and reminders) to to_coordinators.';
COMMENT ON TABLE pyswpt.finalized_transfer_signal IS 'Outbox: FinalizedTransfer to to_coordinators.';
COMMENT ON TABLE pyswpt.account_transfer_signal IS 'Outbox: AccountTransfer to to_creditors.';
COMMENT ON TABLE pyswpt.account_update_signal IS
    'Outbox: AccountUpdate to to_creditors, or to_debtors for root accounts.';
COMMENT ON TABLE pyswpt.account_purge_signal IS
    'Outbox: AccountPurge to to_creditors, or to_debtors for root accounts.';
COMMENT ON TABLE pyswpt.rejected_config_signal IS
    'Outbox: RejectedConfig to to_creditors, or to_debtors for root accounts.';
COMMENT ON TABLE pyswpt.pending_balance_change_signal IS
    'Outbox: PendingBalanceChange to accounts_in, addressed to the shard of (debtor_id, creditor_id). '
    'change_id comes from this table''s sequence, so it is unique per emitting shard.';

-- Wake-up calls -----------------------------------------------------------------

-- Wake-up calls: a statement that fills a queue or outbox table notifies the
-- drivers (LISTEN pyswpt_requests / pyswpt_outbox) with the table's name, so
-- that they act at once instead of waiting for their next poll. Identical
-- notifications of one transaction are delivered once, at commit. A
-- transaction that the session's pyswpt.hold_notifications marks (one before
-- the last of a call that processes several accounts, see
-- 45_work_queues.sql) appends "channel table," to the session's
-- pyswpt.held_notifications instead, for pyswpt_api.send_held_notifications.
-- The function runs in its caller's search_path (a SET clause would cost a
-- save and restore of the setting at every firing): it names nothing but
-- pg_catalog's functions, and no operator, so no search_path changes what it
-- calls. It calls functions in expressions, not with PERFORM, which PL/pgSQL
-- runs as a query through the executor; neither pg_notify (void) nor
-- set_config returns NULL.

CREATE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF pg_catalog.texteq(pg_catalog.current_setting('pyswpt.hold_notifications', true), 'true') THEN
        IF pg_catalog.set_config(
            'pyswpt.held_notifications',
            pg_catalog.concat(
                pg_catalog.current_setting('pyswpt.held_notifications', true), TG_ARGV[0], ' ', TG_TABLE_NAME, ','
            ),
            false
        ) IS NULL THEN
            NULL;
        END IF;
    ELSIF pg_catalog.pg_notify(TG_ARGV[0], TG_TABLE_NAME) IS NULL THEN
        NULL;
    END IF;
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION pyswpt.notify_table_filled() IS
    'Statement trigger: NOTIFY channel TG_ARGV[0] with the name of the table that got rows.';

CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.transfer_request
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');
-- A consumer's window that ends with finalize_at_once, which sends the
-- NOTIFY itself when it leaves a request queued, sets
-- pyswpt.finalizing_at_once for its intakes (migration 0015).
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.finalization_request
    FOR EACH STATEMENT
    WHEN (pg_catalog.current_setting('pyswpt.finalizing_at_once', TRUE) IS DISTINCT FROM 'true')
    EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.pending_balance_change
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');

CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.rejected_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.prepared_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.finalized_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.account_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.account_update_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.account_purge_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.rejected_config_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.pending_balance_change_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');

-- Parked messages ---------------------------------------------------------------

-- Parked messages: what a driver could not apply or publish, kept durably so
-- that nothing is lost and nothing loops (issue 8). The SMP consumer parks a
-- message it rejects (it is also dead-lettered to <queue>.XQ, but a broker may
-- drop that copy); the flusher parks an outbox row it cannot read, encode or
-- route. Operators list, replay and discard them with `pyswpt parked`.

CREATE TABLE pyswpt.parked_message (
    parked_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_kind text NOT NULL,
    source_name text NOT NULL,
    exchange text,
    routing_key text NOT NULL,
    message_type text,
    content_type text,
    headers jsonb,
    body bytea,
    row_data jsonb,
    debtor_id bigint,
    creditor_id bigint,
    reason_code text NOT NULL,
    reason text NOT NULL,
    sqlstate text,
    attempts integer NOT NULL,
    first_seen_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    next_retry_at timestamptz,
    fingerprint bytea NOT NULL,
    CONSTRAINT source_kind_is_known CHECK (source_kind IN ('queue', 'outbox')),
    CONSTRAINT has_body_or_row_data CHECK (body IS NOT NULL OR row_data IS NOT NULL),
    CONSTRAINT attempts_positive CHECK (attempts > 0),
    CONSTRAINT fingerprint_is_sha256 CHECK (octet_length(fingerprint) = 32),
    CONSTRAINT parked_once UNIQUE (source_kind, source_name, fingerprint)
);

CREATE INDEX parked_message_reason_idx ON pyswpt.parked_message (source_name, reason_code);
CREATE INDEX parked_message_retry_idx ON pyswpt.parked_message (next_retry_at)
    WHERE next_retry_at IS NOT NULL;

COMMENT ON TABLE pyswpt.parked_message IS
    'Messages a driver could not apply or publish: set aside with their reason instead of looping or being dropped.';
COMMENT ON COLUMN pyswpt.parked_message.source_kind IS
    '"queue": a consumed message (replayed by publishing it to accounts_in again); "outbox": an outgoing message.';
COMMENT ON COLUMN pyswpt.parked_message.source_name IS
    'The queue the message came from, or the outbox table (flush_<name>) the row was taken from.';
COMMENT ON COLUMN pyswpt.parked_message.exchange IS
    'Where the message was going (outbox), or the exchange it arrived through (queue).';
COMMENT ON COLUMN pyswpt.parked_message.routing_key IS
    'The original routing key: a replay publishes with it, so the owning shard gets the message.';
COMMENT ON COLUMN pyswpt.parked_message.headers IS
    'AMQP headers of the message, as JSON.';
COMMENT ON COLUMN pyswpt.parked_message.body IS
    'The message body exactly as received or as it would have been published; NULL when it could not be built.';
COMMENT ON COLUMN pyswpt.parked_message.row_data IS
    'An outbox row that could not be read or encoded: its columns as PostgreSQL text.';
COMMENT ON COLUMN pyswpt.parked_message.reason_code IS
    'Short class of the reason (invalid, foreign_shard, refused, repeated_failure, unroutable, unencodable, ...).';
COMMENT ON COLUMN pyswpt.parked_message.reason IS
    'One line saying why, without message contents.';
COMMENT ON COLUMN pyswpt.parked_message.sqlstate IS
    'The SQLSTATE with which the database refused the message, if it did.';
COMMENT ON COLUMN pyswpt.parked_message.attempts IS
    'How many times the message was tried: the broker''s delivery count, or the flusher''s publish attempts.';
COMMENT ON COLUMN pyswpt.parked_message.next_retry_at IS
    'When the flusher tries to publish the message again; NULL when only an operator can help.';
COMMENT ON COLUMN pyswpt.parked_message.fingerprint IS
    'sha256 of routing key and content: the same message parked again (a redelivery) updates its row.';

-- A flooding peer must not fill the disk: past a cap per source and reason,
-- only a count is kept here (consumed messages still reach <queue>.XQ).
CREATE TABLE pyswpt.parked_message_overflow (
    source_name text NOT NULL,
    reason_code text NOT NULL,
    dropped_count bigint NOT NULL,
    first_dropped_at timestamptz NOT NULL,
    last_dropped_at timestamptz NOT NULL,
    PRIMARY KEY (source_name, reason_code),
    CONSTRAINT dropped_count_positive CHECK (dropped_count > 0)
);

COMMENT ON TABLE pyswpt.parked_message_overflow IS
    'Messages not parked because their source and reason had reached the cap: counted, not stored.';

-- Scanner passes ----------------------------------------------------------------

-- Scanner passes (issue 11): each table scanner writes where it is in its
-- pass, so that `pyswpt status` can say when each last finished a pass and
-- whether it is still running. One row per scanned table, written through
-- the functions of sql/functions/74_scan_passes.sql at the start and end of
-- each pass and about once a minute in between.

CREATE TABLE pyswpt.scan_pass (
    table_name text PRIMARY KEY,
    pass_seconds double precision NOT NULL,
    pass_started_at timestamptz NOT NULL,
    pass_row_estimate bigint NOT NULL,
    pass_rows_done bigint NOT NULL,
    recorded_at timestamptz NOT NULL,
    last_pass_started_at timestamptz,
    last_pass_ended_at timestamptz,
    last_pass_rows bigint,
    CONSTRAINT pass_seconds_positive CHECK (pass_seconds > 0),
    CONSTRAINT pass_rows_done_not_negative CHECK (pass_rows_done >= 0),
    CONSTRAINT last_pass_complete CHECK (
        (last_pass_started_at IS NULL) = (last_pass_ended_at IS NULL)
        AND (last_pass_started_at IS NULL) = (last_pass_rows IS NULL)
    )
);

COMMENT ON TABLE pyswpt.scan_pass IS
    'Where each table scanner is in its pass and how its last pass went; written by the scanners, read by status.';
COMMENT ON COLUMN pyswpt.scan_pass.table_name IS
    'The scanned table (account, prepared_transfer, registered_balance_change).';
COMMENT ON COLUMN pyswpt.scan_pass.pass_seconds IS 'How long one pass is meant to take (APP_*_SCAN_HOURS/DAYS).';
COMMENT ON COLUMN pyswpt.scan_pass.pass_started_at IS 'When the current pass started.';
COMMENT ON COLUMN pyswpt.scan_pass.pass_row_estimate IS
    'Rows the planner expected in the table when the current pass started.';
COMMENT ON COLUMN pyswpt.scan_pass.pass_rows_done IS
    'Rows the current pass has handed to its steps, as of recorded_at.';
COMMENT ON COLUMN pyswpt.scan_pass.recorded_at IS
    'When the scanner last wrote here: about every minute while it runs, so an old value means it stopped.';
COMMENT ON COLUMN pyswpt.scan_pass.last_pass_ended_at IS
    'When the last finished pass ended (its time was over, or the table size changed and a new rhythm began).';
COMMENT ON COLUMN pyswpt.scan_pass.last_pass_rows IS 'Rows the last finished pass handed to its steps.';
