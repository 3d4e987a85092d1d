-- Operator views (issue 9): what an operator looks at in psql, with the flag
-- bits decoded, balances computed and ages measured from now(). Nothing in
-- the drivers reads them; parked messages have their own view
-- (parked_messages, 90_parked_messages.sql).
--
-- The views live in pyswpt_api, which every apply drops and re-creates whole
-- (sql/migrations/9999_functions.py): a column may be renamed, retyped or
-- removed here without a DROP VIEW. They read the tables with the rights of
-- their owner, but run the functions they call with the reader's: only
-- functions with a SQL-standard body (the flags), whose names were bound at
-- creation, and calc_account_figures below, which runs with its owner's rights,
-- so that an operator needs no USAGE on pyswpt_private (sql/grants.sql).

-- The balance and the available amount of an account row at p_now, for the
-- accounts view. SECURITY DEFINER because the helpers it calls find theirs
-- through pyswpt_private, which only the owner may use; it only computes on
-- the row it is given.
CREATE FUNCTION pyswpt_private.calc_account_figures(
    p_account account,
    p_now timestamptz,
    OUT balance numeric,
    OUT available_amount bigint
)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT calc_account_balance(p_account, p_now), calc_available_amount(p_account, p_now)
$$;

-- Accounts with decoded flags and what they can still lock (spec 02 §1.2, §1.11, B8).
CREATE VIEW pyswpt_api.accounts AS
SELECT
    a.debtor_id,
    a.creditor_id,
    a.creation_date,
    a.principal,
    a.interest,
    a.interest_rate,
    f.balance,
    f.available_amount,
    a.total_locked_amount,
    a.pending_transfers_count,
    -- Skip the index probe for the many accounts without prepared transfers.
    CASE WHEN a.pending_transfers_count > 0 THEN (
        SELECT now() - min(pt.prepared_at)
        FROM prepared_transfer AS pt
        WHERE pt.debtor_id = a.debtor_id AND pt.sender_creditor_id = a.creditor_id
    ) END AS oldest_prepared_transfer_age,
    (
        SELECT count(*)
        FROM pending_balance_change AS c
        WHERE c.debtor_id = a.debtor_id AND c.creditor_id = a.creditor_id
    ) AS pending_balance_changes_count,
    account_is_deleted(a.status_flags) AS is_deleted,
    account_is_overflown(a.status_flags) AS is_overflown,
    config_is_scheduled_for_deletion(a.config_flags) AS is_scheduled_for_deletion,
    a.config_flags,
    a.negligible_amount,
    a.last_change_ts,
    a.last_change_seqnum,
    now() - a.last_change_ts AS last_change_age,
    a.last_transfer_number,
    a.last_transfer_committed_at,
    -- 1970-01-01 (T0) means no transfer was ever committed.
    CASE WHEN a.last_transfer_committed_at > timestamptz 'epoch'
        THEN now() - a.last_transfer_committed_at
    END AS last_transfer_age,
    a.last_config_ts,
    a.last_heartbeat_ts,
    a.pending_account_update
FROM account AS a
CROSS JOIN LATERAL pyswpt_private.calc_account_figures(a, now()) AS f;

COMMENT ON VIEW pyswpt_api.accounts IS
    'Accounts with decoded flags, balance with accrued interest, available and locked amounts, '
    'pending counts and ages, all as of now(). Filter by debtor_id and creditor_id: '
    'a whole-table SELECT computes every balance.';
COMMENT ON COLUMN pyswpt_api.accounts.balance IS
    'principal + interest accrued up to now() (spec 02 §3.3); a root account''s is its principal.';
COMMENT ON COLUMN pyswpt_api.accounts.available_amount IS
    'floor(balance) - total_locked_amount, contained in bigint: what the account can still lock.';
COMMENT ON COLUMN pyswpt_api.accounts.oldest_prepared_transfer_age IS
    'How long ago the oldest of the account''s prepared transfers was prepared; NULL = none.';
COMMENT ON COLUMN pyswpt_api.accounts.pending_balance_changes_count IS
    'Registered balance changes not yet applied to this account.';
COMMENT ON COLUMN pyswpt_api.accounts.is_overflown IS
    'A principal update had to be contained (spec 02 §3.6); sticky, informational only.';
COMMENT ON COLUMN pyswpt_api.accounts.config_flags IS
    'Raw flags of the latest config: bit 0 is is_scheduled_for_deletion, other bits are only echoed.';
COMMENT ON COLUMN pyswpt_api.accounts.last_transfer_age IS
    'Time since the latest committed transfer; NULL = none was ever committed.';

-- Prepared transfers with their age and what is left until their deadline (spec 02 §2.4).
CREATE VIEW pyswpt_api.prepared_transfers AS
SELECT
    pt.debtor_id,
    pt.sender_creditor_id,
    pt.transfer_id,
    pt.coordinator_type,
    pt.coordinator_id,
    pt.coordinator_request_id,
    pt.recipient_creditor_id,
    pt.locked_amount,
    pt.prepared_at,
    now() - pt.prepared_at AS age,
    pt.deadline,
    pt.deadline - now() AS time_to_deadline,
    pt.final_interest_rate_ts,
    pt.demurrage_rate,
    pt.last_reminder_ts
FROM prepared_transfer AS pt;

COMMENT ON VIEW pyswpt_api.prepared_transfers IS
    'Amounts locked on sender accounts, waiting for a FinalizeTransfer, with ages as of now().';
COMMENT ON COLUMN pyswpt_api.prepared_transfers.time_to_deadline IS
    'deadline - now(); negative once the deadline passed: a commit then finalizes with TIMEOUT. '
    'Nothing expires the transfer; the coordinator must still finalize it.';

-- Messages written to the outbox and not yet confirmed by the broker, per message type.
CREATE VIEW pyswpt_api.outbox_backlog AS
SELECT
    'RejectedTransfer' AS message_type,
    'rejected_transfer_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM rejected_transfer_signal
UNION ALL
SELECT
    'PreparedTransfer' AS message_type,
    'prepared_transfer_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM prepared_transfer_signal
UNION ALL
SELECT
    'FinalizedTransfer' AS message_type,
    'finalized_transfer_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM finalized_transfer_signal
UNION ALL
SELECT
    'AccountTransfer' AS message_type,
    'account_transfer_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM account_transfer_signal
UNION ALL
SELECT
    'AccountUpdate' AS message_type,
    'account_update_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM account_update_signal
UNION ALL
SELECT
    'AccountPurge' AS message_type,
    'account_purge_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM account_purge_signal
UNION ALL
SELECT
    'RejectedConfig' AS message_type,
    'rejected_config_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM rejected_config_signal
UNION ALL
SELECT
    'PendingBalanceChange' AS message_type,
    'pending_balance_change_signal' AS outbox_table,
    count(*) AS row_count,
    min(inserted_at) AS oldest_inserted_at,
    now() - min(inserted_at) AS oldest_age
FROM pending_balance_change_signal;

COMMENT ON VIEW pyswpt_api.outbox_backlog IS
    'One row per outgoing message type: rows the flusher has not sent yet and the oldest one''s age. '
    'Each row is a count(*) and min(inserted_at) over a whole outbox table (no index on inserted_at): '
    'cheap while the flusher keeps up, a sequential scan of the backlog when it does not. '
    'Messages the flusher parked are in parked_messages, not here.';
COMMENT ON COLUMN pyswpt_api.outbox_backlog.oldest_age IS 'now() - oldest_inserted_at; NULL when the table is empty.';

-- Queued requests per stage of the request workers (spec 02 §4.2).
CREATE VIEW pyswpt_api.work_queues AS
SELECT
    'transfer_request' AS stage,
    count(*) AS row_count,
    count(DISTINCT ROW(debtor_id, sender_creditor_id)) AS account_count,
    NULL::timestamptz AS oldest_ts,
    NULL::interval AS oldest_age
FROM transfer_request
UNION ALL
SELECT
    'finalization_request' AS stage,
    count(*) AS row_count,
    count(DISTINCT ROW(debtor_id, sender_creditor_id)) AS account_count,
    min(ts) AS oldest_ts,
    now() - min(ts) AS oldest_age
FROM finalization_request
UNION ALL
SELECT
    'pending_balance_change' AS stage,
    count(*) AS row_count,
    count(DISTINCT ROW(debtor_id, creditor_id)) AS account_count,
    min(committed_at) AS oldest_ts,
    now() - min(committed_at) AS oldest_age
FROM pending_balance_change;

COMMENT ON VIEW pyswpt_api.work_queues IS
    'Queued requests per worker stage: rows, distinct accounts with work, and the oldest request''s '
    'timestamp. A count over each whole queue table: fine for an operator, not for a poll loop.';
COMMENT ON COLUMN pyswpt_api.work_queues.account_count IS
    'Distinct accounts (sender accounts for transfers and finalizations) the stage has work for.';
COMMENT ON COLUMN pyswpt_api.work_queues.oldest_ts IS
    'transfer_request: always NULL, the table records no time of arrival. '
    'finalization_request: the oldest FinalizeTransfer ts, set by the coordinator. '
    'pending_balance_change: the oldest committed_at, set by the sender''s shard.';
COMMENT ON COLUMN pyswpt_api.work_queues.oldest_age IS 'now() - oldest_ts.';
