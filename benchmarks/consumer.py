"""Throughput of `pyswpt run consumer`: messages per second from the SMP queue into the database.

Not a test. For each message kind and prefetch count: a fresh database, a fresh
queue holding N pre-published messages, then the consumer is started and the
rows its transactions commit are counted until all N are in. The rate is
measured from the last poll that saw no committed row to the first that saw
them all, so process start-up is not counted. With
PROTOCOL_BROKER_PREFETCH_COUNT=1 every message is its own transaction (the
reference's way); with 100 a batch of up to 100 messages is one transaction.

    PYSWPT_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
    PYSWPT_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F \\
    .venv/bin/python benchmarks/consumer.py --messages 5000 --prefetch 1 100

Only the consumer runs (no workers): the numbers are the intake alone. The
run works in a RabbitMQ vhost of its own, made like a test session's (the
management API or rabbitmqctl) and deleted at the end; the URL's vhost is only
a template.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import psycopg
from psycopg import sql

from pyswpt import schema, topology
from pyswpt.sharding import binary_routing_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import vhosts  # noqa: E402  (tests/vhosts.py, shared with the test sessions)

POLL_SECONDS = 0.01
DRAIN_TIMEOUT_SECONDS = 600.0
ACCOUNTS = 100
MAX_INT64 = 2**63 - 1

# What the consumer's transaction leaves behind for each message of a kind. A FinalizeTransfer's
# request stays queued only while its sender is busy (held_senders): a window finalizes the
# requests of a free sender at once, and those of a missing one leave nothing behind.
COMMITTED_ROWS = {
    "PendingBalanceChange": "SELECT count(*) FROM pyswpt.registered_balance_change",
    "FinalizeTransfer": "SELECT count(*) FROM pyswpt.finalization_request",
}


def with_database(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    dbname = f"pyswpt_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = with_database(server_url, dbname)
    try:
        schema.apply_migrations(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@contextlib.contextmanager
def fresh_queue(rabbitmq_url: str, debtor_id: int) -> Iterator[str]:
    queue = f"pyswpt_bench_{uuid.uuid4().hex[:10]}"
    # Bound only by a key of this run's root account, which nothing publishes to.
    topology.subscribe(rabbitmq_url, queue, binary_routing_key(debtor_id, 0))
    try:
        yield queue
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)
            channel.queue_delete(topology.dead_letter_queue_name(queue))


def pending_balance_change(debtor_id: int, n: int, committed_at: str) -> dict:
    return {
        "type": "PendingBalanceChange",
        "debtor_id": debtor_id,
        "creditor_id": 1 + n % ACCOUNTS,
        "change_id": n,
        "coordinator_type": "direct",
        "transfer_note_format": "",
        "transfer_note": "",
        "committed_at": committed_at,
        "principal_delta": 1,
        "other_creditor_id": 1000,
    }


def finalize_transfer(debtor_id: int, n: int, ts: str) -> dict:
    sender = 1 + n % ACCOUNTS
    return {
        "type": "FinalizeTransfer",
        "debtor_id": debtor_id,
        "creditor_id": sender,
        "transfer_id": n,
        "coordinator_type": "direct",
        "coordinator_id": sender,
        "coordinator_request_id": n,
        "committed_amount": 1,
        "transfer_note_format": "",
        "transfer_note": "",
        "ts": ts,
    }


MESSAGE_FACTORIES: dict[str, Callable[[int, int, str], dict]] = {
    "PendingBalanceChange": pending_balance_change,
    "FinalizeTransfer": finalize_transfer,
}


def publish(rabbitmq_url: str, queue: str, kind: str, debtor_id: int, count: int) -> None:
    """Pre-publish `count` persistent messages, confirmed by the broker."""
    now = dt.datetime.now(dt.UTC).isoformat()
    properties = pika.BasicProperties(content_type="application/json", type=kind, delivery_mode=2)
    with topology.open_channel(rabbitmq_url) as channel:
        channel.confirm_delivery()
        for n in range(1, count + 1):
            body = json.dumps(MESSAGE_FACTORIES[kind](debtor_id, n, now)).encode()
            channel.basic_publish("", queue, body, properties)
        assert channel.queue_declare(queue, passive=True).method.message_count == count


def pyswpt_command() -> list[str]:
    script = Path(sys.executable).with_name("pyswpt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pyswpt.cli"]


def measure(postgres_server_url: str, rabbitmq_url: str, kind: str, prefetch: int, count: int) -> float:
    """Messages per second committed by one consumer process."""
    debtor_id = random.randint(1, MAX_INT64)
    with fresh_database(postgres_server_url) as database_url, fresh_queue(rabbitmq_url, debtor_id) as queue:
        publish(rabbitmq_url, queue, kind, debtor_id, count)
        environ = {
            **os.environ,
            "POSTGRES_URL": database_url,
            "PROTOCOL_BROKER_URL": rabbitmq_url,
            "PROTOCOL_BROKER_QUEUE": queue,
            "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": "#",
            "PROTOCOL_BROKER_PREFETCH_COUNT": str(prefetch),
            "APP_LOG_LEVEL": "warning",
        }
        with (
            psycopg.connect(database_url, autocommit=True) as conn,
            held_senders(database_url, debtor_id) if kind == "FinalizeTransfer" else contextlib.nullcontext(),
        ):
            consumer = subprocess.Popen([*pyswpt_command(), "run", "consumer"], env=environ)
            try:
                return rate_until_done(conn, COMMITTED_ROWS[kind], count, consumer)
            finally:
                consumer.terminate()
                consumer.wait(timeout=60)


@contextlib.contextmanager
def held_senders(database_url: str, debtor_id: int) -> Iterator[None]:
    """The FinalizeTransfers' senders, made and then locked by another session until the run ends,
    as busy senders are: each window's requests stay queued for the finalization stage, which
    does not run here, so the rows count what the intake committed."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {schema.OWNER_SEARCH_PATH}")  # the private helpers' own
        conn.execute(
            "SELECT lock_or_create_account(%s, g, now()) FROM generate_series(1, %s) AS g", (debtor_id, ACCOUNTS)
        )
        with conn.transaction():
            conn.execute("SELECT 1 FROM account WHERE debtor_id = %s FOR UPDATE", (debtor_id,))
            yield


def rate_until_done(conn: psycopg.Connection, query: str, count: int, consumer: subprocess.Popen) -> float:
    """Messages per second from the last poll that saw none committed to the first that saw all:
    start-up is not counted, and a run that commits everything between two polls still has a
    length."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    none_seen_at = time.monotonic()
    while True:
        committed = conn.execute(query).fetchone()[0]
        moment = time.monotonic()
        if committed >= count:
            return count / (moment - none_seen_at)
        if committed == 0:
            none_seen_at = moment
        if consumer.poll() is not None:
            raise RuntimeError(f"the consumer exited with {consumer.returncode}")
        if moment > deadline:
            raise RuntimeError(f"only {committed} of {count} messages committed in time")
        time.sleep(POLL_SECONDS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-url", default=os.environ.get("PYSWPT_TEST_POSTGRES_URL"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get("PYSWPT_TEST_RABBITMQ_URL"))
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--kind", choices=sorted(MESSAGE_FACTORIES), nargs="+", default=sorted(MESSAGE_FACTORIES))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if not args.postgres_url or not args.rabbitmq_url:
        parser.error("set --postgres-url/--rabbitmq-url or PYSWPT_TEST_POSTGRES_URL/PYSWPT_TEST_RABBITMQ_URL")
    try:
        admin = vhosts.vhost_admin_for(args.rabbitmq_url, os.environ.get(vhosts.MANAGEMENT_URL_VARIABLE))
    except vhosts.VhostAdminError as error:
        parser.error(str(error))

    print(f"{'kind':<22} {'prefetch':>8} {'messages':>8} {'msg/s':>9}")
    with vhosts.own_vhost(admin, args.rabbitmq_url, "pyswpt_bench") as rabbitmq_url:
        for kind in args.kind:
            for prefetch in args.prefetch:
                for _ in range(args.repeat):
                    rate = measure(args.postgres_url, rabbitmq_url, kind, prefetch, args.messages)
                    print(f"{kind:<22} {prefetch:>8} {args.messages:>8} {rate:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
