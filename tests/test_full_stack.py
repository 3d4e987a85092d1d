"""The whole service: `pyswpt run all` as a real process against real PostgreSQL and RabbitMQ.

Every driver runs under the supervisor (spec 01 §8.2): web, consumer, chores,
flusher, workers and the three scanners. The peers are simulated on the broker
(tests/peers.py) with a relaxed inbox: the scanners send heartbeats, pending
AccountUpdates and reminders whenever they pass by, so a test waits for the
messages that matter and checks the whole record at the end.

Time passes fast through the settings: a scan pass takes about a second,
heartbeats and reminders are due after ~2.6 s, interest is capitalized as
soon as it is worth it, and deletion is attempted on every pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import declare_smp_exchanges
from drivers import wait_for
from logins import TEST_LOGINS
from peers import (
    MAX_INT64,
    Like,
    Recent,
    Shard,
    account_update_fields,
    assert_smp_message,
    balance_change_message,
    issue,
    now,
    open_root_account,
    open_shard,
    prepare_and_take,
    process_group,
    random_id,
)
from test_supervisor import free_port, healthy, is_alive, started_pids

from pyswpt import topology
from pyswpt.drivers.supervisor import PROGRAMS, STOP_TIMEOUT_SECONDS
from pyswpt.flags import STATUS_DELETED
from pyswpt.sharding import hex_routing_key, u64_string

SECONDS_IN_DAY = 86400
# The line `pyswpt run all` logs once every driver runs and the fetch API answers.
NODE_READY = f"Node ready: {len(PROGRAMS)} drivers running"
# Heartbeats, reminders and the too-old limit of a new account's config: ~2.6 s.
MESSAGE_MAX_DELAY_DAYS = 0.00003
HEARTBEAT_SECONDS = MESSAGE_MAX_DELAY_DAYS * SECONDS_IN_DAY
TTL_SECONDS = int(HEARTBEAT_SECONDS)
# One pass of each scanner: ~1 s (five beats, the tables being small).
SCAN_PASS_SECONDS = 1.08
NODE_SETTINGS = {
    "APP_ACCOUNTS_SCAN_HOURS": str(SCAN_PASS_SECONDS / 3600),
    "APP_ACCOUNTS_SCAN_BEAT_MILLISECS": "50",
    "APP_PREPARED_TRANSFERS_SCAN_DAYS": str(SCAN_PASS_SECONDS / SECONDS_IN_DAY),
    "APP_PREPARED_TRANSFERS_SCAN_BEAT_MILLISECS": "50",
    "APP_REGISTERED_BALANCE_CHANGES_SCAN_DAYS": str(SCAN_PASS_SECONDS / SECONDS_IN_DAY),
    "APP_REGISTERED_BALANCE_CHANGES_SCAN_BEAT_MILLISECS": "50",
    "APP_ACCOUNT_HEARTBEAT_DAYS": str(MESSAGE_MAX_DELAY_DAYS),
    "APP_MESSAGE_MAX_DELAY_DAYS": str(MESSAGE_MAX_DELAY_DAYS),
    "APP_PREPARED_TRANSFER_REMAINDER_DAYS": str(MESSAGE_MAX_DELAY_DAYS),
    "APP_MIN_INTEREST_CAPITALIZATION_DAYS": "0",
    # 10^9 at 100 % a year accrues ~22 units a second; 11 units are worth capitalizing.
    "APP_MAX_INTEREST_TO_PRINCIPAL_RATIO": "1e-8",
    "APP_DELETION_ATTEMPTS_MIN_DAYS": "0",
}
RATE_CONFIG = '{"rate": 100.0}'
LARGE_PRINCIPAL = 10**9
SCHEDULED_FOR_DELETION = 1  # config_flags bit 0
STARTED_WITHIN_SECONDS = 30.0
SETTLED_WITHIN_SECONDS = 30.0
# A process that has exited but is not reaped yet still shows in /proc, as a zombie.
ZOMBIE_STATE = "Z"
ARCHIVED = "SELECT count(*) FROM registered_balance_change WHERE debtor_id = %s AND other_creditor_id = %s"


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@dataclasses.dataclass
class Node:
    """One shard served by `pyswpt run all`, and the peers around it."""

    shard: Shard
    port: int
    log_dir: Path

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[subprocess.Popen]:
        """`pyswpt run all` in its own process group, up and serving.

        At the end it gets a SIGTERM, as from `docker stop`, and must stop every
        driver in time (unless the test stopped it already).
        """
        log_path = self.log_path(name)
        with process_group(["run", "all"], self.shard.environment(), log_path) as process:
            wait_for(
                lambda: process.poll() is None and set(started_pids(log_path.read_text())) == set(PROGRAMS),
                "every driver to start",
                STARTED_WITHIN_SECONDS,
            )
            wait_for(lambda: healthy(self.port), "the fetch API", STARTED_WITHIN_SECONDS)
            wait_for(lambda: NODE_READY in log_path.read_text(), "the node's ready line", STARTED_WITHIN_SECONDS)
            yield process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=STOP_TIMEOUT_SECONDS + 10) == 0
                assert "did not stop in time" not in log_path.read_text()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"run-all-{name}.log"

    def fetch(self, creditor_id: int, what: str) -> int:
        """The status code of the fetch API's `reachable` or `config` for an account."""
        debtor = u64_string(self.shard.debtor_id)
        url = f"http://127.0.0.1:{self.port}/accounts/{debtor}/{u64_string(creditor_id)}/{what}"
        return httpx.get(url, timeout=5).status_code


@pytest.fixture
def node(conn, database_url, role_urls, rabbitmq_url, tmp_path) -> Iterator[Node]:
    """A node whose drivers and web server connect as login users in the least-privilege
    roles pyswpt_driver and pyswpt_web (conftest.role_urls)."""
    port = free_port()
    chores_queue = f"pyswpt_test_full_chores_{uuid.uuid4().hex[:10]}"
    topology.declare_chores_queue(rabbitmq_url, chores_queue)
    settings = {
        **NODE_SETTINGS,
        "CHORES_BROKER_QUEUE": chores_queue,
        "WEBSERVER_PORT": str(port),
        "FETCH_API_URL": f"http://127.0.0.1:{port}",
        "METRICS_PORT": str(free_port()),
        "DRIVER_POSTGRES_URL": role_urls["driver"],
        "WEB_POSTGRES_URL": role_urls["web"],
    }
    try:
        with open_shard(
            conn, database_url, rabbitmq_url, tmp_path, queue_prefix="pyswpt_test_full", relaxed=True, settings=settings
        ) as shard:
            yield Node(shard, port, tmp_path)
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(chores_queue)


# --- a day of a currency -------------------------------------------------------------


def open_creditor_account(shard: Shard, creditor_id: int, since: dt.datetime) -> dict[str, Any]:
    """Configure a creditor's account; it is created, then takes the debtor's rate (spec 02 §2.3)."""
    config = shard.configure(creditor_id)
    created, initialised = shard.inbox.expect(
        Like("AccountUpdate", creditor_id=creditor_id, last_change_seqnum=1),
        Like("AccountUpdate", creditor_id=creditor_id, last_change_seqnum=2),
    )
    assert created.fields["interest_rate"] == 0.0
    expected = account_update_fields(
        shard,
        creditor_id,
        config,
        since,
        interest_rate=100.0,
        last_change_seqnum=2,
        last_interest_rate_change_ts=Recent(since),
        ttl=TTL_SECONDS,
    )
    assert_smp_message(initialised, "to_creditors", hex_routing_key(creditor_id), expected)
    assert initialised.fields["ts"] == initialised.fields["last_change_ts"]
    return initialised.fields


def transfer(shard: Shard, sender: int, recipient: int, amount: int, request_id: int, note: str) -> dict[str, Any]:
    """A direct transfer of `amount`, prepared and committed; both sides' records arrive."""
    prepared = prepare_and_take(shard, sender, recipient, request_id=request_id, min_locked=amount, max_locked=amount)
    assert prepared["locked_amount"] == amount
    shard.finalize(prepared, amount, note=note)
    finalized, sent, *_change, received = shard.inbox.expect(
        Like("FinalizedTransfer", creditor_id=sender, transfer_id=prepared["transfer_id"]),
        Like("AccountTransfer", creditor_id=sender, transfer_note=note),
        *balance_change_message(shard, sender, recipient, transfer_note=note),
        Like("AccountTransfer", creditor_id=recipient, transfer_note=note),
    )
    assert (finalized.fields["status_code"], finalized.fields["committed_amount"]) == ("OK", amount)
    assert finalized.fields["total_locked_amount"] == 0
    assert sent.fields["acquired_amount"] == -amount
    assert sent.fields["recipient"] == u64_string(recipient)
    assert received.fields["acquired_amount"] == amount
    assert received.fields["sender"] == u64_string(sender)
    assert received.fields["committed_at"] == finalized.fields["ts"]
    return finalized.fields


def is_applied(shard: Shard, other_creditor_id: int, change_id: int) -> bool:
    row = shard.conn.execute(
        "SELECT is_applied FROM registered_balance_change"
        " WHERE debtor_id = %s AND other_creditor_id = %s AND change_id = %s",
        (shard.debtor_id, other_creditor_id, change_id),
    ).fetchone()
    return row is not None and row[0]


def accrued_interest_amount(shard: Shard, creditor_id: int) -> int:
    """floor(balance - principal) now: what a capitalization would pay (spec 02 §2.9)."""
    return shard.count(
        "SELECT pyswpt_private.calc_accrued_interest_amount(a, now()) FROM account AS a"
        " WHERE debtor_id = %s AND creditor_id = %s",
        shard.debtor_id,
        creditor_id,
    )


def moment(wire_datetime: str) -> dt.datetime:
    return dt.datetime.fromisoformat(wire_datetime)


def principals_sum(shard: Shard) -> int:
    return shard.count("SELECT coalesce(sum(principal), 0) FROM account WHERE debtor_id = %s", shard.debtor_id)


def account_updates(shard: Shard, creditor_id: int) -> list[dict[str, Any]]:
    return [m.fields for m in shard.inbox.all_received(Like("AccountUpdate", creditor_id=creditor_id))]


def has_heartbeat(shard: Shard, creditor_id: int, after: dt.datetime) -> bool:
    """An AccountUpdate after `after` that repeats an earlier one's state with a later ts."""
    updates = account_updates(shard, creditor_id)
    for i, update in enumerate(updates):
        if moment(update["ts"]) <= after:
            continue
        version = (update["last_change_seqnum"], update["last_change_ts"])
        earlier = [u for u in updates[:i] if (u["last_change_seqnum"], u["last_change_ts"]) == version]
        if any(moment(u["ts"]) < moment(update["ts"]) for u in earlier):
            return True
    return False


def account_transfers(shard: Shard, creditor_id: int) -> list[dict[str, Any]]:
    return [m.fields for m in shard.inbox.all_received(Like("AccountTransfer", creditor_id=creditor_id))]


def assert_transfer_numbers_without_gaps(shard: Shard, creditor_id: int) -> list[dict[str, Any]]:
    """Spec 02 §5.3: 1, 2, 3, ... each once, each after the previous; returns them in order."""
    last = shard.account(creditor_id)["last_transfer_number"]
    wait_for(lambda: len(account_transfers(shard, creditor_id)) >= last, f"{last} AccountTransfers", 10)
    transfers = sorted(account_transfers(shard, creditor_id), key=lambda t: t["transfer_number"])
    assert [t["transfer_number"] for t in transfers] == list(range(1, last + 1)), transfers
    assert [t["previous_transfer_number"] for t in transfers] == list(range(0, last))
    return transfers


def test_a_day_of_a_currency_under_run_all(node):
    shard = node.shard
    alice, bob, carol = shard.creditor(), shard.creditor(), shard.creditor()
    with node.running("day"):
        since = now()

        # The debtor sets up its currency at 100 % a year; creditors open accounts at that rate.
        root = open_root_account(shard, config_data=RATE_CONFIG)
        assert (root["config_data"], root["ttl"]) == (RATE_CONFIG, TTL_SECONDS)
        for creditor in (alice, bob, carol):
            open_creditor_account(shard, creditor, since)

        # Money is issued; its interest is soon worth capitalizing, and the debtor pays it.
        issue(shard, alice, LARGE_PRINCIPAL)
        [capitalized] = shard.inbox.expect(Like("AccountTransfer", creditor_id=alice, coordinator_type="interest"))
        interest = capitalized.fields["acquired_amount"]
        assert interest > LARGE_PRINCIPAL * 1e-8
        assert_smp_message(
            capitalized,
            "to_creditors",
            hex_routing_key(alice),
            {
                "type": "AccountTransfer",
                "debtor_id": shard.debtor_id,
                "creditor_id": alice,
                "creation_date": now().date().isoformat(),
                "transfer_number": 2,
                "coordinator_type": "interest",
                "committed_at": Recent(since),
                "acquired_amount": interest,
                "transfer_note_format": "",
                "transfer_note": "",
                "principal": LARGE_PRINCIPAL + interest,
                "previous_transfer_number": 1,
                "sender": "0",
                "recipient": u64_string(alice),
                "ts": Recent(since),
            },
        )
        [paid_by_root] = shard.inbox.expect(
            Like(
                "PendingBalanceChange",
                creditor_id=0,
                other_creditor_id=alice,
                coordinator_type="interest",
                principal_delta=-interest,
                committed_at=capitalized.fields["committed_at"],
            )
        )
        change_id = paid_by_root.fields["change_id"]
        wait_for(lambda: is_applied(shard, alice, change_id), "the root account to pay the interest")

        # Payments: two committed, one dismissed, one committed too late.
        transfer(shard, alice, bob, 1000, request_id=2, note="rent")
        transfer(shard, alice, carol, 500, request_id=3, note="groceries")

        dismissed = prepare_and_take(shard, bob, alice, request_id=4, min_locked=0, max_locked=300)
        assert dismissed["locked_amount"] == 300
        shard.finalize(dismissed, 0)
        [finalized] = shard.inbox.expect(Like("FinalizedTransfer", transfer_id=dismissed["transfer_id"]))
        assert (finalized.fields["status_code"], finalized.fields["committed_amount"]) == ("OK", 0)
        assert finalized.fields["total_locked_amount"] == 0

        late = prepare_and_take(shard, bob, carol, request_id=5, min_locked=100, max_locked=100, max_commit_delay=1)
        # The coordinator hears nothing back: the prepared-transfer scanner reminds it.
        [reminder] = shard.inbox.expect(Like("PreparedTransfer", creditor_id=bob, transfer_id=late["transfer_id"]))
        assert {**reminder.fields, "ts": late["ts"]} == late
        assert moment(reminder.fields["ts"]) > moment(late["ts"])
        deadline = moment(late["deadline"])
        wait_for(lambda: now() > deadline, "the deadline of the transfer")
        shard.finalize(late, 100)
        [timed_out] = shard.inbox.expect(Like("FinalizedTransfer", transfer_id=late["transfer_id"]))
        assert (timed_out.fields["status_code"], timed_out.fields["committed_amount"]) == ("TIMEOUT", 0)
        assert timed_out.fields["total_locked_amount"] == 0

        # Carol spends everything, schedules her account for deletion, and it goes.
        transfer(shard, carol, bob, 500, request_id=6, note="change")
        scheduled_config = shard.configure(carol, seqnum=2, config_flags=SCHEDULED_FOR_DELETION)
        [scheduled] = shard.inbox.expect(Like("AccountUpdate", creditor_id=carol, last_config_seqnum=2))
        assert scheduled.fields["config_flags"] == SCHEDULED_FOR_DELETION
        [deleted] = shard.inbox.expect(
            Like("AccountUpdate", creditor_id=carol, last_change_seqnum=scheduled.fields["last_change_seqnum"] + 1)
        )
        assert_smp_message(
            deleted,
            "to_creditors",
            hex_routing_key(carol),
            {
                **scheduled.fields,
                "last_change_ts": Recent(since),
                "last_change_seqnum": scheduled.fields["last_change_seqnum"] + 1,
                "principal": 0,
                "interest": 0.0,
                "last_config_ts": scheduled_config["ts"],
                "ts": deleted.fields["last_change_ts"],
            },
        )
        assert shard.account(carol)["status_flags"] & STATUS_DELETED  # deleted, its row kept
        assert (node.fetch(carol, "reachable"), node.fetch(carol, "config")) == (404, 200)
        assert (node.fetch(bob, "reachable"), node.fetch(0, "reachable")) == (204, 204)

        # Alice takes her money back to the debtor.
        redeemed = prepare_and_take(shard, alice, 0, request_id=7, min_locked=0, max_locked=MAX_INT64)
        amount = redeemed["locked_amount"]
        assert amount > LARGE_PRINCIPAL - 1500
        shard.finalize(redeemed, amount, note="redeem")
        finalized, *_to_root = shard.inbox.expect(
            Like("FinalizedTransfer", transfer_id=redeemed["transfer_id"], status_code="OK", committed_amount=amount),
            *balance_change_message(shard, alice, 0, principal_delta=amount),
        )

        # Once the last interest worth paying is paid, nothing moves any more.
        wait_for(lambda: accrued_interest_amount(shard, alice) == 0, "alice's last capitalization")
        shard.settle()
        wait_for(lambda: principals_sum(shard) == 0, "the principals to sum to zero", SETTLED_WITHIN_SECONDS)
        shard.settle()
        assert principals_sum(shard) == 0

        # Heartbeats keep coming for living accounts, none for the deleted one.
        quiet_until = moment(deleted.fields["ts"]) + dt.timedelta(seconds=HEARTBEAT_SECONDS + 2 * SCAN_PASS_SECONDS)
        for creditor in (0, alice, bob):
            wait_for(
                lambda creditor=creditor: has_heartbeat(shard, creditor, quiet_until), f"a heartbeat of {creditor}", 15
            )
        assert account_updates(shard, carol)[-1] == deleted.fields

        # All of it ran through the drivers' and the web server's own login users.
        assert connected_users(shard) == {TEST_LOGINS["driver"][0], TEST_LOGINS["web"][0]}

    assert shard.inbox.all_received(Like("RejectedTransfer")) == []
    assert shard.inbox.all_received(Like("RejectedConfig")) == []

    alice_transfers = assert_transfer_numbers_without_gaps(shard, alice)
    bob_transfers = assert_transfer_numbers_without_gaps(shard, bob)
    carol_transfers = assert_transfer_numbers_without_gaps(shard, carol)
    assert [t["acquired_amount"] for t in bob_transfers] == [1000, 500]
    assert [t["acquired_amount"] for t in carol_transfers] == [500, -500]
    assert [(t["coordinator_type"], t["acquired_amount"]) for t in alice_transfers[:1]] == [
        ("issuing", LARGE_PRINCIPAL)
    ]

    # Every unit of interest alice got, the root account paid; nothing else was paid.
    interest_paid = [t["acquired_amount"] for t in alice_transfers if t["coordinator_type"] == "interest"]
    interest_charged = [
        -m.fields["principal_delta"]
        for m in shard.inbox.all_received(Like("PendingBalanceChange", creditor_id=0, coordinator_type="interest"))
    ]
    assert sorted(interest_paid) == sorted(interest_charged)
    assert all(amount > 0 for amount in interest_paid)
    alice_account, bob_account = shard.account(alice), shard.account(bob)
    assert bob_account["principal"] == 1500
    assert alice_account["principal"] == LARGE_PRINCIPAL + sum(interest_paid) - 1500 - amount
    assert shard.principal(0) == -(alice_account["principal"] + bob_account["principal"])
    for account in (alice_account, bob_account):
        assert (account["total_locked_amount"], account["pending_transfers_count"]) == (0, 0)


def connected_users(shard: Shard) -> set[str]:
    """The users of the node's connections (named `pyswpt <driver>` or `pyswpt-web`)."""
    rows = shard.conn.execute(
        "SELECT DISTINCT usename FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name ~ '^pyswpt[ -]'"
    ).fetchall()
    return {user for (user,) in rows}


# --- SIGTERM under load -----------------------------------------------------------------


def live_members(process_group_id: int) -> list[int]:
    """Pids of the processes of a process group that have not exited."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (command) state ppid pgrp ...": the command may contain spaces.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == process_group_id and state != ZOMBIE_STATE:
            members.append(int(entry.name))
    return members


def test_sigterm_under_load_stops_every_driver_and_loses_nothing(node):
    shard = node.shard
    count = 400
    sigterm_after = count // 4  # published before the signal; the rest goes during the stop
    creditor, other = shard.creditor(), random_id()

    def archived() -> int:
        return shard.count(ARCHIVED, shard.debtor_id, other)

    with node.running("loaded") as supervisor:
        stop_started = None
        for change_id in range(1, count + 1):
            shard.balance_change(creditor, other, change_id, 1)
            if stop_started is None and change_id >= sigterm_after and archived() > 0:
                drivers = [pid for pids in started_pids(node.log_path("loaded").read_text()).values() for pid in pids]
                supervisor.send_signal(signal.SIGTERM)
                stop_started = time.monotonic()
        assert stop_started is not None, "the node never started working"
        status = supervisor.wait(timeout=STOP_TIMEOUT_SECONDS + 10)
        stopped_after_seconds = time.monotonic() - stop_started

    log = node.log_path("loaded").read_text()
    assert status == 0
    assert stopped_after_seconds < STOP_TIMEOUT_SECONDS
    assert "did not stop in time" not in log
    assert f"Node stopped: received SIGTERM; {len(PROGRAMS)} drivers stopped." in log
    assert [pid for pid in drivers if is_alive(pid)] == []
    assert live_members(supervisor.pid) == []
    stopped_with = archived()
    assert 0 < stopped_with < count, "the stop did not come in the middle of the load"

    with node.running("restarted"):
        wait_for(lambda: archived() == count, "every change to be archived", SETTLED_WITHIN_SECONDS)
        shard.settle()

    assert shard.principal(creditor) == count
    assert shard.count(ARCHIVED + " AND is_applied", shard.debtor_id, other) == count
    transfers = assert_transfer_numbers_without_gaps(shard, creditor)
    assert len(transfers) == count
    assert {t["acquired_amount"] for t in transfers} == {1}
