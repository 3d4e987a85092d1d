-- The group roles of pyswpt (README "Database roles"). NOLOGIN: a DBA makes
-- login users members of them. Roles belong to the whole cluster, so several
-- shards (databases) of one server share these three names.
--
--   pyswpt_driver    the drivers: the entry points they call, nothing on tables
--   pyswpt_web       the fetch API: is_reachable_account, get_account_config_data
--   pyswpt_operator  the operator views, audit, parked messages, verify-shard-content
--
-- Every configure and `yoyo apply` runs this file, then sql/grants.sql. A user
-- without CREATEROLE leaves the roles to a DBA: configure then prints this file
-- and sql/grants.sql, for a DBA to run in the database.
DO $$
BEGIN
    IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    -- One configure of this database at a time (an advisory lock is per
    -- database); a configure of another database on the same server may
    -- create a role at the same instant, which the handlers accept.
    PERFORM pg_advisory_xact_lock(7317598230000000009);
    BEGIN
        IF to_regrole('pyswpt_driver') IS NULL THEN
            CREATE ROLE pyswpt_driver NOLOGIN;
        END IF;
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
            NULL;
    END;
    BEGIN
        IF to_regrole('pyswpt_web') IS NULL THEN
            CREATE ROLE pyswpt_web NOLOGIN;
        END IF;
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
            NULL;
    END;
    BEGIN
        IF to_regrole('pyswpt_operator') IS NULL THEN
            CREATE ROLE pyswpt_operator NOLOGIN;
        END IF;
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
            NULL;
    END;
END;
$$;
