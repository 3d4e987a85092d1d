-- What each group role of sql/roles.sql may do (README "Database roles").
-- Every configure and `yoyo apply` runs this file once the API schema is
-- re-created, so a new function has its grants at once. Function signatures
-- are not needed: each name is used once in pyswpt_api. Nobody is granted
-- anything on the tables of pyswpt: the entry points (SECURITY DEFINER) and
-- the views read and write them with their owner's rights.

-- The drivers: the SMP and chores consumers, the workers, the flushers and the
-- scanners, and `pyswpt await-migrations`.
GRANT USAGE ON SCHEMA pyswpt_api TO pyswpt_driver;
GRANT EXECUTE ON FUNCTION
    -- consumer
    pyswpt_api.configure_account,
    pyswpt_api.enqueue_transfer_request,
    pyswpt_api.enqueue_finalization_request,
    pyswpt_api.finalize_at_once,
    pyswpt_api.register_balance_change,
    pyswpt_api.initialize_account,
    pyswpt_api.get_account_config_data,
    -- chores consumer
    pyswpt_api.change_interest_rate,
    pyswpt_api.update_debtor_info,
    pyswpt_api.capitalize_interest,
    pyswpt_api.try_to_delete_account,
    -- workers
    pyswpt_api.list_transfer_request_senders,
    pyswpt_api.list_finalization_request_senders,
    pyswpt_api.list_accounts_with_pending_balance_changes,
    pyswpt_api.process_transfer_requests,
    pyswpt_api.process_finalization_requests,
    pyswpt_api.process_balance_changes,
    pyswpt_api.send_held_notifications,
    pyswpt_api.send_due_account_updates,
    -- flushers
    pyswpt_api.take_rejected_transfer_signals,
    pyswpt_api.take_prepared_transfer_signals,
    pyswpt_api.take_finalized_transfer_signals,
    pyswpt_api.take_account_transfer_signals,
    pyswpt_api.take_account_update_signals,
    pyswpt_api.take_account_purge_signals,
    pyswpt_api.take_rejected_config_signals,
    pyswpt_api.take_pending_balance_change_signals,
    pyswpt_api.current_wal_position,
    pyswpt_api.make_commits_durable,
    pyswpt_api.take_due_parked_retries,
    pyswpt_api.postpone_parked_retry,
    pyswpt_api.discard_parked_messages,
    -- consumers and flushers: messages set aside
    pyswpt_api.park_message,
    -- scanners
    pyswpt_api.get_scanned_table_size,
    pyswpt_api.read_account_keys,
    pyswpt_api.read_prepared_transfer_keys,
    pyswpt_api.read_registered_balance_change_keys,
    pyswpt_api.delete_parent_shard_accounts,
    pyswpt_api.purge_deleted_accounts,
    pyswpt_api.send_account_heartbeats,
    pyswpt_api.select_account_chores,
    pyswpt_api.select_debtor_settings_chores,
    pyswpt_api.send_prepared_transfer_reminders,
    pyswpt_api.delete_applied_balance_changes,
    pyswpt_api.delete_parent_shard_parked_messages,
    pyswpt_api.record_scan_pass_start,
    pyswpt_api.record_scan_progress,
    pyswpt_api.record_scan_pass_end,
    -- the metrics endpoint and the readiness probe
    pyswpt_api.outbox_backlog_metrics,
    pyswpt_api.work_queue_metrics,
    pyswpt_api.parked_message_metrics,
    pyswpt_api.accepts_writes,
    -- await-migrations
    pyswpt_api.applied_migrations
TO pyswpt_driver;
-- the workers, for a few accounts at a time
GRANT EXECUTE ON PROCEDURE
    pyswpt_api.process_transfer_requests_in_turn,
    pyswpt_api.process_finalization_requests_in_turn,
    pyswpt_api.process_balance_changes_in_turn
TO pyswpt_driver;

-- The fetch API: read-only, two functions.
GRANT USAGE ON SCHEMA pyswpt_api TO pyswpt_web;
GRANT EXECUTE ON FUNCTION
    pyswpt_api.is_reachable_account,
    pyswpt_api.get_account_config_data,
    -- the readiness probe
    pyswpt_api.accepts_writes
TO pyswpt_web;

-- Operators: the views, `pyswpt audit`, `pyswpt parked`, `pyswpt verify-shard-content`.
GRANT USAGE ON SCHEMA pyswpt_api TO pyswpt_operator;
GRANT SELECT ON
    pyswpt_api.accounts,
    pyswpt_api.prepared_transfers,
    pyswpt_api.outbox_backlog,
    pyswpt_api.work_queues,
    pyswpt_api.parked_messages,
    pyswpt_api.scan_passes
TO pyswpt_operator;
GRANT EXECUTE ON FUNCTION
    pyswpt_api.audit_ledger,
    pyswpt_api.list_audit_checks,
    pyswpt_api.run_audit_check,
    pyswpt_api.debtor_balances,
    pyswpt_api.count_parked_messages,
    pyswpt_api.list_parked_messages,
    pyswpt_api.get_parked_message,
    pyswpt_api.lock_parked_messages,
    pyswpt_api.discard_parked_messages,
    pyswpt_api.list_shard_content_tables,
    pyswpt_api.find_record_outside_shard,
    pyswpt_api.applied_migrations
TO pyswpt_operator;
-- The accounts view computes with these, run with the reader's rights (see
-- sql/functions/95_operator_views.sql); without USAGE on pyswpt_private an
-- operator cannot call them by name.
GRANT EXECUTE ON FUNCTION
    pyswpt_private.calc_account_figures,
    pyswpt_private.account_is_deleted,
    pyswpt_private.account_is_overflown,
    pyswpt_private.config_is_scheduled_for_deletion
TO pyswpt_operator;
