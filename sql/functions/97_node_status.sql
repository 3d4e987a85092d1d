-- `pyswpt status` (issue 11): what an operator checks at a glance, from cheap
-- SQL. Besides this file it reads the views outbox_backlog and work_queues
-- (95_operator_views.sql) and scan_passes (74_scan_passes.sql).

-- Parked messages per source and reason: how many are kept, and how many more
-- were only counted because their source and reason had reached the cap.
-- Cheap: parked messages are capped per source and reason and indexed by them.
CREATE FUNCTION pyswpt_api.count_parked_messages()
RETURNS TABLE (
    source_name text,
    reason_code text,
    parked_count bigint,
    dropped_count bigint,
    oldest_first_seen_at timestamptz
)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT
        source_name,
        reason_code,
        coalesce(p.parked_count, 0),
        coalesce(o.dropped_count, 0),
        p.oldest_first_seen_at
    FROM (
        SELECT source_name, reason_code, count(*) AS parked_count, min(first_seen_at) AS oldest_first_seen_at
        FROM parked_message
        GROUP BY source_name, reason_code
    ) AS p
    FULL JOIN parked_message_overflow AS o USING (source_name, reason_code)
    ORDER BY source_name, reason_code
$$;
