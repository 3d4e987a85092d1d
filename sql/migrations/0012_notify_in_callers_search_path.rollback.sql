-- Back to the trigger function that pins its search_path.

CREATE OR REPLACE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pyswpt, pg_temp
AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    RETURN NULL;
END;
$$;
