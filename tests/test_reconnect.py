"""A consumer that loses its database or broker connection reconnects by itself.

The message that was being handled when the connection went is not lost: it
was not acked, so the broker delivers it again after the reconnection.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid

import pika
import pytest
from broker import CAN_CLOSE_BROKER_CONNECTIONS, close_broker_connection_of
from drivers import driver_environment, running, wait_for

from pyswpt import topology

CONSUMER_SETTINGS = {"PROTOCOL_BROKER_PREFETCH_COUNT": "10", "APP_LOG_LEVEL": "info"}


@pytest.fixture
def queue(rabbitmq_url):
    name = f"test_reconnect_{uuid.uuid4().hex[:8]}"
    # Bound to a key no message uses: only what the test puts in arrives.
    topology.subscribe(rabbitmq_url, name, "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.#")
    yield name
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_delete(name)
        channel.queue_delete(topology.dead_letter_queue_name(name))


def configure_account(rabbitmq_url: str, queue: str, debtor_id: int, creditor_id: int, seqnum: int = 1) -> None:
    fields = {
        "type": "ConfigureAccount",
        "debtor_id": debtor_id,
        "creditor_id": creditor_id,
        "negligible_amount": 0.0,
        "config_data": "",
        "config_flags": 0,
        "seqnum": seqnum,
        "ts": dt.datetime.now(dt.UTC).isoformat(),
    }
    with topology.open_channel(rabbitmq_url) as channel:
        channel.basic_publish(
            "",
            queue,
            json.dumps(fields).encode(),
            pika.BasicProperties(content_type="application/json", type="ConfigureAccount", delivery_mode=2),
        )


def config_seqnum(conn, debtor_id: int, creditor_id: int) -> int | None:
    """The account's last config seqnum; None while it does not exist."""
    query = "SELECT last_config_seqnum FROM account WHERE debtor_id = %s AND creditor_id = %s"
    row = conn.execute(query, (debtor_id, creditor_id)).fetchone()
    return row[0] if row else None


def account_exists(conn, debtor_id: int, creditor_id: int) -> bool:
    return config_seqnum(conn, debtor_id, creditor_id) is not None


def test_consumer_reconnects_after_losing_its_database_connection(conn, database_url, rabbitmq_url, queue, tmp_path):
    debtor_id = random.randint(1, 2**62)
    environ = driver_environment(database_url, rabbitmq_url, PROTOCOL_BROKER_QUEUE=queue, **CONSUMER_SETTINGS)
    with running(["run", "consumer"], environ, tmp_path) as consumer:
        configure_account(rabbitmq_url, queue, debtor_id, 1)
        wait_for(lambda: account_exists(conn, debtor_id, 1), "the first account")
        # A new account's window is followed by a query for its debtor's settings, which
        # the termination could hit instead of the next window: a window that changes an
        # existing account has no such step, so once it is applied the session is idle.
        configure_account(rabbitmq_url, queue, debtor_id, 1, seqnum=2)
        wait_for(lambda: config_seqnum(conn, debtor_id, 1) == 2, "the first account reconfigured")

        terminated = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'pyswpt consumer%%'"
        ).fetchone()[0]
        assert terminated == 1

        configure_account(rabbitmq_url, queue, debtor_id, 2)
        wait_for(lambda: account_exists(conn, debtor_id, 2), "the account configured after the loss")
        consumer.assert_alive()
        # The window is retried on a new database connection; the broker channel is
        # kept, so the outage is not counted as a delivery attempt, and nothing is parked.
        assert "The database is unavailable while applying 1 messages" in consumer.log()
        assert "Lost a connection while consuming" not in consumer.log()
        assert conn.execute("SELECT count(*) FROM parked_message").fetchone()[0] == 0


@pytest.mark.skipif(
    not CAN_CLOSE_BROKER_CONNECTIONS,
    reason="needs a local RabbitMQ (rabbitmqctl) to close a connection from the broker's side",
)
def test_consumer_reconnects_after_the_broker_closed_its_connection(conn, database_url, rabbitmq_url, queue, tmp_path):
    debtor_id = random.randint(1, 2**62)
    environ = driver_environment(
        database_url, rabbitmq_url, PROTOCOL_BROKER_QUEUE=queue, PROTOCOL_BROKER_PROCESSES="1", **CONSUMER_SETTINGS
    )
    with running(["run", "consumer"], environ, tmp_path) as consumer:
        configure_account(rabbitmq_url, queue, debtor_id, 1)
        wait_for(lambda: account_exists(conn, debtor_id, 1), "the first account")
        # One consumer process runs its worker itself: the broker connection is its own.
        close_broker_connection_of(consumer.process.pid, rabbitmq_url)

        configure_account(rabbitmq_url, queue, debtor_id, 2)
        wait_for(lambda: account_exists(conn, debtor_id, 2), "the account configured after the loss")
        consumer.assert_alive()
        assert "Lost a connection while consuming" in consumer.log()
