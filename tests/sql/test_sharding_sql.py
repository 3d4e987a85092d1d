"""calc_shard_key and is_in_realm (sql/functions/15_sharding.sql) against spec 01 §4.2."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyswpt import schema
from pyswpt.sharding import MAX_INT64, MIN_INT64, Realm, shard_key

# (debtor_id, creditor_id, K, {binding key: (matches realm, matches parent)}) of spec 01 §4.2.
BINDING_KEYS = ("#", "0.#", "1.#", "0.1.#", "1.0.1.#")
VECTORS = [
    (123, 456, 0x084434F0, "YY YY nY nY nn"),
    (1, 2, 0xF014C44F, "YY nY YY nn nn"),
    (-1, 1234, 0x2E3E9FE6, "YY YY nY nY nn"),
    (-1, 12, 0x95241166, "YY nY YY nn nY"),
    (1, 3, 0x7D3D1D27, "YY YY nY YY nn"),
    (1, 14, 0xBD6C8467, "YY nY YY nn YY"),
    (0, 0, 0x4AE71336, "YY YY nY YY nn"),
    (-2, 0, 0x8359079C, "YY nY YY nn nY"),
    (-2, 1099511627778, 0x1C26A5FA, "YY YY nY nY nn"),
]

i64 = st.integers(min_value=MIN_INT64, max_value=MAX_INT64)


def sql_shard_key(conn: psycopg.Connection, debtor_id: int, creditor_id: int) -> int:
    return conn.execute("SELECT calc_shard_key(%s, %s)", (debtor_id, creditor_id)).fetchone()[0]


def sql_is_in_realm(conn: psycopg.Connection, debtor_id: int, creditor_id: int, mask: int, realm: int) -> bool:
    row = conn.execute("SELECT is_in_realm(%s, %s, %s, %s)", (debtor_id, creditor_id, mask, realm)).fetchone()
    return row[0]


@pytest.mark.parametrize(("debtor_id", "creditor_id", "key", "_"), VECTORS)
def test_shard_key_is_first_four_bytes_of_md5_unsigned(conn, debtor_id, creditor_id, key, _):
    assert sql_shard_key(conn, debtor_id, creditor_id) == key


@pytest.mark.parametrize(("debtor_id", "creditor_id", "_", "matches"), VECTORS)
def test_realm_and_parent_realm_matches_follow_the_spec_vectors(conn, debtor_id, creditor_id, _, matches):
    for binding_key, expected in zip(BINDING_KEYS, matches.split(), strict=True):
        realm = Realm.from_binding_key(binding_key)
        in_realm = sql_is_in_realm(conn, debtor_id, creditor_id, realm.mask, realm.realm)
        in_parent = sql_is_in_realm(conn, debtor_id, creditor_id, realm.parent_mask, realm.parent_realm)
        assert (in_realm, in_parent) == (expected[0] == "Y", expected[1] == "Y"), binding_key


@settings(max_examples=200, deadline=None)
@given(debtor_id=i64, creditor_id=i64)
def test_shard_key_agrees_with_python_for_any_pair(migrated_database_url, debtor_id, creditor_id):
    # Hypothesis re-runs the body, so it opens its own connection (read-only queries).
    with psycopg.connect(migrated_database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        assert sql_shard_key(conn, debtor_id, creditor_id) == shard_key(debtor_id, creditor_id)


@settings(max_examples=100, deadline=None)
@given(debtor_id=i64, creditor_id=i64, bits=st.text(alphabet="01", max_size=20))
def test_is_in_realm_agrees_with_python_for_any_pair_and_binding_key(
    migrated_database_url, debtor_id, creditor_id, bits
):
    realm = Realm.from_binding_key("".join(f"{bit}." for bit in bits) + "#")
    with psycopg.connect(migrated_database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")
        assert sql_is_in_realm(conn, debtor_id, creditor_id, realm.mask, realm.realm) == realm.owns(
            debtor_id, creditor_id
        )


def test_null_arguments_give_null(conn):
    assert sql_shard_key(conn, None, 1) is None
