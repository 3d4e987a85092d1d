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
--
-- parked_message (a table the reference does not have) is checked by the
-- account each parked message belongs to (parked_message_owner); a message
-- that names no readable account (a body that is not JSON, say) belongs to
-- no shard and is not checked. parked_message_overflow holds counts only,
-- per source and reason, and names no account.

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
        'pending_balance_change_signal',
        'parked_message'
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

-- The account whose shard a parked message belongs to: the one it is about,
-- (debtor_id, creditor_id), except for an outgoing PendingBalanceChange, whose
-- creditor_id is the remote recipient: it belongs with its sender,
-- other_creditor_id, read from its body (or from the outbox row's columns when
-- it has none). NULLs when no account can be read. Defined before the SQL
-- function below, whose body names it.
CREATE FUNCTION pyswpt_private.parked_message_owner(
    p_source_kind text,
    p_source_name text,
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_body bytea,
    p_row_data jsonb,
    OUT owner_debtor_id bigint,
    OUT owner_creditor_id bigint
)
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    owner_debtor_id := p_debtor_id;
    IF p_source_kind <> 'outbox' OR p_source_name <> 'pending_balance_changes' THEN
        owner_creditor_id := p_creditor_id;
        RETURN;
    END IF;
    BEGIN
        owner_creditor_id := coalesce(
            convert_from(p_body, 'UTF8')::jsonb ->> 'other_creditor_id',
            p_row_data ->> 'other_creditor_id'
        )::bigint;
    EXCEPTION
        -- A body or column that does not read as JSON with an i64: no account.
        WHEN data_exception THEN
            owner_creditor_id := NULL;
    END;
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
    UNION ALL
    SELECT o.owner_debtor_id, o.owner_creditor_id
    FROM parked_message AS t
    CROSS JOIN LATERAL parked_message_owner(
        t.source_kind, t.source_name, t.debtor_id, t.creditor_id, t.body, t.row_data
    ) AS o
    WHERE p_table_name = 'parked_message'
        AND t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
        AND o.owner_debtor_id IS NOT NULL
        AND o.owner_creditor_id IS NOT NULL
$$;

-- After a shard split, with DELETE_PARENT_SHARD_RECORDS (spec 01 §4.4): forget
-- up to p_max_count parked messages that belong to the sibling shard (in the
-- parent's realm, not in this one). The sibling started from the same copy of
-- the parent's database, holds the same rows, and is the one to replay them.
-- Messages that name no readable account are kept by both children (see
-- above). Returns how many rows were deleted.
CREATE FUNCTION pyswpt_api.delete_parent_shard_parked_messages(
    p_realm_mask bigint,
    p_realm bigint,
    p_parent_realm_mask bigint,
    p_parent_realm bigint,
    p_max_count integer
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    WITH siblings AS (
        SELECT t.parked_id
        FROM parked_message AS t
        CROSS JOIN LATERAL parked_message_owner(
            t.source_kind, t.source_name, t.debtor_id, t.creditor_id, t.body, t.row_data
        ) AS o
        WHERE NOT is_in_realm(o.owner_debtor_id, o.owner_creditor_id, p_realm_mask, p_realm)
            AND is_in_realm(o.owner_debtor_id, o.owner_creditor_id, p_parent_realm_mask, p_parent_realm)
        ORDER BY t.parked_id
        LIMIT p_max_count
        FOR UPDATE OF t SKIP LOCKED
    )
    DELETE FROM parked_message AS p
    USING siblings AS s
    WHERE p.parked_id = s.parked_id;

    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;
