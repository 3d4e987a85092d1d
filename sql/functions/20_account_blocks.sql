-- Building blocks shared by every operation on an account (spec 02, §2.1 B1-B8).
--
-- An operation locks an account row into a variable of type `account`, passes
-- it through these blocks (INOUT: they return the changed row and write outbox
-- rows), and finally stores it once with save_account(). One UPDATE per
-- transaction keeps the hot rows HOT and the WAL small. A finalization may
-- credit its recipient too, locked without waiting (try_to_credit_at_once).
--
-- An account row is locked into its variable as one whole-row value
-- (`v_account := (SELECT locked FROM account AS locked ... FOR NO KEY UPDATE)`),
-- not with `SELECT * INTO v_account`: PostgreSQL builds the row type of every
-- plan node at every execution, one entry per column, and PL/pgSQL then assigns
-- the columns to the variable one by one; a whole row is one column through the
-- plan and one assignment: 4 % fewer instructions on the SQL path of a transfer
-- (benchmarks/sql_instructions.py). Without a row the variable is NULL, and an
-- assignment sets no FOUND: a missing account is `v_account.debtor_id IS NULL`.

-- Lock an account that exists for the protocol: NULL if missing or deleted.
CREATE FUNCTION pyswpt_private.lock_existing_account(p_debtor_id bigint, p_creditor_id bigint)
RETURNS account
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_account account;
BEGIN
    v_account := (
        SELECT locked
        FROM account AS locked
        WHERE locked.debtor_id = p_debtor_id
            AND locked.creditor_id = p_creditor_id
        FOR NO KEY UPDATE
    );

    IF v_account.debtor_id IS NULL OR account_is_deleted(v_account.status_flags) THEN
        RETURN NULL;
    END IF;
    RETURN v_account;
END;
$$;

-- B4: lock the account, creating or resurrecting it as an incoming change requires.
-- Creation and resurrection are announced at once by an AccountUpdate.
CREATE FUNCTION pyswpt_private.lock_or_create_account(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_now timestamptz
)
RETURNS account
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_account account;
BEGIN
    v_account := (
        SELECT locked
        FROM account AS locked
        WHERE locked.debtor_id = p_debtor_id
            AND locked.creditor_id = p_creditor_id
        FOR NO KEY UPDATE
    );

    IF v_account.debtor_id IS NULL THEN
        v_account := emit_account_update(new_account(p_debtor_id, p_creditor_id, p_now), p_now);
        PERFORM insert_account(v_account);
    ELSIF account_is_deleted(v_account.status_flags) THEN
        v_account.status_flags := without_deleted_flag(v_account.status_flags);
        v_account := touch_account(v_account, p_now);
        v_account := emit_account_update(v_account, p_now);
        PERFORM save_account(v_account);
    END IF;
    RETURN v_account;
END;
$$;

-- Initial values of a new account row (spec 02 §1.2).
CREATE FUNCTION pyswpt_private.new_account(p_debtor_id bigint, p_creditor_id bigint, p_now timestamptz)
RETURNS account
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_never CONSTANT timestamptz := TIMESTAMPTZ '1970-01-01 00:00:00+00';
    v_account account;
BEGIN
    v_account.debtor_id := p_debtor_id;
    v_account.creditor_id := p_creditor_id;
    v_account.creation_date := (p_now AT TIME ZONE 'UTC')::date;
    v_account.last_change_seqnum := 0;
    v_account.last_change_ts := p_now;
    v_account.principal := 0;
    v_account.interest_rate := 0.0;
    v_account.interest := 0.0;
    v_account.last_interest_rate_change_ts := v_never;
    v_account.last_config_ts := v_never;
    v_account.last_config_seqnum := 0;
    v_account.last_transfer_number := 0;
    v_account.last_transfer_committed_at := v_never;
    v_account.negligible_amount := 0.0;
    v_account.config_flags := 0;
    v_account.config_data := '';
    v_account.status_flags := 0;
    v_account.total_locked_amount := 0;
    v_account.pending_transfers_count := 0;
    v_account.last_transfer_id := days_since_epoch(v_account.creation_date) << 40;
    v_account.previous_interest_rate := 0.0;
    v_account.last_heartbeat_ts := p_now;
    v_account.last_interest_capitalization_ts := v_never;
    v_account.last_deletion_attempt_ts := v_never;
    v_account.pending_account_update := false;
    RETURN v_account;
END;
$$;

-- Insert a new account row. A concurrent twin means this transaction read a stale
-- snapshot: report a serialization failure so that the caller's retry sees the twin.
CREATE FUNCTION pyswpt_private.insert_account(p_account account)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO account
    VALUES ((p_account).*)
    ON CONFLICT DO NOTHING;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'account (%, %) was created concurrently',
            p_account.debtor_id, p_account.creditor_id
            USING ERRCODE = 'serialization_failure';
    END IF;
END;
$$;

-- Store the balance, lock and counter columns of a locked account. Configuration
-- and debtor-info columns are written only by the operations that change them, so
-- that a root account's out-of-line config_data is not rewritten on every payment.
-- PL/pgSQL rather than SQL: its UPDATE plan is cached for the session, where a SQL
-- function (never inlined, because of SET search_path) re-plans it on every call
-- (measured: 0.30 ms -> 0.09 ms per call).
CREATE FUNCTION pyswpt_private.save_account(p_account account)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE account
    SET
        last_change_seqnum = p_account.last_change_seqnum,
        last_change_ts = p_account.last_change_ts,
        principal = p_account.principal,
        interest_rate = p_account.interest_rate,
        interest = p_account.interest,
        last_interest_rate_change_ts = p_account.last_interest_rate_change_ts,
        last_transfer_number = p_account.last_transfer_number,
        last_transfer_committed_at = p_account.last_transfer_committed_at,
        status_flags = p_account.status_flags,
        total_locked_amount = p_account.total_locked_amount,
        pending_transfers_count = p_account.pending_transfers_count,
        last_transfer_id = p_account.last_transfer_id,
        previous_interest_rate = p_account.previous_interest_rate,
        last_heartbeat_ts = p_account.last_heartbeat_ts,
        last_interest_capitalization_ts = p_account.last_interest_capitalization_ts,
        last_deletion_attempt_ts = p_account.last_deletion_attempt_ts,
        pending_account_update = p_account.pending_account_update
    WHERE debtor_id = p_account.debtor_id
        AND creditor_id = p_account.creditor_id;
END;
$$;

-- A meaningful change: next seqnum, and last_change_ts moves forward (never back).
CREATE FUNCTION pyswpt_private.touch_account(INOUT p_account account, p_now timestamptz)
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    p_account.last_change_seqnum := wrap_increment_seqnum(p_account.last_change_seqnum);
    p_account.last_change_ts := greatest(p_account.last_change_ts, p_now);
END;
$$;

-- B1: announce the account's state now. The message's ts is last_change_ts
-- (spec 01 §1.6, AccountUpdate); heartbeats pass a later p_ts.
CREATE FUNCTION pyswpt_private.emit_account_update(
    INOUT p_account account,
    p_now timestamptz,
    p_ts timestamptz DEFAULT NULL
)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    p_account.last_heartbeat_ts := p_now;
    p_account.pending_account_update := false;
    INSERT INTO account_update_signal (
        debtor_id,
        creditor_id,
        last_change_ts,
        last_change_seqnum,
        principal,
        interest,
        interest_rate,
        last_interest_rate_change_ts,
        last_transfer_number,
        last_transfer_committed_at,
        last_config_ts,
        last_config_seqnum,
        creation_date,
        negligible_amount,
        config_data,
        config_flags,
        debtor_info_iri,
        debtor_info_content_type,
        debtor_info_sha256,
        inserted_at
    )
    VALUES (
        p_account.debtor_id,
        p_account.creditor_id,
        p_account.last_change_ts,
        p_account.last_change_seqnum,
        p_account.principal,
        p_account.interest,
        p_account.interest_rate,
        p_account.last_interest_rate_change_ts,
        p_account.last_transfer_number,
        p_account.last_transfer_committed_at,
        p_account.last_config_ts,
        p_account.last_config_seqnum,
        p_account.creation_date,
        p_account.negligible_amount,
        p_account.config_data,
        p_account.config_flags,
        p_account.debtor_info_iri,
        p_account.debtor_info_content_type,
        p_account.debtor_info_sha256,
        coalesce(p_ts, p_account.last_change_ts)
    );
END;
$$;

-- B1': announce a locked account's stored state without changing it, as
-- heartbeats and prompt updates do: ts = max(now, last_change_ts), seqnum,
-- last_change_ts and interest as they are; the row remembers the announcement.
CREATE FUNCTION pyswpt_private.announce_stored_state(p_account account, p_now timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    p_account := emit_account_update(p_account, p_now, greatest(p_now, p_account.last_change_ts));
    UPDATE account
    SET
        last_heartbeat_ts = p_account.last_heartbeat_ts,
        pending_account_update = p_account.pending_account_update
    WHERE debtor_id = p_account.debtor_id
        AND creditor_id = p_account.creditor_id;
END;
$$;

-- B2: change the principal (exactly, then contained) and add to the interest,
-- folding the interest accrued until p_now into the interest column first.
-- Sets pending_account_update instead of announcing the change at once.
CREATE FUNCTION pyswpt_private.apply_account_change(
    INOUT p_account account,
    p_principal_delta numeric,
    p_interest_delta double precision,
    p_now timestamptz
)
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_new_principal numeric := p_account.principal::numeric + p_principal_delta;
BEGIN
    p_account.interest := (calc_account_balance(p_account, p_now) - p_account.principal)::double precision
        + p_interest_delta;
    p_account.principal := contain_principal(v_new_principal);
    IF p_account.principal <> v_new_principal THEN
        p_account.status_flags := with_overflown_flag(p_account.status_flags);
    END IF;
    p_account := touch_account(p_account, p_now);
    p_account.pending_account_update := true;
END;
$$;

-- B3: report a principal change to the account's owner with the next transfer
-- number. Root accounts and negligible incoming amounts are not reported; the
-- negligibility test is in single precision, as the reference's PL/pgSQL does.
CREATE FUNCTION pyswpt_private.emit_account_transfer(
    INOUT p_account account,
    p_coordinator_type text,
    p_other_creditor_id bigint,
    p_committed_at timestamptz,
    p_acquired_amount bigint,
    p_transfer_note_format text,
    p_transfer_note text,
    p_principal_after bigint,
    p_now timestamptz
)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    ASSERT p_acquired_amount <> 0, 'an account transfer must move a non-zero amount';
    IF p_account.creditor_id = 0
        OR (
            p_coordinator_type <> 'agent'
            AND p_acquired_amount > 0
            AND p_acquired_amount::real <= p_account.negligible_amount
        )
    THEN
        RETURN;
    END IF;

    INSERT INTO account_transfer_signal (
        debtor_id,
        creditor_id,
        creation_date,
        transfer_number,
        coordinator_type,
        committed_at,
        acquired_amount,
        other_creditor_id,
        transfer_note_format,
        transfer_note,
        principal,
        previous_transfer_number,
        inserted_at
    )
    VALUES (
        p_account.debtor_id,
        p_account.creditor_id,
        p_account.creation_date,
        p_account.last_transfer_number + 1,
        p_coordinator_type,
        p_committed_at,
        p_acquired_amount,
        p_other_creditor_id,
        p_transfer_note_format,
        p_transfer_note,
        p_principal_after,
        p_account.last_transfer_number,
        p_now
    );
    p_account.last_transfer_number := p_account.last_transfer_number + 1;
    p_account.last_transfer_committed_at := p_committed_at;
END;
$$;

-- B5: mark the account deleted; its principal, interest and locks are gone.
CREATE FUNCTION pyswpt_private.mark_account_deleted(INOUT p_account account, p_now timestamptz)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    p_account.principal := 0;
    p_account.interest := 0.0;
    p_account.total_locked_amount := 0;
    p_account.status_flags := with_deleted_flag(p_account.status_flags);
    p_account := touch_account(p_account, p_now);
    p_account := emit_account_update(p_account, p_now);
END;
$$;

-- B6: a payment between the debtor and a non-root account (interest, deletion).
-- The account changes now; the root account's counterpart travels as a
-- PendingBalanceChange, because the root account may live in another shard.
CREATE FUNCTION pyswpt_private.make_debtor_payment(
    INOUT p_account account,
    p_coordinator_type text,
    p_amount bigint,
    p_now timestamptz,
    p_transfer_note_format text DEFAULT '',
    p_transfer_note text DEFAULT ''
)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    ASSERT p_amount > -9223372036854775808, 'a debtor payment must be within ±(2^63-1)';
    IF p_amount = 0 OR p_account.creditor_id = 0 THEN
        RETURN;
    END IF;

    PERFORM emit_pending_balance_change(
        p_account.debtor_id,
        p_account.creditor_id,
        0,
        p_coordinator_type,
        p_transfer_note_format,
        p_transfer_note,
        p_now,
        -p_amount,
        p_now
    );
    p_account := emit_account_transfer(
        p_account,
        p_coordinator_type,
        0,
        p_now,
        p_amount,
        p_transfer_note_format,
        p_transfer_note,
        contain_principal(p_account.principal::numeric + p_amount),
        p_now
    );
    p_account := apply_account_change(
        p_account,
        p_amount,
        CASE WHEN p_coordinator_type = 'interest' THEN -p_amount::double precision ELSE 0.0 END,
        p_now
    );
END;
$$;

-- A principal change of (p_debtor_id, p_creditor_id), paid by or to
-- p_other_creditor_id. Normally an outbox row, which the flusher routes to the
-- shard that owns the account. When the caller gives its realm (SHARDING_REALM)
-- and the account is in it, the change is queued here at once, as the consumer
-- would queue the PendingBalanceChange: that message would only come back to
-- this shard's own queue, through the flusher, the broker and the consumer.
CREATE FUNCTION pyswpt_private.emit_pending_balance_change(
    p_debtor_id bigint,
    p_other_creditor_id bigint,
    p_creditor_id bigint,
    p_coordinator_type text,
    p_transfer_note_format text,
    p_transfer_note text,
    p_committed_at timestamptz,
    p_principal_delta bigint,
    p_now timestamptz,
    p_realm_mask bigint DEFAULT NULL,
    p_realm bigint DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    -- Without a realm is_in_realm is NULL: through the outbox.
    IF is_in_realm(p_debtor_id, p_creditor_id, p_realm_mask, p_realm) THEN
        -- The outbox's sequence, so that change ids stay unique per sender
        -- whichever way the change travels.
        PERFORM queue_balance_change(
            p_debtor_id,
            p_other_creditor_id,
            nextval('pending_balance_change_signal_change_id_seq'),
            p_creditor_id,
            p_coordinator_type,
            p_transfer_note_format,
            p_transfer_note,
            p_committed_at,
            p_principal_delta
        );
        RETURN;
    END IF;

    INSERT INTO pending_balance_change_signal (
        debtor_id,
        other_creditor_id,
        creditor_id,
        coordinator_type,
        transfer_note_format,
        transfer_note,
        committed_at,
        principal_delta,
        inserted_at
    )
    VALUES (
        p_debtor_id,
        p_other_creditor_id,
        p_creditor_id,
        p_coordinator_type,
        p_transfer_note_format,
        p_transfer_note,
        p_committed_at,
        p_principal_delta,
        p_now
    );
END;
$$;

-- current_balance (spec 02 §3.3) of an account row.
CREATE FUNCTION pyswpt_private.calc_account_balance(p_account account, p_now timestamptz)
RETURNS numeric
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN calc_current_balance(
    p_account.creditor_id,
    p_account.principal,
    p_account.interest,
    p_account.interest_rate,
    p_account.last_change_ts,
    p_now
);

-- B8: what the account can still lock: floor(balance) minus current locks, contained.
CREATE FUNCTION pyswpt_private.calc_available_amount(p_account account, p_now timestamptz)
RETURNS bigint
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN contain_principal(floor(calc_account_balance(p_account, p_now)) - p_account.total_locked_amount);

-- B7: how negative the balance may go. Zero for creditors; a root account may issue
-- down to -min(issuing limit, negligible amount). The negligible amount is rounded
-- to an integer (capped at 9.999e23 first), as the reference's PL/pgSQL does.
CREATE FUNCTION pyswpt_private.calc_min_balance(p_account account)
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_issuing_limit bigint;
BEGIN
    IF p_account.creditor_id <> 0 THEN
        RETURN 0;
    END IF;
    SELECT coalesce(c.issuing_limit, 9223372036854775807)
    INTO v_issuing_limit
    FROM parse_root_config(p_account.config_data) AS c;

    RETURN -least(
        v_issuing_limit,
        contain_principal(round(least(p_account.negligible_amount::double precision, 9.999e23)::numeric))
    );
END;
$$;
