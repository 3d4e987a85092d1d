-- FinalizeTransfer, the second phase of a transfer (spec 02 §2.5, spec 01 §1.4):
-- the intake queues at most one request per prepared transfer, and the batch
-- processor locks the sender account once, commits or dismisses every matching
-- prepared transfer, and moves the committed amounts: the sender's principal at
-- once, the recipient's through a PendingBalanceChange, or, when the recipient
-- is in the realm the worker gives, credited in the same transaction if it is
-- free (try_to_credit_at_once) and queued at once if not. The consumer serves
-- the requests its window queued before the window commits, for each sender
-- whose account is free (finalize_at_once).
--
-- Status codes of a FinalizedTransfer (spec 01 §0.2): OK, TIMEOUT,
-- NEWER_INTEREST_RATE, INSUFFICIENT_AVAILABLE_AMOUNT.
--
-- Helpers are PL/pgSQL even when one SQL statement would do: SET search_path keeps
-- a SQL function from being inlined, and then it is re-planned on every call,
-- while PL/pgSQL caches its plans for the session.

-- Intake of one FinalizeTransfer message (spec 02 §2.5 intake). A request already
-- queued for the same transfer wins and the new one is dropped (a redelivery is
-- harmless; the quirk of a wrong request hiding a right one is the reference's).
-- Returns true when the request was queued. Takes no account lock.
-- p_finalized_at_once says that the transaction ends with finalize_at_once for
-- this request's sender (the consumer's window does): the stage is then woken
-- by that call, only if it leaves a request queued, and not by this insert
-- (pyswpt.finalizing_at_once, the trigger of migration 0015).
CREATE FUNCTION pyswpt_api.enqueue_finalization_request(
    p_debtor_id bigint,
    p_sender_creditor_id bigint,
    p_transfer_id bigint,
    p_coordinator_type text,
    p_coordinator_id bigint,
    p_coordinator_request_id bigint,
    p_committed_amount bigint,
    p_transfer_note_format text,
    p_transfer_note text,
    p_ts timestamptz,
    p_now timestamptz DEFAULT now(),
    p_finalized_at_once boolean DEFAULT FALSE
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
BEGIN
    IF p_finalized_at_once THEN
        PERFORM set_config('pyswpt.finalizing_at_once', 'true', true);
    END IF;
    INSERT INTO finalization_request (
        debtor_id,
        sender_creditor_id,
        transfer_id,
        coordinator_type,
        coordinator_id,
        coordinator_request_id,
        committed_amount,
        transfer_note_format,
        transfer_note,
        ts
    )
    VALUES (
        p_debtor_id,
        p_sender_creditor_id,
        p_transfer_id,
        p_coordinator_type,
        p_coordinator_id,
        p_coordinator_request_id,
        p_committed_amount,
        p_transfer_note_format,
        p_transfer_note,
        coalesce(p_ts, p_now)
    )
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END;
$$;

-- The finalization batch of one sender (spec 02 §2.5, batch processing): takes its
-- queued requests (SKIP LOCKED), each with the prepared transfer matching all six
-- identifying fields, locks the sender account once and finalizes the matches in
-- transfer-id order (the spec allows any order). A request without a match, of a
-- missing sender, or any request when p_ignore_all (parent-shard cleanup, spec 01
-- §4.3) is only deleted. The committed amounts leave the principal in one B2.
-- p_realm_mask and p_realm are the worker's SHARDING_REALM: a batch of one
-- request credits a recipient in it at once when the recipient's account is
-- free (try_to_credit_at_once); otherwise the recipients in it get their
-- balance changes queued here (emit_pending_balance_change). Without them every
-- change goes through the outbox. Returns the number of requests handled.
CREATE FUNCTION pyswpt_api.process_finalization_requests(
    p_debtor_id bigint,
    p_sender_creditor_id bigint,
    p_ignore_all boolean,
    p_now timestamptz DEFAULT now(),
    p_realm_mask bigint DEFAULT NULL,
    p_realm bigint DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
SET enable_seqscan = off -- by index whatever the statistics: README "Schema and functions"
AS $$
DECLARE
    v_requests finalization_request[];
    v_transfers prepared_transfer[];
BEGIN
    SELECT taken.requests, taken.transfers
    INTO v_requests, v_transfers
    FROM take_finalization_requests(p_debtor_id, p_sender_creditor_id) AS taken;
    IF cardinality(v_requests) = 0 THEN
        RETURN 0;
    END IF;
    IF p_ignore_all THEN
        -- Nothing of the account is read or written, so it is not locked.
        RETURN cardinality(v_requests);
    END IF;

    PERFORM serve_finalization_requests(
        lock_existing_account(p_debtor_id, p_sender_creditor_id),
        v_requests,
        v_transfers,
        p_now,
        p_realm_mask,
        p_realm
    );
    RETURN cardinality(v_requests);
END;
$$;

-- Finalize the taken requests of one sender under the lock of its account (NULL
-- when missing or deleted: the requests are only deleted), each with its matching
-- prepared transfer (NULL: none), in the order given; the rest is as
-- process_finalization_requests says.
CREATE FUNCTION pyswpt_private.serve_finalization_requests(
    p_account account,
    p_requests finalization_request[],
    p_transfers prepared_transfer[],
    p_now timestamptz,
    p_realm_mask bigint,
    p_realm bigint
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_account account := p_account;
    v_request finalization_request;
    v_transfer prepared_transfer;
    v_starting_principal bigint;
    v_starting_balance numeric;
    v_min_balance bigint;
    v_principal_delta numeric := 0;
    v_finalized_count integer := 0;
    v_status text;
    v_committed_amount bigint;
BEGIN
    IF v_account.debtor_id IS NULL THEN
        RETURN;
    END IF;
    -- Read once: commits of this batch are tracked in v_principal_delta, released
    -- locks in the account's total_locked_amount.
    v_starting_principal := v_account.principal;
    v_starting_balance := floor(calc_account_balance(v_account, p_now));
    v_min_balance := calc_min_balance(v_account);

    FOR v_index IN 1 .. cardinality(p_requests) LOOP
        v_request := p_requests[v_index];
        v_transfer := p_transfers[v_index];
        CONTINUE WHEN v_transfer.transfer_id IS NULL;

        v_status := calc_finalization_status(
            v_request.committed_amount,
            v_starting_balance + v_principal_delta - v_account.total_locked_amount - v_min_balance,
            v_transfer.locked_amount,
            v_transfer.prepared_at,
            v_transfer.deadline,
            v_transfer.final_interest_rate_ts,
            v_transfer.demurrage_rate,
            v_transfer.sender_creditor_id,
            v_account.last_interest_rate_change_ts,
            p_now
        );
        v_committed_amount := CASE WHEN v_status = 'OK' THEN v_request.committed_amount ELSE 0 END;
        v_account := finalize_prepared_transfer(
            v_account,
            v_transfer,
            v_request,
            v_status,
            v_committed_amount,
            v_starting_principal,
            p_now,
            p_realm_mask,
            p_realm,
            -- At most one subtransaction per transaction (try_to_credit_at_once),
            -- and a busy sender's batch leaves its recipients' changes to the
            -- stage, which applies those of one recipient together.
            cardinality(p_requests) = 1
        );
        v_principal_delta := v_principal_delta - v_committed_amount;
        v_finalized_count := v_finalized_count + 1;
    END LOOP;

    IF v_principal_delta <> 0 THEN
        v_account := apply_account_change(v_account, v_principal_delta, 0.0, p_now);
    END IF;
    IF v_finalized_count > 0 THEN
        PERFORM save_account(v_account);
    END IF;
END;
$$;

-- The end of a consumer's window (spec 02 §2.5 batch processing, done before the
-- window commits): for each sender given, in order, the finalization requests
-- queued for it that this transaction sees are served at once, as the stage
-- would serve them (a missing or deleted sender's are only deleted), when the
-- sender's account can be had at once: no other transaction holds it or
-- changed it since this one began. Requests of a sender
-- that cannot be had stay queued for the stage, and so do requests another
-- transaction holds (SKIP LOCKED). p_realm_mask and p_realm are the consumer's
-- SHARDING_REALM, as the workers give theirs. Returns the number of senders
-- served.
--
-- Like try_to_prepare_at_once, this locks accounts where spec 02 §2.0 says one
-- per transaction, and no deadlock can come of it for the same reasons: each
-- lock is taken with NOWAIT, nothing after it waits for a row (the requests are
-- taken with SKIP LOCKED; the rest is written only under the sender's lock, or
-- the recipient's, had with NOWAIT too), and the consumer calls this last in
-- its window, after the intakes that may wait. The lock comes before the take,
-- where the stage takes first: a failed lock then leaves the requests queued.
-- Each sender is a subtransaction, and a batch of one request may credit its
-- recipient in a nested one, so each counts twice against the transaction's
-- attempts (take_at_once_attempts). Any other error of a sender ends its attempt:
-- its requests stay queued, and the stage meets the error with the sender's
-- account alone. When requests of a sender stay queued so, this call wakes the
-- stage (the intakes of a window that ends with it do not: p_finalized_at_once).
-- Requests that another transaction holds, or that this one does not see, are
-- that transaction's to serve or leave.
CREATE FUNCTION pyswpt_api.finalize_at_once(
    p_debtor_ids bigint[],
    p_sender_creditor_ids bigint[],
    p_realm_mask bigint,
    p_realm bigint,
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
    v_account account;
    v_requests finalization_request[];
    v_transfers prepared_transfer[];
    v_served integer := 0;
    v_left boolean := false;
BEGIN
    FOR v_index IN 1 .. coalesce(cardinality(p_debtor_ids), 0) LOOP
        IF NOT take_at_once_attempts(2) THEN
            v_left := true;
            EXIT;
        END IF;
        BEGIN
            v_account := (
                SELECT locked
                FROM account AS locked
                WHERE locked.debtor_id = p_debtor_ids[v_index]
                    AND locked.creditor_id = p_sender_creditor_ids[v_index]
                FOR NO KEY UPDATE NOWAIT
            );
            IF account_is_deleted(v_account.status_flags) THEN
                v_account := NULL;
            END IF;
            SELECT taken.requests, taken.transfers
            INTO v_requests, v_transfers
            FROM take_finalization_requests(p_debtor_ids[v_index], p_sender_creditor_ids[v_index]) AS taken;
            CONTINUE WHEN cardinality(v_requests) = 0;
            PERFORM serve_finalization_requests(v_account, v_requests, v_transfers, p_now, p_realm_mask, p_realm);
            v_served := v_served + 1;
        EXCEPTION
            WHEN lock_not_available OR serialization_failure THEN
                v_left := true;
            WHEN OTHERS THEN
                RAISE WARNING 'finalizing transfers of account (%, %) at once failed (%: %); its requests stay queued',
                    p_debtor_ids[v_index], p_sender_creditor_ids[v_index], SQLSTATE, SQLERRM;
                v_left := true;
        END;
    END LOOP;
    IF v_left THEN
        PERFORM pg_notify('pyswpt_requests', 'finalization_request');
    END IF;
    RETURN v_served;
END;
$$;

-- The status code of a finalization (spec 02 §2.5 "Status code", §3.5): a dismissal
-- always succeeds; a commit needs the deadline, an unchanged interest rate, and
-- either the expendable amount above the lock or a lock that survives the worst
-- demurrage since preparation (a root sender's lock suffers none).
CREATE FUNCTION pyswpt_private.calc_finalization_status(
    p_committed_amount bigint,
    p_expendable_amount numeric,
    p_locked_amount bigint,
    p_prepared_at timestamptz,
    p_deadline timestamptz,
    p_final_interest_rate_ts timestamptz,
    p_demurrage_rate double precision,
    p_sender_creditor_id bigint,
    p_last_interest_rate_change_ts timestamptz,
    p_now timestamptz
)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RETURN CASE
        WHEN p_committed_amount = 0
            THEN 'OK'
        WHEN p_now > p_deadline
            THEN 'TIMEOUT'
        WHEN p_last_interest_rate_change_ts > p_final_interest_rate_ts
            THEN 'NEWER_INTEREST_RATE'
        -- Expendable path, in exact arithmetic.
        WHEN p_committed_amount <= p_expendable_amount + p_locked_amount
            THEN 'OK'
        -- Reserved path, in doubles. The exponent is floored at -700 because exp()
        -- raises on underflow; any factor below exp(-700) gives the same answer
        -- as 0, since a lock below 2^63 times it is below 1 <= the committed amount.
        WHEN p_committed_amount <= p_locked_amount
            AND (
                p_sender_creditor_id = 0
                OR p_committed_amount::double precision <= p_locked_amount::double precision * exp(
                    greatest(
                        -700.0,
                        calc_k(p_demurrage_rate) * greatest(0.0, seconds_between(p_prepared_at, p_now))
                    )
                )
            )
            THEN 'OK'
        ELSE 'INSUFFICIENT_AVAILABLE_AMOUNT'
    END;
END;
$$;

-- Take (lock, read, delete) the queued finalization requests of one sender that no
-- other transaction holds, each paired with its six-field-matching prepared transfer
-- (a NULL element when there is none), in transfer-id order. Only the request rows
-- are locked. A batch is bounded; what is left stays queued for the next call.
-- The rows locked are deleted by their ctid, as take_transfer_requests does.
CREATE FUNCTION pyswpt_private.take_finalization_requests(
    p_debtor_id bigint,
    p_sender_creditor_id bigint,
    OUT requests finalization_request[],
    OUT transfers prepared_transfer[]
)
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    c_max_requests_per_batch CONSTANT integer := 10000;
BEGIN
    WITH taken AS (
        DELETE FROM finalization_request AS fr
        WHERE fr.ctid = ANY (ARRAY(
            SELECT queued.ctid
            FROM finalization_request AS queued
            WHERE queued.debtor_id = p_debtor_id
                AND queued.sender_creditor_id = p_sender_creditor_id
            ORDER BY queued.transfer_id
            LIMIT c_max_requests_per_batch
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING fr
    )
    SELECT
        coalesce(array_agg(taken.fr ORDER BY (taken.fr).transfer_id), '{}'),
        coalesce(array_agg(pt ORDER BY (taken.fr).transfer_id), '{}')
    INTO requests, transfers
    FROM taken
    LEFT JOIN prepared_transfer AS pt
        ON pt.debtor_id = (taken.fr).debtor_id
        AND pt.sender_creditor_id = (taken.fr).sender_creditor_id
        AND pt.transfer_id = (taken.fr).transfer_id
        AND pt.coordinator_type = (taken.fr).coordinator_type
        AND pt.coordinator_id = (taken.fr).coordinator_id
        AND pt.coordinator_request_id = (taken.fr).coordinator_request_id;
END;
$$;

-- Finalize one prepared transfer (spec 02 §2.5 step 3, items 3-5): release its lock,
-- emit FinalizedTransfer, and for a commit emit the sender's AccountTransfer and
-- credit the recipient: at once when p_may_credit_at_once and the recipient is
-- in the caller's realm and free (try_to_credit_at_once), otherwise through its
-- PendingBalanceChange (emit_pending_balance_change, with the caller's realm).
-- The sender's principal_after is the principal before the batch minus this
-- amount (quirk of spec 02 §2.5, example 5).
-- The caller applies the principal change and stores the account.
CREATE FUNCTION pyswpt_private.finalize_prepared_transfer(
    INOUT p_account account,
    p_transfer prepared_transfer,
    p_request finalization_request,
    p_status_code text,
    p_committed_amount bigint,
    p_starting_principal bigint,
    p_now timestamptz,
    p_realm_mask bigint,
    p_realm bigint,
    p_may_credit_at_once boolean
)
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_credited boolean := false;
BEGIN
    ASSERT p_committed_amount >= 0, 'a committed amount is never negative';
    DELETE FROM prepared_transfer
    WHERE debtor_id = p_transfer.debtor_id
        AND sender_creditor_id = p_transfer.sender_creditor_id
        AND transfer_id = p_transfer.transfer_id;
    p_account.total_locked_amount := greatest(0, p_account.total_locked_amount - p_transfer.locked_amount);
    p_account.pending_transfers_count := greatest(0, p_account.pending_transfers_count - 1);

    INSERT INTO finalized_transfer_signal (
        debtor_id,
        sender_creditor_id,
        transfer_id,
        coordinator_type,
        coordinator_id,
        coordinator_request_id,
        prepared_at,
        finalized_at,
        committed_amount,
        total_locked_amount,
        status_code,
        inserted_at
    )
    VALUES (
        p_transfer.debtor_id,
        p_transfer.sender_creditor_id,
        p_transfer.transfer_id,
        p_transfer.coordinator_type,
        p_transfer.coordinator_id,
        p_transfer.coordinator_request_id,
        p_transfer.prepared_at,
        p_now,
        p_committed_amount,
        p_account.total_locked_amount,
        p_status_code,
        p_now
    );

    IF p_committed_amount > 0 THEN
        p_account := emit_account_transfer(
            p_account,
            p_transfer.coordinator_type,
            p_transfer.recipient_creditor_id,
            p_now,
            -p_committed_amount,
            p_request.transfer_note_format,
            p_request.transfer_note,
            contain_principal(p_starting_principal::numeric - p_committed_amount),
            p_now
        );
        IF p_may_credit_at_once AND is_in_realm(
            p_transfer.debtor_id, p_transfer.recipient_creditor_id, p_realm_mask, p_realm
        ) THEN
            v_credited := try_to_credit_at_once(
                p_transfer.debtor_id,
                p_transfer.recipient_creditor_id,
                p_transfer.sender_creditor_id,
                p_transfer.coordinator_type,
                p_request.transfer_note_format,
                p_request.transfer_note,
                p_committed_amount,
                p_now
            );
        END IF;
        IF NOT v_credited THEN
            PERFORM emit_pending_balance_change(
                p_transfer.debtor_id,
                p_transfer.sender_creditor_id,
                p_transfer.recipient_creditor_id,
                p_transfer.coordinator_type,
                p_request.transfer_note_format,
                p_request.transfer_note,
                p_now,
                p_committed_amount,
                p_now,
                p_realm_mask,
                p_realm
            );
        END IF;
    END IF;
END;
$$;
