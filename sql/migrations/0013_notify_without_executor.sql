-- The wake-up trigger evaluates pg_notify as an expression instead of
-- PERFORMing it. PL/pgSQL runs a PERFORM as a query: a plan is started, run
-- and ended through the executor at every firing, where an expression with
-- no table is evaluated directly. A transfer fires the trigger about seven
-- times (benchmarks/sql_instructions.py gives what it saves). pg_notify
-- returns void, which is never NULL: the IF only makes the call an expression.

CREATE OR REPLACE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF pg_catalog.pg_notify(TG_ARGV[0], TG_TABLE_NAME) IS NULL THEN
        NULL;
    END IF;
    RETURN NULL;
END;
$$;
