-- The fetch API's two reads (spec 02 §2.15, spec 01 §6.1). Both are
-- read-only: the web server calls nothing else. The reachability test is also
-- the recipient check of the transfer intake for recipients in this shard.
--
-- Flags are read through the named bits of 05_flags.sql (spec 02 §1.11).
--
-- PL/pgSQL rather than SQL: a SQL function with SET search_path is parsed and
-- planned again in every transaction that calls it (measured: 66 µs against
-- 12 µs per call, each in a transaction of its own), and every fetch and most
-- PrepareTransfer intakes are such a call.

-- Whether an account may receive non-agent transfers (spec 02 B10): the root
-- account (creditor 0) always, even when it has no row; any other account only
-- when its row exists, is not deleted and is not scheduled for deletion.
CREATE FUNCTION pyswpt_api.is_reachable_account(p_debtor_id bigint, p_creditor_id bigint)
RETURNS boolean
LANGUAGE plpgsql
STABLE
PARALLEL SAFE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
BEGIN
    RETURN account_is_reachable(p_debtor_id, p_creditor_id);
END;
$$;

-- The test of is_reachable_account. The transfer intake calls it directly: an
-- entry point's SET clauses would cost a save and restore of two settings at
-- every intake.
CREATE FUNCTION pyswpt_private.account_is_reachable(p_debtor_id bigint, p_creditor_id bigint)
RETURNS boolean
LANGUAGE plpgsql
STABLE
PARALLEL SAFE
AS $$
BEGIN
    RETURN p_creditor_id = 0
        OR EXISTS (
            SELECT 1
            FROM account
            WHERE debtor_id = p_debtor_id
                AND creditor_id = p_creditor_id
                AND NOT account_is_deleted(status_flags)
                AND NOT config_is_scheduled_for_deletion(config_flags)
        );
END;
$$;

-- The stored config_data of an account, deleted or not (spec 02 §2.15, a
-- quirk of the reference kept on purpose); NULL when there is no row.
CREATE FUNCTION pyswpt_api.get_account_config_data(p_debtor_id bigint, p_creditor_id bigint)
RETURNS text
LANGUAGE plpgsql
STABLE
PARALLEL SAFE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
BEGIN
    RETURN (
        SELECT config_data
        FROM account
        WHERE debtor_id = p_debtor_id
            AND creditor_id = p_creditor_id
    );
END;
$$;
