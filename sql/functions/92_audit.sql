-- `pyswpt audit` (issue 8): the shard's invariants (spec 02 §5), checked in
-- SQL. Read-only: every function here is STABLE, so one call of audit_ledger
-- sees one snapshot and the figures of different checks agree with each other.
--
-- Each check yields one row: its name, a status, how many offending items it
-- found, the first p_max_keys of them (ids and figures, never notes), and a
-- detail line. Statuses:
--   ok         nothing found;
--   VIOLATION  an invariant is broken (pyswpt audit exits 1);
--   warning    nothing is broken, but an operator should look (parked messages);
--   info       a figure that is normal while a shard works (money in transit).
--
-- What one shard can check without history:
--   * locks (§5.2): total_locked_amount and pending_transfers_count against the
--     account's prepared transfers;
--   * transfer numbers (§5.3): the flusher deletes AccountTransfer rows once
--     published, in any order, so a missing number cannot be told from a sent
--     one. The rows still in the outbox must each link to the number before
--     theirs, none may lie beyond its account's last_transfer_number or in a
--     later incarnation, a root account has none, and the row numbered
--     last_transfer_number carries last_transfer_committed_at;
--   * the archive (§1.6, §2.6): a change is queued exactly while its archive
--     row is not applied (the archive stores no amounts, so principals are
--     checked against changes only through conservation below);
--   * conservation (§5.1): per debtor, Σ principal + the changes in transit
--     that this database can see (unsent outbox rows, queued changes, parked
--     PendingBalanceChange messages). Only a shard that holds every account
--     (binding key `#`) can expect zero, and only when no change is in the
--     broker and no principal overflowed: then a non-zero sum is a VIOLATION;
--     otherwise the sum is reported as info.
--
-- The file reads bottom-up, audit_ledger last: SQL-language bodies are checked
-- when they are created, so each helper must exist before its caller.

-- 'VIOLATION' when a check found anything, else 'ok'.
CREATE FUNCTION pyswpt_private.violation_status(p_found_count bigint)
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_found_count > 0 THEN 'VIOLATION' ELSE 'ok' END;

-- debtor_id and principal_delta of one parked PendingBalanceChange; NULLs when
-- the body is not UTF-8 JSON or a field is not an integer. A peer's garbage
-- must not stop the audit, so the error is caught for this message alone.
CREATE FUNCTION pyswpt_private.read_parked_balance_change(
    p_body bytea,
    p_row_data jsonb,
    OUT debtor_id bigint,
    OUT principal_delta bigint
)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_fields jsonb := p_row_data;
BEGIN
    IF p_body IS NOT NULL THEN
        v_fields := convert_from(p_body, 'UTF8')::jsonb;
    END IF;
    IF jsonb_typeof(v_fields) = 'object' THEN
        debtor_id := (v_fields ->> 'debtor_id')::bigint;
        principal_delta := (v_fields ->> 'principal_delta')::bigint;
    END IF;
EXCEPTION
    WHEN data_exception THEN
        debtor_id := NULL;
        principal_delta := NULL;
END;
$$;

-- Parked PendingBalanceChange messages with their debtor and amount, read from
-- the JSON body, or from the columns of an outbox row the flusher could not
-- turn into a message (parked from `pending_balance_changes` without a type or
-- body). NULL principal_delta: the debtor or the amount cannot be read.
CREATE FUNCTION pyswpt_private.parked_balance_changes()
RETURNS TABLE (parked_id bigint, debtor_id bigint, principal_delta bigint)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        m.parked_id,
        coalesce(m.debtor_id, r.debtor_id),
        CASE WHEN coalesce(m.debtor_id, r.debtor_id) IS NOT NULL THEN r.principal_delta END
    FROM parked_message AS m
    CROSS JOIN LATERAL read_parked_balance_change(m.body, m.row_data) AS r
    WHERE m.message_type = 'PendingBalanceChange'
        OR (m.source_kind = 'outbox' AND m.source_name = 'pending_balance_changes')
$$;

-- Per debtor: the principals held here, and the changes in transit seen here
-- (unsent outbox rows, queued changes, readable parked messages), as sums and
-- counts. Sums are numeric, so that no sum of bigints overflows.
CREATE FUNCTION pyswpt_api.debtor_balances()
RETURNS TABLE (
    debtor_id bigint,
    principal_sum numeric,
    unsent_sum numeric,
    queued_sum numeric,
    parked_sum numeric,
    unsent_count bigint,
    queued_count bigint,
    parked_count bigint,
    overflown_account_count bigint
)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH amounts (debtor_id, principal, unsent, queued, parked, kind) AS (
        SELECT a.debtor_id, a.principal, 0, 0, 0,
            CASE WHEN account_is_overflown(a.status_flags) THEN 'overflown' ELSE 'account' END
        FROM account AS a
        UNION ALL
        SELECT s.debtor_id, 0, s.principal_delta, 0, 0, 'unsent'
        FROM pending_balance_change_signal AS s
        UNION ALL
        SELECT q.debtor_id, 0, 0, q.principal_delta, 0, 'queued'
        FROM pending_balance_change AS q
        UNION ALL
        SELECT p.debtor_id, 0, 0, 0, p.principal_delta, 'parked'
        FROM parked_balance_changes() AS p
        WHERE p.principal_delta IS NOT NULL
    )
    SELECT
        debtor_id,
        sum(principal),
        sum(unsent),
        sum(queued),
        sum(parked),
        count(*) FILTER (WHERE kind = 'unsent'),
        count(*) FILTER (WHERE kind = 'queued'),
        count(*) FILTER (WHERE kind = 'parked'),
        count(*) FILTER (WHERE kind = 'overflown')
    FROM amounts
    GROUP BY debtor_id
$$;

-- §5.2: both lock columns of every account against its prepared transfers,
-- from one pass over the two tables. The locked sum is capped at 2^63-1.
-- Offending rows are kept in materialized CTEs, which spill to disk, and only
-- the first p_max_keys of them are formatted: a badly broken shard cannot
-- exhaust the backend's memory.
CREATE FUNCTION pyswpt_private.audit_account_locks(p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH wrong AS MATERIALIZED (
        SELECT
            a.debtor_id,
            a.creditor_id,
            a.total_locked_amount,
            a.pending_transfers_count,
            least(coalesce(p.locked_sum, 0), 9223372036854775807) AS locked_sum,
            coalesce(p.transfer_count, 0) AS transfer_count
        FROM account AS a
        LEFT JOIN (
            SELECT debtor_id, sender_creditor_id, sum(locked_amount) AS locked_sum, count(*) AS transfer_count
            FROM prepared_transfer
            GROUP BY debtor_id, sender_creditor_id
        ) AS p
            ON p.debtor_id = a.debtor_id AND p.sender_creditor_id = a.creditor_id
        WHERE a.total_locked_amount <> least(coalesce(p.locked_sum, 0), 9223372036854775807)
            OR a.pending_transfers_count <> coalesce(p.transfer_count, 0)
    )
    SELECT
        'locked_amounts',
        violation_status(count(*)),
        count(*),
        ARRAY(
            SELECT format('(%s, %s) total_locked_amount %s, prepared %s',
                debtor_id, creditor_id, total_locked_amount, locked_sum)
            FROM wrong
            WHERE total_locked_amount <> locked_sum
            ORDER BY debtor_id, creditor_id
            LIMIT p_max_keys
        ),
        'total_locked_amount = Σ locked_amount of the account''s prepared transfers'
    FROM wrong
    WHERE total_locked_amount <> locked_sum
    UNION ALL
    SELECT
        'pending_transfer_counts',
        violation_status(count(*)),
        count(*),
        ARRAY(
            SELECT format('(%s, %s) pending_transfers_count %s, prepared %s',
                debtor_id, creditor_id, pending_transfers_count, transfer_count)
            FROM wrong
            WHERE pending_transfers_count <> transfer_count
            ORDER BY debtor_id, creditor_id
            LIMIT p_max_keys
        ),
        'pending_transfers_count = number of the account''s prepared transfers'
    FROM wrong
    WHERE pending_transfers_count <> transfer_count
$$;

-- §5.3: every AccountTransfer still in the outbox follows the number before it.
CREATE FUNCTION pyswpt_private.audit_transfer_number_links(p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH wrong AS MATERIALIZED (
        SELECT debtor_id, creditor_id, creation_date, transfer_number, previous_transfer_number
        FROM account_transfer_signal
        WHERE transfer_number < 1
            OR previous_transfer_number <> transfer_number - 1
    )
    SELECT
        'transfer_number_links',
        violation_status(count(*)),
        count(*),
        ARRAY(
            SELECT format('(%s, %s) %s #%s after #%s',
                debtor_id, creditor_id, creation_date, transfer_number, previous_transfer_number)
            FROM wrong
            ORDER BY debtor_id, creditor_id, creation_date, transfer_number
            LIMIT p_max_keys
        ),
        'unsent AccountTransfers: previous_transfer_number = transfer_number - 1 >= 0'
    FROM wrong
$$;

-- §5.3: no unsent AccountTransfer was numbered beyond what its account issued.
CREATE FUNCTION pyswpt_private.audit_transfer_numbers_issued(p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH wrong AS MATERIALIZED (
        SELECT
            t.debtor_id,
            t.creditor_id,
            t.creation_date,
            t.transfer_number,
            CASE
                WHEN t.creditor_id = 0 THEN 'of a root account'
                WHEN t.creation_date > a.creation_date THEN 'of a later incarnation than ' || a.creation_date
                WHEN t.transfer_number > a.last_transfer_number THEN 'beyond last_transfer_number ' || a.last_transfer_number
                ELSE 'committed_at is not last_transfer_committed_at'
            END AS what
        FROM account_transfer_signal AS t
        LEFT JOIN account AS a
            ON a.debtor_id = t.debtor_id AND a.creditor_id = t.creditor_id
        WHERE t.creditor_id = 0
            OR t.creation_date > a.creation_date
            OR (t.creation_date = a.creation_date AND t.transfer_number > a.last_transfer_number)
            OR (
                t.creation_date = a.creation_date
                AND t.transfer_number = a.last_transfer_number
                AND t.committed_at <> a.last_transfer_committed_at
            )
    )
    SELECT
        'transfer_numbers_issued',
        violation_status(count(*)),
        count(*),
        ARRAY(
            SELECT format('(%s, %s) %s #%s %s', debtor_id, creditor_id, creation_date, transfer_number, what)
            FROM wrong
            ORDER BY debtor_id, creditor_id, creation_date, transfer_number
            LIMIT p_max_keys
        ),
        'unsent AccountTransfers: numbered up to the account''s last_transfer_number, none for root accounts'
    FROM wrong
$$;

-- §1.6, §2.6: a change is queued exactly while its archive row is unapplied
-- (the foreign key already ties every queued change to an archive row).
CREATE FUNCTION pyswpt_private.audit_balance_change_archive(p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH wrong AS MATERIALIZED (
        SELECT r.debtor_id, r.other_creditor_id, r.change_id, r.is_applied
        FROM registered_balance_change AS r
        LEFT JOIN pending_balance_change AS q
            ON q.debtor_id = r.debtor_id AND q.other_creditor_id = r.other_creditor_id AND q.change_id = r.change_id
        WHERE r.is_applied = (q.change_id IS NOT NULL)
    )
    SELECT
        'balance_change_archive',
        violation_status(count(*)),
        count(*),
        ARRAY(
            SELECT format('(%s, %s, %s) %s', debtor_id, other_creditor_id, change_id,
                CASE WHEN is_applied THEN 'applied but still queued' ELSE 'unapplied but not queued' END)
            FROM wrong
            ORDER BY debtor_id, other_creditor_id, change_id
            LIMIT p_max_keys
        ),
        'registered_balance_change.is_applied = false exactly while the change is in pending_balance_change'
    FROM wrong
$$;

-- §5.1: conservation per debtor, the money in transit, and the parked
-- PendingBalanceChanges whose amount cannot be read (not counted in transit).
CREATE FUNCTION pyswpt_private.audit_money(p_holds_every_account boolean, p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH balances AS MATERIALIZED (
        SELECT
            b.*,
            b.unsent_sum + b.queued_sum + b.parked_sum AS in_transit,
            b.unsent_count + b.queued_count + b.parked_count AS change_count,
            -- A contained overflow (status bit 1) has lost money on purpose (§3.6).
            p_holds_every_account AND b.overflown_account_count = 0 AS must_balance
        FROM pyswpt_api.debtor_balances() AS b
    ),
    unbalanced AS MATERIALIZED (
        SELECT * FROM balances WHERE principal_sum + in_transit <> 0
    ),
    unreadable AS MATERIALIZED (
        SELECT parked_id FROM parked_balance_changes() WHERE principal_delta IS NULL
    )
    SELECT
        'conservation',
        CASE
            WHEN bool_or(must_balance) THEN 'VIOLATION'
            WHEN count(*) > 0 THEN 'info'
            ELSE 'ok'
        END,
        count(*),
        ARRAY(
            SELECT format('debtor %s: principals %s, in transit %s', debtor_id, principal_sum, in_transit)
            FROM unbalanced
            ORDER BY must_balance DESC, debtor_id
            LIMIT p_max_keys
        ),
        CASE
            WHEN p_holds_every_account THEN
                'Σ principal + in transit = 0 per debtor (changes in the broker are not seen: run with the SMP queue drained)'
            ELSE 'Σ principal + in transit per debtor; other shards hold the rest (information only)'
        END
    FROM unbalanced
    UNION ALL
    SELECT
        'money_in_transit',
        CASE
            WHEN sum(parked_count) > 0 THEN 'warning'
            WHEN sum(change_count) > 0 THEN 'info'
            ELSE 'ok'
        END,
        coalesce(sum(change_count), 0)::bigint,
        ARRAY(
            SELECT format('debtor %s: %s (unsent %s, queued %s, parked %s)',
                debtor_id, in_transit, unsent_sum, queued_sum, parked_sum)
            FROM balances
            WHERE change_count > 0
            ORDER BY parked_count DESC, debtor_id
            LIMIT p_max_keys
        ),
        format('%s changes unsent, %s queued, %s parked (replay parked ones with pyswpt parked)',
            coalesce(sum(unsent_count), 0), coalesce(sum(queued_count), 0), coalesce(sum(parked_count), 0))
    FROM balances
    UNION ALL
    SELECT
        'unreadable_parked_changes',
        CASE WHEN count(*) > 0 THEN 'warning' ELSE 'ok' END,
        count(*),
        ARRAY(SELECT format('parked %s', parked_id) FROM unreadable ORDER BY parked_id LIMIT p_max_keys),
        'parked PendingBalanceChanges whose debtor or amount cannot be read: not counted in transit'
    FROM unreadable
$$;

-- Parked messages of any kind wait for an operator: a warning, not a violation.
CREATE FUNCTION pyswpt_private.audit_parked_messages(p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH counts AS (
        SELECT
            (SELECT count(*) FROM parked_message) AS parked_count,
            (SELECT coalesce(sum(dropped_count), 0)::bigint FROM parked_message_overflow) AS dropped_count
    )
    SELECT
        'parked_messages',
        CASE WHEN parked_count + dropped_count > 0 THEN 'warning' ELSE 'ok' END,
        parked_count + dropped_count,
        ARRAY(
            SELECT format('parked %s: %s %s', parked_id, coalesce(message_type, 'untyped'), reason_code)
            FROM parked_message
            ORDER BY parked_id
            LIMIT p_max_keys
        ),
        format('%s parked, %s more not stored (over the cap per reason): see pyswpt parked list',
            parked_count, dropped_count)
    FROM counts
$$;

-- The checks of audit_ledger, in its order, with the heap blocks of the tables
-- each one reads: `pyswpt audit` runs them one by one in one snapshot and
-- shows its progress in blocks.
CREATE FUNCTION pyswpt_api.list_audit_checks()
RETURNS TABLE (check_name text, block_count bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT c.check_name, sum(pg_relation_size(t.table_name::regclass) / current_setting('block_size')::bigint)::bigint
    FROM (
        VALUES
            (1, 'account_locks', ARRAY['account', 'prepared_transfer']),
            (2, 'transfer_number_links', ARRAY['account_transfer_signal']),
            (3, 'transfer_numbers_issued', ARRAY['account_transfer_signal', 'account']),
            (4, 'balance_change_archive', ARRAY['registered_balance_change', 'pending_balance_change']),
            (5, 'money', ARRAY['account', 'pending_balance_change_signal', 'pending_balance_change', 'parked_message']),
            (6, 'parked_messages', ARRAY['parked_message', 'parked_message_overflow'])
    ) AS c (ordinal, check_name, table_names)
    CROSS JOIN LATERAL unnest(c.table_names) AS t (table_name)
    GROUP BY c.ordinal, c.check_name
    ORDER BY c.ordinal
$$;

-- One check of list_audit_checks, by name.
CREATE FUNCTION pyswpt_api.run_audit_check(p_check_name text, p_holds_every_account boolean, p_max_keys integer)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
BEGIN
    CASE p_check_name
        WHEN 'account_locks' THEN
            RETURN QUERY SELECT * FROM audit_account_locks(p_max_keys);
        WHEN 'transfer_number_links' THEN
            RETURN QUERY SELECT * FROM audit_transfer_number_links(p_max_keys);
        WHEN 'transfer_numbers_issued' THEN
            RETURN QUERY SELECT * FROM audit_transfer_numbers_issued(p_max_keys);
        WHEN 'balance_change_archive' THEN
            RETURN QUERY SELECT * FROM audit_balance_change_archive(p_max_keys);
        WHEN 'money' THEN
            RETURN QUERY SELECT * FROM audit_money(p_holds_every_account, p_max_keys);
        WHEN 'parked_messages' THEN
            RETURN QUERY SELECT * FROM audit_parked_messages(p_max_keys);
        ELSE
            RAISE EXCEPTION 'no audit check is named %', p_check_name;
    END CASE;
END;
$$;

-- Every check, one row each (more for some), in the order of list_audit_checks.
CREATE FUNCTION pyswpt_api.audit_ledger(p_holds_every_account boolean, p_max_keys integer DEFAULT 5)
RETURNS TABLE (check_name text, status text, found_count bigint, first_keys text[], detail text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT r.*
    FROM pyswpt_api.list_audit_checks() WITH ORDINALITY AS c (check_name, block_count, ordinal)
    CROSS JOIN LATERAL pyswpt_api.run_audit_check(c.check_name, p_holds_every_account, p_max_keys) AS r
    ORDER BY c.ordinal
$$;
