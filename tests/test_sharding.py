"""Identifiers, routing keys and realms: the test vectors of spec 01 §0.1, §3.3, §4.1, §4.2."""

from __future__ import annotations

import pytest

from pyswpt import sharding

MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1

# (i64, hex routing key, u64 string), spec 01 §3.3.
HEX_VECTORS = [
    (0, "00.00.00.00.00.00.00.00", "0"),
    (2, "00.00.00.00.00.00.00.02", "2"),
    (-1, "ff.ff.ff.ff.ff.ff.ff.ff", "18446744073709551615"),
    (-2, "ff.ff.ff.ff.ff.ff.ff.fe", "18446744073709551614"),
    (1234, "00.00.00.00.00.00.04.d2", "1234"),
    (1099511627778, "00.00.01.00.00.00.00.02", "1099511627778"),
    (MIN_INT64, "80.00.00.00.00.00.00.00", "9223372036854775808"),
    (MAX_INT64, "7f.ff.ff.ff.ff.ff.ff.ff", "9223372036854775807"),
]

# (debtor, creditor, binary routing key), spec 01 §3.3.
BINARY_VECTORS = [
    (123, 456, "0.0.0.0.1.0.0.0.0.1.0.0.0.1.0.0.0.0.1.1.0.1.0.0"),
    (1, 2, "1.1.1.1.0.0.0.0.0.0.0.1.0.1.0.0.1.1.0.0.0.1.0.0"),
    (-1, 1234, "0.0.1.0.1.1.1.0.0.0.1.1.1.1.1.0.1.0.0.1.1.1.1.1"),
    (-1, 12, "1.0.0.1.0.1.0.1.0.0.1.0.0.1.0.0.0.0.0.1.0.0.0.1"),
    (0, 0, "0.1.0.0.1.0.1.0.1.1.1.0.0.1.1.1.0.0.0.1.0.0.1.1"),
    (-2, 0, "1.0.0.0.0.0.1.1.0.1.0.1.1.0.0.1.0.0.0.0.0.1.1.1"),
    (-2, 1099511627781, "1.1.0.0.0.0.1.0.1.1.1.1.0.1.0.0.1.0.0.1.1.1.0.1"),
]

# (debtor, creditor, MD5 hex), spec 01 §3.3.
HASH_VECTORS = [
    (123, 456, "084434f0770579f74203843d57ea0378"),
    (1, 2, "f014c44f99b5d6162fc852fea57caceb"),
    (-1, 1234, "2e3e9fe6078b8847ec78859bebbe7d69"),
    (-1, 12, "95241166755af5e87d7ccab76926d86e"),
    (0, 0, "4ae71336e44bf9bf79d2752e234818a5"),
    (-2, 0, "8359079cdc59546da9087a08dfc4d476"),
    (-2, 1099511627781, "c2f49df5c96fca9f048d57b6b9e098ba"),
]

# Binding key -> (realm_mask, realm, parent mask, parent realm), spec 01 §4.1.
REALM_VECTORS = {
    "#": (0x00000000, 0x00000000, 0x00000000, 0x00000000),
    "0.#": (0x80000000, 0x00000000, 0x00000000, 0x00000000),
    "1.#": (0x80000000, 0x80000000, 0x00000000, 0x00000000),
    "0.1.#": (0xC0000000, 0x40000000, 0x80000000, 0x00000000),
    "1.0.1.#": (0xE0000000, 0xA0000000, 0xC0000000, 0x80000000),
}

# (debtor, creditor, K, {binding key: "Y/n"}), spec 01 §4.2.
KEYS = ["#", "0.#", "1.#", "0.1.#", "1.0.1.#"]
MATCH_VECTORS = [
    (123, 456, 0x084434F0, "Y/Y Y/Y n/Y n/Y n/n"),
    (1, 2, 0xF014C44F, "Y/Y n/Y Y/Y n/n n/n"),
    (-1, 1234, 0x2E3E9FE6, "Y/Y Y/Y n/Y n/Y n/n"),
    (-1, 12, 0x95241166, "Y/Y n/Y Y/Y n/n n/Y"),
    (1, 3, 0x7D3D1D27, "Y/Y Y/Y n/Y Y/Y n/n"),
    (1, 14, 0xBD6C8467, "Y/Y n/Y Y/Y n/n Y/Y"),
    (0, 0, 0x4AE71336, "Y/Y Y/Y n/Y Y/Y n/n"),
    (-2, 0, 0x8359079C, "Y/Y n/Y Y/Y n/n n/Y"),
    (-2, 1099511627778, 0x1C26A5FA, "Y/Y Y/Y n/Y n/Y n/n"),
]


@pytest.mark.parametrize(("value", "key", "u64"), HEX_VECTORS)
def test_hex_routing_key_is_big_endian_twos_complement(value: int, key: str, u64: str) -> None:
    assert sharding.hex_routing_key(value) == key


@pytest.mark.parametrize(("value", "key", "u64"), HEX_VECTORS)
def test_u64_string_has_the_same_bits(value: int, key: str, u64: str) -> None:
    assert sharding.u64_string(value) == u64


@pytest.mark.parametrize(("value", "key", "u64"), HEX_VECTORS)
def test_i64_from_u64_inverts_u64_string(value: int, key: str, u64: str) -> None:
    assert sharding.i64_from_u64(int(u64)) == value


@pytest.mark.parametrize("value", [-1, 2**64])
def test_i64_from_u64_refuses_numbers_outside_u64(value: int) -> None:
    with pytest.raises(ValueError):
        sharding.i64_from_u64(value)


@pytest.mark.parametrize(("debtor_id", "creditor_id", "md5"), HASH_VECTORS)
def test_pair_hash_is_md5_of_both_ids(debtor_id: int, creditor_id: int, md5: str) -> None:
    assert sharding.pair_hash(debtor_id, creditor_id).hex() == md5


@pytest.mark.parametrize(("debtor_id", "creditor_id", "key"), BINARY_VECTORS)
def test_binary_routing_key_is_the_first_24_bits_of_the_pair_hash(debtor_id: int, creditor_id: int, key: str) -> None:
    assert sharding.binary_routing_key(debtor_id, creditor_id) == key


@pytest.mark.parametrize("binding_key", REALM_VECTORS)
def test_realm_from_binding_key(binding_key: str) -> None:
    realm = sharding.Realm.from_binding_key(binding_key)
    assert (realm.mask, realm.realm, realm.parent_mask, realm.parent_realm) == REALM_VECTORS[binding_key]


def test_twenty_bits_are_the_most_a_binding_key_may_have() -> None:
    realm = sharding.Realm.from_binding_key("1." * 20 + "#")
    assert (realm.mask, realm.realm) == (0xFFFFF000, 0xFFFFF000)


@pytest.mark.parametrize("binding_key", ["", "1.1", "2.#", ".#", "1." * 21 + "#", "1.#.#"])
def test_invalid_binding_key_is_refused(binding_key: str) -> None:
    with pytest.raises(ValueError, match="invalid routing key"):
        sharding.Realm.from_binding_key(binding_key)


@pytest.mark.parametrize(("debtor_id", "creditor_id", "k", "matches"), MATCH_VECTORS)
def test_shard_key_is_the_first_32_bits_of_the_pair_hash(
    debtor_id: int, creditor_id: int, k: int, matches: str
) -> None:
    assert sharding.shard_key(debtor_id, creditor_id) == k


@pytest.mark.parametrize(("debtor_id", "creditor_id", "k", "matches"), MATCH_VECTORS)
def test_realm_and_parent_realm_ownership(debtor_id: int, creditor_id: int, k: int, matches: str) -> None:
    for binding_key, expected in zip(KEYS, matches.split(), strict=True):
        realm = sharding.Realm.from_binding_key(binding_key)
        owns = "Y" if realm.owns(debtor_id, creditor_id) else "n"
        parent_owns = "Y" if realm.parent_owns(debtor_id, creditor_id) else "n"
        assert f"{owns}/{parent_owns}" == expected, binding_key


def test_the_realm_of_the_whole_hash_space_owns_a_pair_without_hashing_it(monkeypatch) -> None:
    # A node of one shard asks for every message, account and outbox row.
    def no_hash(debtor_id: int, creditor_id: int) -> int:
        raise AssertionError("hashed")

    monkeypatch.setattr(sharding, "shard_key", no_hash)
    assert sharding.Realm.from_binding_key("#").owns(-2, 1099511627781)


def test_pending_balance_change_routing_matches_shard_binding() -> None:
    # Spec 01 §3.3: crediting (-2, 1099511627781) reaches `1.#` and `1.1.#`, not `0.#`.
    assert sharding.Realm.from_binding_key("1.#").owns(-2, 1099511627781)
    assert sharding.Realm.from_binding_key("1.1.#").owns(-2, 1099511627781)
    assert not sharding.Realm.from_binding_key("0.#").owns(-2, 1099511627781)
