-- The API schema (issue 9): functions and views move out of the data schema.
-- From now on 9999_functions re-creates them in pyswpt_api (entry points and
-- views) and pyswpt_private (helpers); this removes the copies that earlier
-- releases installed in pyswpt. Trigger functions stay: tables use them.
--
-- The old operator views call functions, and list_parked_messages returns the
-- row type of the old parked_messages view, hence the order. Each DROP
-- restricts: a table that used one of these would stop this migration.

DROP FUNCTION IF EXISTS pyswpt.list_parked_messages(bigint, integer);
DROP VIEW IF EXISTS pyswpt.accounts, pyswpt.prepared_transfers, pyswpt.outbox_backlog,
    pyswpt.work_queues, pyswpt.parked_messages;

DO $$
DECLARE
    v_functions text;
BEGIN
    SELECT string_agg(
        format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
        ', '
    )
    INTO v_functions
    FROM pg_proc AS p
    JOIN pg_namespace AS n ON n.oid = p.pronamespace
    WHERE n.nspname = 'pyswpt'
        AND p.prorettype <> 'trigger'::regtype;
    -- One statement, so that functions depending on each other go together.
    IF v_functions IS NOT NULL THEN
        EXECUTE 'DROP FUNCTION ' || v_functions;
    END IF;
END;
$$;

COMMENT ON SCHEMA pyswpt IS
    'pyswpt ledger data: tables, sequences, indexes and trigger functions, changed only by migrations. '
    'Callers use pyswpt_api.';
