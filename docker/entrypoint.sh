#!/bin/sh
# Accepts the reference image's commands and runs the matching `pyswpt` command,
# so that the image runs exactly what the test suite starts.
set -e

command="${1:-all}"
[ "$#" -gt 0 ] && shift

case "$command" in
    all) exec pyswpt run all "$@" ;;
    configure) exec pyswpt configure "$@" ;;
    webserver) exec pyswpt run web "$@" ;;
    consume_messages) exec pyswpt run consumer "$@" ;;
    consume_chore_messages) exec pyswpt run chores "$@" ;;
    await_migrations) exec pyswpt await-migrations "$@" ;;
    flush_all) exec pyswpt run flusher "$@" ;;
    flush_rejected_transfers | flush_prepared_transfers | flush_finalized_transfers | \
    flush_account_transfers | flush_account_updates | flush_account_purges | \
    flush_rejected_configs | flush_pending_balance_changes)
        exec pyswpt run flusher "${command#flush_}" "$@" ;;
    process_transfer_requests) exec pyswpt run workers transfer_requests "$@" ;;
    process_finalization_requests) exec pyswpt run workers finalization_requests "$@" ;;
    process_balance_changes) exec pyswpt run workers balance_changes "$@" ;;
    scan_accounts) exec pyswpt run scan-accounts "$@" ;;
    scan_prepared_transfers) exec pyswpt run scan-prepared-transfers "$@" ;;
    scan_registered_balance_changes) exec pyswpt run scan-registered-balance-changes "$@" ;;
    subscribe) exec pyswpt subscribe "$@" ;;
    unsubscribe) exec pyswpt unsubscribe "$@" ;;
    delete_queue) exec pyswpt delete-queue "$@" ;;
    verify_shard_content) exec pyswpt verify-shard-content "$@" ;;
    test) exec python -m pytest "$@" ;;
    *) exec "$command" "$@" ;;
esac
