-- Accounts scanner step 6 (spec 02 §4.4, spec 01 §5): which accounts need a
-- ChangeInterestRate or an UpdateDebtorInfo chore to follow their debtor's
-- root config. The scanner obtains the root configs (locally or through the
-- fetch API) and passes their config_data texts; the decision is made here,
-- with the same RootConfigData parser as the rest of the ledger.

-- For the given accounts: the chores that align them with their debtor's root
-- config, one row per account needing at least one. p_root_debtor_ids and
-- p_root_config_data are parallel arrays; a debtor missing from them (no
-- config obtained) or with an invalid config gets no chores. Only existing,
-- non-root, not deleted accounts qualify. No locks: the chore handlers
-- re-check everything under the account lock.
--  * interest_rate: the target, when it differs from the stored rate and the
--    last change is at least MESSAGE_MAX_DELAY_DAYS + 1 days old; else NULL.
--    The stored rate is single precision: it is compared with the target as
--    change_interest_rate would store it (interest_rate_as_stored), so a
--    target such as 3.567 does not "change" the rate on every pass as in the
--    reference, a target that would be stored as zero asks for nothing, and
--    no target can make the comparison fail (a plain cast to `real` raises
--    underflow on 1e-46, which stopped the scanner at that debtor for good).
--  * needs_debtor_info_update: the stored (iri, content type, sha256) differ
--    from the config's. '' counts as absent on both sides: the chore maps ''
--    to absent anyway, so an '' in the config no longer sends a no-op chore
--    on every pass (a quirk of the reference, spec 02 §4.4).
CREATE FUNCTION pyswpt_api.select_debtor_settings_chores(
    p_debtor_ids bigint[],
    p_creditor_ids bigint[],
    p_root_debtor_ids bigint[],
    p_root_config_data text[],
    p_message_max_delay_days double precision,
    p_now timestamptz DEFAULT now()
)
RETURNS TABLE (
    debtor_id bigint,
    creditor_id bigint,
    interest_rate double precision,
    needs_debtor_info_update boolean,
    debtor_info_iri text,
    debtor_info_content_type text,
    debtor_info_sha256 bytea
)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    WITH root_config AS (
        SELECT DISTINCT ON (r.debtor_id)
            r.debtor_id,
            c.interest_rate_target,
            c.info_iri,
            c.info_content_type,
            c.info_sha256
        FROM unnest(p_root_debtor_ids, p_root_config_data) AS r (debtor_id, config_data)
        CROSS JOIN LATERAL parse_root_config(r.config_data) AS c
        WHERE r.config_data IS NOT NULL
            AND c.is_valid
        ORDER BY r.debtor_id
    ),
    decided AS (
        SELECT
            s.debtor_id,
            s.creditor_id,
            CASE
                WHEN s.interest_rate <> interest_rate_as_stored(r.interest_rate_target)
                    AND s.last_interest_rate_change_ts
                        <= p_now - make_interval(secs => (p_message_max_delay_days + 1.0) * 86400.0)
                THEN r.interest_rate_target
            END AS interest_rate,
            (
                nullif(s.debtor_info_iri, ''),
                nullif(s.debtor_info_content_type, ''),
                s.debtor_info_sha256
            ) IS DISTINCT FROM (
                nullif(r.info_iri, ''),
                nullif(r.info_content_type, ''),
                r.info_sha256
            ) AS needs_debtor_info_update,
            r.info_iri,
            r.info_content_type,
            r.info_sha256
        FROM get_account_debtor_settings(p_debtor_ids, p_creditor_ids) AS s
        JOIN root_config AS r ON r.debtor_id = s.debtor_id
        WHERE s.creditor_id <> 0
            AND NOT s.is_deleted
    )
    SELECT
        d.debtor_id,
        d.creditor_id,
        d.interest_rate,
        d.needs_debtor_info_update,
        d.info_iri,
        d.info_content_type,
        d.info_sha256
    FROM decided AS d
    WHERE d.interest_rate IS NOT NULL
        OR d.needs_debtor_info_update
    ORDER BY d.debtor_id, d.creditor_id
$$;
