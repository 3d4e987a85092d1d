-- What the node's Prometheus metrics read from the database (issue 11;
-- pyswpt/metrics.py calls these when scraped, at most every few seconds).
--
-- The views outbox_backlog and work_queues count whole tables (and
-- work_queues counts distinct accounts over them): fine for an operator in
-- psql, not on every scrape of a node that is far behind. Here each table is
-- read through a LIMIT of p_max_rows rows, so a scrape costs at most that
-- many rows per table, and nothing when the node keeps up. Below the limit
-- every figure is exact; at the limit a row count is the statistics'
-- estimate of live rows, an account count a lower bound, and an age that of
-- the oldest row among those read: a lower bound too. No index is added to
-- the hot queue and outbox tables for the sake of a scrape.

-- The helpers come first: a SQL function's body is checked when it is created.

-- A row count read through a LIMIT: exact below the limit, else the
-- statistics' estimate of the table's live rows (never below what was read).
CREATE FUNCTION pyswpt_private.capped_row_count(p_table regclass, p_read_count bigint, p_max_rows integer)
RETURNS bigint
LANGUAGE sql STABLE
RETURN CASE
    WHEN p_read_count < p_max_rows THEN p_read_count
    -- The function behind pg_stat_user_tables.n_live_tup, without the view to plan.
    ELSE greatest(p_read_count, pg_catalog.pg_stat_get_live_tuples(p_table))
END;

-- Seconds from p_since to now(); NULL for NULL (an empty table).
CREATE FUNCTION pyswpt_private.age_seconds(p_since timestamptz)
RETURNS double precision
LANGUAGE sql STABLE
RETURN extract(EPOCH FROM now() - p_since)::double precision;

-- Outbox rows not yet published and the age of the oldest, per outbox table
-- (named as in the flush_<table> commands).
CREATE FUNCTION pyswpt_api.outbox_backlog_metrics(p_max_rows integer)
RETURNS TABLE (outbox_table text, row_count bigint, oldest_age_seconds double precision)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        'rejected_transfers' AS outbox_table,
        capped_row_count('rejected_transfer_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM rejected_transfer_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'prepared_transfers' AS outbox_table,
        capped_row_count('prepared_transfer_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM prepared_transfer_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'finalized_transfers' AS outbox_table,
        capped_row_count('finalized_transfer_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM finalized_transfer_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'account_transfers' AS outbox_table,
        capped_row_count('account_transfer_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM account_transfer_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'account_updates' AS outbox_table,
        capped_row_count('account_update_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM account_update_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'account_purges' AS outbox_table,
        capped_row_count('account_purge_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM account_purge_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'rejected_configs' AS outbox_table,
        capped_row_count('rejected_config_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM rejected_config_signal LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'pending_balance_changes' AS outbox_table,
        capped_row_count('pending_balance_change_signal', count(*), p_max_rows) AS row_count,
        age_seconds(min(r.inserted_at)) AS oldest_age_seconds
    FROM (SELECT inserted_at FROM pending_balance_change_signal LIMIT p_max_rows) AS r
$$;

-- Requests waiting per worker stage (named as in the process_<stage> commands):
-- how many, for how many accounts, and how long the oldest has waited.
CREATE FUNCTION pyswpt_api.work_queue_metrics(p_max_rows integer)
RETURNS TABLE (stage text, request_count bigint, account_count bigint, oldest_age_seconds double precision)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        'transfer_requests' AS stage,
        capped_row_count('transfer_request', count(*), p_max_rows) AS request_count,
        count(DISTINCT ROW(r.debtor_id, r.sender_creditor_id)) AS account_count,
        age_seconds(min(r.enqueued_at)) AS oldest_age_seconds
    FROM (SELECT debtor_id, sender_creditor_id, enqueued_at FROM transfer_request LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'finalization_requests' AS stage,
        capped_row_count('finalization_request', count(*), p_max_rows) AS request_count,
        count(DISTINCT ROW(r.debtor_id, r.sender_creditor_id)) AS account_count,
        age_seconds(min(r.enqueued_at)) AS oldest_age_seconds
    FROM (SELECT debtor_id, sender_creditor_id, enqueued_at FROM finalization_request LIMIT p_max_rows) AS r
    UNION ALL
    SELECT
        'balance_changes' AS stage,
        capped_row_count('pending_balance_change', count(*), p_max_rows) AS request_count,
        count(DISTINCT ROW(r.debtor_id, r.creditor_id)) AS account_count,
        age_seconds(min(r.enqueued_at)) AS oldest_age_seconds
    FROM (SELECT debtor_id, creditor_id, enqueued_at FROM pending_balance_change LIMIT p_max_rows) AS r
$$;

-- Parked messages per source and reason: an index-only count, at most
-- MAX_PARKED_PER_REASON rows per source and reason (pyswpt/parking.py).
CREATE FUNCTION pyswpt_api.parked_message_metrics()
RETURNS TABLE (source_name text, reason_code text, message_count bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        p.source_name,
        p.reason_code,
        count(*) AS message_count
    FROM parked_message AS p
    GROUP BY p.source_name, p.reason_code
$$;

-- Readiness (the fetch API's /accounts/readyz): the database answers, the
-- functions are installed, and it takes writes (not a standby in recovery).
CREATE FUNCTION pyswpt_api.accepts_writes()
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
RETURN NOT pg_catalog.pg_is_in_recovery();
