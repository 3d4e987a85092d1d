-- The bits of account.status_flags and account.config_flags (spec 02 §1.11),
-- named once here so that no other file masks a flags column by hand.
--
-- These are SQL functions with a SQL-standard body: their names are bound
-- when they are created, so they need no SET search_path, and PostgreSQL
-- inlines them into the calling query (a scan's WHERE clause costs the same
-- as the bare mask). This file installs first, before every function that
-- calls them.

-- status_flags bit 0 (1), deleted: the account is logically gone.
CREATE FUNCTION pyswpt_private.account_is_deleted(p_status_flags integer)
RETURNS boolean
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN p_status_flags & 1 <> 0;

-- status_flags bit 1 (2), overflown: a principal update had to be contained
-- (spec 02 §3.6). Sticky and informational only.
CREATE FUNCTION pyswpt_private.account_is_overflown(p_status_flags integer)
RETURNS boolean
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN p_status_flags & 2 <> 0;

-- config_flags bit 0 (1), scheduled for deletion: set by the owner through
-- ConfigureAccount; the other config bits are stored and echoed, never read.
CREATE FUNCTION pyswpt_private.config_is_scheduled_for_deletion(p_config_flags integer)
RETURNS boolean
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN p_config_flags & 1 <> 0;

-- status_flags with the deleted bit set: deletion of an account (spec 02 §2.10).
CREATE FUNCTION pyswpt_private.with_deleted_flag(p_status_flags integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN p_status_flags | 1;

-- status_flags with the deleted bit cleared: resurrection of an account by
-- ConfigureAccount or a balance change; the overflown bit is kept.
CREATE FUNCTION pyswpt_private.without_deleted_flag(p_status_flags integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN p_status_flags & ~1;

-- status_flags with the overflown bit set: a contained principal update.
CREATE FUNCTION pyswpt_private.with_overflown_flag(p_status_flags integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN p_status_flags | 2;
