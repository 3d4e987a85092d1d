"""Identifiers on the wire: u64 strings, routing keys and the sharding realm.

Shards split the space of `(debtor_id, creditor_id)` pairs by the first bits of
an MD5 hash; RabbitMQ routes PendingBalanceChange messages by the same bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
MAX_UINT64 = 2**64 - 1
ROUTING_KEY_BITS = 24

# Zero to twenty bits, each followed by a dot, then '#'.
BINDING_KEY_PATTERN = re.compile(r"((?:[01]\.){0,20})#")


def u64_string(value: int) -> str:
    """The decimal text of the unsigned number with the same bits as an i64."""
    return str(value if value >= 0 else value + 2**64)


def i64_from_u64(value: int) -> int:
    """The i64 with the same bits as an unsigned 64-bit number."""
    if not 0 <= value <= MAX_UINT64:
        raise ValueError(f"{value} is not an unsigned 64-bit number")
    return value if value <= MAX_INT64 else value - 2**64


def _be8(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def hex_routing_key(value: int) -> str:
    """Routing key of `to_creditors`, `to_debtors` and `to_coordinators`."""
    return _be8(value).hex(".")


def pair_hash(debtor_id: int, creditor_id: int) -> bytes:
    return hashlib.md5(_be8(debtor_id) + _be8(creditor_id)).digest()


def binary_routing_key(debtor_id: int, creditor_id: int) -> str:
    """Routing key of `accounts_in`: the first 24 bits of the pair's hash."""
    bits = int.from_bytes(pair_hash(debtor_id, creditor_id)[:3], "big")
    return ".".join(format(bits, f"0{ROUTING_KEY_BITS}b"))


def shard_key(debtor_id: int, creditor_id: int) -> int:
    """The 32-bit number whose first bits select the shard of a pair."""
    return int.from_bytes(pair_hash(debtor_id, creditor_id)[:4], "big")


@dataclasses.dataclass(frozen=True)
class Realm:
    """The part of the hash space one shard owns, and its parent's before a split."""

    mask: int
    realm: int
    parent_mask: int
    parent_realm: int

    @classmethod
    def from_binding_key(cls, binding_key: str) -> Realm:
        match = BINDING_KEY_PATTERN.fullmatch(binding_key)
        if match is None:
            raise ValueError(f"invalid routing key: {binding_key!r}")
        bits = match.group(1).replace(".", "")
        n = len(bits)
        mask = ((1 << n) - 1) << (32 - n)
        realm = int(bits, 2) << (32 - n) if n else 0
        parent_mask = mask & (mask << 1) & 0xFFFFFFFF
        return cls(mask, realm, parent_mask, realm & parent_mask)

    def owns(self, debtor_id: int, creditor_id: int) -> bool:
        if not self.mask:  # the whole hash space (`#`, one shard): its owner needs no hash
            return True
        return shard_key(debtor_id, creditor_id) & self.mask == self.realm

    def parent_owns(self, debtor_id: int, creditor_id: int) -> bool:
        return shard_key(debtor_id, creditor_id) & self.parent_mask == self.parent_realm
