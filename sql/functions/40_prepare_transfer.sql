-- PrepareTransfer, the first phase of a transfer (spec 02 §2.4, spec 01 §1.3):
-- the intake queues the request (or rejects an unreachable recipient at once),
-- and the batch processor locks the sender account once, serves every queued
-- request of that sender, and emits one PreparedTransfer or RejectedTransfer
-- per request. The consumer's intake serves a request at once instead, in its
-- own transaction, when the sender's account can be had at once
-- (try_to_prepare_at_once).
--
-- Transfer status codes (spec 01 §0.2) produced here: SENDER_IS_UNREACHABLE,
-- RECIPIENT_IS_UNREACHABLE, TOO_MANY_TRANSFERS, RECIPIENT_SAME_AS_SENDER,
-- NEWER_INTEREST_RATE, INSUFFICIENT_AVAILABLE_AMOUNT; 'OK' means "prepare".
--
-- Helpers are PL/pgSQL even when one SQL statement would do: SET search_path keeps
-- a SQL function from being inlined, and then it is re-planned on every call,
-- while PL/pgSQL caches its plans for the session.

-- Intake of one PrepareTransfer message (spec 02 §2.4 intake, steps 4-5). The driver
-- parses `recipient` (NULL when unparsable) and passes p_recipient_reachable when it
-- has decided reachability itself (agent rule, or the fetch API for another shard);
-- NULL means the recipient lives in this shard and B10 decides here. An unreachable
-- recipient is rejected before the sender is looked at. Given
-- p_commit_period_seconds (the consumer gives it), the request is served at once
-- when its sender's account is free (try_to_prepare_at_once); otherwise, and
-- without it, it is queued and the intake takes no account lock.
-- Returns true when the request was queued, false when it was answered at once.
CREATE FUNCTION pyswpt_api.enqueue_transfer_request(
    p_debtor_id bigint,
    p_sender_creditor_id bigint,
    p_coordinator_type text,
    p_coordinator_id bigint,
    p_coordinator_request_id bigint,
    p_min_locked_amount bigint,
    p_max_locked_amount bigint,
    p_recipient_creditor_id bigint,
    p_final_interest_rate_ts timestamptz,
    p_max_commit_delay_seconds integer,
    p_ts timestamptz,
    p_recipient_reachable boolean DEFAULT NULL,
    p_now timestamptz DEFAULT now(),
    p_commit_period_seconds integer DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    -- T∞ of spec 01 §0.2: the latest instant an SMP date-time can express.
    c_latest_deadline CONSTANT timestamptz := TIMESTAMPTZ '9999-12-31 23:59:59+00';
    v_request transfer_request;
BEGIN
    IF p_recipient_creditor_id IS NULL
        OR NOT coalesce(p_recipient_reachable, account_is_reachable(p_debtor_id, p_recipient_creditor_id))
    THEN
        PERFORM reject_transfer(
            p_debtor_id,
            p_sender_creditor_id,
            p_coordinator_type,
            p_coordinator_id,
            p_coordinator_request_id,
            'RECIPIENT_IS_UNREACHABLE',
            0,
            p_now
        );
        RETURN false;
    END IF;

    v_request.debtor_id := p_debtor_id;
    v_request.sender_creditor_id := p_sender_creditor_id;
    v_request.coordinator_type := p_coordinator_type;
    v_request.coordinator_id := p_coordinator_id;
    v_request.coordinator_request_id := p_coordinator_request_id;
    v_request.min_locked_amount := p_min_locked_amount;
    v_request.max_locked_amount := p_max_locked_amount;
    -- A fix: the reference computes ts + max_commit_delay with Python datetimes,
    -- which overflow past year 9999, so such a message was redelivered forever.
    -- The deadline is capped at T∞ instead, which a message can still carry.
    v_request.deadline := least(p_ts + make_interval(secs => p_max_commit_delay_seconds), c_latest_deadline);
    v_request.recipient_creditor_id := p_recipient_creditor_id;
    v_request.final_interest_rate_ts := p_final_interest_rate_ts;

    IF p_commit_period_seconds IS NOT NULL
        AND try_to_prepare_at_once(v_request, p_commit_period_seconds, p_now)
    THEN
        RETURN false;
    END IF;

    INSERT INTO transfer_request (
        debtor_id,
        sender_creditor_id,
        coordinator_type,
        coordinator_id,
        coordinator_request_id,
        min_locked_amount,
        max_locked_amount,
        deadline,
        recipient_creditor_id,
        final_interest_rate_ts
    )
    VALUES (
        v_request.debtor_id,
        v_request.sender_creditor_id,
        v_request.coordinator_type,
        v_request.coordinator_id,
        v_request.coordinator_request_id,
        v_request.min_locked_amount,
        v_request.max_locked_amount,
        v_request.deadline,
        v_request.recipient_creditor_id,
        v_request.final_interest_rate_ts
    );
    RETURN true;
END;
$$;

-- Serve a PrepareTransfer in the intake's transaction, instead of queueing it
-- for the transfer_requests stage, when its sender's account can be had at
-- once: no request of the sender that this transaction sees is queued (those
-- keep their place before it), and no other transaction holds the account or
-- changed it since this one began (at REPEATABLE READ that would fail the
-- lock). The request is then served as the stage would serve a batch of one,
-- a missing or deleted sender included. Returns whether it was served; when
-- not, nothing of the attempt is left and the caller queues the request.
--
-- A consumer's window locks several accounts this way, where spec 02 §2.0 says
-- one per transaction. No deadlock can come of it: these locks are taken with
-- NOWAIT, nothing in the attempt waits for a row (the sender's outbox and
-- prepared_transfer rows are written only under its lock), and the consumer
-- applies a window's PrepareTransfers after its other messages, so that the
-- window waits for nothing once it holds such a lock. The attempt is a block
-- with its own subtransaction, which holds the lock and writes the rows (a row
-- locked by a subtransaction and updated by its parent would need a
-- MultiXact); the transaction's attempts are bounded (take_at_once_attempts),
-- and the rest are queued. Any other error of the attempt ends it too: the
-- request is queued, and the stage meets the error with the sender's account
-- alone, as before.
CREATE FUNCTION pyswpt_private.try_to_prepare_at_once(
    p_request transfer_request,
    p_commit_period_seconds integer,
    p_now timestamptz
)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_account account;
BEGIN
    IF EXISTS (
        SELECT 1
        FROM transfer_request
        WHERE debtor_id = p_request.debtor_id
            AND sender_creditor_id = p_request.sender_creditor_id
    ) THEN
        RETURN false;
    END IF;
    IF NOT take_at_once_attempts(1) THEN
        RETURN false;
    END IF;
    BEGIN
        v_account := (
            SELECT locked
            FROM account AS locked
            WHERE locked.debtor_id = p_request.debtor_id
                AND locked.creditor_id = p_request.sender_creditor_id
            FOR NO KEY UPDATE NOWAIT
        );
        IF account_is_deleted(v_account.status_flags) THEN
            v_account := NULL;
        END IF;
        PERFORM serve_transfer_requests(v_account, ARRAY[p_request], p_commit_period_seconds, p_now);
        RETURN true;
    EXCEPTION
        WHEN lock_not_available OR serialization_failure THEN
            RETURN false;
        WHEN OTHERS THEN
            RAISE WARNING 'preparing a transfer of account (%, %) at once failed (%: %); its request is queued',
                p_request.debtor_id, p_request.sender_creditor_id, SQLSTATE, SQLERRM;
            RETURN false;
    END;
END;
$$;

-- The transfer-request batch of one sender (spec 02 §2.4, batch processing): takes
-- its queued requests (SKIP LOCKED: another worker's requests are left alone), locks
-- the sender account once, and serves the requests in arrival order — the spec
-- allows any order, a fixed one makes outcomes reproducible.
-- Returns the number of requests handled (0: nothing was queued or all are taken).
CREATE FUNCTION pyswpt_api.process_transfer_requests(
    p_debtor_id bigint,
    p_sender_creditor_id bigint,
    p_commit_period_seconds integer,
    p_now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    v_requests transfer_request[];
BEGIN
    v_requests := take_transfer_requests(p_debtor_id, p_sender_creditor_id);
    IF cardinality(v_requests) = 0 THEN
        RETURN 0;
    END IF;

    PERFORM serve_transfer_requests(
        lock_existing_account(p_debtor_id, p_sender_creditor_id),
        v_requests,
        p_commit_period_seconds,
        p_now
    );
    RETURN cardinality(v_requests);
END;
$$;

-- Serve the requests of one sender, in order, under the lock of its account
-- (NULL when missing or deleted: each request is rejected). The account is
-- stored once, only if something was prepared: no seqnum change and no
-- AccountUpdate.
CREATE FUNCTION pyswpt_private.serve_transfer_requests(
    p_account account,
    p_requests transfer_request[],
    p_commit_period_seconds integer,
    p_now timestamptz
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_account account := p_account;
    v_request transfer_request;
    v_prepared prepared_transfer;
    v_floor_balance numeric;
    v_min_balance bigint;
    v_amount_to_lock bigint;
    v_status text;
    v_prepared_count integer := 0;
BEGIN
    IF v_account.debtor_id IS NOT NULL THEN
        -- Preparing locks amounts but moves no principal, so the balance stays the
        -- same through the batch; the minimum balance is read once, as PL does.
        v_floor_balance := floor(calc_account_balance(v_account, p_now));
        v_min_balance := calc_min_balance(v_account);
    END IF;

    FOREACH v_request IN ARRAY p_requests LOOP
        -- A redelivered request (the same coordinator request of the same sender)
        -- gets its PreparedTransfer again; the reference would lock a second time
        -- and leave it to the coordinator to dismiss the extra transfer.
        v_prepared := find_prepared_transfer(v_request);
        IF v_prepared.transfer_id IS NOT NULL THEN
            PERFORM emit_prepared_transfer(v_prepared, greatest(p_now, v_prepared.prepared_at));
            CONTINUE;
        END IF;
        v_amount_to_lock := calc_amount_to_lock(
            v_floor_balance,
            v_account.total_locked_amount,
            v_min_balance,
            v_request.max_locked_amount
        );
        v_status := calc_preparation_status(v_account, v_request, v_amount_to_lock);
        IF v_status = 'OK' THEN
            v_account := prepare_transfer(v_account, v_request, v_amount_to_lock, p_commit_period_seconds, p_now);
            v_prepared_count := v_prepared_count + 1;
        ELSE
            PERFORM reject_transfer(
                v_request.debtor_id,
                v_request.sender_creditor_id,
                v_request.coordinator_type,
                v_request.coordinator_id,
                v_request.coordinator_request_id,
                v_status,
                CASE
                    WHEN v_status IN ('SENDER_IS_UNREACHABLE', 'RECIPIENT_IS_UNREACHABLE') THEN 0
                    ELSE v_account.total_locked_amount
                END,
                p_now
            );
        END IF;
    END LOOP;

    IF v_prepared_count > 0 THEN
        PERFORM save_account(v_account);
    END IF;
END;
$$;

-- Whether two creditor ids belong to the same creditors agent (spec 02 §2.4, check 2):
-- equal top 24 bits (CREDITOR_SUBNET_MASK), and not the all-zero prefix.
CREATE FUNCTION pyswpt_private.is_same_creditors_agent(p_creditor_id bigint, p_other_creditor_id bigint)
RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    -- -1099511627776 is 0xffffff0000000000 as a signed 64-bit number.
    RETURN p_creditor_id & -1099511627776 = p_other_creditor_id & -1099511627776
        AND p_creditor_id & -1099511627776 <> 0;
END;
$$;

-- amount_to_lock of spec 02 §2.4 step 3, PL variant: the whole available amount
-- above the minimum balance is contained, then clamped into [0, max_locked_amount].
CREATE FUNCTION pyswpt_private.calc_amount_to_lock(
    p_floor_balance numeric,
    p_total_locked_amount bigint,
    p_min_balance bigint,
    p_max_locked_amount bigint
)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RETURN greatest(
        0,
        least(p_max_locked_amount, contain_principal(p_floor_balance - p_total_locked_amount - p_min_balance))
    );
END;
$$;

-- The outcome of one transfer request (spec 02 §2.4 step 3): the first failing check
-- in the spec's order, or 'OK'. p_account is all NULLs when the sender was not found.
-- The insufficiency check is last, so that a retried smaller request cannot fail
-- for another reason.
CREATE FUNCTION pyswpt_private.calc_preparation_status(
    p_account account,
    p_request transfer_request,
    p_amount_to_lock bigint
)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
AS $$
BEGIN
    RETURN CASE
        WHEN p_account.debtor_id IS NULL
            THEN 'SENDER_IS_UNREACHABLE'
        WHEN p_request.coordinator_type = 'agent'
            AND NOT is_same_creditors_agent(p_request.sender_creditor_id, p_request.recipient_creditor_id)
            THEN 'RECIPIENT_IS_UNREACHABLE'
        WHEN p_account.pending_transfers_count >= 2147483647
            THEN 'TOO_MANY_TRANSFERS'
        WHEN p_request.sender_creditor_id = p_request.recipient_creditor_id
            THEN 'RECIPIENT_SAME_AS_SENDER'
        WHEN p_account.last_interest_rate_change_ts > p_request.final_interest_rate_ts
            THEN 'NEWER_INTEREST_RATE'
        WHEN p_amount_to_lock < p_request.min_locked_amount
            THEN 'INSUFFICIENT_AVAILABLE_AMOUNT'
        ELSE 'OK'
    END;
END;
$$;

-- Take (delete and return) the queued requests of one sender that no other
-- transaction holds, oldest first. A batch is bounded; what is left stays queued
-- for the next call.
CREATE FUNCTION pyswpt_private.take_transfer_requests(p_debtor_id bigint, p_sender_creditor_id bigint)
RETURNS transfer_request[]
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    c_max_requests_per_batch CONSTANT integer := 10000;
    v_requests transfer_request[];
BEGIN
    -- The rows locked are deleted by their ctid, a TID scan: a request row is never
    -- updated, so a locked row keeps its place until this transaction deletes it. The
    -- ARRAY() subquery runs once, before the DELETE, so it never takes more than its LIMIT.
    WITH taken AS (
        DELETE FROM transfer_request AS tr
        WHERE tr.ctid = ANY (ARRAY(
            SELECT queued.ctid
            FROM transfer_request AS queued
            WHERE queued.debtor_id = p_debtor_id
                AND queued.sender_creditor_id = p_sender_creditor_id
            ORDER BY queued.transfer_request_id
            LIMIT c_max_requests_per_batch
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING tr
    )
    SELECT coalesce(array_agg(taken.tr ORDER BY (taken.tr).transfer_request_id), '{}')
    INTO v_requests
    FROM taken;

    RETURN v_requests;
END;
$$;

-- Count p_count subtransactions against the transaction's bound for work done at
-- once (try_to_prepare_at_once, finalize_at_once); false, counting nothing, when
-- they would pass it. Past 64 subtransactions with an XID in one transaction,
-- PostgreSQL's snapshots slow down for every session; only committed ones count
-- there (a failed attempt's is forgotten), and no other subtransaction of a
-- consumer's window takes an XID, so 60 leaves room. The count is the
-- transaction-local setting pyswpt.at_once_attempts; the caller counts before
-- its subtransaction begins, whose rollback would undo the setting.
CREATE FUNCTION pyswpt_private.take_at_once_attempts(p_count integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c_max_attempts CONSTANT integer := 60;
    v_attempts integer := coalesce(nullif(current_setting('pyswpt.at_once_attempts', true), ''), '0')::integer;
BEGIN
    IF v_attempts + p_count > c_max_attempts THEN
        RETURN false;
    END IF;
    PERFORM set_config('pyswpt.at_once_attempts', (v_attempts + p_count)::text, true);
    RETURN true;
END;
$$;

-- Lock an amount for one request (spec 02 §2.4 step 4): the next transfer id, a
-- prepared_transfer row and its PreparedTransfer message. The caller stores the account.
CREATE FUNCTION pyswpt_private.prepare_transfer(
    INOUT p_account account,
    p_request transfer_request,
    p_amount_to_lock bigint,
    p_commit_period_seconds integer,
    p_now timestamptz
)
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_deadline timestamptz := least(p_now + make_interval(secs => p_commit_period_seconds), p_request.deadline);
    v_transfer prepared_transfer;
BEGIN
    ASSERT p_amount_to_lock >= 0, 'a prepared transfer locks a non-negative amount';
    p_account.total_locked_amount := least(
        p_account.total_locked_amount::numeric + p_amount_to_lock,
        9223372036854775807
    )::bigint;
    p_account.pending_transfers_count := p_account.pending_transfers_count + 1;
    p_account.last_transfer_id := p_account.last_transfer_id + 1;

    INSERT INTO prepared_transfer (
        debtor_id,
        sender_creditor_id,
        transfer_id,
        coordinator_type,
        coordinator_id,
        coordinator_request_id,
        recipient_creditor_id,
        prepared_at,
        final_interest_rate_ts,
        demurrage_rate,
        deadline,
        locked_amount,
        last_reminder_ts
    )
    VALUES (
        p_account.debtor_id,
        p_account.creditor_id,
        p_account.last_transfer_id,
        p_request.coordinator_type,
        p_request.coordinator_id,
        p_request.coordinator_request_id,
        p_request.recipient_creditor_id,
        p_now,
        p_request.final_interest_rate_ts,
        -50.0,
        v_deadline,
        p_amount_to_lock,
        NULL
    )
    RETURNING *
    INTO v_transfer;

    PERFORM emit_prepared_transfer(v_transfer, p_now);
END;
$$;

-- The prepared transfer that answers the same coordinator request of the same sender.
CREATE FUNCTION pyswpt_private.find_prepared_transfer(p_request transfer_request)
RETURNS prepared_transfer
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_transfer prepared_transfer;
BEGIN
    SELECT *
    INTO v_transfer
    FROM prepared_transfer AS pt
    WHERE pt.debtor_id = p_request.debtor_id
        AND pt.sender_creditor_id = p_request.sender_creditor_id
        AND pt.coordinator_request_id = p_request.coordinator_request_id
        AND pt.coordinator_id = p_request.coordinator_id
        AND pt.coordinator_type = p_request.coordinator_type;
    RETURN v_transfer;
END;
$$;

-- Emit a PreparedTransfer (spec 01 §1.6) for a prepared transfer; its ts is p_inserted_at.
CREATE FUNCTION pyswpt_private.emit_prepared_transfer(p_transfer prepared_transfer, p_inserted_at timestamptz)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    INSERT INTO prepared_transfer_signal (
        debtor_id,
        sender_creditor_id,
        transfer_id,
        coordinator_type,
        coordinator_id,
        coordinator_request_id,
        locked_amount,
        recipient_creditor_id,
        prepared_at,
        demurrage_rate,
        deadline,
        final_interest_rate_ts,
        inserted_at
    )
    VALUES (
        p_transfer.debtor_id,
        p_transfer.sender_creditor_id,
        p_transfer.transfer_id,
        p_transfer.coordinator_type,
        p_transfer.coordinator_id,
        p_transfer.coordinator_request_id,
        p_transfer.locked_amount,
        p_transfer.recipient_creditor_id,
        p_transfer.prepared_at,
        p_transfer.demurrage_rate,
        p_transfer.deadline,
        p_transfer.final_interest_rate_ts,
        p_inserted_at
    );
END;
$$;

-- Emit one RejectedTransfer (spec 01 §1.6); its ts is the moment of the rejection.
CREATE FUNCTION pyswpt_private.reject_transfer(
    p_debtor_id bigint,
    p_sender_creditor_id bigint,
    p_coordinator_type text,
    p_coordinator_id bigint,
    p_coordinator_request_id bigint,
    p_status_code text,
    p_total_locked_amount bigint,
    p_now timestamptz
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    INSERT INTO rejected_transfer_signal (
        debtor_id,
        sender_creditor_id,
        coordinator_type,
        coordinator_id,
        coordinator_request_id,
        status_code,
        total_locked_amount,
        inserted_at
    )
    VALUES (
        p_debtor_id,
        p_sender_creditor_id,
        p_coordinator_type,
        p_coordinator_id,
        p_coordinator_request_id,
        p_status_code,
        p_total_locked_amount,
        p_now
    );
END;
$$;
