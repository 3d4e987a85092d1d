-- verify-shard-content (spec 01 §4.5): after a shard split, check that no
-- table still holds records of accounts this shard does not own. The command
-- walks each table a few heap blocks at a time (short transactions, pauses
-- between them) and stops at the first foreign record.
--
-- Checked pairs: account (debtor_id, creditor_id); transfer_request and
-- finalization_request (debtor_id, sender_creditor_id); pending_balance_change
-- (debtor_id, creditor_id); the transfer-related outbox tables by
-- sender_creditor_id, the account-related ones by creditor_id.
--
-- pending_balance_change_signal is checked by (debtor_id, other_creditor_id),
-- the account of this shard whose operation wrote it. The reference checks
-- its creditor_id, the remote recipient (a quirk, spec 01 §4.5), so it fails
-- on a healthy shard whenever a payment to another shard waits to be
-- flushed. Left-over rows of the parent shard are still found: their sender
-- belongs to the sibling.
-- prepared_transfer and registered_balance_change are not checked, as in the
-- reference: their rows go with their account.

-- The checked tables in checking order, with their current size in heap blocks.
CREATE FUNCTION pyswpt_api.list_shard_content_tables()
RETURNS TABLE (table_name text, block_count bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        t.name,
        pg_relation_size(('pyswpt.' || t.name)::regclass) / current_setting('block_size')::bigint
    FROM unnest(ARRAY[
        'account',
        'transfer_request',
        'finalization_request',
        'pending_balance_change',
        'rejected_transfer_signal',
        'prepared_transfer_signal',
        'finalized_transfer_signal',
        'account_transfer_signal',
        'account_update_signal',
        'account_purge_signal',
        'rejected_config_signal',
        'pending_balance_change_signal'
    ]) WITH ORDINALITY AS t (name, position)
    ORDER BY t.position
$$;

-- One step of the check: the rows of one table stored in heap blocks
-- [p_first_block, p_first_block + p_block_count). Returns how many rows were
-- checked and the pair of one row outside the realm (NULLs when all belong).
CREATE FUNCTION pyswpt_api.find_record_outside_shard(
    p_table_name text,
    p_first_block bigint,
    p_block_count integer,
    p_realm_mask bigint,
    p_realm bigint,
    OUT checked_count bigint,
    OUT foreign_debtor_id bigint,
    OUT foreign_creditor_id bigint
)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pyswpt_api.list_shard_content_tables() AS t WHERE t.table_name = p_table_name) THEN
        RAISE EXCEPTION 'table % is not checked by verify-shard-content', p_table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT
        count(*),
        (array_agg(k.debtor_id) FILTER (WHERE NOT is_in_realm(k.debtor_id, k.creditor_id, p_realm_mask, p_realm)))[1],
        (array_agg(k.creditor_id) FILTER (WHERE NOT is_in_realm(k.debtor_id, k.creditor_id, p_realm_mask, p_realm)))[1]
    INTO checked_count, foreign_debtor_id, foreign_creditor_id
    FROM shard_keys_in_blocks(p_table_name, p_first_block, p_block_count) AS k;
END;
$$;

-- The account pair of every row of one checked table in a heap block range.
-- Each branch runs only for its own table: the condition on p_table_name is
-- decided once per execution, before any row is read.
CREATE FUNCTION pyswpt_private.shard_keys_in_blocks(p_table_name text, p_first_block bigint, p_block_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT t.debtor_id, t.creditor_id
    FROM account AS t
    WHERE p_table_name = 'account'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.sender_creditor_id
    FROM transfer_request AS t
    WHERE p_table_name = 'transfer_request'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.sender_creditor_id
    FROM finalization_request AS t
    WHERE p_table_name = 'finalization_request'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.creditor_id
    FROM pending_balance_change AS t
    WHERE p_table_name = 'pending_balance_change'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.sender_creditor_id
    FROM rejected_transfer_signal AS t
    WHERE p_table_name = 'rejected_transfer_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.sender_creditor_id
    FROM prepared_transfer_signal AS t
    WHERE p_table_name = 'prepared_transfer_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.sender_creditor_id
    FROM finalized_transfer_signal AS t
    WHERE p_table_name = 'finalized_transfer_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.creditor_id
    FROM account_transfer_signal AS t
    WHERE p_table_name = 'account_transfer_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.creditor_id
    FROM account_update_signal AS t
    WHERE p_table_name = 'account_update_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.creditor_id
    FROM account_purge_signal AS t
    WHERE p_table_name = 'account_purge_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.creditor_id
    FROM rejected_config_signal AS t
    WHERE p_table_name = 'rejected_config_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
    UNION ALL
    SELECT t.debtor_id, t.other_creditor_id
    FROM pending_balance_change_signal AS t
    WHERE p_table_name = 'pending_balance_change_signal'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
$$;
