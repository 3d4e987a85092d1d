-- Scanner passes (issue 11): each table scanner writes where it is in its
-- pass, so that `pyswpt status` can say when each last finished a pass and
-- whether it is still running. One row per scanned table, written through
-- the functions of sql/functions/74_scan_passes.sql at the start and end of
-- each pass and about once a minute in between.

CREATE TABLE pyswpt.scan_pass (
    table_name text PRIMARY KEY,
    pass_seconds double precision NOT NULL,
    pass_started_at timestamptz NOT NULL,
    pass_row_estimate bigint NOT NULL,
    pass_rows_done bigint NOT NULL,
    recorded_at timestamptz NOT NULL,
    last_pass_started_at timestamptz,
    last_pass_ended_at timestamptz,
    last_pass_rows bigint,
    CONSTRAINT pass_seconds_positive CHECK (pass_seconds > 0),
    CONSTRAINT pass_rows_done_not_negative CHECK (pass_rows_done >= 0),
    CONSTRAINT last_pass_complete CHECK (
        (last_pass_started_at IS NULL) = (last_pass_ended_at IS NULL)
        AND (last_pass_started_at IS NULL) = (last_pass_rows IS NULL)
    )
);

COMMENT ON TABLE pyswpt.scan_pass IS
    'Where each table scanner is in its pass and how its last pass went; written by the scanners, read by status.';
COMMENT ON COLUMN pyswpt.scan_pass.table_name IS
    'The scanned table (account, prepared_transfer, registered_balance_change).';
COMMENT ON COLUMN pyswpt.scan_pass.pass_seconds IS 'How long one pass is meant to take (APP_*_SCAN_HOURS/DAYS).';
COMMENT ON COLUMN pyswpt.scan_pass.pass_started_at IS 'When the current pass started.';
COMMENT ON COLUMN pyswpt.scan_pass.pass_row_estimate IS
    'Rows the planner expected in the table when the current pass started.';
COMMENT ON COLUMN pyswpt.scan_pass.pass_rows_done IS
    'Rows the current pass has handed to its steps, as of recorded_at.';
COMMENT ON COLUMN pyswpt.scan_pass.recorded_at IS
    'When the scanner last wrote here: about every minute while it runs, so an old value means it stopped.';
COMMENT ON COLUMN pyswpt.scan_pass.last_pass_ended_at IS
    'When the last finished pass ended (its time was over, or the table size changed and a new rhythm began).';
COMMENT ON COLUMN pyswpt.scan_pass.last_pass_rows IS 'Rows the last finished pass handed to its steps.';
