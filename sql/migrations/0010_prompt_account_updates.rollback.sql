DROP INDEX pyswpt.account_pending_update_idx;
