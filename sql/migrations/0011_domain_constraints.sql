-- The single-column CHECK constraints of the tables a transfer writes (the
-- account, prepared transfers, the finalization and balance-change queues)
-- become constraints of domains, one domain per constrained column, with the
-- same names and conditions. PostgreSQL 15 reads a table's CHECK expressions
-- back from their stored text and plans them again at the start of every
-- statement that writes the table; for the account table's nine alone that was
-- about 13 % of the database's instructions per transfer
-- (benchmarks/sql_instructions.py). A domain's constraints are planned once
-- per session and checked wherever a value becomes one of the domain: an
-- UPDATE that stores a field of a row of the table, as save_account does,
-- checks nothing again, while any other value written to the column is checked
-- as before. transfer_request's check compares two columns and stays.
--
-- Objects that depend on the columns' types (views, helpers with SQL-standard
-- bodies) are in the schemas that 9999_functions re-creates right after this
-- migration, so both are dropped here. The domains are created without their
-- constraints, so that the columns change type without a rewrite of the
-- tables; adding the constraints then checks the rows in place.

DROP SCHEMA IF EXISTS pyswpt_api CASCADE;
DROP SCHEMA IF EXISTS pyswpt_private CASCADE;

CREATE DOMAIN pyswpt.account_principal AS bigint;
CREATE DOMAIN pyswpt.account_interest_rate AS real;
CREATE DOMAIN pyswpt.account_previous_interest_rate AS real;
CREATE DOMAIN pyswpt.account_transfer_number AS bigint;
CREATE DOMAIN pyswpt.account_negligible_amount AS real;
CREATE DOMAIN pyswpt.account_debtor_info_sha256 AS bytea;
CREATE DOMAIN pyswpt.account_total_locked_amount AS bigint;
CREATE DOMAIN pyswpt.account_pending_transfers_count AS integer;
CREATE DOMAIN pyswpt.account_transfer_id AS bigint;
CREATE DOMAIN pyswpt.prepared_transfer_id AS bigint;
CREATE DOMAIN pyswpt.prepared_transfer_demurrage_rate AS double precision;
CREATE DOMAIN pyswpt.prepared_transfer_locked_amount AS bigint;
CREATE DOMAIN pyswpt.finalization_request_committed_amount AS bigint;
CREATE DOMAIN pyswpt.pending_balance_change_principal_delta AS bigint;

ALTER TABLE pyswpt.account
    DROP CONSTRAINT principal_is_contained,
    DROP CONSTRAINT interest_rate_in_range,
    DROP CONSTRAINT previous_interest_rate_in_range,
    DROP CONSTRAINT last_transfer_number_not_negative,
    DROP CONSTRAINT negligible_amount_not_negative,
    DROP CONSTRAINT debtor_info_sha256_is_32_bytes,
    DROP CONSTRAINT total_locked_amount_not_negative,
    DROP CONSTRAINT pending_transfers_count_not_negative,
    DROP CONSTRAINT last_transfer_id_not_negative,
    ALTER COLUMN principal TYPE pyswpt.account_principal,
    ALTER COLUMN interest_rate TYPE pyswpt.account_interest_rate,
    ALTER COLUMN previous_interest_rate TYPE pyswpt.account_previous_interest_rate,
    ALTER COLUMN last_transfer_number TYPE pyswpt.account_transfer_number,
    ALTER COLUMN negligible_amount TYPE pyswpt.account_negligible_amount,
    ALTER COLUMN debtor_info_sha256 TYPE pyswpt.account_debtor_info_sha256,
    ALTER COLUMN total_locked_amount TYPE pyswpt.account_total_locked_amount,
    ALTER COLUMN pending_transfers_count TYPE pyswpt.account_pending_transfers_count,
    ALTER COLUMN last_transfer_id TYPE pyswpt.account_transfer_id;

ALTER TABLE pyswpt.prepared_transfer
    DROP CONSTRAINT transfer_id_positive,
    DROP CONSTRAINT demurrage_rate_in_range,
    DROP CONSTRAINT locked_amount_not_negative,
    ALTER COLUMN transfer_id TYPE pyswpt.prepared_transfer_id,
    ALTER COLUMN demurrage_rate TYPE pyswpt.prepared_transfer_demurrage_rate,
    ALTER COLUMN locked_amount TYPE pyswpt.prepared_transfer_locked_amount;

ALTER TABLE pyswpt.finalization_request
    DROP CONSTRAINT committed_amount_not_negative,
    ALTER COLUMN committed_amount TYPE pyswpt.finalization_request_committed_amount;

ALTER TABLE pyswpt.pending_balance_change
    DROP CONSTRAINT principal_delta_not_zero,
    ALTER COLUMN principal_delta TYPE pyswpt.pending_balance_change_principal_delta;

ALTER DOMAIN pyswpt.account_principal
    ADD CONSTRAINT principal_is_contained CHECK (value > -9223372036854775808);
ALTER DOMAIN pyswpt.account_interest_rate
    ADD CONSTRAINT interest_rate_in_range CHECK (value BETWEEN -50.0 AND 100.0);
ALTER DOMAIN pyswpt.account_previous_interest_rate
    ADD CONSTRAINT previous_interest_rate_in_range CHECK (value BETWEEN -50.0 AND 100.0);
ALTER DOMAIN pyswpt.account_transfer_number
    ADD CONSTRAINT last_transfer_number_not_negative CHECK (value >= 0);
ALTER DOMAIN pyswpt.account_negligible_amount
    ADD CONSTRAINT negligible_amount_not_negative CHECK (value >= 0.0);
ALTER DOMAIN pyswpt.account_debtor_info_sha256
    ADD CONSTRAINT debtor_info_sha256_is_32_bytes CHECK (octet_length(value) = 32);
ALTER DOMAIN pyswpt.account_total_locked_amount
    ADD CONSTRAINT total_locked_amount_not_negative CHECK (value >= 0);
ALTER DOMAIN pyswpt.account_pending_transfers_count
    ADD CONSTRAINT pending_transfers_count_not_negative CHECK (value >= 0);
ALTER DOMAIN pyswpt.account_transfer_id
    ADD CONSTRAINT last_transfer_id_not_negative CHECK (value >= 0);
ALTER DOMAIN pyswpt.prepared_transfer_id
    ADD CONSTRAINT transfer_id_positive CHECK (value > 0);
ALTER DOMAIN pyswpt.prepared_transfer_demurrage_rate
    ADD CONSTRAINT demurrage_rate_in_range CHECK (value > -100.0 AND value <= 0.0);
ALTER DOMAIN pyswpt.prepared_transfer_locked_amount
    ADD CONSTRAINT locked_amount_not_negative CHECK (value >= 0);
ALTER DOMAIN pyswpt.finalization_request_committed_amount
    ADD CONSTRAINT committed_amount_not_negative CHECK (value >= 0);
ALTER DOMAIN pyswpt.pending_balance_change_principal_delta
    ADD CONSTRAINT principal_delta_not_zero CHECK (value <> 0);
