-- Settings a non-root account copies from its debtor's root config: the interest
-- rate (spec 02 §2.7) and the debtor info (§2.8), set by the ChangeInterestRate
-- and UpdateDebtorInfo chores and by the initialisation of a new account (§2.3).

-- ChangeInterestRate (spec 02 §2.7): move the account to a new rate, at most once
-- per p_message_max_delay_seconds + 1 day, so that every client hears of each
-- rate before the next one. Stale requests (ts older than a day) are ignored.
CREATE FUNCTION pyswpt_api.change_interest_rate(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_interest_rate double precision,
    p_ts timestamptz,
    p_message_max_delay_seconds double precision,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    c_seconds_in_day CONSTANT double precision := 86400.0;
    v_rate real;
    v_account account;
BEGIN
    IF p_creditor_id = 0
        OR seconds_between(p_ts, p_now) > c_seconds_in_day
        OR p_interest_rate = 'NaN'
    THEN
        RETURN;
    END IF;
    -- Compared and stored in single precision, like the column: comparing the
    -- REAL with the double (3.567::real <> 3.567) would "change" it every time.
    v_rate := interest_rate_as_stored(p_interest_rate);

    v_account := lock_existing_account(p_debtor_id, p_creditor_id);
    IF v_account.debtor_id IS NULL
        OR v_account.interest_rate = v_rate
        OR seconds_between(v_account.last_interest_rate_change_ts, p_now)
            < p_message_max_delay_seconds + c_seconds_in_day
    THEN
        RETURN;
    END IF;

    -- The balance formula applies one rate from last_change_ts on: freeze what
    -- accrued under the old rate, and restart accrual now (touch_account).
    v_account.interest := (calc_account_balance(v_account, p_now) - v_account.principal)::double precision;
    v_account.previous_interest_rate := v_account.interest_rate;
    v_account.interest_rate := v_rate;
    v_account.last_interest_rate_change_ts := p_now;
    v_account := touch_account(v_account, p_now);
    v_account := emit_account_update(v_account, p_now);
    PERFORM save_account(v_account);
END;
$$;

-- UpdateDebtorInfo (spec 02 §2.8): store the debtor info triple if it differs.
-- NULL means absent; the chores driver maps the message's '' to NULL, the
-- initialisation passes the root config's values as they are (as the reference).
CREATE FUNCTION pyswpt_api.update_debtor_info(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_iri text,
    p_content_type text,
    p_sha256 bytea,
    p_ts timestamptz,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    v_account account;
BEGIN
    IF p_creditor_id = 0 OR seconds_between(p_ts, p_now) > 86400.0 THEN
        RETURN;
    END IF;

    v_account := lock_existing_account(p_debtor_id, p_creditor_id);
    IF v_account.debtor_id IS NULL
        OR (v_account.debtor_info_iri, v_account.debtor_info_content_type, v_account.debtor_info_sha256)
            IS NOT DISTINCT FROM (p_iri, p_content_type, p_sha256)
    THEN
        RETURN;
    END IF;

    -- A fix: the reference only moves last_change_ts here, which drops the interest
    -- accrued since the previous change (interest accrues from last_change_ts).
    -- Folding it into the interest column first keeps the balance unchanged.
    v_account.debtor_info_iri := p_iri;
    v_account.debtor_info_content_type := p_content_type;
    v_account.debtor_info_sha256 := p_sha256;
    v_account := apply_account_change(v_account, 0, 0.0, p_now);
    v_account := emit_account_update(v_account, p_now);
    PERFORM save_account(v_account);
    PERFORM save_account_debtor_info(v_account);
END;
$$;

-- Initialisation of a new or resurrected non-root account (spec 02 §2.3 step 2):
-- the consumer calls this after configure_account returned true and it fetched
-- the debtor's root config_data (NULL when none was obtained: nothing happens,
-- and the accounts scanner repairs rate and info later; likewise for an invalid
-- one). The rate change and the debtor-info update run here in the caller's one
-- transaction instead of the reference's two: each emits its own AccountUpdate
-- all the same, and a failure rolls back both so that a retry redoes both.
CREATE FUNCTION pyswpt_api.initialize_account(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_root_config_data text,
    p_message_max_delay_seconds double precision,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    v_config record;
BEGIN
    SELECT *
    INTO v_config
    FROM parse_root_config(p_root_config_data);
    IF NOT v_config.is_valid THEN
        RETURN;
    END IF;
    PERFORM pyswpt_api.change_interest_rate(
        p_debtor_id,
        p_creditor_id,
        v_config.interest_rate_target,
        p_now,
        p_message_max_delay_seconds,
        p_now
    );
    PERFORM pyswpt_api.update_debtor_info(
        p_debtor_id,
        p_creditor_id,
        v_config.info_iri,
        v_config.info_content_type,
        v_config.info_sha256,
        p_now,
        p_now
    );
END;
$$;

-- Store the debtor-info columns of a locked account (save_account leaves them alone).
CREATE FUNCTION pyswpt_private.save_account_debtor_info(p_account account)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    UPDATE account
    SET
        debtor_info_iri = p_account.debtor_info_iri,
        debtor_info_content_type = p_account.debtor_info_content_type,
        debtor_info_sha256 = p_account.debtor_info_sha256
    WHERE debtor_id = p_account.debtor_id
        AND creditor_id = p_account.creditor_id
$$;

-- The rate an account stores for a requested one (spec 02 §2.7): clamped to
-- [-50, 100] and rounded to single precision like the column. A rate below
-- 1e-40 in magnitude is zero: a `real` cannot hold the smallest ones, and the
-- cast would raise underflow (an endless redelivery of the chore in the
-- reference). The accounts scanner compares stored rates with this too, so it
-- never asks for a change that change_interest_rate would not make.
CREATE FUNCTION pyswpt_private.interest_rate_as_stored(p_interest_rate double precision)
RETURNS real
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT CASE
        WHEN abs(p_interest_rate) < 1e-40 THEN 0.0
        ELSE least(greatest(p_interest_rate, -50.0), 100.0)
    END::real
$$;
