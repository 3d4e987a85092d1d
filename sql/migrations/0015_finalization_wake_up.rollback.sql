-- Back to the trigger that notifies for every insert into finalization_request.

DROP TRIGGER notify_filled ON pyswpt.finalization_request;

CREATE TRIGGER notify_filled AFTER INSERT ON pyswpt.finalization_request
    FOR EACH STATEMENT EXECUTE FUNCTION pyswpt.notify_table_filled('pyswpt_requests');
