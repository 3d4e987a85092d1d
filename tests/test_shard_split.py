"""A shard split under load: `#` becomes `0.#` and `1.#` while transfers keep flowing.

The procedure of the README ("Splitting a shard", spec 01 §4.4), step by step,
with `pyswpt` commands as real subprocesses on real PostgreSQL and RabbitMQ:
the parent node (`pyswpt run all`, binding key `#`) serves two debtors whose
accounts fall in both halves; simulated coordinators run transfers between
them in a closed loop, through `accounts_in` as real peers do, and never send
anything twice, so a lost message would leave a transfer unfinished. Then,
with no pause in the load:

1. the parent stops (its queue keeps filling);
2. its database is copied to the two children (CREATE DATABASE ... TEMPLATE);
3. `pyswpt configure` declares each child's chores queue, SMP queue and binding;
4. `pyswpt unsubscribe` unbinds the old queue and deletes the parent's chores queue;
5. the children start with DELETE_PARENT_SHARD_RECORDS=true, and each drains
   the old queue with `run consumer --draining-mode`;
6. `pyswpt delete-queue` deletes the old queue once drained, and the drainers exit 0;
7. once `verify-shard-content` passes on a child, it restarts with the flag off.

At the end: every transfer was prepared and finalized once (a duplicate of a
PrepareTransfer, delivered to both queues while both were bound, prepares a
second transfer that the coordinator dismisses, as the protocol asks), every
principal is what the coordinators' books say and lives in the shard that owns
it, each debtor's principals sum to zero across the children, every account's
transfer numbers are whole, `verify-shard-content` and `audit` pass on both,
nothing is parked, and the old queue is gone.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import psycopg
import pytest
from conftest import new_database, with_database
from drivers import driver_environment, free_port, healthy, pyswpt_command, running, wait_for
from peers import OUTBOX_TABLES, WORK_TABLES
from psycopg import sql

from pyswpt import topology
from pyswpt.sharding import Realm, binary_routing_key, u64_string

PARENT_KEY = "#"
CHILD_KEYS = ("0.#", "1.#")
DEBTORS = 2
CREDITORS_PER_HALF = 3
FUND_AMOUNT = 10**9
# Transfers in flight at most, new ones started up to one per RECEIVE_SECONDS: while the parent is
# down, requests keep coming until this many wait for an answer.
CONCURRENCY = 40
RECEIVE_SECONDS = 0.05
TRANSFERS_BEFORE_SPLIT = 40
TRANSFERS_AFTER_SPLIT = 40
MAX_COMMIT_DELAY_SECONDS = 3600
T_INFINITY = "9999-12-31T23:59:59+00:00"
ROOT_NEGLIGIBLE_AMOUNT = 1e30
NOT_FOUND = 404
CONNECTION_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError)
NODE_SETTINGS = {
    "PROTOCOL_BROKER_PREFETCH_COUNT": "50",
    "FLUSH_PERIOD": "0.2",
    "APP_PROCESS_BALANCE_CHANGES_WAIT": "0.2",
    "APP_PROCESS_TRANSFER_REQUESTS_WAIT": "0.2",
    "APP_PROCESS_FINALIZATION_REQUESTS_WAIT": "0.2",
    # A pass of the accounts scanner in about a second: it deletes the sibling's accounts soon.
    "APP_ACCOUNTS_SCAN_HOURS": str(1 / 3600),
    "APP_ACCOUNTS_SCAN_BEAT_MILLISECS": "50",
}
# Generous: on a busy two-core machine ten Python processes may take long to start.
STARTED_WITHIN_SECONDS = 120.0
# The first pause of a draining consumer ends at the next multiple of 15 s, the second of 30 s.
DRAINED_WITHIN_SECONDS = 180.0
SETTLED_WITHIN_SECONDS = 180.0


# --- the simulated coordinators ----------------------------------------------------


@dataclasses.dataclass
class Request:
    debtor_id: int
    request_id: int
    sender: int
    recipient: int
    amount: int
    coordinator_type: str
    coordinator_id: int
    state: str = "preparing"  # preparing, finalizing, committed, rejected
    transfer_id: int | None = None
    answers: list[str] = dataclasses.field(default_factory=list)
    dismissed_transfer_ids: set[int] = dataclasses.field(default_factory=set)

    @property
    def done(self) -> bool:
        return self.state in ("committed", "rejected")


class Coordinators(threading.Thread):
    """Coordinators of every debtor: publish to accounts_in, react to what comes back, never resend."""

    def __init__(self, broker_url: str, accounts: dict[int, list[int]], inbox: str):
        super().__init__(name="coordinators", daemon=True)
        self.broker_url = broker_url
        self.accounts = accounts  # debtor -> creditor ids (root excluded)
        self.requests: dict[tuple[int, int], Request] = {}
        self.funding: list[Request] = []
        self.transfers: list[Request] = []
        self.account_transfers: dict[tuple[int, int], dict[int, dict]] = collections.defaultdict(dict)
        # AccountTransfers whose transfer number came again with other contents: applied twice, or by two shards.
        self.conflicting_account_transfers: list[tuple[dict, dict]] = []
        self.next_request_id = 1
        self.load_on = threading.Event()
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        # Durable, so that nothing sent to the coordinators is lost if their connection is.
        self.inbox = inbox
        self.connect()

    def connect(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.queue_declare(self.inbox, durable=True)
        for exchange in ("to_creditors", "to_debtors"):
            self.channel.queue_bind(self.inbox, exchange, "#")

    def reconnect(self, error: Exception) -> None:
        """A broker connection closed under the coordinators (another test's chaos): open a new one."""
        print(f"coordinators reconnecting after {error!r}")
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()
        self.connect()

    # -- sending, as a peer does: to accounts_in, routed by the account's key

    def send(self, fields: dict) -> None:
        """Publish with a confirm; sent again only if the connection was lost before the confirm."""
        while True:
            try:
                self.channel.basic_publish(
                    "accounts_in",
                    binary_routing_key(fields["debtor_id"], fields["creditor_id"]),
                    json.dumps(fields).encode(),
                    pika.BasicProperties(content_type="application/json", type=fields["type"], delivery_mode=2),
                    mandatory=True,  # a moment with no queue bound would raise UnroutableError and fail the test
                )
                return
            except CONNECTION_LOST as error:
                self.reconnect(error)

    def configure(self, debtor_id: int, creditor_id: int, negligible_amount: float = 0.0) -> None:
        self.send(
            {
                "type": "ConfigureAccount",
                "debtor_id": debtor_id,
                "creditor_id": creditor_id,
                "negligible_amount": negligible_amount,
                "config_data": "",
                "config_flags": 0,
                "seqnum": 1,
                "ts": wire_now(),
            }
        )

    def start_request(
        self, debtor_id: int, sender: int, recipient: int, amount: int, coordinator_type: str = "direct"
    ) -> Request:
        coordinator_id = debtor_id if coordinator_type == "issuing" else sender
        request = Request(debtor_id, self.next_request_id, sender, recipient, amount, coordinator_type, coordinator_id)
        self.next_request_id += 1
        self.requests[(coordinator_id, request.request_id)] = request
        self.send(
            {
                "type": "PrepareTransfer",
                "debtor_id": debtor_id,
                "creditor_id": sender,
                "coordinator_type": coordinator_type,
                "coordinator_id": coordinator_id,
                "coordinator_request_id": request.request_id,
                "min_locked_amount": amount,
                "max_locked_amount": amount,
                "recipient": u64_string(recipient),
                "final_interest_rate_ts": T_INFINITY,
                "max_commit_delay": MAX_COMMIT_DELAY_SECONDS,
                "ts": wire_now(),
            }
        )
        return request

    def finalize(self, request: Request, transfer_id: int, committed_amount: int) -> None:
        self.send(
            {
                "type": "FinalizeTransfer",
                "debtor_id": request.debtor_id,
                "creditor_id": request.sender,
                "transfer_id": transfer_id,
                "coordinator_type": request.coordinator_type,
                "coordinator_id": request.coordinator_id,
                "coordinator_request_id": request.request_id,
                "committed_amount": committed_amount,
                "transfer_note_format": "",
                "transfer_note": "",
                "ts": wire_now(),
            }
        )

    # -- receiving

    def receive(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                channel = self.channel
                method, _properties, body = channel.basic_get(self.inbox)
                if method is not None:
                    # Handled before the ack: a message comes again if the connection is lost, never not at all.
                    self.handle(json.loads(body))
                    if self.channel is channel:  # else it went with the old connection, and comes again
                        channel.basic_ack(method.delivery_tag)
            except CONNECTION_LOST as error:
                self.reconnect(error)
                continue
            if method is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                try:
                    self.connection.sleep(min(0.02, remaining))
                except CONNECTION_LOST as error:
                    self.reconnect(error)
                continue

    def handle(self, fields: dict) -> None:
        message_type = fields["type"]
        if message_type == "AccountTransfer":
            # Delivered at least once: the same message may come twice, never another with its number.
            known = self.account_transfers[(fields["debtor_id"], fields["creditor_id"])]
            earlier = known.setdefault(fields["transfer_number"], fields)
            if earlier != fields:
                self.conflicting_account_transfers.append((earlier, fields))
            return
        if message_type not in ("PreparedTransfer", "RejectedTransfer", "FinalizedTransfer"):
            return
        request = self.requests.get((fields["coordinator_id"], fields["coordinator_request_id"]))
        assert request is not None, f"an answer to no request of ours: {fields}"
        if message_type == "PreparedTransfer":
            self.on_prepared(request, fields["transfer_id"])
        elif message_type == "RejectedTransfer":
            request.answers.append(f"rejected {fields['status_code']}")
            if request.state == "preparing":
                request.state = "rejected"
        elif fields["transfer_id"] == request.transfer_id:
            request.answers.append(f"finalized {fields['status_code']} {fields['committed_amount']}")
            request.state = "committed"

    def on_prepared(self, request: Request, transfer_id: int) -> None:
        if request.state == "preparing":
            request.transfer_id = transfer_id
            request.state = "finalizing"
            request.answers.append(f"prepared {transfer_id}")
            self.finalize(request, transfer_id, request.amount)
        elif transfer_id != request.transfer_id and transfer_id not in request.dismissed_transfer_ids:
            # The PrepareTransfer reached both queues while both were bound: dismiss the second transfer.
            request.dismissed_transfer_ids.add(transfer_id)
            self.finalize(request, transfer_id, 0)

    # -- the closed loop, in this thread

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                in_flight = sum(not request.done for request in self.transfers)
                if self.load_on.is_set() and in_flight < CONCURRENCY:
                    debtor_id = random.choice(list(self.accounts))
                    sender, recipient = random.sample(self.accounts[debtor_id], 2)
                    self.transfers.append(self.start_request(debtor_id, sender, recipient, random.randint(1, 1000)))
                self.receive(RECEIVE_SECONDS)
        except BaseException as error:  # noqa: BLE001 - reported by the test's thread
            self.failure = error
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self.connection.close()

    def committed(self) -> int:
        return sum(request.state == "committed" for request in self.transfers)

    def all_done(self) -> bool:
        return all(request.done for request in self.funding + self.transfers)


def wire_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def pick_accounts() -> dict[int, list[int]]:
    """Debtors whose creditors fall in both halves of the hash space."""
    halves = [Realm.from_binding_key(key) for key in CHILD_KEYS]
    accounts = {}
    for _ in range(DEBTORS):
        debtor_id = random.randint(1, 2**62)
        creditors = []
        for half in halves:
            while sum(half.owns(debtor_id, c) for c in creditors) < CREDITORS_PER_HALF:
                creditor = random.randint(1, 2**62)
                if half.owns(debtor_id, creditor):
                    creditors.append(creditor)
        accounts[debtor_id] = creditors
    return accounts


# --- the nodes ---------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    name: str
    database_url: str
    environ: dict[str, str]
    port: int

    def command(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*pyswpt_command(), *args],
            env={**self.environ, **settings},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def query(self, query: str, *params) -> list[tuple]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def queued_rows(self) -> int:
        return sum(self.query(f"SELECT count(*) FROM pyswpt.{table}")[0][0] for table in WORK_TABLES + OUTBOX_TABLES)


def node(name: str, database_url: str, broker_url: str, queue: str, key: str, **settings: str) -> Node:
    port = free_port()
    environ = driver_environment(
        database_url,
        broker_url,
        **NODE_SETTINGS,
        PROTOCOL_BROKER_QUEUE=queue,
        PROTOCOL_BROKER_QUEUE_ROUTING_KEY=key,
        CHORES_BROKER_QUEUE=f"{queue}_chores",
        WEBSERVER_PORT=str(port),
        FETCH_API_URL=f"http://127.0.0.1:{port}",
        SETUP_RABBITMQ_BINDINGS="yes",
        **settings,
    )
    return Node(name, database_url, environ, port)


@contextlib.contextmanager
def run_all(node: Node, log_dir: Path, **settings: str) -> Iterator:
    with running(["run", "all"], {**node.environ, **settings}, log_dir) as process:
        wait_for(lambda: healthy(node.port), f"the fetch API of {node.name}", STARTED_WITHIN_SECONDS)
        yield process


def copy_database(server_url: str, parent_url: str, name: str) -> str:
    """CREATE DATABASE ... TEMPLATE: needs the parent database without any connection, as after its stop."""
    parent = psycopg.conninfo.conninfo_to_dict(parent_url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(parent)))
    return with_database(server_url, name)


def queue_exists(broker_url: str, queue: str) -> bool:
    with topology.open_channel(broker_url) as channel:
        try:
            channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            assert error.reply_code == NOT_FOUND
            return False
    return True


def ready_messages(broker_url: str, queue: str) -> int:
    with topology.open_channel(broker_url) as channel:
        return channel.queue_declare(queue, passive=True).method.message_count


@pytest.fixture
def databases(postgres_server_url) -> Iterator[tuple[str, list[str]]]:
    """The parent's database (migrated by `configure`) and the names of the children's, dropped afterwards."""
    children = [f"pyswpt_split_child{n}_{uuid.uuid4().hex[:8]}" for n in range(2)]
    with new_database(postgres_server_url, "pyswpt_split_parent") as parent_url:
        try:
            yield parent_url, children
        finally:
            with psycopg.connect(postgres_server_url, autocommit=True) as admin:
                for name in children:
                    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def queues(rabbitmq_url) -> Iterator[list[str]]:
    """The parent's queue and the children's, deleted afterwards with their chores and dead-letter queues."""
    names = [f"test_split_{suffix}_{uuid.uuid4().hex[:8]}" for suffix in ("parent", "child0", "child1")]
    yield names
    with topology.open_channel(rabbitmq_url) as channel:
        for queue in names:
            for name in (queue, f"{queue}_chores", topology.dead_letter_queue_name(queue)):
                channel.queue_delete(name)


@pytest.fixture
def coordinators_inbox(rabbitmq_url) -> Iterator[str]:
    """The coordinators' queue, bound until the test ends: the nodes may still publish (an AccountUpdate of
    the account scanner) after the coordinators stop, and a message no queue takes would be parked."""
    name = f"test_split_coordinators_{uuid.uuid4().hex[:8]}"
    yield name
    with topology.open_channel(rabbitmq_url) as channel:
        channel.queue_delete(name)


def test_a_split_under_load_loses_doubles_and_misplaces_nothing(
    postgres_server_url, rabbitmq_url, databases, queues, coordinators_inbox, tmp_path
):
    parent_url, child_names = databases
    parent_queue, *child_queues = queues
    parent = node("the parent", parent_url, rabbitmq_url, parent_queue, PARENT_KEY)
    assert parent.command("configure").returncode == 0
    accounts = pick_accounts()
    coordinators = Coordinators(rabbitmq_url, accounts, coordinators_inbox)

    with run_all(parent, tmp_path) as parent_process:
        for debtor_id, creditors in accounts.items():
            coordinators.configure(debtor_id, 0, ROOT_NEGLIGIBLE_AMOUNT)
            for creditor in creditors:
                coordinators.configure(debtor_id, creditor)
        expected_accounts = sum(len(creditors) + 1 for creditors in accounts.values())
        wait_for(lambda: parent.query("SELECT count(*) FROM pyswpt.account")[0][0] == expected_accounts, "the accounts")
        for debtor_id, creditors in accounts.items():
            for creditor in creditors:
                coordinators.funding.append(coordinators.start_request(debtor_id, 0, creditor, FUND_AMOUNT, "issuing"))
        coordinators.start()
        wait_for(lambda: coordinators.all_done(), "the funding")
        # Committed is not yet credited: the recipients' PendingBalanceChanges are applied after.
        funded = expected_accounts - DEBTORS
        wait_for(
            lambda: (
                parent.query("SELECT count(*) FROM pyswpt.account WHERE principal = %s", FUND_AMOUNT)[0][0] == funded
            ),
            "the funded accounts",
        )
        coordinators.load_on.set()
        wait_for(
            lambda: coordinators.committed() >= TRANSFERS_BEFORE_SPLIT,
            "transfers on the parent",
            SETTLED_WITHIN_SECONDS,
        )

        # 1. The parent stops; its queue keeps filling.
        parent_process.stop()
        assert parent_process.process.returncode == 0, parent_process.log()
    # Published before the children's queues exist, these reach the children only through the drainers.
    wait_for(lambda: ready_messages(rabbitmq_url, parent_queue) > 0, "messages waiting for the stopped parent")

    # 2. Two copies of its database.
    children = [
        node(
            f"child {key}",
            copy_database(postgres_server_url, parent_url, name),
            rabbitmq_url,
            queue,
            key,
            DELETE_PARENT_SHARD_RECORDS="true",
        )
        for key, name, queue in zip(CHILD_KEYS, child_names, child_queues, strict=True)
    ]
    # 3. The children's queues, bound next to the parent's: a message may reach both now.
    for child in children:
        result = child.command("configure")
        assert result.returncode == 0, result.stdout + result.stderr
    # 4. The parent's queue is unbound: from now on only the children's queues fill.
    result = parent.command("unsubscribe")
    assert result.returncode == 0, result.stderr

    # Each child asks its sibling about the sibling's accounts: a web server of each is up first.
    webs = [free_port() for _ in children]
    for child, sibling_web in zip(children, reversed(webs), strict=True):
        child.environ["FETCH_API_URL"] = f"http://127.0.0.1:{sibling_web}"
    with contextlib.ExitStack() as stack:
        for child, web in zip(children, webs, strict=True):
            stack.enter_context(running(["run", "web"], {**child.environ, "WEBSERVER_PORT": str(web)}, tmp_path))
        for web in webs:
            wait_for(lambda web=web: healthy(web), "a child's web server", STARTED_WITHIN_SECONDS)

        # 5. The children start, with DELETE_PARENT_SHARD_RECORDS, and drain the old queue.
        child_processes = [stack.enter_context(run_all(child, tmp_path)) for child in children]
        drainers = [
            stack.enter_context(
                running(
                    ["run", "consumer", "--draining-mode"],
                    {**child.environ, "PROTOCOL_BROKER_QUEUE": parent_queue},
                    tmp_path,
                )
            )
            for child in children
        ]
        # 6. The old queue is deleted once drained; the drainers are done.
        deleted = subprocess.run(
            [*pyswpt_command(), "delete-queue"],
            env=parent.environ,
            capture_output=True,
            text=True,
            timeout=DRAINED_WITHIN_SECONDS,
        )
        assert deleted.returncode == 0, deleted.stderr
        assert not queue_exists(rabbitmq_url, parent_queue)
        for drainer in drainers:
            wait_for(lambda d=drainer: d.process.poll() is not None, "a drainer to exit", DRAINED_WITHIN_SECONDS)
            assert drainer.process.returncode == 0, drainer.log()
            assert "The shard is not responsible" not in drainer.log()
            print(*(line for line in drainer.log().splitlines() if "Handed on" in line), sep="\n")

        # 7. Once verify-shard-content passes, each child runs on without the flag.
        for child, process in zip(children, child_processes, strict=True):
            wait_for(
                lambda c=child: c.command("verify-shard-content").returncode == 0,
                f"verify-shard-content on {child.name}",
                SETTLED_WITHIN_SECONDS,
            )
            process.stop()
            assert process.process.returncode == 0, process.log()
            child.environ["DELETE_PARENT_SHARD_RECORDS"] = "false"
            stack.enter_context(run_all(child, tmp_path))

        target = coordinators.committed() + TRANSFERS_AFTER_SPLIT
        wait_for(lambda: coordinators.committed() >= target, "transfers on the children", SETTLED_WITHIN_SECONDS)
        coordinators.load_on.clear()
        wait_for(lambda: coordinators.all_done() or coordinators.failure, "every transfer", SETTLED_WITHIN_SECONDS)
        for child, queue in zip(children, child_queues, strict=True):
            wait_for(
                lambda c=child, q=queue: ready_messages(rabbitmq_url, q) == 0 and c.queued_rows() == 0,
                f"{child.name} to settle",
                SETTLED_WITHIN_SECONDS,
            )
        coordinators.stopping.set()
        coordinators.join(30)
        assert coordinators.failure is None, repr(coordinators.failure)

        dismissed = sum(len(request.dismissed_transfer_ids) for request in coordinators.transfers)
        print(f"{len(coordinators.transfers)} transfers, {dismissed} second transfers dismissed")
        assert_every_transfer_finalized_once(coordinators)
        assert_principals_match_the_books_in_the_owning_shard(coordinators, accounts, children)
        assert_transfer_numbers_whole(coordinators, children)
        for child in children:
            verified = child.command("verify-shard-content")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            audit = child.command("audit")
            assert audit.returncode == 0, audit.stdout + audit.stderr
            parked = child.query(
                "SELECT source_name, message_type, reason_code, reason FROM pyswpt_api.parked_messages"
            )
            assert parked == [], parked
    assert not queue_exists(rabbitmq_url, parent_queue)


def assert_every_transfer_finalized_once(coordinators: Coordinators) -> None:
    for request in coordinators.funding + coordinators.transfers:
        assert request.state == "committed", request
        prepared = [answer for answer in request.answers if answer.startswith("prepared ")]
        finalized = set(request.answers) - set(prepared)
        assert len(prepared) == 1 and finalized == {f"finalized OK {request.amount}"}, request


def assert_principals_match_the_books_in_the_owning_shard(
    coordinators: Coordinators, accounts: dict[int, list[int]], children: list[Node]
) -> None:
    expected: collections.Counter[tuple[int, int]] = collections.Counter()
    for request in coordinators.funding + coordinators.transfers:
        expected[(request.debtor_id, request.sender)] -= request.amount
        expected[(request.debtor_id, request.recipient)] += request.amount
    found = {}
    for child, key in zip(children, CHILD_KEYS, strict=True):
        realm = Realm.from_binding_key(key)
        for debtor_id, creditor_id, principal in child.query(
            "SELECT debtor_id, creditor_id, principal FROM pyswpt.account"
        ):
            assert realm.owns(debtor_id, creditor_id), f"{child.name} holds ({debtor_id}, {creditor_id})"
            found[(debtor_id, creditor_id)] = principal
    every_account = {(debtor_id, c) for debtor_id, creditors in accounts.items() for c in [0, *creditors]}
    assert set(found) == every_account
    assert {pair: found[pair] for pair in every_account} == {pair: expected[pair] for pair in every_account}
    for debtor_id in accounts:
        assert sum(principal for (d, _c), principal in found.items() if d == debtor_id) == 0


def assert_transfer_numbers_whole(coordinators: Coordinators, children: list[Node]) -> None:
    """Spec 02 §5.3 across the split: 1, 2, 3, ... each once, each after the previous, none from the wrong shard."""
    assert coordinators.conflicting_account_transfers == []
    for child in children:
        for debtor_id, creditor_id, last in child.query(
            "SELECT debtor_id, creditor_id, last_transfer_number FROM pyswpt.account WHERE creditor_id <> 0"
        ):
            transfers = coordinators.account_transfers[(debtor_id, creditor_id)]
            assert sorted(transfers) == list(range(1, last + 1)), (child.name, creditor_id, sorted(transfers))
            assert [transfers[n]["previous_transfer_number"] for n in sorted(transfers)] == list(range(0, last))
