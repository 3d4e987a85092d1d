"""Route specifiers of the fetch proxy: the Swaptacular API proxy's file format, every key routed once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyswpt.fetch_routes import RoutesError, parse_routes
from pyswpt.sharding import MAX_INT64, MIN_INT64, Realm, shard_key

TWO_SHARDS = "0.* http://shard-0:8080\n1.* http://shard-1:8080\n"
THREE_SHARDS = "0.* http://a:1\n1.0.* http://b:2\n1.1.* http://c:3\n"


def test_one_route_for_every_key():
    routes = parse_routes("* http://only:8080\n")
    assert {routes.server_for(key) for key in (0, 2**31, 2**32 - 1)} == {"http://only:8080"}


@pytest.mark.parametrize(
    ("pair", "server"),
    # Spec 01 §4.2: K of (123, 456) is 0x084434f0, of (1, 2) 0xf014c44f.
    [((123, 456), "http://shard-0:8080"), ((1, 2), "http://shard-1:8080"), ((-1, 12), "http://shard-1:8080")],
)
def test_the_first_bits_of_the_sharding_key_pick_the_server(pair, server):
    assert parse_routes(TWO_SHARDS).server_for(shard_key(*pair)) == server


@given(st.integers(MIN_INT64, MAX_INT64), st.integers(MIN_INT64, MAX_INT64))
def test_a_pair_goes_to_the_server_whose_route_is_the_binding_key_of_the_shard_owning_it(debtor_id, creditor_id):
    routes = parse_routes(THREE_SHARDS)
    owners = {
        server
        for bits, server in routes.servers.items()
        if Realm.from_binding_key("".join(f"{bit}." for bit in bits) + "#").owns(debtor_id, creditor_id)
    }
    assert owners == {routes.server_for(shard_key(debtor_id, creditor_id))}


def test_comments_blank_lines_and_trailing_slashes_as_the_ecosystem_writes_them():
    text = "# 0.0.* http://zzzz:9010/ # comment\n\n  0.* http://a:9008/   # shard 0\n1.* https://b\n"
    assert parse_routes(text).servers == {"0": "http://a:9008", "1": "https://b"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0.* http://a\n", "no route for the keys of 1.*"),
        ("0.* http://a\n1.0.* http://b\n", "no route for the keys of 1.1.*"),
        ("", "no route for the keys of *"),
        ("0.* http://a\n1.* http://b\n0.* http://c\n", "line 3: route 0.* is given twice (also on line 1)"),
        ("* http://a\n1.* http://b\n", "line 2: route 1.* overlaps route * (line 1)"),
        ("0.* http://a\n1.* http://b\n0.1.* http://c\n", "line 3: route 0.1.* overlaps route 0.* (line 1)"),
        ("0.# http://a\n1.* http://b\n", "line 1: '0.#' is not a route specifier"),
        ("0.1 http://a\n", "line 1: '0.1' is not a route specifier"),
        ("2.* http://a\n", "line 1: '2.*' is not a route specifier"),
        ("0.* http://a\n1.*\n", "line 2: route 1.* has no server URL"),
        ("* ftp://a\n", "line 1: 'ftp://a' is not a server URL"),
        ("* http://a?x=1\n", "line 1: 'http://a?x=1' is not a server URL"),
        ("* http://a:port\n", "line 1: 'http://a:port' has an invalid port"),
        ("* http://a http://b\n", "line 1: unexpected 'http://b' after the server URL"),
        ("".join(f"{bit}." for bit in "0" * 21) + "* http://a\n", "line 1: "),
    ],
)
def test_routes_that_cannot_be_used_are_refused_with_the_reason(text, problem):
    with pytest.raises(RoutesError) as raised:
        parse_routes(text)
    assert str(raised.value).startswith(problem)
