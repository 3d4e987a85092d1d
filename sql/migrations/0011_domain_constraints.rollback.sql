-- Back to plain columns with table CHECK constraints. The API schemas depend on
-- the columns' types and go too: `configure` of the release rolled back to
-- re-creates them.

DROP SCHEMA IF EXISTS pyswpt_api CASCADE;
DROP SCHEMA IF EXISTS pyswpt_private CASCADE;

ALTER TABLE pyswpt.account
    ALTER COLUMN principal TYPE bigint,
    ALTER COLUMN interest_rate TYPE real,
    ALTER COLUMN previous_interest_rate TYPE real,
    ALTER COLUMN last_transfer_number TYPE bigint,
    ALTER COLUMN negligible_amount TYPE real,
    ALTER COLUMN debtor_info_sha256 TYPE bytea,
    ALTER COLUMN total_locked_amount TYPE bigint,
    ALTER COLUMN pending_transfers_count TYPE integer,
    ALTER COLUMN last_transfer_id TYPE bigint,
    ADD CONSTRAINT principal_is_contained CHECK (principal > -9223372036854775808),
    ADD CONSTRAINT interest_rate_in_range CHECK (interest_rate BETWEEN -50.0 AND 100.0),
    ADD CONSTRAINT previous_interest_rate_in_range CHECK (previous_interest_rate BETWEEN -50.0 AND 100.0),
    ADD CONSTRAINT last_transfer_number_not_negative CHECK (last_transfer_number >= 0),
    ADD CONSTRAINT negligible_amount_not_negative CHECK (negligible_amount >= 0.0),
    ADD CONSTRAINT debtor_info_sha256_is_32_bytes
        CHECK (debtor_info_sha256 IS NULL OR octet_length(debtor_info_sha256) = 32),
    ADD CONSTRAINT total_locked_amount_not_negative CHECK (total_locked_amount >= 0),
    ADD CONSTRAINT pending_transfers_count_not_negative CHECK (pending_transfers_count >= 0),
    ADD CONSTRAINT last_transfer_id_not_negative CHECK (last_transfer_id >= 0);

ALTER TABLE pyswpt.prepared_transfer
    ALTER COLUMN transfer_id TYPE bigint,
    ALTER COLUMN demurrage_rate TYPE double precision,
    ALTER COLUMN locked_amount TYPE bigint,
    ADD CONSTRAINT transfer_id_positive CHECK (transfer_id > 0),
    ADD CONSTRAINT demurrage_rate_in_range CHECK (demurrage_rate > -100.0 AND demurrage_rate <= 0.0),
    ADD CONSTRAINT locked_amount_not_negative CHECK (locked_amount >= 0);

ALTER TABLE pyswpt.finalization_request
    ALTER COLUMN committed_amount TYPE bigint,
    ADD CONSTRAINT committed_amount_not_negative CHECK (committed_amount >= 0);

ALTER TABLE pyswpt.pending_balance_change
    ALTER COLUMN principal_delta TYPE bigint,
    ADD CONSTRAINT principal_delta_not_zero CHECK (principal_delta <> 0);

DROP DOMAIN pyswpt.account_principal;
DROP DOMAIN pyswpt.account_interest_rate;
DROP DOMAIN pyswpt.account_previous_interest_rate;
DROP DOMAIN pyswpt.account_transfer_number;
DROP DOMAIN pyswpt.account_negligible_amount;
DROP DOMAIN pyswpt.account_debtor_info_sha256;
DROP DOMAIN pyswpt.account_total_locked_amount;
DROP DOMAIN pyswpt.account_pending_transfers_count;
DROP DOMAIN pyswpt.account_transfer_id;
DROP DOMAIN pyswpt.prepared_transfer_id;
DROP DOMAIN pyswpt.prepared_transfer_demurrage_rate;
DROP DOMAIN pyswpt.prepared_transfer_locked_amount;
DROP DOMAIN pyswpt.finalization_request_committed_amount;
DROP DOMAIN pyswpt.pending_balance_change_principal_delta;
