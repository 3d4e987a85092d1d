-- Pending balance changes (spec 02 §2.6): money arriving at an account through
-- PendingBalanceChange messages. The archive (registered_balance_change) makes
-- every change count once however often its message is delivered.

-- Intake of one PendingBalanceChange (spec 02 §2.6 intake, spec 01 §1.5):
-- true when it was archived and queued, false when it was dropped as too old
-- (committed before the archive threshold) or as an already archived duplicate.
CREATE FUNCTION pyswpt_api.register_balance_change(
    p_debtor_id bigint,
    p_other_creditor_id bigint,
    p_change_id bigint,
    p_creditor_id bigint,
    p_coordinator_type text,
    p_transfer_note_format text,
    p_transfer_note text,
    p_committed_at timestamptz,
    p_principal_delta bigint,
    p_archive_threshold timestamptz
)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
BEGIN
    -- Older than the threshold: the archive may have forgotten that it was applied.
    IF p_committed_at < p_archive_threshold THEN
        RETURN false;
    END IF;

    IF EXISTS (
        SELECT 1
        FROM registered_balance_change
        WHERE debtor_id = p_debtor_id
            AND other_creditor_id = p_other_creditor_id
            AND change_id = p_change_id
    ) THEN
        RETURN false;
    END IF;

    PERFORM queue_balance_change(
        p_debtor_id,
        p_other_creditor_id,
        p_change_id,
        p_creditor_id,
        p_coordinator_type,
        p_transfer_note_format,
        p_transfer_note,
        p_committed_at,
        p_principal_delta
    );
    RETURN true;
END;
$$;

-- Archive a balance change as not yet applied and queue it for the balance_changes
-- stage: the end of the intake above, and what a finalization does at once when
-- the recipient is in its own shard (emit_pending_balance_change). Takes no lock.
CREATE FUNCTION pyswpt_private.queue_balance_change(
    p_debtor_id bigint,
    p_other_creditor_id bigint,
    p_change_id bigint,
    p_creditor_id bigint,
    p_coordinator_type text,
    p_transfer_note_format text,
    p_transfer_note text,
    p_committed_at timestamptz,
    p_principal_delta bigint
)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO registered_balance_change (debtor_id, other_creditor_id, change_id, committed_at, is_applied)
    VALUES (p_debtor_id, p_other_creditor_id, p_change_id, p_committed_at, false)
    ON CONFLICT DO NOTHING;

    IF NOT FOUND THEN
        -- A twin registered it after our snapshot: retrying will see it and drop this one.
        RAISE EXCEPTION 'balance change (%, %, %) was registered concurrently',
            p_debtor_id, p_other_creditor_id, p_change_id
            USING ERRCODE = 'serialization_failure';
    END IF;

    INSERT INTO pending_balance_change (
        debtor_id,
        other_creditor_id,
        change_id,
        creditor_id,
        coordinator_type,
        transfer_note_format,
        transfer_note,
        committed_at,
        principal_delta
    )
    VALUES (
        p_debtor_id,
        p_other_creditor_id,
        p_change_id,
        p_creditor_id,
        p_coordinator_type,
        p_transfer_note_format,
        p_transfer_note,
        p_committed_at,
        p_principal_delta
    );
END;
$$;

-- Apply the queued changes of one account in one transaction (spec 02 §2.6
-- processing): lock, create or resurrect the account (B4), report each change
-- by AccountTransfer (B3) with a running principal, credit the interest each
-- amount earned since it was committed, and change the balance once (B2).
-- Returns how many changes were applied; a batch takes at most 10000 of them,
-- the rest are left for the next call. Changes are applied in commit order.
CREATE FUNCTION pyswpt_api.process_balance_changes(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    -- Bounds the work (and the lock time of a hot root account) of one transaction.
    c_max_changes_per_batch CONSTANT integer := 10000;
    v_changes pending_balance_change[];
    v_account account;
BEGIN
    v_changes := take_pending_balance_changes(p_debtor_id, p_creditor_id, c_max_changes_per_batch);
    IF v_changes IS NULL THEN
        RETURN 0;
    END IF;

    v_account := lock_or_create_account(p_debtor_id, p_creditor_id, p_now);
    v_account := apply_balance_changes(v_account, v_changes, p_now);
    PERFORM save_account(v_account);
    RETURN cardinality(v_changes);
END;
$$;

-- Credit a locked account with changes in the given order: an AccountTransfer
-- for each (B3) with a running principal, the interest each amount earned since
-- it was committed, and one change of the balance (B2). The caller stores it.
CREATE FUNCTION pyswpt_private.apply_balance_changes(
    INOUT p_account account,
    p_changes pending_balance_change[],
    p_now timestamptz
)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_change pending_balance_change;
    v_principal_delta numeric := 0;
    v_interest_delta double precision := 0.0;
BEGIN
    FOREACH v_change IN ARRAY p_changes LOOP
        v_principal_delta := v_principal_delta + v_change.principal_delta;
        v_interest_delta := v_interest_delta + calc_due_interest(
            v_change.principal_delta,
            v_change.committed_at,
            p_account.previous_interest_rate,
            p_account.interest_rate,
            p_account.last_interest_rate_change_ts,
            p_now
        );
        p_account := emit_account_transfer(
            p_account,
            v_change.coordinator_type,
            v_change.other_creditor_id,
            v_change.committed_at,
            v_change.principal_delta,
            v_change.transfer_note_format,
            v_change.transfer_note,
            contain_principal(p_account.principal + v_principal_delta),
            p_now
        );
    END LOOP;

    p_account := apply_account_change(p_account, v_principal_delta, v_interest_delta, p_now);
END;
$$;

-- Credit a committed amount to its recipient in the finalizing transaction,
-- instead of queueing the change for the balance_changes stage, when the
-- recipient's account can be had at once: it exists, is not deleted, no other
-- transaction holds it or changed it since this one began, and no change of
-- its that this transaction sees is queued (those keep their place before it;
-- one queued by a transaction this one does not see may come after, as across
-- the stage's batches). Returns whether it was credited; when not, nothing of
-- the attempt is left and the caller queues the change.
--
-- The caller holds the sender's lock, so this one must not wait: NOWAIT, and
-- the failures of a lock had without waiting (55P03, and 40001 at REPEATABLE
-- READ for a row changed after this transaction's snapshot) end the attempt.
-- Nothing else here waits for a row (the recipient's outbox rows are written
-- only under its lock), so the attempt adds no wait to any cycle of waits.
-- The attempt is a block with its own subtransaction, allowed once per
-- transaction by the caller. The lock and the update of the row belong to
-- that subtransaction alike: a row locked by a subtransaction and updated by
-- its parent would need a MultiXact. Any other error of the recipient's side
-- ends the attempt too, so that it cannot stop the sender's finalization: the
-- change is queued, and the stage meets the error with the recipient's
-- account alone, as before.
CREATE FUNCTION pyswpt_private.try_to_credit_at_once(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_other_creditor_id bigint,
    p_coordinator_type text,
    p_transfer_note_format text,
    p_transfer_note text,
    p_principal_delta bigint,
    p_now timestamptz
)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_account account;
    v_change pending_balance_change;
BEGIN
    -- Never so (RECIPIENT_SAME_AS_SENDER is refused at preparation), and it must not
    -- be: the caller stores the sender's row after this, and the credit would be lost.
    IF p_creditor_id = p_other_creditor_id THEN
        RETURN false;
    END IF;
    -- Before the lock, which would be held to the end of the transaction for
    -- nothing: a busy recipient nearly always has changes queued, and the stage
    -- must not wait for this transaction to apply them.
    IF EXISTS (
        SELECT 1
        FROM pending_balance_change
        WHERE debtor_id = p_debtor_id
            AND creditor_id = p_creditor_id
    ) THEN
        RETURN false;
    END IF;
    BEGIN
        v_account := (
            SELECT locked
            FROM account AS locked
            WHERE locked.debtor_id = p_debtor_id
                AND locked.creditor_id = p_creditor_id
            FOR NO KEY UPDATE NOWAIT
        );
        IF v_account.debtor_id IS NULL OR account_is_deleted(v_account.status_flags) THEN
            -- The balance_changes stage creates or resurrects it, with its AccountUpdate.
            RETURN false;
        END IF;

        v_change.debtor_id := p_debtor_id;
        v_change.other_creditor_id := p_other_creditor_id;
        v_change.creditor_id := p_creditor_id;
        v_change.coordinator_type := p_coordinator_type;
        v_change.transfer_note_format := p_transfer_note_format;
        v_change.transfer_note := p_transfer_note;
        v_change.committed_at := p_now;
        v_change.principal_delta := p_principal_delta;
        v_account := apply_balance_changes(v_account, ARRAY[v_change], p_now);
        PERFORM save_account(v_account);
        RETURN true;
    EXCEPTION
        WHEN lock_not_available OR serialization_failure THEN
            RETURN false;
        WHEN OTHERS THEN
            RAISE WARNING 'crediting account (%, %) at once failed (%: %); its balance change is queued',
                p_debtor_id, p_creditor_id, SQLSTATE, SQLERRM;
            RETURN false;
    END;
END;
$$;

-- Lock, dequeue and mark applied (in the archive) up to p_max_count queued
-- changes of one account, skipping changes another transaction holds; NULL
-- when there are none. Sorted by commit time, so that transfer numbers follow it.
CREATE FUNCTION pyswpt_private.take_pending_balance_changes(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_max_count integer
)
RETURNS pending_balance_change[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_changes pending_balance_change[];
BEGIN
    WITH locked AS (
        SELECT debtor_id, other_creditor_id, change_id
        FROM pending_balance_change
        WHERE debtor_id = p_debtor_id
            AND creditor_id = p_creditor_id
        LIMIT p_max_count
        FOR UPDATE SKIP LOCKED
    ),
    taken AS (
        DELETE FROM pending_balance_change AS p
        USING locked AS l
        WHERE p.debtor_id = l.debtor_id
            AND p.other_creditor_id = l.other_creditor_id
            AND p.change_id = l.change_id
        RETURNING p.*
    ),
    marked AS (
        UPDATE registered_balance_change AS r
        SET is_applied = true
        FROM taken AS t
        WHERE r.debtor_id = t.debtor_id
            AND r.other_creditor_id = t.other_creditor_id
            AND r.change_id = t.change_id
    )
    SELECT array_agg(
        ROW(t.*)::pending_balance_change
        ORDER BY t.committed_at, t.other_creditor_id, t.change_id
    )
    INTO v_changes
    FROM taken AS t;

    RETURN v_changes;
END;
$$;
