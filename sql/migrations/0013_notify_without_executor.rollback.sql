-- Back to the trigger function that PERFORMs pg_notify.

CREATE OR REPLACE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    RETURN NULL;
END;
$$;
