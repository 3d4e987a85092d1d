-- What the request workers look for (spec 02 §4.2): accounts with queued work.
-- Each returns distinct account keys, at most p_max_count of them; the worker
-- then runs the account's batch processor once per key. PL/pgSQL, so that
-- the plan is cached for the session (see 80_outbox.sql).

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
