-- Parked messages (issue 8): set aside what cannot be applied or published,
-- durably and at most once per message, bounded against a flooding peer.
-- The drivers park; operators list, replay and discard through `pyswpt parked`.

-- Parked messages for operators: what, whose, why, since when; not the bodies.
CREATE VIEW pyswpt_api.parked_messages AS
SELECT
    parked_id,
    source_kind,
    source_name,
    message_type,
    debtor_id,
    creditor_id,
    reason_code,
    reason,
    sqlstate,
    attempts,
    first_seen_at,
    last_seen_at,
    next_retry_at,
    routing_key,
    octet_length(body) AS body_bytes
FROM parked_message;

COMMENT ON VIEW pyswpt_api.parked_messages IS
    'Parked messages without their bodies; pyswpt parked show ID prints one whole.';

-- Park one message, or count it when its source and reason reached the cap.
-- The same message parked again (a redelivery after a crash) updates its row.
-- Returns 'parked', 'parked_again' or 'over_cap'.
CREATE FUNCTION pyswpt_api.park_message(
    p_source_kind text,
    p_source_name text,
    p_exchange text,
    p_routing_key text,
    p_message_type text,
    p_content_type text,
    p_headers jsonb,
    p_body bytea,
    p_row_data jsonb,
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_reason_code text,
    p_reason text,
    p_sqlstate text,
    p_attempts integer,
    p_next_retry_at timestamptz,
    p_max_per_reason integer,
    p_now timestamptz DEFAULT now()
)
RETURNS text
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_fingerprint bytea := sha256(
        convert_to(p_routing_key, 'UTF8') || '\x00'::bytea
        || coalesce(p_body, convert_to(p_row_data::text, 'UTF8'))
    );
    v_parked_count integer;
BEGIN
    UPDATE parked_message
    SET
        last_seen_at = p_now,
        attempts = greatest(attempts + 1, p_attempts),
        reason_code = p_reason_code,
        reason = p_reason,
        sqlstate = p_sqlstate,
        next_retry_at = p_next_retry_at
    WHERE source_kind = p_source_kind
        AND source_name = p_source_name
        AND fingerprint = v_fingerprint;
    IF FOUND THEN
        RETURN 'parked_again';
    END IF;

    SELECT count(*) INTO v_parked_count
    FROM (
        SELECT 1
        FROM parked_message
        WHERE source_name = p_source_name AND reason_code = p_reason_code
        LIMIT p_max_per_reason
    ) AS parked;
    IF v_parked_count >= p_max_per_reason THEN
        INSERT INTO parked_message_overflow AS o (
            source_name, reason_code, dropped_count, first_dropped_at, last_dropped_at
        )
        VALUES (p_source_name, p_reason_code, 1, p_now, p_now)
        ON CONFLICT (source_name, reason_code) DO UPDATE
        SET dropped_count = o.dropped_count + 1, last_dropped_at = p_now;
        RETURN 'over_cap';
    END IF;

    -- Two consumers parking the same redelivered message at once: one row wins.
    INSERT INTO parked_message (
        source_kind, source_name, exchange, routing_key, message_type, content_type,
        headers, body, row_data, debtor_id, creditor_id, reason_code, reason, sqlstate,
        attempts, first_seen_at, last_seen_at, next_retry_at, fingerprint
    )
    VALUES (
        p_source_kind, p_source_name, p_exchange, p_routing_key, p_message_type, p_content_type,
        p_headers, p_body, p_row_data, p_debtor_id, p_creditor_id, p_reason_code, p_reason, p_sqlstate,
        greatest(p_attempts, 1), p_now, p_now, p_next_retry_at, v_fingerprint
    )
    ON CONFLICT (source_kind, source_name, fingerprint) DO NOTHING;
    RETURN 'parked';
END;
$$;

-- Parked messages after p_after_id, oldest first, for listing (no bodies).
CREATE FUNCTION pyswpt_api.list_parked_messages(p_after_id bigint, p_max_count integer)
RETURNS SETOF pyswpt_api.parked_messages
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT *
    FROM pyswpt_api.parked_messages
    WHERE parked_id > p_after_id
    ORDER BY parked_id
    LIMIT p_max_count
$$;

-- One parked message, whole.
CREATE FUNCTION pyswpt_api.get_parked_message(p_parked_id bigint)
RETURNS SETOF parked_message
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT *
    FROM parked_message
    WHERE parked_id = p_parked_id
$$;

-- The parked messages to replay, locked in the caller's transaction, which
-- publishes them and then discards them (discard_parked_messages) before it commits.
CREATE FUNCTION pyswpt_api.lock_parked_messages(p_parked_ids bigint[])
RETURNS SETOF parked_message
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT *
    FROM parked_message
    WHERE parked_id = ANY (p_parked_ids)
    ORDER BY parked_id
    FOR UPDATE SKIP LOCKED
$$;

-- Forget parked messages; returns how many were there.
CREATE FUNCTION pyswpt_api.discard_parked_messages(p_parked_ids bigint[])
RETURNS integer
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH discarded AS (
        DELETE FROM parked_message
        WHERE parked_id = ANY (p_parked_ids)
        RETURNING 1
    )
    SELECT count(*)::integer FROM discarded
$$;

-- Parked outgoing messages of the given outbox tables whose retry is due, locked
-- for the flusher's transaction. Consumed messages (source_kind 'queue') are
-- never republished by a flusher, and a flusher retries only the tables it flushes.
CREATE FUNCTION pyswpt_api.take_due_parked_retries(
    p_source_names text[],
    p_max_count integer,
    p_now timestamptz DEFAULT now()
)
RETURNS SETOF parked_message
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT *
        FROM parked_message
        WHERE next_retry_at <= p_now
            AND source_kind = 'outbox'
            AND source_name = ANY (p_source_names)
            AND body IS NOT NULL
        ORDER BY next_retry_at
        LIMIT p_max_count
        FOR UPDATE SKIP LOCKED;
END;
$$;

-- A retry failed again: try later, twice as long after each failure, at most p_max_pause_seconds.
CREATE FUNCTION pyswpt_api.postpone_parked_retry(
    p_parked_id bigint,
    p_reason text,
    p_max_pause_seconds double precision,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    UPDATE parked_message
    SET
        attempts = attempts + 1,
        last_seen_at = p_now,
        reason = p_reason,
        next_retry_at = p_now + make_interval(
            secs => least(power(2.0, least(attempts, 30))::double precision, p_max_pause_seconds)
        )
    WHERE parked_id = p_parked_id
$$;
