-- Account configuration (spec 02 §2.2, spec 01 §1.2) and the RootConfigData
-- parser (spec 02 B9, spec 01 §6.4) that validates a root account's config_data
-- and that the root minimum balance (B7) and the initialisation read.

-- ConfigureAccount (spec 02 §2.2): apply a newer configuration, creating or
-- resurrecting the account, or answer an invalid one with RejectedConfig.
-- Returns needs_initialisation: true when a non-root account was created or
-- resurrected, so that the caller fetches the root config and initialises the
-- rate and debtor info (spec 02 §2.3, see initialize_account).
CREATE FUNCTION pyswpt_api.configure_account(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_ts timestamptz,
    p_seqnum integer,
    p_negligible_amount double precision,
    p_config_flags integer,
    p_config_data text,
    p_max_delay_seconds double precision,
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
    v_is_new boolean;
    v_needs_initialisation boolean := false;
BEGIN
    -- A deleted row is locked too: a newer config resurrects it.
    v_account := (
        SELECT locked
        FROM account AS locked
        WHERE locked.debtor_id = p_debtor_id
            AND locked.creditor_id = p_creditor_id
        FOR NO KEY UPDATE
    );
    v_is_new := v_account.debtor_id IS NULL;

    IF v_is_new THEN
        -- Only a missing account has an age limit: a wandering old message must
        -- not re-create a purged account. A ts in the future always passes.
        IF seconds_between(p_ts, p_now) > p_max_delay_seconds THEN
            RETURN false;
        END IF;
    ELSIF NOT is_later_config(p_ts, p_seqnum, v_account.last_config_ts, v_account.last_config_seqnum) THEN
        RETURN false;
    END IF;

    IF NOT is_valid_account_config(p_creditor_id, p_negligible_amount, p_config_data) THEN
        PERFORM emit_rejected_config(
            p_debtor_id,
            p_creditor_id,
            p_ts,
            p_seqnum,
            p_negligible_amount,
            p_config_flags,
            p_config_data,
            p_now
        );
        RETURN false;
    END IF;

    IF v_is_new THEN
        -- No AccountUpdate for the bare creation (unlike B4): the one below
        -- announces the account with its configuration.
        v_account := new_account(p_debtor_id, p_creditor_id, p_now);
        v_needs_initialisation := p_creditor_id <> 0;
    ELSIF account_is_deleted(v_account.status_flags) THEN
        -- Principal, interest and locks are already zero; creation date,
        -- numbers, rates and debtor info are kept.
        v_account.status_flags := without_deleted_flag(v_account.status_flags);
        v_needs_initialisation := p_creditor_id <> 0;
    END IF;

    v_account.negligible_amount := p_negligible_amount;
    v_account.config_flags := p_config_flags;
    v_account.config_data := p_config_data;
    v_account.last_config_ts := p_ts;
    v_account.last_config_seqnum := p_seqnum;
    v_account := apply_account_change(v_account, 0, 0.0, p_now);
    v_account := emit_account_update(v_account, p_now);

    IF v_is_new THEN
        PERFORM insert_account(v_account);
    ELSE
        PERFORM save_account(v_account);
        PERFORM save_account_config(v_account);
    END IF;
    RETURN v_needs_initialisation;
END;
$$;

-- B9 (spec 02 §2.1, spec 01 §6.4): parse a root account's config_data.
-- '' gives the defaults; anything not accepted gives is_valid = false and NULLs,
-- never an exception. Follows the reference's parser, quirks included: unknown
-- properties are rejected at both levels, `type` is optional but exact, numeric
-- strings are accepted, a fractional limit is truncated, an empty IRI is accepted,
-- and duplicate keys resolve to the last value.
CREATE FUNCTION pyswpt_private.parse_root_config(
    p_config_data text,
    OUT is_valid boolean,
    OUT interest_rate_target double precision,
    OUT issuing_limit bigint,
    OUT info_iri text,
    OUT info_sha256 bytea,
    OUT info_content_type text
)
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_document json;
    v_info json;
    v_rate double precision;
    v_limit bigint;
    v_iri text;
    v_content_type text;
    v_sha256_hex text;
BEGIN
    is_valid := false;
    IF p_config_data IS NULL THEN
        RETURN;
    END IF;
    IF p_config_data = '' THEN
        is_valid := true;
        interest_rate_target := 0.0;
        issuing_limit := 9223372036854775807;
        RETURN;
    END IF;

    BEGIN
        -- The json type (not jsonb) keeps each number's text, which tells an
        -- integer literal from a float one, as the reference's JSON parser does;
        -- its operators, like the reference, take the last of duplicate keys.
        v_document := p_config_data::json;
        IF json_typeof(v_document) <> 'object'
            OR NOT json_keys_are_among(v_document, ARRAY['type', 'rate', 'limit', 'info'])
            OR NOT json_string_is_absent_or(v_document -> 'type', 'RootConfigData')
        THEN
            RETURN;
        END IF;
        v_rate := coalesce(json_to_float(v_document -> 'rate'), 0.0);
        v_limit := coalesce(json_to_lenient_integer(v_document -> 'limit'), 9223372036854775807);
        v_info := v_document -> 'info';

        IF v_info IS NOT NULL THEN
            IF json_typeof(v_info) <> 'object'
                OR NOT json_keys_are_among(v_info, ARRAY['type', 'iri', 'contentType', 'sha256'])
                OR NOT json_string_is_absent_or(v_info -> 'type', 'DebtorInfo')
                OR NOT json_is_string(v_info -> 'iri', false)
                OR NOT json_is_string(v_info -> 'contentType', true)
                OR NOT json_is_string(v_info -> 'sha256', true)
            THEN
                RETURN;
            END IF;
            v_iri := v_info ->> 'iri';
            v_content_type := v_info ->> 'contentType';
            v_sha256_hex := v_info ->> 'sha256';
        END IF;
    EXCEPTION
        -- Malformed JSON, a string escape that text cannot hold, a number out of
        -- range or not a number at all: class 22 errors, and all mean "invalid".
        WHEN data_exception THEN
            RETURN;
    END;

    -- Rate in [-50, 100], limit >= 0 (the upper bounds were enforced by bigint),
    -- IRI <= 200 characters, content type <= 100 ASCII characters, sha256 exactly
    -- 64 upper-case hex digits. Absent info fields are NULL and fail no test here.
    IF NOT v_rate BETWEEN -50.0 AND 100.0
        OR v_limit < 0
        OR char_length(v_iri) > 200
        OR char_length(v_content_type) > 100
        OR v_content_type !~ '^[\u0001-\u007f]*$'
        OR v_sha256_hex !~ '^[0-9A-F]{64}$'
    THEN
        RETURN;
    END IF;

    is_valid := true;
    -- A fix: a rate that every account would store as zero is zero here too,
    -- so that nothing downstream casts 1e-46 to `real` (underflow, 22003).
    interest_rate_target := CASE WHEN interest_rate_as_stored(v_rate) = 0.0 THEN 0.0 ELSE v_rate END;
    issuing_limit := v_limit;
    info_iri := v_iri;
    info_content_type := v_content_type;
    info_sha256 := decode(v_sha256_hex, 'hex');
END;
$$;

-- Whether (p_ts, p_seqnum) follows the last applied config: a later ts, or the
-- same ts (exactly) and a later seqnum in 32-bit wrap-around order (spec 02 §3.9).
CREATE FUNCTION pyswpt_private.is_later_config(
    p_ts timestamptz,
    p_seqnum integer,
    p_last_config_ts timestamptz,
    p_last_config_seqnum integer
)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT p_ts > p_last_config_ts
        OR (p_ts = p_last_config_ts AND is_later_seqnum(p_seqnum, p_last_config_seqnum))
$$;

-- Validity of a configuration (spec 02 §2.2 step 4): a non-negative negligible
-- amount, and config_data empty, or valid RootConfigData on a root account.
-- NaN is refused explicitly because PostgreSQL orders it above every number.
CREATE FUNCTION pyswpt_private.is_valid_account_config(
    p_creditor_id bigint,
    p_negligible_amount double precision,
    p_config_data text
)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT coalesce(
        p_negligible_amount >= 0.0
            AND p_negligible_amount <> 'NaN'
            AND (
                p_config_data = ''
                OR (p_creditor_id = 0 AND (parse_root_config(p_config_data)).is_valid)
            ),
        false
    )
$$;

-- Outbox row for RejectedConfig (spec 01 §1.6): echoes the message, with the
-- negligible amount rounded to single precision as the reference stores it.
CREATE FUNCTION pyswpt_private.emit_rejected_config(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_config_ts timestamptz,
    p_config_seqnum integer,
    p_negligible_amount double precision,
    p_config_flags integer,
    p_config_data text,
    p_now timestamptz
)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    INSERT INTO rejected_config_signal (
        debtor_id,
        creditor_id,
        config_ts,
        config_seqnum,
        config_flags,
        config_data,
        negligible_amount,
        rejection_code,
        inserted_at
    )
    VALUES (
        p_debtor_id,
        p_creditor_id,
        p_config_ts,
        p_config_seqnum,
        p_config_flags,
        p_config_data,
        p_negligible_amount::real,
        'INVALID_CONFIGURATION',
        p_now
    )
$$;

-- Store the configuration columns of a locked account, which save_account leaves
-- alone so that a root account's out-of-line config_data is rewritten only here.
CREATE FUNCTION pyswpt_private.save_account_config(p_account account)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    UPDATE account
    SET
        negligible_amount = p_account.negligible_amount,
        config_flags = p_account.config_flags,
        config_data = p_account.config_data,
        last_config_ts = p_account.last_config_ts,
        last_config_seqnum = p_account.last_config_seqnum
    WHERE debtor_id = p_account.debtor_id
        AND creditor_id = p_account.creditor_id
$$;

-- Whether every key of a JSON object is one of p_allowed.
CREATE FUNCTION pyswpt_private.json_keys_are_among(p_object json, p_allowed text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT NOT EXISTS (
        SELECT 1
        FROM json_object_keys(p_object) AS k (key)
        WHERE k.key <> ALL (p_allowed)
    )
$$;

-- Whether an optional `type` property is absent or exactly the expected string
-- (no version suffix, no null).
CREATE FUNCTION pyswpt_private.json_string_is_absent_or(p_value json, p_expected text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT p_value IS NULL
        OR (json_typeof(p_value) = 'string' AND (p_value #>> '{}') = p_expected)
$$;

-- Whether a property is a JSON string; an absent one passes only if optional.
CREATE FUNCTION pyswpt_private.json_is_string(p_value json, p_is_optional boolean)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT CASE
        WHEN p_value IS NULL THEN p_is_optional
        ELSE json_typeof(p_value) = 'string'
    END
$$;

-- A float field as the reference reads it: a JSON number or a numeric string,
-- rounded to double precision; NULL when absent. Anything else (booleans,
-- null, other strings) and non-finite values raise invalid_text_representation
-- or numeric_value_out_of_range, which the caller treats as "invalid".
CREATE FUNCTION pyswpt_private.json_to_float(p_value json)
RETURNS double precision
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_exact numeric := json_to_numeric(p_value, true);
BEGIN
    IF v_exact IS NULL THEN
        RETURN NULL;
    END IF;
    -- float() rounds what it cannot represent to 0.0; PostgreSQL would raise.
    IF abs(v_exact) < 1e-300 THEN
        RETURN 0.0;
    END IF;
    RETURN v_exact::double precision;
END;
$$;

-- An integer field as the reference's lenient schema reads it: a JSON integer
-- exactly, a JSON float rounded to double then truncated toward zero, or a
-- decimal integer string; NULL when absent. Values beyond bigint raise
-- numeric_value_out_of_range, which the caller treats as "invalid".
CREATE FUNCTION pyswpt_private.json_to_lenient_integer(p_value json)
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_exact numeric := json_to_numeric(p_value, false);
BEGIN
    IF v_exact IS NULL THEN
        RETURN NULL;
    END IF;
    IF json_typeof(p_value) = 'number' AND (p_value #>> '{}') !~ '^-?[0-9]+$' THEN
        -- A float literal: int(float(text)). |x| < 0.5 cannot round to ±1.0.
        IF abs(v_exact) < 0.5 THEN
            RETURN 0;
        END IF;
        RETURN trunc(v_exact::double precision)::bigint;
    END IF;
    RETURN v_exact::bigint;
END;
$$;

-- The exact value of a JSON number, or of a numeric string in the syntax that
-- Python's float() (p_float_syntax) or int() accepts: surrounding whitespace,
-- a sign, and underscores between digits. NULL when absent; anything else
-- raises invalid_text_representation.
CREATE FUNCTION pyswpt_private.json_to_numeric(p_value json, p_float_syntax boolean)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    c_digits CONSTANT text := '[0-9](_?[0-9])*';
    c_space CONSTANT text := '[ \t\n\r\f\v]*';
    v_text text;
    v_pattern text;
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    v_text := p_value #>> '{}';
    CASE json_typeof(p_value)
        WHEN 'number' THEN
            RETURN v_text::numeric;
        WHEN 'string' THEN
            IF p_float_syntax THEN
                v_pattern := '^' || c_space || '[+-]?(' || c_digits || '(\.(' || c_digits || ')?)?|\.'
                    || c_digits || ')([eE][+-]?' || c_digits || ')?' || c_space || '$';
            ELSE
                v_pattern := '^' || c_space || '[+-]?' || c_digits || c_space || '$';
            END IF;
            IF v_text ~ v_pattern THEN
                RETURN replace(btrim(v_text, E' \t\n\r\f\v'), '_', '')::numeric;
            END IF;
        ELSE
            NULL;
    END CASE;
    RAISE EXCEPTION 'not a number: %', p_value
        USING ERRCODE = 'invalid_text_representation';
END;
$$;
