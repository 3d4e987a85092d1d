"""Every SQL statement the Python side runs: calls of the pyswpt_api functions.

One list, so that a reader sees the whole contract between the drivers and
the database in one place (like procrastinate's queries.sql). Each statement
calls its function in named notation (`p_debtor_id => %(debtor_id)s`) and is
run with a dict whose keys are the argument names without `p_`: two bigints
given in the wrong order cannot pass unnoticed, and PostgreSQL itself checks
every argument name. tests/sql/test_queries.py prepares each statement
against the installed functions. No statement is built at run time: a table
or stage with its own function has its own statement here. The API schema
pyswpt_api holds these functions and the operator views; the tables (pyswpt)
and the helpers (pyswpt_private) are no part of the contract.
"""

# SMP messages (the consumer) ------------------------------------------------------------------

# Create or update an account from a ConfigureAccount; says whether the account is new.
CONFIGURE_ACCOUNT = """
    SELECT pyswpt_api.configure_account(
        p_debtor_id => %(debtor_id)s,
        p_creditor_id => %(creditor_id)s,
        p_ts => %(ts)s,
        p_seqnum => %(seqnum)s,
        p_negligible_amount => %(negligible_amount)s,
        p_config_flags => %(config_flags)s,
        p_config_data => %(config_data)s,
        p_max_delay_seconds => %(max_delay_seconds)s
    )
"""

# Serve a PrepareTransfer at once if its sender is free, else queue it for the
# transfer_requests stage.
ENQUEUE_TRANSFER_REQUEST = """
    SELECT pyswpt_api.enqueue_transfer_request(
        p_debtor_id => %(debtor_id)s,
        p_sender_creditor_id => %(sender_creditor_id)s,
        p_coordinator_type => %(coordinator_type)s,
        p_coordinator_id => %(coordinator_id)s,
        p_coordinator_request_id => %(coordinator_request_id)s,
        p_min_locked_amount => %(min_locked_amount)s,
        p_max_locked_amount => %(max_locked_amount)s,
        p_recipient_creditor_id => %(recipient_creditor_id)s,
        p_final_interest_rate_ts => %(final_interest_rate_ts)s,
        p_max_commit_delay_seconds => %(max_commit_delay_seconds)s,
        p_ts => %(ts)s,
        p_recipient_reachable => %(recipient_reachable)s,
        p_commit_period_seconds => %(commit_period_seconds)s
    )
"""

# Queue a FinalizeTransfer for the finalization_requests stage, in a consumer's transaction that
# ends with FINALIZE_AT_ONCE for its sender, which wakes the stage if it leaves the request queued.
ENQUEUE_FINALIZATION_REQUEST = """
    SELECT pyswpt_api.enqueue_finalization_request(
        p_debtor_id => %(debtor_id)s,
        p_sender_creditor_id => %(sender_creditor_id)s,
        p_transfer_id => %(transfer_id)s,
        p_coordinator_type => %(coordinator_type)s,
        p_coordinator_id => %(coordinator_id)s,
        p_coordinator_request_id => %(coordinator_request_id)s,
        p_committed_amount => %(committed_amount)s,
        p_transfer_note_format => %(transfer_note_format)s,
        p_transfer_note => %(transfer_note)s,
        p_ts => %(ts)s,
        p_finalized_at_once => true
    )
"""

# The end of a consumer's transaction that queued FinalizeTransfers (its window's, or one
# message's): served at once where the senders are free, the stage woken for the others.
FINALIZE_AT_ONCE = """
    SELECT pyswpt_api.finalize_at_once(
        p_debtor_ids => %(debtor_ids)s,
        p_sender_creditor_ids => %(sender_creditor_ids)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s
    )
"""

# Register a PendingBalanceChange once, for the balance_changes stage.
REGISTER_BALANCE_CHANGE = """
    SELECT pyswpt_api.register_balance_change(
        p_debtor_id => %(debtor_id)s,
        p_other_creditor_id => %(other_creditor_id)s,
        p_change_id => %(change_id)s,
        p_creditor_id => %(creditor_id)s,
        p_coordinator_type => %(coordinator_type)s,
        p_transfer_note_format => %(transfer_note_format)s,
        p_transfer_note => %(transfer_note)s,
        p_committed_at => %(committed_at)s,
        p_principal_delta => %(principal_delta)s,
        p_archive_threshold => %(archive_threshold)s
    )
"""

# Give a new account its debtor's interest rate and info, from the root config_data.
INITIALIZE_ACCOUNT = """
    SELECT pyswpt_api.initialize_account(
        p_debtor_id => %(debtor_id)s,
        p_creditor_id => %(creditor_id)s,
        p_root_config_data => %(root_config_data)s,
        p_message_max_delay_seconds => %(message_max_delay_seconds)s
    )
"""

# The config_data of a debtor's root account in this shard (NULL if it has none).
GET_ROOT_CONFIG_DATA = """
    SELECT pyswpt_api.get_account_config_data(p_debtor_id => %(debtor_id)s, p_creditor_id => 0)
"""

# Chores (the chores consumer) -----------------------------------------------------------------

# Apply a ChangeInterestRate chore.
CHANGE_INTEREST_RATE = """
    SELECT pyswpt_api.change_interest_rate(
        p_debtor_id => %(debtor_id)s,
        p_creditor_id => %(creditor_id)s,
        p_interest_rate => %(interest_rate)s,
        p_ts => %(ts)s,
        p_message_max_delay_seconds => %(message_max_delay_seconds)s
    )
"""

# Apply an UpdateDebtorInfo chore.
UPDATE_DEBTOR_INFO = """
    SELECT pyswpt_api.update_debtor_info(
        p_debtor_id => %(debtor_id)s,
        p_creditor_id => %(creditor_id)s,
        p_iri => %(iri)s,
        p_content_type => %(content_type)s,
        p_sha256 => %(sha256)s,
        p_ts => %(ts)s
    )
"""

# Apply a CapitalizeInterest chore.
CAPITALIZE_INTEREST = """
    SELECT pyswpt_api.capitalize_interest(
        p_debtor_id => %(debtor_id)s,
        p_creditor_id => %(creditor_id)s,
        p_min_capitalization_interval_seconds => %(min_capitalization_interval_seconds)s
    )
"""

# Apply a TryToDeleteAccount chore.
TRY_TO_DELETE_ACCOUNT = """
    SELECT pyswpt_api.try_to_delete_account(p_debtor_id => %(debtor_id)s, p_creditor_id => %(creditor_id)s)
"""

# Work queues (the process_* stages) -----------------------------------------------------------

# Senders with queued transfer requests, at most max_count.
LIST_TRANSFER_REQUEST_SENDERS = """
    SELECT debtor_id, creditor_id
    FROM pyswpt_api.list_transfer_request_senders(p_max_count => %(max_count)s)
"""

# Senders with queued finalization requests, at most max_count.
LIST_FINALIZATION_REQUEST_SENDERS = """
    SELECT debtor_id, creditor_id
    FROM pyswpt_api.list_finalization_request_senders(p_max_count => %(max_count)s)
"""

# Accounts with pending balance changes, at most max_count.
LIST_ACCOUNTS_WITH_PENDING_BALANCE_CHANGES = """
    SELECT debtor_id, creditor_id
    FROM pyswpt_api.list_accounts_with_pending_balance_changes(p_max_count => %(max_count)s)
"""

# Prepare (or reject) one sender's queued transfer requests.
PROCESS_TRANSFER_REQUESTS = """
    SELECT pyswpt_api.process_transfer_requests(
        p_debtor_id => %(debtor_id)s,
        p_sender_creditor_id => %(sender_creditor_id)s,
        p_commit_period_seconds => %(commit_period_seconds)s
    )
"""

# Finalize one sender's queued finalization requests (or drop them all).
PROCESS_FINALIZATION_REQUESTS = """
    SELECT pyswpt_api.process_finalization_requests(
        p_debtor_id => %(debtor_id)s,
        p_sender_creditor_id => %(sender_creditor_id)s,
        p_ignore_all => %(ignore_all)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s
    )
"""

# Apply one account's pending balance changes.
PROCESS_BALANCE_CHANGES = """
    SELECT pyswpt_api.process_balance_changes(p_debtor_id => %(debtor_id)s, p_creditor_id => %(creditor_id)s)
"""

# The three above for a few accounts in one call, each account in a transaction of its own;
# a lock waited for longer than lock_timeout_ms fails the call. Run in autocommit: a
# procedure may commit only outside a transaction block.
PROCESS_TRANSFER_REQUESTS_IN_TURN = """
    CALL pyswpt_api.process_transfer_requests_in_turn(
        p_debtor_ids => %(debtor_ids)s,
        p_sender_creditor_ids => %(sender_creditor_ids)s,
        p_commit_period_seconds => %(commit_period_seconds)s,
        p_lock_timeout_ms => %(lock_timeout_ms)s
    )
"""

PROCESS_FINALIZATION_REQUESTS_IN_TURN = """
    CALL pyswpt_api.process_finalization_requests_in_turn(
        p_debtor_ids => %(debtor_ids)s,
        p_sender_creditor_ids => %(sender_creditor_ids)s,
        p_ignore_all => %(ignore_all)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_lock_timeout_ms => %(lock_timeout_ms)s
    )
"""

PROCESS_BALANCE_CHANGES_IN_TURN = """
    CALL pyswpt_api.process_balance_changes_in_turn(
        p_debtor_ids => %(debtor_ids)s,
        p_creditor_ids => %(creditor_ids)s,
        p_lock_timeout_ms => %(lock_timeout_ms)s
    )
"""

# After a call of several accounts failed: the NOTIFYs its committed transactions held back.
SEND_HELD_NOTIFICATIONS = "SELECT pyswpt_api.send_held_notifications()"

# Announce (AccountUpdate) up to max_count changed accounts that sent none for min_interval_seconds.
SEND_DUE_ACCOUNT_UPDATES = """
    SELECT pyswpt_api.send_due_account_updates(
        p_min_interval_seconds => %(min_interval_seconds)s,
        p_max_count => %(max_count)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_now => %(now)s
    )
"""

# Outbox (the flushers): take and delete up to max_count rows of one outbox table -------------

TAKE_REJECTED_TRANSFER_SIGNALS = """
    SELECT * FROM pyswpt_api.take_rejected_transfer_signals(p_max_count => %(max_count)s)
"""

TAKE_PREPARED_TRANSFER_SIGNALS = """
    SELECT * FROM pyswpt_api.take_prepared_transfer_signals(p_max_count => %(max_count)s)
"""

TAKE_FINALIZED_TRANSFER_SIGNALS = """
    SELECT * FROM pyswpt_api.take_finalized_transfer_signals(p_max_count => %(max_count)s)
"""

TAKE_ACCOUNT_TRANSFER_SIGNALS = """
    SELECT * FROM pyswpt_api.take_account_transfer_signals(p_max_count => %(max_count)s)
"""

TAKE_ACCOUNT_UPDATE_SIGNALS = """
    SELECT * FROM pyswpt_api.take_account_update_signals(p_max_count => %(max_count)s)
"""

TAKE_ACCOUNT_PURGE_SIGNALS = """
    SELECT * FROM pyswpt_api.take_account_purge_signals(p_max_count => %(max_count)s)
"""

TAKE_REJECTED_CONFIG_SIGNALS = """
    SELECT * FROM pyswpt_api.take_rejected_config_signals(p_max_count => %(max_count)s)
"""

TAKE_PENDING_BALANCE_CHANGE_SIGNALS = """
    SELECT * FROM pyswpt_api.take_pending_balance_change_signals(p_max_count => %(max_count)s)
"""

# The flusher's durability barrier (sql/functions/80_outbox.sql): the position is read first in
# the transaction that takes the rows; the barrier runs in a transaction of its own before they are published.
CURRENT_WAL_POSITION = """
    SELECT pyswpt_api.current_wal_position()
"""

MAKE_COMMITS_DURABLE = """
    SELECT pyswpt_api.make_commits_durable(p_through => %(through)s::pg_lsn)
"""

# Parked messages (parking, the flushers' retries, `pyswpt parked`) ---------------------------

# Park one message; says 'parked', 'parked_again' or 'over_cap'.
PARK_MESSAGE = """
    SELECT pyswpt_api.park_message(
        p_source_kind => %(source_kind)s,
        p_source_name => %(source_name)s,
        p_exchange => %(exchange)s,
        p_routing_key => %(routing_key)s,
        p_message_type => %(message_type)s,
        p_content_type => %(content_type)s,
        p_headers => %(headers)s,
        p_body => %(body)s,
        p_row_data => %(row_data)s,
        p_debtor_id => %(debtor_id)s,
        p_creditor_id => %(creditor_id)s,
        p_reason_code => %(reason_code)s,
        p_reason => %(reason)s,
        p_sqlstate => %(sqlstate)s,
        p_attempts => %(attempts)s,
        p_next_retry_at => %(next_retry_at)s,
        p_max_per_reason => %(max_per_reason)s
    )
"""

# Lock and return the parked outgoing messages of these sources that are due for a retry.
TAKE_DUE_PARKED_RETRIES = """
    SELECT * FROM pyswpt_api.take_due_parked_retries(p_source_names => %(source_names)s, p_max_count => %(max_count)s)
"""

# Schedule the next retry of a parked message that failed again.
POSTPONE_PARKED_RETRY = """
    SELECT pyswpt_api.postpone_parked_retry(
        p_parked_id => %(parked_id)s,
        p_reason => %(reason)s,
        p_max_pause_seconds => %(max_pause_seconds)s
    )
"""

# Forget parked messages; says how many there were.
DISCARD_PARKED_MESSAGES = """
    SELECT pyswpt_api.discard_parked_messages(p_parked_ids => %(parked_ids)s) AS discarded_count
"""

# One page of parked messages (no bodies), in id order after after_id.
LIST_PARKED_MESSAGES = """
    SELECT * FROM pyswpt_api.list_parked_messages(p_after_id => %(after_id)s, p_max_count => %(max_count)s)
"""

# Every column of one parked message.
GET_PARKED_MESSAGE = """
    SELECT * FROM pyswpt_api.get_parked_message(p_parked_id => %(parked_id)s)
"""

# Lock the parked messages that still exist among parked_ids.
LOCK_PARKED_MESSAGES = """
    SELECT * FROM pyswpt_api.lock_parked_messages(p_parked_ids => %(parked_ids)s)
"""

# Fetch API (the web server) -------------------------------------------------------------------

# Whether an account exists for the protocol.
IS_REACHABLE_ACCOUNT = """
    SELECT pyswpt_api.is_reachable_account(p_debtor_id => %(debtor_id)s, p_creditor_id => %(creditor_id)s)
"""

# An account's config_data (NULL if it is not reachable).
GET_ACCOUNT_CONFIG_DATA = """
    SELECT pyswpt_api.get_account_config_data(p_debtor_id => %(debtor_id)s, p_creditor_id => %(creditor_id)s)
"""

# Scanners -------------------------------------------------------------------------------------

# Heap blocks and planner row estimate of a scanned table.
GET_SCANNED_TABLE_SIZE = """
    SELECT block_count, row_estimate FROM pyswpt_api.get_scanned_table_size(p_table_name => %(table_name)s)
"""

# The account keys in heap blocks [first_block, first_block + block_count).
READ_ACCOUNT_KEYS = """
    SELECT debtor_id, creditor_id
    FROM pyswpt_api.read_account_keys(p_first_block => %(first_block)s, p_block_count => %(block_count)s)
"""

# The prepared transfer keys in heap blocks [first_block, first_block + block_count).
READ_PREPARED_TRANSFER_KEYS = """
    SELECT debtor_id, sender_creditor_id, transfer_id
    FROM pyswpt_api.read_prepared_transfer_keys(p_first_block => %(first_block)s, p_block_count => %(block_count)s)
"""

# The registered balance change keys in heap blocks [first_block, first_block + block_count).
READ_REGISTERED_BALANCE_CHANGE_KEYS = """
    SELECT debtor_id, other_creditor_id, change_id
    FROM pyswpt_api.read_registered_balance_change_keys(
        p_first_block => %(first_block)s,
        p_block_count => %(block_count)s
    )
"""

# Accounts scanner step 1: delete the accounts among the keys that went to the other half of a split.
DELETE_PARENT_SHARD_ACCOUNTS = """
    SELECT pyswpt_api.delete_parent_shard_accounts(
        p_debtor_ids => %(debtor_ids)s,
        p_creditor_ids => %(creditor_ids)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_parent_realm_mask => %(parent_realm_mask)s,
        p_parent_realm => %(parent_realm)s
    )
"""

# Accounts scanner, with DELETE_PARENT_SHARD_RECORDS: forget up to %(max_count)s parked messages of the sibling shard.
DELETE_PARENT_SHARD_PARKED_MESSAGES = """
    SELECT pyswpt_api.delete_parent_shard_parked_messages(
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_parent_realm_mask => %(parent_realm_mask)s,
        p_parent_realm => %(parent_realm)s,
        p_max_count => %(max_count)s
    )
"""

# Accounts scanner step 2: purge the accounts among the keys deleted long ago (AccountPurge).
PURGE_DELETED_ACCOUNTS = """
    SELECT pyswpt_api.purge_deleted_accounts(
        p_debtor_ids => %(debtor_ids)s,
        p_creditor_ids => %(creditor_ids)s,
        p_intranet_extreme_delay_days => %(intranet_extreme_delay_days)s,
        p_prepared_transfer_max_delay_days => %(prepared_transfer_max_delay_days)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_now => %(now)s
    )
"""

# Accounts scanner step 3: heartbeats and pending AccountUpdates for the keys.
SEND_ACCOUNT_HEARTBEATS = """
    SELECT pyswpt_api.send_account_heartbeats(
        p_debtor_ids => %(debtor_ids)s,
        p_creditor_ids => %(creditor_ids)s,
        p_account_heartbeat_days => %(account_heartbeat_days)s,
        p_message_max_delay_days => %(message_max_delay_days)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_now => %(now)s
    )
"""

# Accounts scanner steps 4 and 5: which of the keys need a deletion attempt or a capitalization.
SELECT_ACCOUNT_CHORES = """
    SELECT debtor_id, creditor_id, needs_deletion_attempt, needs_capitalization
    FROM pyswpt_api.select_account_chores(
        p_debtor_ids => %(debtor_ids)s,
        p_creditor_ids => %(creditor_ids)s,
        p_deletion_attempts_min_days => %(deletion_attempts_min_days)s,
        p_min_interest_capitalization_days => %(min_interest_capitalization_days)s,
        p_max_interest_to_principal_ratio => %(max_interest_to_principal_ratio)s,
        p_now => %(now)s
    )
"""

# Accounts scanner step 6: the root config_data of those of debtor_ids whose root account is here.
GET_ROOT_CONFIGS_DATA = """
    SELECT debtor_id, pyswpt_api.get_account_config_data(p_debtor_id => debtor_id, p_creditor_id => 0)
    FROM unnest(%(debtor_ids)s::bigint[]) AS debtor_id
"""

# Accounts scanner step 6: which of the keys need a rate or debtor-info chore, given the root configs.
SELECT_DEBTOR_SETTINGS_CHORES = """
    SELECT
        debtor_id,
        creditor_id,
        interest_rate,
        needs_debtor_info_update,
        debtor_info_iri,
        debtor_info_content_type,
        debtor_info_sha256
    FROM pyswpt_api.select_debtor_settings_chores(
        p_debtor_ids => %(debtor_ids)s,
        p_creditor_ids => %(creditor_ids)s,
        p_root_debtor_ids => %(root_debtor_ids)s,
        p_root_config_data => %(root_config_data)s,
        p_message_max_delay_days => %(message_max_delay_days)s,
        p_now => %(now)s
    )
"""

# Prepared transfers scanner: re-send the due PreparedTransfer reminders among the keys.
SEND_PREPARED_TRANSFER_REMINDERS = """
    SELECT pyswpt_api.send_prepared_transfer_reminders(
        p_debtor_ids => %(debtor_ids)s,
        p_sender_creditor_ids => %(sender_creditor_ids)s,
        p_transfer_ids => %(transfer_ids)s,
        p_prepared_transfer_remainder_days => %(prepared_transfer_remainder_days)s,
        p_message_max_delay_days => %(message_max_delay_days)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s,
        p_now => %(now)s
    )
"""

# Registered balance changes scanner: forget the applied changes among the keys older than the threshold.
DELETE_APPLIED_BALANCE_CHANGES = """
    SELECT pyswpt_api.delete_applied_balance_changes(
        p_debtor_ids => %(debtor_ids)s,
        p_other_creditor_ids => %(other_creditor_ids)s,
        p_change_ids => %(change_ids)s,
        p_archive_threshold => %(archive_threshold)s
    )
"""

# Scanner passes: where each scanner is, for `pyswpt status` (the time is the database's now()).
RECORD_SCAN_PASS_START = """
    SELECT pyswpt_api.record_scan_pass_start(
        p_table_name => %(table_name)s,
        p_pass_seconds => %(pass_seconds)s,
        p_row_estimate => %(row_estimate)s
    )
"""

RECORD_SCAN_PROGRESS = """
    SELECT pyswpt_api.record_scan_progress(p_table_name => %(table_name)s, p_rows_done => %(rows_done)s)
"""

RECORD_SCAN_PASS_END = """
    SELECT pyswpt_api.record_scan_pass_end(p_table_name => %(table_name)s, p_rows_done => %(rows_done)s)
"""

# Operator commands ----------------------------------------------------------------------------

# verify-shard-content: the checked tables and their sizes in heap blocks.
LIST_SHARD_CONTENT_TABLES = """
    SELECT table_name, block_count FROM pyswpt_api.list_shard_content_tables()
"""

# verify-shard-content: the first record outside the shard in one block range of a table, if any.
FIND_RECORD_OUTSIDE_SHARD = """
    SELECT checked_count, foreign_debtor_id, foreign_creditor_id
    FROM pyswpt_api.find_record_outside_shard(
        p_table_name => %(table_name)s,
        p_first_block => %(first_block)s,
        p_block_count => %(block_count)s,
        p_realm_mask => %(realm_mask)s,
        p_realm => %(realm)s
    )
"""

# await-migrations: the schema migrations applied to this database.
LIST_APPLIED_MIGRATIONS = """
    SELECT migration_id FROM pyswpt_api.applied_migrations() AS migration_id
"""

# audit: the ledger checks in order, with the heap blocks each reads (the weights of its progress).
LIST_AUDIT_CHECKS = """
    SELECT check_name, block_count FROM pyswpt_api.list_audit_checks()
"""

# audit: one ledger check, with what it found (audit_ledger runs them all in one call, for psql).
RUN_AUDIT_CHECK = """
    SELECT check_name, status, found_count, first_keys, detail
    FROM pyswpt_api.run_audit_check(
        p_check_name => %(check_name)s,
        p_holds_every_account => %(holds_every_account)s,
        p_max_keys => %(max_keys)s
    )
"""

# status: unsent outbox rows and the oldest one's age, per message type.
OUTBOX_BACKLOG = """
    SELECT message_type, outbox_table, row_count, oldest_age FROM pyswpt_api.outbox_backlog
"""

# status: queued requests per worker stage, the accounts waiting and the oldest request's age.
WORK_QUEUES = """
    SELECT stage, row_count, account_count, oldest_age FROM pyswpt_api.work_queues
"""

# status: parked messages per source and reason, and those only counted past the cap.
COUNT_PARKED_MESSAGES = """
    SELECT source_name, reason_code, parked_count, dropped_count, oldest_first_seen_at
    FROM pyswpt_api.count_parked_messages()
"""

# status: each scanner's current pass, when it last wrote, and its last finished pass.
SCAN_PASSES = """
    SELECT
        table_name,
        pass_seconds,
        pass_started_at,
        pass_row_estimate,
        pass_rows_done,
        recorded_age,
        last_pass_ended_at,
        last_pass_age,
        last_pass_duration,
        last_pass_rows
    FROM pyswpt_api.scan_passes
"""

# Metrics and readiness (pyswpt.metrics, the fetch API) --------------------------------------------

# Outbox rows not yet published and the oldest one's age, per outbox table; reads at most max_rows per table.
OUTBOX_BACKLOG_METRICS = """
    SELECT outbox_table, row_count, oldest_age_seconds
    FROM pyswpt_api.outbox_backlog_metrics(p_max_rows => %(max_rows)s)
"""

# Requests, accounts and the oldest request's age per worker stage; reads at most max_rows per table.
WORK_QUEUE_METRICS = """
    SELECT stage, request_count, account_count, oldest_age_seconds
    FROM pyswpt_api.work_queue_metrics(p_max_rows => %(max_rows)s)
"""

# Parked messages per source and reason code.
PARKED_MESSAGE_METRICS = """
    SELECT source_name, reason_code, message_count FROM pyswpt_api.parked_message_metrics()
"""

# Whether the database answers with the functions installed and takes writes.
ACCEPTS_WRITES = """
    SELECT pyswpt_api.accepts_writes()
"""
