-- A FinalizeTransfer's intake in a consumer's window wakes the finalization
-- stage only when the window leaves its request queued. The window ends with
-- finalize_at_once, which serves nearly every request the window queued
-- before it commits, so the statement trigger's NOTIFY at the commit woke the
-- stage for an empty queue once per window. An intake that the window's last
-- call will follow sets the transaction-local pyswpt.finalizing_at_once, the
-- trigger's WHEN then skips the NOTIFY, and finalize_at_once sends one itself
-- when it leaves a request queued. Every other insert notifies as before.
--
-- The condition is parsed here, once: no search_path changes what it calls.

DROP TRIGGER notify_filled ON pyswpt.finalization_request;

CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.finalization_request
    FOR EACH STATEMENT
    WHEN (pg_catalog.current_setting('pyswpt.finalizing_at_once', TRUE) IS DISTINCT FROM 'true')
    EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');
