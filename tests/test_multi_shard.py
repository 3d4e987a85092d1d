"""Two shards, `0.#` and `1.#`: two `pyswpt run all` nodes on two databases and one broker.

Each node's queue is bound by its shard's binding key, so RabbitMQ routes
every message to the node that owns its (debtor, creditor) pair; the peers
publish to `accounts_in` as real ones do. Both nodes' FETCH_API_URL is one
`pyswpt run fetch-proxy` in front of both fetch APIs. Two debtors, one with
its root account on each shard, have creditors on both shards: accounts take
the debtor's interest rate from the other shard, payments go across shards
both ways, interest is capitalized and paid by a root account on the other
shard, and accounts are deleted on both. At the end each debtor's principals
sum to zero across the shards, every transfer-number chain is whole, nothing
is parked, and each database holds only its own shard's records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from broker import declare_smp_exchanges
from conftest import new_database
from drivers import free_port, pyswpt_command, wait_for
from peers import (
    MAX_INT64,
    Inbox,
    Like,
    Shard,
    balance_change_message,
    issue,
    now,
    open_root_account,
    prepare_and_take,
    random_id,
)
from test_fetch_proxy import Proxy, account_path, fetch_proxy
from test_full_stack import (
    LARGE_PRINCIPAL,
    NODE_SETTINGS,
    RATE_CONFIG,
    SCHEDULED_FOR_DELETION,
    Node,
    accrued_interest_amount,
    assert_transfer_numbers_without_gaps,
    open_creditor_account,
    transfer,
)

from pyswpt import schema, topology
from pyswpt.flags import STATUS_DELETED
from pyswpt.sharding import Realm, binary_routing_key, hex_routing_key, u64_string

BINDING_KEYS = ("0.#", "1.#")


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@dataclasses.dataclass
class ShardNode:
    """What one shard is made of: a database, a queue bound by the shard's key, a chores queue, a port."""

    binding_key: str
    database_url: str
    conn: psycopg.Connection
    queue: str
    chores_queue: str
    port: int

    @property
    def realm(self) -> Realm:
        return Realm.from_binding_key(self.binding_key)

    def settings(self, fetch_api_url: str) -> dict[str, str]:
        return {
            **NODE_SETTINGS,
            "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": self.binding_key,
            "CHORES_BROKER_QUEUE": self.chores_queue,
            "WEBSERVER_PORT": str(self.port),
            "FETCH_API_URL": fetch_api_url,
        }


@contextlib.contextmanager
def shard_node(binding_key: str, postgres_server_url: str, rabbitmq_url: str) -> Iterator[ShardNode]:
    prefix = f"pyswpt_test_shard_{binding_key[0]}"
    queue = f"{prefix}_{uuid.uuid4().hex[:10]}"
    chores_queue = f"{queue}_chores"
    with new_database(postgres_server_url, prefix) as database_url:
        schema.apply_migrations(database_url)
        topology.subscribe(rabbitmq_url, queue, binding_key)
        topology.declare_chores_queue(rabbitmq_url, chores_queue)
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("SET search_path = pyswpt")
                yield ShardNode(binding_key, database_url, conn, queue, chores_queue, free_port())
        finally:
            with topology.open_channel(rabbitmq_url) as channel:
                for name in (queue, topology.dead_letter_queue_name(queue), chores_queue):
                    channel.queue_delete(name)


@pytest.fixture
def shard_nodes(postgres_server_url, rabbitmq_url) -> Iterator[list[ShardNode]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(shard_node(key, postgres_server_url, rabbitmq_url)) for key in BINDING_KEYS]


@dataclasses.dataclass
class Currency:
    """One debtor whose accounts are spread over the shards: a peer `Shard` per shard, one inbox."""

    shards: list[Shard]

    @property
    def debtor_id(self) -> int:
        return self.shards[0].debtor_id

    def of(self, creditor_id: int) -> Shard:
        """The shard that owns the debtor's account with `creditor_id`."""
        [owner] = [shard for shard in self.shards if shard.realm.owns(self.debtor_id, creditor_id)]
        return owner

    @property
    def home(self) -> Shard:
        """The shard of the root account."""
        return self.of(0)

    def principals_sum(self) -> int:
        query = "SELECT coalesce(sum(principal), 0) FROM account WHERE debtor_id = %s"
        return sum(shard.count(query, self.debtor_id) for shard in self.shards)

    def settle(self) -> None:
        for shard in self.shards:
            shard.settle()


@contextlib.contextmanager
def currency(
    nodes: list[ShardNode], root_node: ShardNode, rabbitmq_url: str, fetch_api_url: str, log_dir: Path
) -> Iterator[Currency]:
    """A debtor whose root account is on `root_node`, with peers publishing to `accounts_in`."""
    debtor_id = random_id()
    while not root_node.realm.owns(debtor_id, 0):
        debtor_id = random_id()
    with topology.open_connection(rabbitmq_url) as connection, contextlib.ExitStack() as stack:
        channel = connection.channel()
        channel.confirm_delivery()
        inbox = Inbox(connection.channel(), set(), relaxed=True)
        inbox.bind("to_debtors", hex_routing_key(debtor_id))
        inbox.bind("accounts_in", binary_routing_key(debtor_id, 0))
        shards = [
            Shard(
                rabbitmq_url,
                node.database_url,
                node.conn,
                log_dir,
                stack,
                channel,
                node.queue,
                debtor_id,
                inbox,
                settings=node.settings(fetch_api_url),
                realm=node.realm,
            )
            for node in nodes
        ]
        yield Currency(shards)


# --- what happens in each currency ----------------------------------------------------


@dataclasses.dataclass
class Creditors:
    rich: list[int]  # one per shard, issued LARGE_PRINCIPAL: interest is worth capitalizing
    poor: list[int]  # one per shard, paid by the rich, then deleted


def open_accounts(money: Currency, since: dt.datetime) -> Creditors:
    """Creditors on both shards; each takes the debtor's rate, read through the proxy on the other shard."""
    root = open_root_account(money.home, config_data=RATE_CONFIG)
    assert root["config_data"] == RATE_CONFIG
    creditors = Creditors([shard.creditor() for shard in money.shards], [shard.creditor() for shard in money.shards])
    for creditor in creditors.rich + creditors.poor:
        open_creditor_account(money.of(creditor), creditor, since)
    return creditors


def issue_and_capitalize(money: Currency, creditors: Creditors) -> None:
    """The root account issues money on both shards, and pays the interest capitalized there."""
    for request_id, rich in enumerate(creditors.rich, start=1):
        issue(money.home, rich, LARGE_PRINCIPAL, request_id=request_id)
    for rich in creditors.rich:
        [capitalized] = money.home.inbox.expect(Like("AccountTransfer", creditor_id=rich, coordinator_type="interest"))
        interest = capitalized.fields["acquired_amount"]
        money.home.inbox.expect(
            Like(
                "PendingBalanceChange",
                creditor_id=0,
                other_creditor_id=rich,
                coordinator_type="interest",
                principal_delta=-interest,
            )
        )


def pay_across_shards(money: Currency, creditors: Creditors) -> None:
    """Payments from each shard to the other, one within a shard, and one to an account that does not exist."""
    rich_0, rich_1 = creditors.rich
    poor_0, poor_1 = creditors.poor
    transfer(money.home, rich_0, poor_1, 1000, request_id=10, note="from 0 to 1")
    transfer(money.home, rich_1, poor_0, 700, request_id=11, note="from 1 to 0")
    transfer(money.home, rich_0, poor_0, 300, request_id=12, note="within 0")

    stranger = money.shards[1].creditor()  # no account on shard 1: the fetch API says 404 through the proxy
    money.home.prepare(rich_0, u64_string(stranger), request_id=13, min_locked=1, max_locked=1)
    [rejected] = money.home.inbox.expect(Like("RejectedTransfer", creditor_id=rich_0, coordinator_request_id=13))
    assert rejected.fields["status_code"] == "RECIPIENT_IS_UNREACHABLE"


def redeem(money: Currency, creditor: int, request_id: int) -> None:
    """Everything the creditor can spend goes back to the root account."""
    redeemed = prepare_and_take(money.home, creditor, 0, request_id=request_id, min_locked=0, max_locked=MAX_INT64)
    amount = redeemed["locked_amount"]
    money.home.finalize(redeemed, amount, note="redeem")
    money.home.inbox.expect(
        Like("FinalizedTransfer", transfer_id=redeemed["transfer_id"], status_code="OK", committed_amount=amount),
        *balance_change_message(money.home, creditor, 0, principal_delta=amount),
    )


def delete(money: Currency, creditor: int) -> None:
    shard = money.of(creditor)
    shard.configure(creditor, seqnum=2, config_flags=SCHEDULED_FOR_DELETION)
    [scheduled] = shard.inbox.expect(Like("AccountUpdate", creditor_id=creditor, last_config_seqnum=2))
    shard.inbox.expect(
        Like("AccountUpdate", creditor_id=creditor, last_change_seqnum=scheduled.fields["last_change_seqnum"] + 1)
    )
    account = shard.account(creditor)
    assert account is not None and account["status_flags"] & STATUS_DELETED


def close_accounts(money: Currency, creditors: Creditors) -> None:
    """The poor return their money and close their accounts; the rich return theirs, so interest stops."""
    for request_id, poor in enumerate(creditors.poor, start=20):
        redeem(money, poor, request_id)
        delete(money, poor)
    for request_id, rich in enumerate(creditors.rich, start=30):
        redeem(money, rich, request_id)
    for rich in creditors.rich:
        shard = money.of(rich)
        wait_for(lambda shard=shard, rich=rich: accrued_interest_amount(shard, rich) == 0, "the last capitalization")


# --- the proof ------------------------------------------------------------------------


def test_two_shards_behind_the_fetch_proxy_keep_every_debtor_whole(shard_nodes, rabbitmq_url, tmp_path):
    node_0, node_1 = shard_nodes
    routes = f"0.* http://127.0.0.1:{node_0.port}\n1.* http://127.0.0.1:{node_1.port}\n"
    with (
        fetch_proxy(routes, tmp_path, APP_LOG_LEVEL="debug") as proxy,
        currency(shard_nodes, node_0, rabbitmq_url, proxy.url, tmp_path) as first,
        currency(shard_nodes, node_1, rabbitmq_url, proxy.url, tmp_path) as second,
    ):
        moneys = (first, second)
        with (
            Node(first.shards[0], node_0.port, tmp_path).running("shard-0"),
            Node(first.shards[1], node_1.port, tmp_path).running("shard-1"),
        ):
            since = now()
            books = [open_accounts(money, since) for money in moneys]
            for money, creditors in zip(moneys, books, strict=True):
                issue_and_capitalize(money, creditors)
                pay_across_shards(money, creditors)
                close_accounts(money, creditors)
            for money in moneys:
                wait_for(lambda money=money: money.principals_sum() == 0, "the principals to sum to zero", 60)
                money.settle()
                assert money.principals_sum() == 0

        for money, creditors in zip(moneys, books, strict=True):
            assert_every_chain_whole(money, creditors)
            assert_asked_through_the_proxy(proxy, money, creditors)
    for node in shard_nodes:
        assert node.conn.execute("SELECT count(*) FROM parked_message").fetchone()[0] == 0
        assert_only_own_records(node, first)


def assert_every_chain_whole(money: Currency, creditors: Creditors) -> None:
    for rich in creditors.rich:
        assert_transfer_numbers_without_gaps(money.of(rich), rich)
    poor_0, poor_1 = creditors.poor
    received = {
        poor: [t["acquired_amount"] for t in assert_transfer_numbers_without_gaps(money.of(poor), poor)]
        for poor in creditors.poor
    }
    assert received[poor_1][0] == 1000
    assert sorted(received[poor_0][:2]) == [300, 700]
    assert money.shards[0].inbox.all_received(Like("RejectedConfig")) == []
    assert [m.fields["coordinator_request_id"] for m in money.home.inbox.all_received(Like("RejectedTransfer"))] == [13]


def assert_asked_through_the_proxy(proxy: Proxy, money: Currency, creditors: Creditors) -> None:
    """Each shard asked the proxy about the other shard's recipients and the root config it lacks."""
    log = proxy.process.log()
    poor_0, poor_1 = creditors.poor
    for pair, what, status in (
        ((money.debtor_id, poor_1), "reachable", 204),  # shard 0 paying shard 1
        ((money.debtor_id, poor_0), "reachable", 204),  # shard 1 paying shard 0
        ((money.debtor_id, 0), "config", 200),  # the rate, on the shard without the root account
    ):
        assert f'"GET {account_path(pair, what)} HTTP/1.1" {status} ' in log, (pair, what)


def assert_only_own_records(node: ShardNode, money: Currency) -> None:
    """`pyswpt verify-shard-content` passes on the shard's database: nothing was applied by the wrong shard."""
    [shard] = [shard for shard in money.shards if shard.queue == node.queue]
    result = subprocess.run(
        [*pyswpt_command(), "verify-shard-content"],
        env=shard.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
