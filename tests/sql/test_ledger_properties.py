"""Property tests of the ledger's invariants (spec 02 §5).

A hypothesis state machine drives one debtor's accounts (the root account and
four creditors, two of them under one creditors agent) through random
sequences of the operations of spec 02 §2.2-2.6, §2.9-2.10 and §2.16:
configure, prepare, finalize (commits of any size, dismissals, requests with
wrong coordinator fields), delivery and application of balance changes, rate
changes, interest capitalization, deletion attempts and direct debtor
payments, with the clock moved forward by passing `p_now`. After every step it
checks the invariants that must hold whatever happened:

* locks (§5.2): `total_locked_amount` and `pending_transfers_count` summarize
  the account's prepared transfers; every prepared transfer has exactly one
  outcome, and none disappears without one (§5.6);
* transfer numbers (§5.3): per (account, creation_date) the AccountTransfers
  are numbered 1, 2, 3, ... with an unbroken `previous_transfer_number` chain,
  and `last_transfer_number` is the latest;
* commit times: along an account's transfer numbers no transfer the account
  committed itself is dated before an earlier transfer, and none was numbered
  at an earlier time than the one before it (incoming balance changes keep
  their sender's `committed_at`, and arrive in any order);
* transfer ids (§5.4): strictly increasing per sender, from the account's
  `last_transfer_id`;
* versions (§5.7): `last_change_seqnum` and `last_change_ts` never go back, and
  a changed principal or deleted flag always comes with a new seqnum;
* conservation (§5.1): principals plus the balance changes in flight (outbox
  and queue) sum to zero at every step, and once every change is delivered
  and applied, the principals alone sum to zero.

The test plays the broker itself: `deliver_balance_changes` moves
PendingBalanceChange outbox rows into `register_balance_change` (deleting what
it delivered, like the flusher, sometimes twice, like an at-least-once broker),
and `run_processors` runs the three batch processors for every account with
queued work, like the workers.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
from factories import CONFIG_SCHEDULED_FOR_DELETION, STATUS_DELETED, STATUS_OVERFLOWN, T0, UTC, initial_transfer_id
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from psycopg import sql
from psycopg.rows import dict_row

DEBTOR_ID = 0x1234_5678_9ABC
ROOT_ID = 0
# Creditors agent prefix 0x000001 (the top 24 bits, spec 02 §2.4): agent transfers
# may go between these two only.
AGENT_PREFIX = 1 << 40
AGENT_CREDITORS = (AGENT_PREFIX | 1, AGENT_PREFIX | 2)
PLAIN_CREDITORS = (1, 2)
CREDITORS = (ROOT_ID, *PLAIN_CREDITORS, *AGENT_CREDITORS)

START = dt.datetime(2024, 5, 20, 12, 0, tzinfo=UTC)
MAX_INT64 = 2**63 - 1
SECONDS_IN_DAY = 86_400
DAY = dt.timedelta(days=1)
# Defaults of the reference: MESSAGE_MAX_DELAY_DAYS = 7, PREPARED_TRANSFER_MAX_DELAY_DAYS = 90,
# MIN_INTEREST_CAPITALIZATION_DAYS = 14.
MESSAGE_MAX_DELAY_SECONDS = 7 * SECONDS_IN_DAY
COMMIT_PERIOD_SECONDS = 90 * SECONDS_IN_DAY
MIN_CAPITALIZATION_INTERVAL_SECONDS = 14 * SECONDS_IN_DAY
# A root account issues down to -min(limit, negligible amount) (B7): with this
# negligible amount (a REAL) and no limit it may issue anything.
ROOT_NEGLIGIBLE_AMOUNT = 1e30
ROOT_RATES = (0.0, 3.5, -10.0, 40.0)
NEGLIGIBLE_AMOUNTS = (0.0, 2.0, 100.0, 1e6)
# T∞ (spec 01 §0.2): a final_interest_rate_ts that no rate change can be newer than.
T_INFINITY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
# max_commit_delay of a request: some expire before a slow commit. Amounts stay far
# below 2^63 throughout, so containment never fires and conservation is exact.
COMMIT_DELAYS_SECONDS = (SECONDS_IN_DAY, 30 * SECONDS_IN_DAY, 1_000 * SECONDS_IN_DAY)
# Coordinator types of transfers between accounts: the recipient's AccountTransfer
# is an applied balance change (any other type is a debtor payment, §2.16).
TRANSFER_COORDINATOR_TYPES = ("direct", "agent", "issuing")

LEDGER_TABLES = (
    "prepared_transfer",
    "account",
    "transfer_request",
    "finalization_request",
    "pending_balance_change",
    "registered_balance_change",
    "rejected_transfer_signal",
    "prepared_transfer_signal",
    "finalized_transfer_signal",
    "account_transfer_signal",
    "account_update_signal",
    "account_purge_signal",
    "rejected_config_signal",
    "pending_balance_change_signal",
)

# Enough examples and steps to reach deep states (resurrection after deletion,
# several commits in one batch, redelivered changes), few enough to run in seconds.
PROPERTY_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# Examples that reached each outcome, over one run of the property test.
REACHED: Counter[str] = Counter()
# Outcomes every run must reach, or the invariants were checked on shallow states only
# (each is reached by 10-60% of the examples, so a run of 100 misses one with
# probability below 1e-4).
MUST_REACH = ("finalized OK commit", "prepared by direct", "a deleted account", "a resurrected account")


def reached(outcome: str) -> None:
    REACHED[outcome] += 1


def rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, params).fetchall()


def value(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def is_later_or_equal_seqnum(a: int, b: int) -> bool:
    """Wrap-around order of spec 02 §3.9, equality allowed."""
    return (a - b) % 2**32 < 2**31


def empty_ledger(conn: psycopg.Connection) -> None:
    """A fresh state for one example (the `conn` fixture empties tables only per test).

    DELETE, not TRUNCATE: the tables hold a few dozen rows, and TRUNCATE of fourteen
    tables costs tens of milliseconds per example. Children before parents (FKs).
    """
    conn.execute(
        sql.SQL(" ").join(sql.SQL("DELETE FROM {};").format(sql.Identifier("pyswpt", table)) for table in LEDGER_TABLES)
    )


def deliver_balance_changes(
    conn: psycopg.Connection,
    select: Callable[[dict[str, Any]], bool] | None = None,
    *,
    duplicate: bool = False,
) -> int:
    """Loopback broker: PendingBalanceChange outbox rows go to register_balance_change.

    `select(row) -> bool` picks the rows to deliver now (all when None); delivered rows
    are deleted from the outbox, as the flusher does after the broker confirmed them.
    With `duplicate` each is delivered twice, as an at-least-once broker may.
    """
    outbox = rows(conn, "SELECT * FROM pending_balance_change_signal ORDER BY change_id")
    delivered = [row for row in outbox if select is None or select(row)]
    for row in delivered:
        for _ in range(2 if duplicate else 1):
            conn.execute(
                "SELECT register_balance_change(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    row["debtor_id"],
                    row["other_creditor_id"],
                    row["change_id"],
                    row["creditor_id"],
                    row["coordinator_type"],
                    row["transfer_note_format"],
                    row["transfer_note"],
                    row["committed_at"],
                    row["principal_delta"],
                    T0,
                ),
            )
        conn.execute(
            "DELETE FROM pending_balance_change_signal"
            " WHERE debtor_id = %s AND other_creditor_id = %s AND change_id = %s",
            (row["debtor_id"], row["other_creditor_id"], row["change_id"]),
        )
    return len(delivered)


def run_processors(conn: psycopg.Connection, now: dt.datetime) -> int:
    """The workers: each batch processor once for every account with queued work."""
    max_accounts = 1000
    handled = 0
    for debtor_id, creditor_id in conn.execute(
        "SELECT * FROM list_transfer_request_senders(%s)", (max_accounts,)
    ).fetchall():
        handled += value(
            conn,
            "SELECT process_transfer_requests(%s, %s, %s, %s)",
            (debtor_id, creditor_id, COMMIT_PERIOD_SECONDS, now),
        )
    for debtor_id, creditor_id in conn.execute(
        "SELECT * FROM list_finalization_request_senders(%s)", (max_accounts,)
    ).fetchall():
        handled += value(
            conn,
            "SELECT process_finalization_requests(%s, %s, false, %s)",
            (debtor_id, creditor_id, now),
        )
    for debtor_id, creditor_id in conn.execute(
        "SELECT * FROM list_accounts_with_pending_balance_changes(%s)", (max_accounts,)
    ).fetchall():
        handled += value(conn, "SELECT process_balance_changes(%s, %s, %s)", (debtor_id, creditor_id, now))
    return handled


def settle(conn: psycopg.Connection, now: dt.datetime) -> None:
    """Deliver and apply every balance change in flight, and every queued request."""
    for _ in range(10):
        delivered = deliver_balance_changes(conn)
        handled = run_processors(conn, now)
        if delivered == 0 and handled == 0:
            return
    raise AssertionError("balance changes still in flight after 10 rounds")


@st.composite
def transfer_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A PrepareTransfer between two of the debtor's accounts (rarely the same one)."""
    sender = draw(st.sampled_from(CREDITORS))
    others = [creditor_id for creditor_id in CREDITORS if creditor_id != sender]
    recipient = sender if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(others))
    max_locked_amount = draw(st.integers(0, 3_000))
    return {
        "sender": sender,
        "recipient": recipient,
        "max_locked_amount": max_locked_amount,
        # Often 0: the preparation then succeeds with whatever is available.
        "min_locked_amount": draw(st.just(0) | st.integers(0, max_locked_amount)),
        "use_agent": draw(st.booleans()),
        "final_interest_rate_ts": draw(st.sampled_from(("now", "now", "now", "never", "before every rate"))),
        "max_commit_delay_seconds": draw(st.sampled_from(COMMIT_DELAYS_SECONDS)),
    }


def commit_kinds() -> st.SearchStrategy[str]:
    """Dismissal, commits within the lock, and commits above it (from the free balance or not)."""
    return st.sampled_from(("dismiss", "part", "full", "full", "more", "huge"))


def coordinator_mismatches() -> st.SearchStrategy[str | None]:
    """Mostly the right coordinator fields; sometimes one of them wrong (the request is ignored)."""
    return st.sampled_from((None, None, None, "coordinator_type", "coordinator_id", "coordinator_request_id"))


class LedgerMachine(RuleBasedStateMachine):
    """One debtor's ledger under random operations; `conn` is shared by all examples."""

    def __init__(self, conn: psycopg.Connection) -> None:
        super().__init__()
        self.conn = conn
        empty_ledger(conn)
        self.now = START
        # Per account: (ts, seqnum) of the latest ConfigureAccount sent.
        self.configs: dict[int, tuple[dt.datetime, int]] = {}
        self.root_rate = 0.0
        self.request_count = 0
        self.deleted_creditors: set[int] = set()
        # Per account: the columns seen after the previous step (versions only move forward).
        self.seen: dict[int, dict[str, Any]] = {}

    # -- operations -------------------------------------------------------------------

    @initialize(
        negligible_amounts=st.lists(
            st.sampled_from(NEGLIGIBLE_AMOUNTS), min_size=len(CREDITORS) - 1, max_size=len(CREDITORS) - 1
        ),
        root_rate=st.sampled_from(ROOT_RATES),
        payments=st.lists(
            st.sampled_from((0, 2)) | st.integers(0, 5_000), min_size=len(CREDITORS) - 1, max_size=len(CREDITORS) - 1
        ),
    )
    def open_accounts(self, negligible_amounts: list[float], root_rate: float, payments: list[int]) -> None:
        """Every example starts with the root account and its creditors configured and
        paid something, so that most steps act on accounts that exist and have money;
        later configs may schedule them for deletion, and payments resurrect them."""
        self.configure(ROOT_ID, ROOT_NEGLIGIBLE_AMOUNT, root_rate, False, False)
        for creditor_id, negligible_amount, amount in zip(CREDITORS[1:], negligible_amounts, payments, strict=True):
            self.configure(creditor_id, negligible_amount, root_rate, False, False)
            self.pay(creditor_id, amount)

    @rule(
        creditor_id=st.sampled_from(CREDITORS),
        negligible_amount=st.sampled_from(NEGLIGIBLE_AMOUNTS),
        root_rate=st.sampled_from(ROOT_RATES),
        scheduled_for_deletion=st.booleans(),
        stale=st.booleans(),
    )
    def configure(
        self,
        creditor_id: int,
        negligible_amount: float,
        root_rate: float,
        scheduled_for_deletion: bool,
        stale: bool,
    ) -> None:
        """ConfigureAccount (§2.2), then the initialisation of a new account (§2.3).

        A stale config repeats the latest (ts, seqnum), or is too old to create an account.
        """
        if stale:
            ts, seqnum = self.configs.get(creditor_id, (self.now - 8 * DAY, 0))
        else:
            ts, seqnum = self.now, self.configs.get(creditor_id, (START, 0))[1] + 1
            self.configs[creditor_id] = (ts, seqnum)
        config_data = ""
        if creditor_id == ROOT_ID:
            negligible_amount = ROOT_NEGLIGIBLE_AMOUNT
            config_data = json.dumps({"rate": root_rate})
            if not stale:
                self.root_rate = root_rate
        needs_initialisation = value(
            self.conn,
            "SELECT configure_account(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                DEBTOR_ID,
                creditor_id,
                ts,
                seqnum,
                negligible_amount,
                CONFIG_SCHEDULED_FOR_DELETION if scheduled_for_deletion else 0,
                config_data,
                MESSAGE_MAX_DELAY_SECONDS,
                self.now,
            ),
        )
        if needs_initialisation:
            root_config = rows(
                self.conn,
                "SELECT config_data FROM account WHERE debtor_id = %s AND creditor_id = 0",
                (DEBTOR_ID,),
            )
            self.conn.execute(
                "SELECT initialize_account(%s, %s, %s, %s, %s)",
                (
                    DEBTOR_ID,
                    creditor_id,
                    root_config[0]["config_data"] if root_config else None,
                    MESSAGE_MAX_DELAY_SECONDS,
                    self.now,
                ),
            )

    @rule(request=transfer_requests(), process_now=st.booleans())
    def prepare(self, request: dict[str, Any], process_now: bool) -> None:
        """PrepareTransfer (§2.4), processed now or left queued for run_processors."""
        self.enqueue_prepare(request)
        if process_now:
            run_processors(self.conn, self.now)

    @rule(
        data=st.data(),
        commit=commit_kinds(),
        mismatch=coordinator_mismatches(),
        process_now=st.booleans(),
    )
    def finalize(self, data: st.DataObject, commit: str, mismatch: str | None, process_now: bool) -> None:
        """FinalizeTransfer (§2.5) of any prepared transfer, or of one that does not exist."""
        transfers = rows(self.conn, "SELECT * FROM prepared_transfer ORDER BY sender_creditor_id, transfer_id")
        if transfers:
            transfer = data.draw(st.sampled_from(transfers), label="transfer")
        else:
            sender = data.draw(st.sampled_from(CREDITORS), label="sender")
            transfer = {
                "sender_creditor_id": sender,
                "transfer_id": 1,
                "coordinator_type": "direct",
                "coordinator_id": sender,
                "coordinator_request_id": 1,
                "locked_amount": 0,
            }
        self.enqueue_finalize(data, transfer, commit, mismatch)
        if process_now:
            run_processors(self.conn, self.now)

    @rule(data=st.data(), request=transfer_requests(), commit=commit_kinds())
    def transfer(self, data: st.DataObject, request: dict[str, Any], commit: str) -> None:
        """Both phases at once, as a well-behaved coordinator does: prepare, then finalize
        the transfer just prepared (if any) with the right coordinator fields."""
        self.enqueue_prepare(request)
        run_processors(self.conn, self.now)
        prepared = rows(
            self.conn,
            "SELECT * FROM prepared_transfer WHERE coordinator_request_id = %s",
            (self.request_count,),
        )
        if prepared:
            self.enqueue_finalize(data, prepared[0], commit, None)
            run_processors(self.conn, self.now)

    @rule(data=st.data(), recipient=st.sampled_from(CREDITORS[1:]), amount=st.integers(1, 5_000))
    def issue(self, data: st.DataObject, recipient: int, amount: int) -> None:
        """The debtor issues money: a transfer from the root account, committed in full."""
        request = {
            "sender": ROOT_ID,
            "recipient": recipient,
            "min_locked_amount": amount,
            "max_locked_amount": amount,
            "use_agent": False,
            "final_interest_rate_ts": "now",
            "max_commit_delay_seconds": COMMIT_DELAYS_SECONDS[-1],
        }
        self.transfer(data, request, "full")

    def enqueue_prepare(self, request: dict[str, Any]) -> None:
        self.request_count += 1
        sender = request["sender"]
        if sender == ROOT_ID:
            coordinator_type, coordinator_id, reachable = "issuing", DEBTOR_ID, None
        elif request["use_agent"] and sender in AGENT_CREDITORS:
            # The driver declares an agent's recipient reachable without a lookup.
            coordinator_type, coordinator_id, reachable = "agent", sender, True
        else:
            coordinator_type, coordinator_id, reachable = "direct", sender, None
        final_interest_rate_ts = {
            "now": self.now,
            "before every rate": T0 - dt.timedelta(minutes=1),
            "never": T_INFINITY,
        }[request["final_interest_rate_ts"]]
        self.conn.execute(
            "SELECT enqueue_transfer_request(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                DEBTOR_ID,
                sender,
                coordinator_type,
                coordinator_id,
                self.request_count,
                request["min_locked_amount"],
                request["max_locked_amount"],
                request["recipient"],
                final_interest_rate_ts,
                request["max_commit_delay_seconds"],
                self.now,
                reachable,
                self.now,
            ),
        )

    def enqueue_finalize(
        self, data: st.DataObject, transfer: dict[str, Any], commit: str, mismatch: str | None
    ) -> None:
        locked = transfer["locked_amount"]
        if commit == "dismiss":
            committed_amount = 0
        elif commit == "part":
            committed_amount = data.draw(st.integers(0, locked), label="part of the lock")
        elif commit == "full":
            committed_amount = locked
        elif commit == "more":
            committed_amount = locked + data.draw(st.integers(1, 3_000), label="above the lock")
        else:
            committed_amount = 10**12
        fields = {key: transfer[key] for key in ("coordinator_type", "coordinator_id", "coordinator_request_id")}
        if mismatch == "coordinator_type":
            fields["coordinator_type"] = "agent" if fields["coordinator_type"] != "agent" else "direct"
        elif mismatch is not None:
            fields[mismatch] += 1
        self.conn.execute(
            "SELECT enqueue_finalization_request(%s, %s, %s, %s, %s, %s, %s, '', '', %s, %s)",
            (
                DEBTOR_ID,
                transfer["sender_creditor_id"],
                transfer["transfer_id"],
                fields["coordinator_type"],
                fields["coordinator_id"],
                fields["coordinator_request_id"],
                committed_amount,
                self.now,
                self.now,
            ),
        )

    @rule(data=st.data(), duplicate=st.booleans())
    def deliver(self, data: st.DataObject, duplicate: bool) -> None:
        """The broker delivers some of the PendingBalanceChange messages, maybe twice."""
        deliver_balance_changes(
            self.conn,
            lambda row: data.draw(st.booleans(), label=f"deliver change {row['change_id']}"),
            duplicate=duplicate,
        )

    @rule(lag_seconds=st.sampled_from((0, 0, 1, 600)))
    def process(self, lag_seconds: int) -> None:
        """The workers: prepare, finalize and apply whatever is queued. A worker whose
        transaction started a little earlier passes an earlier `now`, but never one
        before the latest change of an account: at REPEATABLE READ (pyswpt.db) a
        transaction older than the account row it locks fails with 40001 and is run
        again with a fresh now(). (Only READ COMMITTED would let it through, dating
        its transfers before the ones numbered before them.)"""
        latest_change = value(self.conn, "SELECT max(last_change_ts) FROM account WHERE debtor_id = %s", (DEBTOR_ID,))
        lagging_now = self.now - dt.timedelta(seconds=lag_seconds)
        run_processors(self.conn, lagging_now if latest_change is None else max(lagging_now, latest_change))

    @rule(creditor_id=st.sampled_from(CREDITORS), rate=st.sampled_from((-50.0, -5.0, 0.0, 7.5, 100.0)))
    def change_interest_rate(self, creditor_id: int, rate: float) -> None:
        """ChangeInterestRate chore (§2.7): refused within 8 days of the last change."""
        self.conn.execute(
            "SELECT change_interest_rate(%s, %s, %s, %s, %s, %s)",
            (DEBTOR_ID, creditor_id, rate, self.now, MESSAGE_MAX_DELAY_SECONDS, self.now),
        )

    @rule(
        creditor_id=st.sampled_from(CREDITORS),
        interval_seconds=st.sampled_from((0, MIN_CAPITALIZATION_INTERVAL_SECONDS)),
    )
    def capitalize(self, creditor_id: int, interval_seconds: int) -> None:
        """CapitalizeInterest chore (§2.9); a direct call may pass a zero interval."""
        self.conn.execute(
            "SELECT capitalize_interest(%s, %s, %s, %s)",
            (DEBTOR_ID, creditor_id, interval_seconds, self.now),
        )

    @rule(creditor_id=st.sampled_from(CREDITORS))
    def try_to_delete(self, creditor_id: int) -> None:
        """TryToDeleteAccount chore (§2.10)."""
        if value(self.conn, "SELECT try_to_delete_account(%s, %s, %s)", (DEBTOR_ID, creditor_id, self.now)):
            self.deleted_creditors.add(creditor_id)

    @rule(creditor_id=st.sampled_from(CREDITORS))
    def close_account(self, creditor_id: int) -> None:
        """The owner schedules the account for deletion, and a deletion attempt follows."""
        negligible_amount = value(
            self.conn,
            "SELECT coalesce(max(negligible_amount), 0) FROM account WHERE debtor_id = %s AND creditor_id = %s",
            (DEBTOR_ID, creditor_id),
        )
        self.configure(creditor_id, negligible_amount, self.root_rate, True, False)
        self.try_to_delete(creditor_id)

    @rule(creditor_id=st.sampled_from(CREDITORS), amount=st.integers(-2_000, 5_000))
    def pay(self, creditor_id: int, amount: int) -> None:
        """Direct debtor payment (§2.16): B4 then B6, creating or resurrecting the account."""
        self.conn.execute(
            "SELECT make_direct_debtor_payment('payment', %s, %s, %s, '', '', %s)",
            (DEBTOR_ID, creditor_id, amount, self.now),
        )

    @rule(
        delay=st.one_of(
            st.integers(1, 3_600).map(lambda seconds: dt.timedelta(seconds=seconds)),
            st.integers(1, 40).map(lambda days: days * DAY),
        )
    )
    def advance_clock(self, delay: dt.timedelta) -> None:
        self.now += delay

    @rule()
    def settle_and_check_conservation(self) -> None:
        """§5.1: with nothing in flight, the principals of the debtor's accounts sum to zero."""
        settle(self.conn, self.now)
        self.check_settled_conservation()

    def teardown(self) -> None:
        # Runs in a `finally`: when a step or an invariant already failed, that failure
        # is the one to report, not a consequence of it found while settling.
        if sys.exc_info()[1] is not None:
            return
        settle(self.conn, self.now)
        self.check_settled_conservation()
        self.report_reached_states()

    def report_reached_states(self) -> None:
        """Count the outcomes this example reached, to prove the generator reaches them."""
        for (status,) in self.conn.execute(
            "SELECT DISTINCT 'finalized ' || status_code"
            " || CASE WHEN committed_amount > 0 THEN ' commit' WHEN status_code = 'OK' THEN ' dismissal' ELSE '' END"
            " FROM finalized_transfer_signal"
            " UNION SELECT DISTINCT 'prepare rejected ' || status_code FROM rejected_transfer_signal"
            " UNION SELECT DISTINCT 'account transfer ' || coordinator_type FROM account_transfer_signal"
            " UNION SELECT DISTINCT 'prepared by ' || coordinator_type FROM prepared_transfer_signal"
        ).fetchall():
            reached(status)
        deleted = {
            creditor_id
            for (creditor_id,) in self.conn.execute(
                "SELECT creditor_id FROM account WHERE status_flags & %s <> 0", (STATUS_DELETED,)
            ).fetchall()
        }
        if self.deleted_creditors:
            reached("a deleted account")
        if self.deleted_creditors - deleted:
            reached("a resurrected account")

    def check_settled_conservation(self) -> None:
        assert value(self.conn, "SELECT count(*) FROM pending_balance_change_signal") == 0
        assert value(self.conn, "SELECT count(*) FROM pending_balance_change") == 0
        total = value(
            self.conn,
            "SELECT coalesce(sum(principal), 0) FROM account WHERE debtor_id = %s",
            (DEBTOR_ID,),
        )
        assert total == 0, f"principals sum to {total} with no balance change in flight"

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def money_is_conserved_in_flight(self) -> None:
        """§5.1 at every step: what left a principal is in another, or on its way there."""
        principals, in_outbox, in_queue, overflown = self.conn.execute(
            """
            SELECT
                (SELECT coalesce(sum(principal), 0) FROM account WHERE debtor_id = %(d)s),
                (SELECT coalesce(sum(principal_delta), 0) FROM pending_balance_change_signal WHERE debtor_id = %(d)s),
                (SELECT coalesce(sum(principal_delta), 0) FROM pending_balance_change WHERE debtor_id = %(d)s),
                (SELECT count(*) FROM account WHERE debtor_id = %(d)s AND status_flags & %(overflown)s <> 0)
            """,
            {"d": DEBTOR_ID, "overflown": STATUS_OVERFLOWN},
        ).fetchone()
        assert overflown == 0, "containment fired although every amount is small"
        assert principals + in_outbox + in_queue == 0, (
            f"principals {principals} + outbox {in_outbox} + queue {in_queue} != 0"
        )

    @invariant()
    def audit_finds_no_violation(self) -> None:
        """The SQL audit (`pyswpt audit`) agrees: no false alarm in any reachable state.
        The test holds every account of its debtor and no change is in a broker, so
        conservation is checked strictly."""
        found = rows(self.conn, "SELECT * FROM audit_ledger(true) WHERE status = 'VIOLATION'")
        assert found == []

    @invariant()
    def locks_summarize_prepared_transfers(self) -> None:
        """§5.2: total_locked_amount and pending_transfers_count match the prepared transfers."""
        mismatches = rows(
            self.conn,
            """
            SELECT a.creditor_id, a.total_locked_amount, a.pending_transfers_count,
                coalesce(sum(pt.locked_amount), 0) AS locked_sum, count(pt.transfer_id) AS transfer_count
            FROM account AS a
            LEFT JOIN prepared_transfer AS pt
                ON pt.debtor_id = a.debtor_id AND pt.sender_creditor_id = a.creditor_id
            GROUP BY a.debtor_id, a.creditor_id
            HAVING a.total_locked_amount <> least(coalesce(sum(pt.locked_amount), 0), %s)
                OR a.pending_transfers_count <> count(pt.transfer_id)
            """,
            (MAX_INT64,),
        )
        assert mismatches == []

    @invariant()
    def every_prepared_transfer_has_at_most_one_outcome(self) -> None:
        """§5.6: a prepared transfer is either still pending or finalized once, never lost."""
        prepared = {
            (row[0], row[1])
            for row in self.conn.execute(
                "SELECT sender_creditor_id, transfer_id FROM prepared_transfer_signal"
            ).fetchall()
        }
        pending = {
            (row[0], row[1])
            for row in self.conn.execute("SELECT sender_creditor_id, transfer_id FROM prepared_transfer").fetchall()
        }
        finalized = {
            (row[0], row[1])
            for row in self.conn.execute(
                "SELECT sender_creditor_id, transfer_id FROM finalized_transfer_signal"
            ).fetchall()
        }
        assert pending.isdisjoint(finalized)
        assert pending | finalized == prepared

    @invariant()
    def transfer_numbers_form_a_chain(self) -> None:
        """§5.3: per (account, creation_date) AccountTransfers are numbered 1, 2, 3, ..."""
        chains: dict[tuple[int, dt.date], list[dict[str, Any]]] = {}
        for row in rows(
            self.conn,
            "SELECT * FROM account_transfer_signal ORDER BY creditor_id, creation_date, transfer_number",
        ):
            chains.setdefault((row["creditor_id"], row["creation_date"]), []).append(row)
        for (creditor_id, _), chain in chains.items():
            assert creditor_id != ROOT_ID, "root accounts number no transfers"
            for expected, row in enumerate(chain, start=1):
                assert row["transfer_number"] == expected
                assert row["previous_transfer_number"] == expected - 1
        for account in rows(self.conn, "SELECT * FROM account WHERE debtor_id = %s", (DEBTOR_ID,)):
            chain = chains.get((account["creditor_id"], account["creation_date"]), [])
            assert account["last_transfer_number"] == len(chain)

    @invariant()
    def transfers_are_never_dated_before_earlier_ones(self) -> None:
        """Along an account's transfer numbers, the time each was numbered (inserted_at)
        never goes back, and a transfer the account committed itself (the sender's side,
        debtor payments: committed_at is the numbering transaction's now) is not dated
        before any earlier one. An incoming balance change keeps its sender's commit
        time (spec 01, AccountTransfer): one delivered late is dated before transfers
        numbered before it, so it is exempt."""
        chains: dict[tuple[int, dt.date], list[dict[str, Any]]] = {}
        for row in rows(
            self.conn,
            "SELECT creditor_id, creation_date, transfer_number, coordinator_type, acquired_amount,"
            " committed_at, inserted_at"
            " FROM account_transfer_signal ORDER BY creditor_id, creation_date, transfer_number",
        ):
            chains.setdefault((row["creditor_id"], row["creation_date"]), []).append(row)
        for chain in chains.values():
            for earlier, later in itertools.pairwise(chain):
                assert later["inserted_at"] >= earlier["inserted_at"], (later, earlier)
            latest_committed_at = T0
            for row in chain:
                is_incoming = row["coordinator_type"] in TRANSFER_COORDINATOR_TYPES and row["acquired_amount"] > 0
                if not is_incoming:
                    assert row["committed_at"] >= latest_committed_at, (row, latest_committed_at)
                latest_committed_at = max(latest_committed_at, row["committed_at"])

    @invariant()
    def transfer_ids_increase_per_sender(self) -> None:
        """§5.4: each sender's transfer ids strictly increase from days(creation_date) << 40."""
        accounts = {
            row["creditor_id"]: row
            for row in rows(self.conn, "SELECT * FROM account WHERE debtor_id = %s", (DEBTOR_ID,))
        }
        last_ids: dict[int, int] = {}
        for row in rows(self.conn, "SELECT * FROM prepared_transfer_signal ORDER BY signal_id"):
            sender = row["sender_creditor_id"]
            previous = last_ids.get(sender, initial_transfer_id(accounts[sender]["creation_date"]))
            assert row["transfer_id"] > previous
            last_ids[sender] = row["transfer_id"]
        for creditor_id, account in accounts.items():
            assert account["last_transfer_id"] == last_ids.get(
                creditor_id, initial_transfer_id(account["creation_date"])
            )

    @invariant()
    def account_versions_only_move_forward(self) -> None:
        """§5.7: seqnum and last_change_ts never go back; changes of principal or of the
        deleted flag come with a new seqnum; an account row stays one incarnation."""
        current = {
            row["creditor_id"]: row
            for row in rows(self.conn, "SELECT * FROM account WHERE debtor_id = %s", (DEBTOR_ID,))
        }
        for creditor_id, before in self.seen.items():
            after = current.get(creditor_id)
            assert after is not None, "nothing here purges accounts"
            assert after["creation_date"] == before["creation_date"]
            assert is_later_or_equal_seqnum(after["last_change_seqnum"], before["last_change_seqnum"])
            assert after["last_change_ts"] >= before["last_change_ts"]
            assert after["last_transfer_number"] >= before["last_transfer_number"]
            assert after["last_transfer_id"] >= before["last_transfer_id"]
            if (
                after["principal"] != before["principal"]
                or after["status_flags"] & STATUS_DELETED != before["status_flags"] & STATUS_DELETED
            ):
                assert after["last_change_seqnum"] != before["last_change_seqnum"]
        for account in current.values():
            if account["status_flags"] & STATUS_DELETED:
                assert account["principal"] == 0
                assert account["pending_transfers_count"] == 0
        self.seen = current


def test_ledger_invariants_hold_under_random_operations(conn: psycopg.Connection) -> None:
    REACHED.clear()
    run_state_machine_as_test(lambda: LedgerMachine(conn), settings=PROPERTY_SETTINGS)
    missed = [outcome for outcome in MUST_REACH if REACHED[outcome] == 0]
    assert not missed, f"no example reached {missed}; reached: {dict(REACHED)}"
