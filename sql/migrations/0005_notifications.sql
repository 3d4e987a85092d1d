-- Wake-up calls: a statement that fills a queue or outbox table notifies the
-- drivers (LISTEN pyswpt_requests / pyswpt_outbox) with the table's name, so
-- that they act at once instead of waiting for their next poll. Identical
-- notifications of one transaction are delivered once, at commit.

CREATE FUNCTION pyswpt.notify_table_filled()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pyswpt, pg_temp
AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION pyswpt.notify_table_filled() IS
    'Statement trigger: NOTIFY channel TG_ARGV[0] with the name of the table that got rows.';

CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.transfer_request
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.finalization_request
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.pending_balance_change
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');

CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.rejected_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.prepared_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.finalized_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.account_transfer_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.account_update_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.account_purge_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.rejected_config_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.pending_balance_change_signal
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_outbox');
