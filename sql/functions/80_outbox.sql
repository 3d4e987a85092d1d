-- The outbox, as the flusher sees it (spec 01 §3.5, spec 02 §4.6).
--
-- take_<table>(p_max_count) deletes up to p_max_count rows that no other
-- flusher holds and returns them. The caller publishes them and commits only
-- after the broker confirmed every message; if publishing fails it rolls back
-- and the rows are there again. SKIP LOCKED lets several flushers share a table.
-- One function per table because each returns its table's own row type.
-- PL/pgSQL rather than SQL: the statement's plan is cached for the session,
-- where a SQL function with SET search_path is planned again at every call.
-- The rows are found by one sequential scan and deleted by their ctid (a TID
-- scan): the rows locked by this transaction keep their place until it
-- deletes them, and a signal row is never updated. Until vacuum comes, a
-- table keeps every page its deleted rows filled, and a scan reads them all:
-- joining the taken keys back to the table by key cost a second such scan
-- (measured on 667 pages of which 6 rows were live: 1.7 ms, now 0.6 ms).
-- PL/pgSQL keeps the plan it makes while a table is small, where a scan
-- filtering by ctid costs less than a TID scan: enable_seqscan = off leaves
-- the TID scan the cheapest, and the search for rows, whose only path is the
-- sequential scan, keeps it. That scan then costs the planner's penalty for a
-- disabled path, far past jit_above_cost: with JIT on, each take would be
-- compiled anew (measured: 90 ms a take), hence jit = off.

-- Up to p_max_count rejected_transfer_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_rejected_transfer_signals(p_max_count integer)
RETURNS SETOF rejected_transfer_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM rejected_transfer_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM rejected_transfer_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count prepared_transfer_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_prepared_transfer_signals(p_max_count integer)
RETURNS SETOF prepared_transfer_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM prepared_transfer_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM prepared_transfer_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count finalized_transfer_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_finalized_transfer_signals(p_max_count integer)
RETURNS SETOF finalized_transfer_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM finalized_transfer_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM finalized_transfer_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count account_transfer_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_account_transfer_signals(p_max_count integer)
RETURNS SETOF account_transfer_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM account_transfer_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM account_transfer_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count account_update_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_account_update_signals(p_max_count integer)
RETURNS SETOF account_update_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM account_update_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM account_update_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count account_purge_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_account_purge_signals(p_max_count integer)
RETURNS SETOF account_purge_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM account_purge_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM account_purge_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count rejected_config_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_rejected_config_signals(p_max_count integer)
RETURNS SETOF rejected_config_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM rejected_config_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM rejected_config_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- Up to p_max_count pending_balance_change_signal rows, removed in the caller's transaction.
CREATE FUNCTION pyswpt_api.take_pending_balance_change_signals(p_max_count integer)
RETURNS SETOF pending_balance_change_signal
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- the TID scan, whatever the table's size: see above
SET jit = off -- nor compiles the plan: see above
AS $$
BEGIN
    RETURN QUERY
        DELETE FROM pending_balance_change_signal
        WHERE ctid = ANY (ARRAY(
            SELECT ctid
            FROM pending_balance_change_signal
            LIMIT p_max_count
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING *;
END;
$$;

-- A WAL position past the commit record of every transaction the caller's
-- snapshot sees: a commit becomes visible only once its record is in the WAL.
-- The flusher reads it first in its REPEATABLE READ transaction, which then
-- takes rows with that snapshot, so the commits that wrote them lie before
-- it. NULL at READ COMMITTED, where every statement sees newer commits: the
-- barrier then always waits.
CREATE FUNCTION pyswpt_api.current_wal_position()
RETURNS pg_lsn
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
RETURN CASE
    WHEN current_setting('transaction_isolation') <> 'read committed'
        THEN pg_current_wal_insert_lsn()
END;

-- The flusher's durability barrier. The workers commit without waiting for
-- their WAL to reach the disk (pyswpt/drivers/workers.py): their changes
-- leave the database only through the outbox, and the flusher calls this in a
-- transaction of its own after taking rows and before publishing them, when
-- one of the rows came from such a commit (its flushed_at_commit is false),
-- with the position its snapshot covers (current_wal_position). When the
-- WAL is already flushed that far (the consumers' synchronous commits flush
-- all the WAL before theirs), there is nothing to wait for. Otherwise the
-- barrier writes one small record, a transactional logical message that
-- nothing decodes: a commit that wrote WAL, with synchronous_commit on, waits
-- until the WAL up to its commit record is flushed. A synchronous standby is
-- always waited for: the local flush position says nothing about it.
-- Returns whether the barrier waited.
CREATE FUNCTION pyswpt_api.make_commits_durable(p_through pg_lsn)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    IF pg_current_wal_flush_lsn() >= p_through
        AND current_setting('synchronous_standby_names') = '' THEN
        RETURN false;
    END IF;
    PERFORM pg_logical_emit_message(true, 'pyswpt', 'durable');
    RETURN true;
END;
$$;
