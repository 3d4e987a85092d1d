-- Finds the prepared transfer of a coordinator's request, so that a redelivered
-- PrepareTransfer gets the same PreparedTransfer again instead of a second lock.

CREATE INDEX idx_prepared_transfer_request
    ON pyswpt.prepared_transfer (debtor_id, sender_creditor_id, coordinator_request_id);
