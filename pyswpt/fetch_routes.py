"""Route specifiers of the fetch-API proxy: which server owns which sharding keys.

The file (APIPROXY_CONFIG_FILE) has the format of the Swaptacular API proxy,
so that an operator can move between that proxy and `pyswpt run fetch-proxy`
without rewriting it: one route per line, a route specifier (zero to twenty
bits, each followed by a dot, then `*`), spaces, and the server's http(s)
URL. Blank lines and lines starting with `#` are comments, and so is what
follows a `#` after the URL.

    0.* http://shard-0:8080
    1.* http://shard-1:8080

The specifiers must cover every 32-bit sharding key exactly once: a key with
no server would make its accounts unreachable, and two servers for one key
would make the answer depend on the order of lines. Any other line is an
error too (the ecosystem's proxy skips it), because a mistyped route is far
more likely than a line meant to be ignored.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

# Like a binding key of the shards (sharding.BINDING_KEY_PATTERN), with `*` for `#`.
ROUTE_PATTERN = re.compile(r"((?:[01]\.){0,20})\*")
MAX_ROUTE_BITS = 20
KEY_BITS = 32
COMMENT_START = "#"
SERVER_SCHEMES = ("http", "https")


class RoutesError(Exception):
    """The routes cannot be used; the message says which line or which keys."""


@dataclasses.dataclass(frozen=True)
class Routes:
    """Server base URL (no trailing slash) by the bits a route specifier names ("" for `*`)."""

    servers: dict[str, str]

    def server_for(self, sharding_key: int) -> str:
        """The base URL of the server that owns a 32-bit sharding key."""
        bits = format(sharding_key, f"0{KEY_BITS}b")
        for length in range(MAX_ROUTE_BITS + 1):
            server = self.servers.get(bits[:length])
            if server is not None:
                return server
        raise AssertionError("parse_routes() accepts only routes that cover every key")


def parse_routes(text: str) -> Routes:
    """The routes of a file's text; RoutesError names the first problem."""
    servers: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        route = parse_line(line, number)
        if route is None:
            continue
        bits, server = route
        if bits in servers:
            raise RoutesError(f"line {number}: route {specifier(bits)} is given twice (also on line {lines_of[bits]})")
        servers[bits] = server
        lines_of[bits] = number
    check_every_key_has_one_route(servers, lines_of)
    return Routes(servers)


def parse_line(line: str, number: int) -> tuple[str, str] | None:
    """(bits, server URL) of one line, or None for a comment or a blank line."""
    fields = line.split()
    if not fields or fields[0].startswith(COMMENT_START):
        return None
    match = ROUTE_PATTERN.fullmatch(fields[0])
    if match is None:
        raise RoutesError(f"line {number}: {fields[0]!r} is not a route specifier (e.g. '*', '0.*', '1.0.*')")
    if len(fields) < 2:
        raise RoutesError(f"line {number}: route {fields[0]} has no server URL")
    if len(fields) > 2 and not fields[2].startswith(COMMENT_START):
        raise RoutesError(f"line {number}: unexpected {fields[2]!r} after the server URL")
    return match.group(1).replace(".", ""), server_url(fields[1], number)


def server_url(text: str, number: int) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in SERVER_SCHEMES or not parts.hostname or parts.query or parts.fragment:
        raise RoutesError(f"line {number}: {text!r} is not a server URL such as http://shard-0:8080")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise RoutesError(f"line {number}: {text!r} has an invalid port") from None
    return text.rstrip("/")


def check_every_key_has_one_route(servers: dict[str, str], lines_of: dict[str, int]) -> None:
    for bits in servers:
        for length in range(len(bits)):
            if bits[:length] in servers:
                raise RoutesError(
                    f"line {lines_of[bits]}: route {specifier(bits)} overlaps route "
                    f"{specifier(bits[:length])} (line {lines_of[bits[:length]]})"
                )
    missing = first_uncovered("", servers)
    if missing is not None:
        raise RoutesError(f"no route for the keys of {specifier(missing)}: the routes must cover every key")


def first_uncovered(prefix: str, servers: dict[str, str]) -> str | None:
    """The first bits under `prefix` that no route covers, given routes that do not overlap.

    Recurses only below prefixes that some longer route extends, hence at most
    MAX_ROUTE_BITS deep.
    """
    if prefix in servers:
        return None
    if not any(bits.startswith(prefix) for bits in servers):
        return prefix
    return first_uncovered(prefix + "0", servers) or first_uncovered(prefix + "1", servers)


def specifier(bits: str) -> str:
    """The route specifier of some bits: "10" -> "1.0.*"."""
    return "".join(f"{bit}." for bit in bits) + "*"
