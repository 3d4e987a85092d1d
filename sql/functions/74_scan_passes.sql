-- Scanner passes (issue 11): the table scanners write where they are in their
-- pass (the table scan_pass), and `pyswpt status` reads the view scan_passes.
-- Each write is one row of one small table, at most about once a minute per
-- scanner: nothing a busy shard notices.

-- How each scanner's pass is going and how its last pass went, with ages as of now().
CREATE VIEW pyswpt_api.scan_passes AS
SELECT
    s.table_name,
    s.pass_seconds,
    s.pass_started_at,
    s.pass_row_estimate,
    s.pass_rows_done,
    s.recorded_at,
    now() - s.recorded_at AS recorded_age,
    s.last_pass_started_at,
    s.last_pass_ended_at,
    now() - s.last_pass_ended_at AS last_pass_age,
    s.last_pass_ended_at - s.last_pass_started_at AS last_pass_duration,
    s.last_pass_rows
FROM scan_pass AS s;

COMMENT ON VIEW pyswpt_api.scan_passes IS
    'The table scanners: the current pass (rows done of the planner''s estimate), when each last wrote '
    '(about every minute while it runs) and its last finished pass.';
COMMENT ON COLUMN pyswpt_api.scan_passes.recorded_age IS
    'now() - recorded_at: much more than a minute means the scanner is not running.';

-- A scanner starts a pass over its table; an unfinished pass before it (the
-- scanner was stopped) is forgotten, the last finished one is kept.
CREATE FUNCTION pyswpt_api.record_scan_pass_start(
    p_table_name text,
    p_pass_seconds double precision,
    p_row_estimate bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    INSERT INTO scan_pass AS s (
        table_name, pass_seconds, pass_started_at, pass_row_estimate, pass_rows_done, recorded_at
    )
    VALUES (p_table_name, p_pass_seconds, p_now, greatest(p_row_estimate, 0), 0, p_now)
    ON CONFLICT (table_name) DO UPDATE
    SET
        pass_seconds = EXCLUDED.pass_seconds,
        pass_started_at = EXCLUDED.pass_started_at,
        pass_row_estimate = EXCLUDED.pass_row_estimate,
        pass_rows_done = 0,
        recorded_at = EXCLUDED.recorded_at;
$$;

-- A scanner says how many rows its current pass has done so far (and that it runs).
CREATE FUNCTION pyswpt_api.record_scan_progress(
    p_table_name text,
    p_rows_done bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    UPDATE scan_pass
    SET pass_rows_done = p_rows_done, recorded_at = p_now
    WHERE table_name = p_table_name;
$$;

-- A scanner finished its current pass after p_rows_done rows.
CREATE FUNCTION pyswpt_api.record_scan_pass_end(
    p_table_name text,
    p_rows_done bigint,
    p_now timestamptz DEFAULT now()
)
RETURNS void
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    UPDATE scan_pass
    SET
        pass_rows_done = p_rows_done,
        recorded_at = p_now,
        last_pass_started_at = pass_started_at,
        last_pass_ended_at = p_now,
        last_pass_rows = p_rows_done
    WHERE table_name = p_table_name;
$$;
