-- Ledger arithmetic (spec 02, section 3): containment, sequence numbers,
-- interest growth, current balance and due interest. Pure functions only.
--
-- The small ones are SQL functions with a SQL-standard body, like the flag
-- helpers of 05_flags.sql: bound when created, so they need no SET
-- search_path, and PostgreSQL inlines them into the calling expression. A
-- SQL function with SET search_path is never inlined: it is parsed and
-- planned again in every transaction that calls it, which made these the
-- costliest functions of a transfer (benchmarks/end_to_end.py --sql-profile).
-- They are not STRICT where their body holds a CASE, greatest() or least():
-- PostgreSQL inlines a STRICT function only when every construct in its body
-- is strict. A NULL argument still gives NULL, through the CASE, or through
-- an explicit test where greatest() and least() would skip it.

-- contain(x) of spec 02 §3.6: clamps an exact amount into bigint, never MIN_INT64.
CREATE FUNCTION pyswpt_private.contain_principal(p_value numeric)
RETURNS bigint
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN p_value <= -9223372036854775808 THEN -9223372036854775807
    WHEN p_value > 9223372036854775807 THEN 9223372036854775807
    ELSE p_value::bigint
END;

-- wrap_increment of spec 02 §3.9: the next 32-bit sequence number.
CREATE FUNCTION pyswpt_private.wrap_increment_seqnum(p_seqnum integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_seqnum = 2147483647 THEN -2147483648 ELSE p_seqnum + 1 END;

-- later(a, b) of spec 02 §3.9: a follows b in 32-bit wrap-around order.
CREATE FUNCTION pyswpt_private.is_later_seqnum(p_a integer, p_b integer)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN (((p_a::bigint - p_b::bigint) % 4294967296 + 4294967296) % 4294967296) BETWEEN 1 AND 2147483647;

-- calc_k of spec 02 §3.2: per-second growth constant of an annual rate in percent.
CREATE FUNCTION pyswpt_private.calc_k(p_interest_rate double precision)
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN ln(1.0 + p_interest_rate / 100.0) / 31557600.0;

-- Seconds from p_start to p_end (negative when p_end is earlier), microsecond resolution.
CREATE FUNCTION pyswpt_private.seconds_between(p_start timestamptz, p_end timestamptz)
RETURNS double precision
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN extract(EPOCH FROM (p_end - p_start))::double precision;

-- The balance current_balance (spec 02 §3.3) grows from: principal plus interest,
-- each clamped to ±4.999e23, at the 8 decimals of numeric(32,8), so that the
-- growth below cannot overflow it. For calc_current_balance only, which tests
-- for NULLs first: greatest() and least() skip a NULL argument.
CREATE FUNCTION pyswpt_private.calc_clamped_balance(p_principal bigint, p_interest double precision)
RETURNS numeric
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN (
    greatest(-4.999e23, least(p_principal::numeric, 4.999e23))
    + greatest(-4.999e23, least(p_interest, 4.999e23))::numeric
)::numeric(32, 8);

-- current_balance of spec 02 §3.3: principal plus interest grown since p_last_change_ts.
-- Root accounts hold exactly their principal; non-positive balances do not grow;
-- the result is capped at 9.999e23, as the reference's PL/pgSQL does.
CREATE FUNCTION pyswpt_private.calc_current_balance(
    p_creditor_id bigint,
    p_principal bigint,
    p_interest double precision,
    p_interest_rate real,
    p_last_change_ts timestamptz,
    p_now timestamptz
)
RETURNS numeric
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN num_nulls(p_creditor_id, p_principal, p_interest, p_interest_rate, p_last_change_ts, p_now) > 0
        THEN NULL
    WHEN p_creditor_id = 0
        THEN p_principal::numeric
    WHEN calc_clamped_balance(p_principal, p_interest) > 0
        THEN least(
            calc_clamped_balance(p_principal, p_interest)
            * exp(calc_k(p_interest_rate) * greatest(0.0, seconds_between(p_last_change_ts, p_now)))::numeric,
            9.999e23
        )::numeric(32, 8)
    ELSE calc_clamped_balance(p_principal, p_interest)
END;

-- due_interest of spec 02 §3.4: interest an amount earns from p_due_ts to p_now,
-- across at most one rate change (previous rate before p_rate_change_ts, current after).
CREATE FUNCTION pyswpt_private.calc_due_interest(
    p_amount bigint,
    p_due_ts timestamptz,
    p_previous_interest_rate real,
    p_interest_rate real,
    p_rate_change_ts timestamptz,
    p_now timestamptz
)
RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
DECLARE
    v_end timestamptz := greatest(p_due_ts, p_now);
    v_change timestamptz := least(p_rate_change_ts, v_end);
    v_total_seconds double precision := seconds_between(p_due_ts, v_end);
    v_previous_seconds double precision := greatest(0.0, seconds_between(p_due_ts, v_change));
    v_current_seconds double precision := least(seconds_between(v_change, v_end), v_total_seconds);
BEGIN
    RETURN p_amount::double precision * (
        exp(
            calc_k(p_previous_interest_rate) * v_previous_seconds
            + calc_k(p_interest_rate) * v_current_seconds
        ) - 1.0
    );
END;
$$;

-- Days from 1970-01-01 to a date; transfer ids of an incarnation start at this << 40.
CREATE FUNCTION pyswpt_private.days_since_epoch(p_date date)
RETURNS bigint
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN (p_date - date '1970-01-01')::bigint;
