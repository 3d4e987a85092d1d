-- The wake-up trigger holds its NOTIFY back while the session says so: the
-- procedures that process several accounts in turn (45_work_queues.sql) set
-- pyswpt.hold_notifications for the transactions of a call before its last,
-- and the last sends what they held (send_held_notifications). Every
-- NOTIFYing commit wakes every LISTENing session of the database, whatever
-- the channel, and makes the committing backend signal each of them: a call
-- of eight accounts woke the flusher and the workers eight times, where the
-- rows of a few milliseconds go out in one round anyway.
--
-- What a transaction held is appended to the session's
-- pyswpt.held_notifications, as "channel table," items: set for the session,
-- it outlives the commit, and a rollback takes back what the transaction
-- added along with its rows. Repeated items are harmless: PostgreSQL sends
-- one notification for each channel and payload a transaction names.
--
-- Still nothing but pg_catalog's functions, by their full names, and no
-- operator: the trigger runs in the inserting session's search_path.

CREATE OR REPLACE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF pg_catalog.texteq(pg_catalog.current_setting('pyswpt.hold_notifications', true), 'true') THEN
        IF pg_catalog.set_config(
            'pyswpt.held_notifications',
            pg_catalog.concat(
                pg_catalog.current_setting('pyswpt.held_notifications', true), TG_ARGV[0], ' ', TG_TABLE_NAME, ','
            ),
            false
        ) IS NULL THEN
            NULL;
        END IF;
    ELSIF pg_catalog.pg_notify(TG_ARGV[0], TG_TABLE_NAME) IS NULL THEN
        NULL;
    END IF;
    RETURN NULL;
END;
$$;
