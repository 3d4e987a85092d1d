-- What the request workers look for (spec 02 §4.2): accounts with queued work.
-- Each returns distinct account keys, at most p_max_count of them; the worker
-- then runs the account's batch processor once per key, for a few keys at a
-- time through the procedures at the end of this file. PL/pgSQL, so that the
-- plan is cached for the session (see 80_outbox.sql).

-- Senders with queued PrepareTransfer requests.
CREATE FUNCTION pyswpt_api.list_transfer_request_senders(p_max_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT r.debtor_id, r.sender_creditor_id
        FROM transfer_request AS r
        LIMIT p_max_count;
END;
$$;

-- Senders with queued FinalizeTransfer requests.
CREATE FUNCTION pyswpt_api.list_finalization_request_senders(p_max_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT r.debtor_id, r.sender_creditor_id
        FROM finalization_request AS r
        LIMIT p_max_count;
END;
$$;

-- Accounts with registered balance changes not applied yet.
CREATE FUNCTION pyswpt_api.list_accounts_with_pending_balance_changes(p_max_count integer)
RETURNS TABLE (debtor_id bigint, creditor_id bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT c.debtor_id, c.creditor_id
        FROM pending_balance_change AS c
        LIMIT p_max_count;
END;
$$;

-- Sends the NOTIFYs that the session's transactions held back (pyswpt.held_notifications,
-- see 0014_held_notifications.sql) and forgets them; returns how many it sent.
-- The last transaction of a call runs it, and the worker after a failed call.
CREATE FUNCTION pyswpt_api.send_held_notifications()
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_channel text;
    v_table text;
    v_sent integer := 0;
BEGIN
    FOR v_channel, v_table IN
        SELECT DISTINCT split_part(held.item, ' ', 1), split_part(held.item, ' ', 2)
        FROM unnest(string_to_array(current_setting('pyswpt.held_notifications', true), ',')) AS held (item)
        WHERE held.item <> ''
    LOOP
        PERFORM pg_notify(v_channel, v_table);
        v_sent := v_sent + 1;
    END LOOP;
    PERFORM set_config('pyswpt.held_notifications', '', false);
    RETURN v_sent;
END;
$$;

-- The batch processors of several accounts in one call, each account in a
-- transaction of its own, committed before the next begins: a transaction
-- still locks at most one account row (spec 02 §2.0), and a worker pays one
-- statement and round trip for a few accounts instead of one each. A lock
-- waited for longer than p_lock_timeout_ms fails the call, as any error does;
-- the accounts before the failing one stay committed, and the worker then
-- processes the call's accounts one at a time, each as its own statement
-- with the session's lock timeout (a repeated account finds nothing queued).
--
-- Procedures, as COMMIT needs one; PostgreSQL allows it only in a procedure
-- that neither runs with its owner's rights nor has SET clauses. These run
-- with their caller's, in its search_path, and call only the entry points
-- above, named with their schema, which check their own arguments.
--
-- Wake-ups: the transactions before the last hold their NOTIFYs back (the
-- trigger of 0014_held_notifications.sql), and the last sends what they held
-- with its own. The flusher and the stages hear of a call's rows when it
-- ends, a few milliseconds after the first account's commit, and a call of
-- eight wakes every LISTENing session once instead of eight times. After a
-- failed call the worker sends what its committed transactions held
-- (send_held_notifications). An account's transaction sets both its settings
-- in one statement: PL/pgSQL runs each PERFORM as a query through the executor.

CREATE PROCEDURE pyswpt_api.process_transfer_requests_in_turn(
    p_debtor_ids bigint[],
    p_sender_creditor_ids bigint[],
    p_commit_period_seconds integer,
    p_lock_timeout_ms integer
)
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer := pg_catalog.cardinality(p_debtor_ids);
BEGIN
    FOR i IN 1 .. v_count LOOP
        PERFORM
            pg_catalog.set_config('lock_timeout', p_lock_timeout_ms::text, true),
            pg_catalog.set_config('pyswpt.hold_notifications', (i < v_count)::text, true);
        PERFORM pyswpt_api.process_transfer_requests(
            p_debtor_id => p_debtor_ids[i],
            p_sender_creditor_id => p_sender_creditor_ids[i],
            p_commit_period_seconds => p_commit_period_seconds
        );
        IF i = v_count THEN
            PERFORM pyswpt_api.send_held_notifications();
        END IF;
        COMMIT;
    END LOOP;
END;
$$;

CREATE PROCEDURE pyswpt_api.process_finalization_requests_in_turn(
    p_debtor_ids bigint[],
    p_sender_creditor_ids bigint[],
    p_ignore_all boolean[],
    p_realm_mask bigint,
    p_realm bigint,
    p_lock_timeout_ms integer
)
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer := pg_catalog.cardinality(p_debtor_ids);
BEGIN
    FOR i IN 1 .. v_count LOOP
        PERFORM
            pg_catalog.set_config('lock_timeout', p_lock_timeout_ms::text, true),
            pg_catalog.set_config('pyswpt.hold_notifications', (i < v_count)::text, true);
        PERFORM pyswpt_api.process_finalization_requests(
            p_debtor_id => p_debtor_ids[i],
            p_sender_creditor_id => p_sender_creditor_ids[i],
            p_ignore_all => p_ignore_all[i],
            p_realm_mask => p_realm_mask,
            p_realm => p_realm
        );
        IF i = v_count THEN
            PERFORM pyswpt_api.send_held_notifications();
        END IF;
        COMMIT;
    END LOOP;
END;
$$;

CREATE PROCEDURE pyswpt_api.process_balance_changes_in_turn(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_lock_timeout_ms integer
)
LANGUAGE plpgsql
AS $$
DECLARE
    v_count integer := pg_catalog.cardinality(p_debtor_ids);
BEGIN
    FOR i IN 1 .. v_count LOOP
        PERFORM
            pg_catalog.set_config('lock_timeout', p_lock_timeout_ms::text, true),
            pg_catalog.set_config('pyswpt.hold_notifications', (i < v_count)::text, true);
        PERFORM pyswpt_api.process_balance_changes(
            p_debtor_id => p_debtor_ids[i],
            p_creditor_id => p_creditor_ids[i]
        );
        IF i = v_count THEN
            PERFORM pyswpt_api.send_held_notifications();
        END IF;
        COMMIT;
    END LOOP;
END;
$$;
