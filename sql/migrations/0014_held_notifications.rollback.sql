-- Back to the trigger function that always notifies at once.

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
