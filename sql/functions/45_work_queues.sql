-- What the request workers look for (spec 02 §4.2): accounts with queued work.
-- Each returns distinct account keys, at most p_max_count of them; the worker
-- then runs the account's batch processor once per key, for a few keys at a
-- time through the procedures at the end of this file. PL/pgSQL, so that the
-- plan is cached for the session (see 80_outbox.sql).

-- Senders with queued PrepareTransfer requests.
CREATE FUNCTION pyswpt_api.list_transfer_request_senders(p_max_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT r.debtor_id, r.sender_creditor_id
        FROM transfer_request AS r
        LIMIT p_max_count;
END;
$$;

-- Senders with queued FinalizeTransfer requests.
CREATE FUNCTION pyswpt_api.list_finalization_request_senders(p_max_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT r.debtor_id, r.sender_creditor_id
        FROM finalization_request AS r
        LIMIT p_max_count;
END;
$$;

-- Accounts with registered balance changes not applied yet.
CREATE FUNCTION pyswpt_api.list_accounts_with_pending_balance_changes(p_max_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT c.debtor_id, c.creditor_id
        FROM pending_balance_change AS c
        LIMIT p_max_count;
END;
$$;

-- The batch processors of several accounts in one call, each account in a
-- transaction of its own, committed before the next begins: a transaction
-- still locks at most one account row (spec 02 §2.0), and a worker pays one
-- statement and round trip for a few accounts instead of one each. A lock
-- waited for longer than p_lock_timeout_ms fails the call, as any error does;
-- the accounts before the failing one stay committed, and the worker then
-- processes the call's accounts one at a time, each as its own statement
-- with the session's lock timeout (a repeated account finds nothing queued).
--
-- Procedures, as COMMIT needs one; PostgreSQL allows it only in a procedure
-- that neither runs with its owner's rights nor has SET clauses. These run
-- with their caller's, in its search_path, and call only the entry points
-- above, named with their schema, which check their own arguments.

CREATE PROCEDURE pyswpt_api.process_transfer_requests_in_turn(
    p_debtor_ids bigint[],
    p_sender_creditor_ids bigint[],
    p_commit_period_seconds integer,
    p_lock_timeout_ms integer
)
LANGUAGE plpgsql
AS $$
BEGIN
    FOR i IN 1 .. pg_catalog.cardinality(p_debtor_ids) LOOP
        PERFORM pg_catalog.set_config('lock_timeout', p_lock_timeout_ms::text, true);
        PERFORM pyswpt_api.process_transfer_requests(
            p_debtor_id => p_debtor_ids[i],
            p_sender_creditor_id => p_sender_creditor_ids[i],
            p_commit_period_seconds => p_commit_period_seconds
        );
        COMMIT;
    END LOOP;
END;
$$;

CREATE PROCEDURE pyswpt_api.process_finalization_requests_in_turn(
    p_debtor_ids bigint[],
    p_sender_creditor_ids bigint[],
    p_ignore_all boolean[],
    p_realm_mask bigint,
    p_realm bigint,
    p_lock_timeout_ms integer
)
LANGUAGE plpgsql
AS $$
BEGIN
    FOR i IN 1 .. pg_catalog.cardinality(p_debtor_ids) LOOP
        PERFORM pg_catalog.set_config('lock_timeout', p_lock_timeout_ms::text, true);
        PERFORM pyswpt_api.process_finalization_requests(
            p_debtor_id => p_debtor_ids[i],
            p_sender_creditor_id => p_sender_creditor_ids[i],
            p_ignore_all => p_ignore_all[i],
            p_realm_mask => p_realm_mask,
            p_realm => p_realm
        );
        COMMIT;
    END LOOP;
END;
$$;

CREATE PROCEDURE pyswpt_api.process_balance_changes_in_turn(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_lock_timeout_ms integer
)
LANGUAGE plpgsql
AS $$
BEGIN
    FOR i IN 1 .. pg_catalog.cardinality(p_debtor_ids) LOOP
        PERFORM pg_catalog.set_config('lock_timeout', p_lock_timeout_ms::text, true);
        PERFORM pyswpt_api.process_balance_changes(
            p_debtor_id => p_debtor_ids[i],
            p_creditor_id => p_creditor_ids[i]
        );
        COMMIT;
    END LOOP;
END;
$$;
