-- The wake-up trigger runs in its caller's search_path instead of pinning its
-- own. A SET clause costs, at every firing, a save, a set and a restore of the
-- setting and a new lookup of the path afterwards; a transfer fires the
-- trigger about seven times, and the clause alone was about 3 % of the
-- database's instructions per transfer (benchmarks/sql_instructions.py). The
-- body names nothing but pg_catalog.pg_notify, which no search_path shadows.

CREATE OR REPLACE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    RETURN NULL;
END;
$$;
