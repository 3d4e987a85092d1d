-- Account maintenance (spec 02 §2.9, §2.10, §2.16): interest capitalization
-- and the deletion attempt, which the chores consumer runs, and the direct
-- debtor payment. The chores act on an existing (not deleted) account only,
-- under its lock, and re-check everything the scanner saw, so a chore
-- delivered twice or late is harmless.

-- CapitalizeInterest (spec 02 §2.9): turn the accrued interest, floored to an
-- integer, into principal paid by the debtor (B6, coordinator type `interest`),
-- at most once per p_min_capitalization_interval_seconds. Returns the amount
-- capitalized; 0 when nothing changed (missing, too soon, or nothing accrued).
CREATE FUNCTION pyswpt_api.capitalize_interest(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_min_capitalization_interval_seconds double precision,
    p_now timestamptz DEFAULT now()
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    v_account account;
    v_amount bigint;
BEGIN
    v_account := lock_existing_account(p_debtor_id, p_creditor_id);
    IF v_account.debtor_id IS NULL THEN
        RETURN 0;
    END IF;
    IF v_account.last_interest_capitalization_ts
        > p_now - make_interval(secs => p_min_capitalization_interval_seconds)
    THEN
        RETURN 0;
    END IF;

    -- Always 0 for a root account, whose balance is its principal.
    v_amount := calc_accrued_interest_amount(v_account, p_now);
    IF v_amount = 0 THEN
        RETURN 0;
    END IF;

    v_account.last_interest_capitalization_ts := p_now;
    v_account := make_debtor_payment(v_account, 'interest', v_amount, p_now);
    PERFORM save_account(v_account);
    RETURN v_amount;
END;
$$;

-- TryToDeleteAccount (spec 02 §2.10): delete an account that is scheduled for
-- deletion, has no prepared transfers and a negligible balance (a root
-- account: a zero principal). A remaining principal goes back to the debtor
-- (B6, coordinator type `delete`); accrued interest is dropped. Returns
-- whether the account was deleted. Every attempt on an existing account is
-- recorded in last_deletion_attempt_ts, successful or not.
CREATE FUNCTION pyswpt_api.try_to_delete_account(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    v_account account;
    v_is_deletable boolean;
BEGIN
    v_account := lock_existing_account(p_debtor_id, p_creditor_id);
    IF v_account.debtor_id IS NULL THEN
        RETURN false;
    END IF;

    v_account.last_deletion_attempt_ts := p_now;
    v_is_deletable := is_deletable_account(v_account, p_now);
    IF v_is_deletable THEN
        IF v_account.principal <> 0 THEN
            v_account := make_debtor_payment(v_account, 'delete', -v_account.principal, p_now);
        END IF;
        v_account := mark_account_deleted(v_account, p_now);
    END IF;
    PERFORM save_account(v_account);
    RETURN v_is_deletable;
END;
$$;

-- Direct debtor payment (spec 02 §2.16): B4 then B6. Not reachable from any
-- message; for tests and internal tools. The `direct` and `agent` coordinator
-- types belong to real transfers between accounts and are refused.
CREATE FUNCTION pyswpt_private.make_direct_debtor_payment(
    p_coordinator_type text,
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_amount bigint,
    p_transfer_note_format text DEFAULT '',
    p_transfer_note text DEFAULT '',
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_account account;
BEGIN
    IF p_coordinator_type IN ('direct', 'agent') THEN
        RAISE EXCEPTION 'a debtor payment can not have coordinator type %', p_coordinator_type
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_amount = -9223372036854775808 THEN
        RAISE EXCEPTION 'a debtor payment must be within ±(2^63-1)'
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;

    v_account := lock_or_create_account(p_debtor_id, p_creditor_id, p_now);
    v_account := make_debtor_payment(
        v_account,
        p_coordinator_type,
        p_amount,
        p_now,
        p_transfer_note_format,
        p_transfer_note
    );
    PERFORM save_account(v_account);
END;
$$;

-- Helpers below, each before its callers: a SQL function's body is checked
-- when it is created.

-- contain(floor(current_balance - principal)) of spec 02 §2.9 and §3.8: the
-- accrued interest as a whole amount, floored (so -409.67 gives -410).
CREATE FUNCTION pyswpt_private.calc_accrued_interest_amount(p_account account, p_now timestamptz)
RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT contain_principal(floor(calc_account_balance(p_account, p_now) - p_account.principal))
$$;

-- The balance condition shared by the deletion attempt and the scanner's
-- TryToDeleteAccount chore (spec 02 §2.10, §4.4 step 4).
CREATE FUNCTION pyswpt_private.has_negligible_balance(p_account account, p_now timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT CASE
        WHEN p_account.creditor_id = 0 THEN p_account.principal = 0
        ELSE calc_account_balance(p_account, p_now)
            <= greatest(p_account.negligible_amount::double precision, 2.0)::numeric
    END
$$;

-- Whether an account may be deleted now (spec 02 §2.10 step 3): scheduled for
-- deletion, no prepared transfers, and a negligible balance. Any balance up to
-- 2.0 counts as negligible, so every negative balance does; a root account
-- needs a principal of exactly 0, since its balance is what it has issued.
CREATE FUNCTION pyswpt_private.is_deletable_account(p_account account, p_now timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT config_is_scheduled_for_deletion(p_account.config_flags)
        AND p_account.pending_transfers_count = 0
        AND has_negligible_balance(p_account, p_now)
$$;
