-- Prompt AccountUpdates (issue 12): a transfer or a balance change marks the
-- account pending_account_update instead of announcing itself at once (spec
-- 02 §3, B2). The accounts scanner announces such accounts on its pass, hours
-- later; the workers call this function every second or so to announce them
-- within APP_ACCOUNT_UPDATE_DELAY_SECONDS. An account announces itself at most
-- once per that interval, so a burst of changes costs one message. The scanner
-- stays the safety net.

-- Announce up to p_max_count of this shard's pending accounts whose last
-- AccountUpdate is at least p_min_interval_seconds old, oldest first; returns
-- how many. SKIP LOCKED: an account a worker holds is announced on a later
-- call, and this function never waits for a lock, so taking several account
-- locks in one transaction cannot deadlock (the heartbeat step does the same).
-- It reads only the rows it locks, so it is correct at READ COMMITTED, where the
-- workers' loop calls it: at REPEATABLE READ an account changed after the
-- call's snapshot fails the whole call. The accounts scanner calls
-- send_account_heartbeats at READ COMMITTED for the same reason.
CREATE FUNCTION pyswpt_api.send_due_account_updates(
    p_min_interval_seconds double precision,
    p_max_count integer,
    p_realm_mask bigint,
    p_realm bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
DECLARE
    v_announced_before CONSTANT timestamptz := p_now - make_interval(secs => p_min_interval_seconds);
    v_account account;
    v_count integer := 0;
BEGIN
    FOR v_account IN
        SELECT *
        FROM account
        WHERE pending_account_update
            AND last_heartbeat_ts <= v_announced_before
            AND NOT account_is_deleted(status_flags)
            AND is_in_realm(debtor_id, creditor_id, p_realm_mask, p_realm)
        ORDER BY last_heartbeat_ts
        LIMIT p_max_count
        FOR NO KEY UPDATE SKIP LOCKED
    LOOP
        PERFORM announce_stored_state(v_account, p_now);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END;
$$;
