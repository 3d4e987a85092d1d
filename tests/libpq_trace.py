"""What a connection sends and receives, from libpq's protocol trace: how many round trips a step costs."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import psycopg
from psycopg.pq import Trace


@contextlib.contextmanager
def traced(conn: psycopg.Connection) -> Iterator[list[str]]:
    """Trace the protocol messages of `conn` in the block; yields a list that holds them after it,
    one per line: "F" (sent) or "B" (received), then the message type and its fields."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        try:
            yield lines
        finally:
            conn.pgconn.untrace()  # libpq buffers the trace until then
            trace.seek(0)
            lines += [" ".join(fields[:1] + fields[2:]) for fields in messages(trace.read().decode())]


def messages(trace: str) -> list[list[str]]:
    """The fields of each message; a query's text may span lines."""
    found: list[list[str]] = []
    for line in trace.splitlines():
        if line.startswith(("F\t", "B\t")):
            found.append(line.split("\t"))
        else:
            found[-1][-1] += " " + line.strip()
    return found


def round_trips(lines: list[str]) -> int:
    """How many times the client sent something and then waited for the server's answer."""
    directions = "".join(line[0] for line in lines)
    return directions.count("FB")


def sent_queries(lines: list[str]) -> list[list[str]]:
    """The statements of each query sent, in order: one per Parse message (extended protocol),
    those of a Query message (simple protocol, maybe several) together."""
    queries = []
    for line in lines:
        if line.startswith("F Parse"):
            queries.append([line.split('"')[3].strip()])
        elif line.startswith("F Query"):
            queries.append([statement.strip() for statement in line.split('"')[1].split(";")])
    return queries
