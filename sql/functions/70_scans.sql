-- Table scanners (spec 02 §2.11-§2.14, §4.3-§4.5): the per-beat steps of the
-- accounts, prepared-transfers and archive scanners.
--
-- The Python scanner walks a table's heap a few blocks at a time
-- (read_*_keys), and hands the keys it read to the step functions below as
-- parallel arrays. Each step re-selects those rows by key, applies its rule
-- to the current row under a SKIP LOCKED lock (rows another transaction
-- holds are left for the next pass), and acts only on rows it locked; it
-- returns how many rows it acted on. Settings come in as parameters in the
-- configuration's units (days), the current time as p_now.
--
-- Flags are read through the named bits of 05_flags.sql (spec 02 §1.11).

-- Accounts scanner step 1 (spec 02 §4.4, spec 01 §4.3-4.4): after a shard
-- split, delete the accounts that belong to the parent shard but not to this
-- one, without any message (their prepared transfers go with them). Used only
-- when DELETE_PARENT_SHARD_RECORDS is on.
CREATE FUNCTION pyswpt_api.delete_parent_shard_accounts(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_realm_mask bigint,
    p_realm bigint,
    p_parent_realm_mask bigint,
    p_parent_realm bigint
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    ASSERT cardinality(p_debtor_ids) = cardinality(p_creditor_ids), 'key arrays must have equal lengths';
    WITH locked AS (
        SELECT debtor_id, creditor_id
        FROM account
        WHERE (debtor_id, creditor_id) IN (SELECT * FROM unnest(p_debtor_ids, p_creditor_ids))
            AND NOT is_in_realm(debtor_id, creditor_id, p_realm_mask, p_realm)
            AND is_in_realm(debtor_id, creditor_id, p_parent_realm_mask, p_parent_realm)
        ORDER BY debtor_id, creditor_id
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM account AS a
    USING locked AS l
    WHERE a.debtor_id = l.debtor_id
        AND a.creditor_id = l.creditor_id;

    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- Accounts scanner step 2, purge (spec 02 §2.12): remove the rows of this
-- shard's accounts deleted long enough ago (INTRANET_EXTREME_DELAY_DAYS +
-- PREPARED_TRANSFER_MAX_DELAY_DAYS + 2 days after their last change, so no
-- message about them can still be under way) and created before the date of
-- now - 3 days (so a re-created account always gets a later creation date),
-- and emit AccountPurge for each.
CREATE FUNCTION pyswpt_api.purge_deleted_accounts(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_intranet_extreme_delay_days double precision,
    p_prepared_transfer_max_delay_days double precision,
    p_realm_mask bigint,
    p_realm bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_purge_delay_days CONSTANT double precision :=
        p_intranet_extreme_delay_days + p_prepared_transfer_max_delay_days + 2.0;
    v_changed_before CONSTANT timestamptz := p_now - make_interval(secs => v_purge_delay_days * 86400.0);
    v_created_before CONSTANT date := ((p_now - INTERVAL '3 days') AT TIME ZONE 'UTC')::date;
    v_count integer;
BEGIN
    ASSERT cardinality(p_debtor_ids) = cardinality(p_creditor_ids), 'key arrays must have equal lengths';
    WITH locked AS (
        SELECT debtor_id, creditor_id
        FROM account
        WHERE (debtor_id, creditor_id) IN (SELECT * FROM unnest(p_debtor_ids, p_creditor_ids))
            AND account_is_deleted(status_flags)
            AND last_change_ts < v_changed_before
            AND creation_date < v_created_before
            AND is_in_realm(debtor_id, creditor_id, p_realm_mask, p_realm)
        ORDER BY debtor_id, creditor_id
        FOR UPDATE SKIP LOCKED
    ),
    purged AS (
        DELETE FROM account AS a
        USING locked AS l
        WHERE a.debtor_id = l.debtor_id
            AND a.creditor_id = l.creditor_id
        RETURNING a.debtor_id, a.creditor_id, a.creation_date
    )
    INSERT INTO account_purge_signal (debtor_id, creditor_id, creation_date, inserted_at)
    SELECT debtor_id, creditor_id, creation_date, p_now
    FROM purged
    -- The same incarnation can be purged only once; a twin row would be the same message.
    ON CONFLICT DO NOTHING;

    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- Accounts scanner step 3, heartbeats (spec 02 §2.11): emit an AccountUpdate
-- for each of this shard's existing accounts that has an unannounced change
-- (pending_account_update) or whose last AccountUpdate is older than
-- max(ACCOUNT_HEARTBEAT_DAYS, MESSAGE_MAX_DELAY_DAYS). The message carries the
-- stored state with ts = max(now, last_change_ts); seqnum, last_change_ts and
-- interest stay as they are. Deleted accounts get no heartbeats.
-- Reads only the rows it locks: called at READ COMMITTED (see send_due_account_updates).
CREATE FUNCTION pyswpt_api.send_account_heartbeats(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_account_heartbeat_days double precision,
    p_message_max_delay_days double precision,
    p_realm_mask bigint,
    p_realm bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_heartbeat_before CONSTANT timestamptz := p_now - make_interval(
        secs => greatest(p_account_heartbeat_days, p_message_max_delay_days) * 86400.0
    );
    v_account account;
    v_count integer := 0;
BEGIN
    ASSERT cardinality(p_debtor_ids) = cardinality(p_creditor_ids), 'key arrays must have equal lengths';
    -- Bounded by the number of keys given.
    FOR v_account IN
        SELECT *
        FROM account
        WHERE (debtor_id, creditor_id) IN (SELECT * FROM unnest(p_debtor_ids, p_creditor_ids))
            AND NOT account_is_deleted(status_flags)
            AND (pending_account_update OR last_heartbeat_ts < v_heartbeat_before)
            AND is_in_realm(debtor_id, creditor_id, p_realm_mask, p_realm)
        ORDER BY debtor_id, creditor_id
        FOR NO KEY UPDATE SKIP LOCKED
    LOOP
        PERFORM announce_stored_state(v_account, p_now);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END;
$$;

-- Accounts scanner steps 4 and 5 (spec 02 §4.4, spec 01 §5): which of the
-- given accounts should get a TryToDeleteAccount or a CapitalizeInterest
-- chore now. Only rows needing at least one chore are returned. No locks:
-- the chore handlers re-check everything under the account lock.
--  * deletion: not deleted, scheduled for deletion, no attempt within
--    DELETION_ATTEMPTS_MIN_DAYS, and a negligible balance (root: principal 0);
--  * capitalization: non-root, not deleted, not capitalized within
--    MIN_INTEREST_CAPITALIZATION_DAYS, and |floor(accrued interest)| /
--    (1 + |principal|) above MAX_INTEREST_TO_PRINCIPAL_RATIO (spec 02 §3.8).
CREATE FUNCTION pyswpt_api.select_account_chores(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_deletion_attempts_min_days double precision,
    p_min_interest_capitalization_days double precision,
    p_max_interest_to_principal_ratio double precision,
    p_now timestamptz DEFAULT now()
)
RETURNS TABLE (
    debtor_id bigint,
    creditor_id bigint,
    needs_deletion_attempt boolean,
    needs_capitalization boolean
)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT c.debtor_id, c.creditor_id, c.needs_deletion_attempt, c.needs_capitalization
    FROM (
        SELECT
            a.debtor_id,
            a.creditor_id,
            (
                config_is_scheduled_for_deletion(a.config_flags)
                AND a.last_deletion_attempt_ts
                    <= p_now - make_interval(secs => p_deletion_attempts_min_days * 86400.0)
                AND has_negligible_balance(a, p_now)
            ) AS needs_deletion_attempt,
            (
                a.creditor_id <> 0
                AND a.last_interest_capitalization_ts
                    <= p_now - make_interval(secs => p_min_interest_capitalization_days * 86400.0)
                AND abs(calc_accrued_interest_amount(a, p_now)::numeric) / (1 + abs(a.principal::numeric))
                    > p_max_interest_to_principal_ratio::numeric
            ) AS needs_capitalization
        FROM account AS a
        WHERE (a.debtor_id, a.creditor_id) IN (SELECT * FROM unnest(p_debtor_ids, p_creditor_ids))
            AND NOT account_is_deleted(a.status_flags)
    ) AS c
    WHERE c.needs_deletion_attempt OR c.needs_capitalization
    ORDER BY c.debtor_id, c.creditor_id
$$;

-- Accounts scanner step 6 (spec 02 §4.4): what the scanner compares with the
-- debtor's root config to decide on ChangeInterestRate and UpdateDebtorInfo
-- chores. The scanner fetches the root configs itself (fetch API), so this
-- only reads the stored side, for every given account that has a row.
-- interest_rate is single precision: compare it with the target rounded to
-- single precision, or a target such as 3.567 never compares equal (§2.7).
CREATE FUNCTION pyswpt_private.get_account_debtor_settings(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[]
)
RETURNS TABLE (
    debtor_id bigint,
    creditor_id bigint,
    interest_rate real,
    last_interest_rate_change_ts timestamptz,
    debtor_info_iri text,
    debtor_info_content_type text,
    debtor_info_sha256 bytea,
    is_deleted boolean
)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        a.debtor_id,
        a.creditor_id,
        a.interest_rate,
        a.last_interest_rate_change_ts,
        a.debtor_info_iri,
        a.debtor_info_content_type,
        a.debtor_info_sha256,
        account_is_deleted(a.status_flags)
    FROM account AS a
    WHERE (a.debtor_id, a.creditor_id) IN (SELECT * FROM unnest(p_debtor_ids, p_creditor_ids))
    ORDER BY a.debtor_id, a.creditor_id
$$;

-- Prepared-transfers scanner (spec 02 §2.13, §4.5): re-send PreparedTransfer
-- for this shard's transfers prepared more than R ago and not reminded within
-- the last R, R = max(PREPARED_TRANSFER_REMAINDER_DAYS, MESSAGE_MAX_DELAY_DAYS).
-- The reminder repeats the original fields with ts = max(now, prepared_at).
-- Nothing expires: the lock stays until a FinalizeTransfer arrives.
CREATE FUNCTION pyswpt_api.send_prepared_transfer_reminders(
    p_debtor_ids bigint[],
    p_sender_creditor_ids bigint[],
    p_transfer_ids bigint[],
    p_prepared_transfer_remainder_days double precision,
    p_message_max_delay_days double precision,
    p_realm_mask bigint,
    p_realm bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_remind_before CONSTANT timestamptz := p_now - make_interval(
        secs => greatest(p_prepared_transfer_remainder_days, p_message_max_delay_days) * 86400.0
    );
    v_count integer;
BEGIN
    ASSERT cardinality(p_debtor_ids) = cardinality(p_sender_creditor_ids)
        AND cardinality(p_debtor_ids) = cardinality(p_transfer_ids), 'key arrays must have equal lengths';
    WITH locked AS (
        SELECT debtor_id, sender_creditor_id, transfer_id
        FROM prepared_transfer
        WHERE (debtor_id, sender_creditor_id, transfer_id)
                IN (SELECT * FROM unnest(p_debtor_ids, p_sender_creditor_ids, p_transfer_ids))
            AND prepared_at < v_remind_before
            AND (last_reminder_ts IS NULL OR last_reminder_ts < v_remind_before)
            AND is_in_realm(debtor_id, sender_creditor_id, p_realm_mask, p_realm)
        ORDER BY debtor_id, sender_creditor_id, transfer_id
        FOR NO KEY UPDATE SKIP LOCKED
    ),
    reminded AS (
        UPDATE prepared_transfer AS t
        SET last_reminder_ts = p_now
        FROM locked AS l
        WHERE t.debtor_id = l.debtor_id
            AND t.sender_creditor_id = l.sender_creditor_id
            AND t.transfer_id = l.transfer_id
        RETURNING t.*
    )
    SELECT count(emit_prepared_transfer(ROW(r.*)::prepared_transfer, greatest(p_now, r.prepared_at)))
    INTO v_count
    FROM reminded AS r;

    RETURN v_count;
END;
$$;

-- Archive scanner (spec 02 §2.14, §4.5): forget applied balance changes
-- committed before REMOVE_FROM_ARCHIVE_THRESHOLD_DATE. The intake refuses
-- changes that old, so forgetting them cannot let one be applied twice.
-- Unapplied changes stay whatever their age: their queued rows need them.
CREATE FUNCTION pyswpt_api.delete_applied_balance_changes(
    p_debtor_ids bigint[],
    p_other_creditor_ids bigint[],
    p_change_ids bigint[],
    p_archive_threshold timestamptz
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    ASSERT cardinality(p_debtor_ids) = cardinality(p_other_creditor_ids)
        AND cardinality(p_debtor_ids) = cardinality(p_change_ids), 'key arrays must have equal lengths';
    DELETE FROM registered_balance_change
    WHERE (debtor_id, other_creditor_id, change_id)
            IN (SELECT * FROM unnest(p_debtor_ids, p_other_creditor_ids, p_change_ids))
        AND committed_at < p_archive_threshold
        AND is_applied;

    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- The first tuple id of a heap block, the bound of a TID range scan.
CREATE FUNCTION pyswpt_private.block_start_tid(p_block bigint)
RETURNS tid
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT format('(%s,0)', least(p_block, 4294967295))::tid
$$;

-- The keys of the account rows stored in heap blocks [p_first_block,
-- p_first_block + p_block_count) (spec 02 §4.3 reader). No locks; the steps
-- above re-check every key they are given.
CREATE FUNCTION pyswpt_api.read_account_keys(p_first_block bigint, p_block_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT a.debtor_id, a.creditor_id
    FROM account AS a
    WHERE a.ctid >= block_start_tid(p_first_block)
        AND a.ctid < block_start_tid(p_first_block + p_block_count)
$$;

-- The keys of the prepared transfers stored in the given heap blocks (spec 02 §4.3).
CREATE FUNCTION pyswpt_api.read_prepared_transfer_keys(p_first_block bigint, p_block_count integer)
RETURNS TABLE (debtor_id bigint, sender_creditor_id bigint, transfer_id bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT t.debtor_id, t.sender_creditor_id, t.transfer_id
    FROM prepared_transfer AS t
    WHERE t.ctid >= block_start_tid(p_first_block)
        AND t.ctid < block_start_tid(p_first_block + p_block_count)
$$;

-- The keys of the archived balance changes stored in the given heap blocks (spec 02 §4.3).
CREATE FUNCTION pyswpt_api.read_registered_balance_change_keys(p_first_block bigint, p_block_count integer)
RETURNS TABLE (debtor_id bigint, other_creditor_id bigint, change_id bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT r.debtor_id, r.other_creditor_id, r.change_id
    FROM registered_balance_change AS r
    WHERE r.ctid >= block_start_tid(p_first_block)
        AND r.ctid < block_start_tid(p_first_block + p_block_count)
$$;

-- Size of a scanned table for the reader's end-of-table check and the
-- rhythm (spec 02 §4.3): heap blocks now, and the planner's row estimate
-- (reltuples; negative when never analysed, which the rhythm treats as 0).
-- Only the three scanned tables are accepted.
CREATE FUNCTION pyswpt_api.get_scanned_table_size(
    p_table_name text,
    OUT block_count bigint,
    OUT row_estimate double precision
)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_table regclass;
BEGIN
    v_table := CASE p_table_name
        WHEN 'account' THEN 'pyswpt.account'::regclass
        WHEN 'prepared_transfer' THEN 'pyswpt.prepared_transfer'::regclass
        WHEN 'registered_balance_change' THEN 'pyswpt.registered_balance_change'::regclass
    END;
    IF v_table IS NULL THEN
        RAISE EXCEPTION 'table % is not scanned', p_table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    block_count := pg_relation_size(v_table) / current_setting('block_size')::bigint;
    SELECT c.reltuples
    INTO row_estimate
    FROM pg_class AS c
    WHERE c.oid = v_table;
END;
$$;
