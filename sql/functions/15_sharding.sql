-- Sharding in SQL (spec 01 §3.3, §4.1): the 32-bit shard key of an account and
-- whether it lies in a realm. The same numbers as pyswpt.sharding.shard_key and
-- Realm.owns, so that SQL can select or check the accounts of one shard.

-- The shard key K of spec 01 §4.1: the first 4 bytes of
-- md5(be8(debtor_id) || be8(creditor_id)), read as an unsigned big-endian number.
CREATE FUNCTION pyswpt_private.calc_shard_key(p_debtor_id bigint, p_creditor_id bigint)
RETURNS bigint
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
-- int8send gives the 8-byte big-endian two's complement form; a bit(32)
-- casts to bigint as an unsigned number.
RETURN ('x' || substr(md5(int8send(p_debtor_id) || int8send(p_creditor_id)), 1, 8))::bit(32)::bigint;

-- Whether the account (p_debtor_id, p_creditor_id) matches a realm of spec 01 §4.1:
-- K & realm_mask = realm. Also answers for the parent realm when given its mask.
CREATE FUNCTION pyswpt_private.is_in_realm(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_realm_mask bigint,
    p_realm bigint
)
RETURNS boolean
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
RETURN calc_shard_key(p_debtor_id, p_creditor_id) & p_realm_mask = p_realm;
