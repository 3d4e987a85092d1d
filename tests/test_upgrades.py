"""Upgrades while the node runs (issue 9): the drivers wait out a missing or changed SQL API, up to a bound.

`configure` of another release may run while the drivers are up. A function
that is missing or changed meanwhile is never a message's, row's or
account's fault: nothing is parked, rejected or skipped because of it, and
the work is done once the API is back. A driver whose API stays missing past
APP_API_WAIT_SECONDS exits with one line saying why, and `pyswpt run all`
stops the node on it.

Each test has a database of its own: the upgrades change its schema.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from broker import declare_smp_exchanges
from conftest import new_database
from drivers import free_port, healthy, pyswpt_command, started_pids, wait_for
from factories import insert_account
from peers import Like, Shard, funded_pair, open_account, open_shard, process_group
from test_web import web_server

from pyswpt import queries, schema, topology
from pyswpt.applying import MAX_DELIVERY_ATTEMPTS
from pyswpt.drivers.supervisor import PROGRAMS, STOP_TIMEOUT_SECONDS
from pyswpt.sharding import u64_string
from pyswpt.transactions import is_api_missing, is_infrastructure_error
from pyswpt.upgrades import EXIT_API_UNAVAILABLE, ApiUnavailable, ApiWait

# The functions the drivers call, by name, qualified with their schema as pyswpt.queries calls them.
ENTRY_POINTS = {
    name: f"{schema_name}.{name}"
    for value in vars(queries).values()
    if isinstance(value, str)
    for schema_name, name in re.findall(r"(\w+)\.(\w+)\(", value)
}
# Short enough for a test, long enough for a driver to meet the missing function.
SHORT_API_WAIT_SECONDS = "3"
EXIT_DEADLINE_SECONDS = 60.0
# Five Python processes start at once under `run all`, on a shared machine.
START_SECONDS = 60.0
# Generous: the machine running the tests may be shared and busy.
ROUND_TIMEOUT_SECONDS = 120.0
TRANSFERS_PER_ROUND = 10
CONFIGURE_RUNS = 3
ROUNDS_AFTER_CONFIGURE = 2
FUNDS = 10**6
# psycopg prepares a statement on the server from its fifth run on a connection.
PSYCOPG_PREPARE_THRESHOLD = 5


@pytest.fixture(scope="module", autouse=True)
def exchanges(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)


@pytest.fixture
def shard(postgres_server_url, rabbitmq_url, tmp_path) -> Iterator[Shard]:
    """A shard on a database of its own, migrated by this release's `sql/`."""
    with new_database(postgres_server_url, "pyswpt_test_upgrade") as url:
        schema.apply_migrations(url)
        with contextlib.closing(psycopg.connect(url, autocommit=True)) as conn:
            conn.execute("SET search_path = pyswpt")
            with open_shard(conn, url, rabbitmq_url, tmp_path, queue_prefix="pyswpt_test_upgrade", relaxed=True) as s:
                yield s


def drop_functions(shard: Shard, *names: str) -> None:
    """DROP FUNCTION as the superuser, as a `configure` of another release would."""
    for name in names:
        assert name in ENTRY_POINTS
        shard.conn.execute(f"DROP FUNCTION {ENTRY_POINTS[name]}")


def prepare_transfers(shard: Shard, sender: int, recipient: int, request_ids: range) -> None:
    for request_id in request_ids:
        shard.prepare(sender, u64_string(recipient), request_id=request_id, min_locked=1, max_locked=1)


def parked_count(shard: Shard) -> int:
    return shard.count("SELECT count(*) FROM parked_message")


# Which errors say "the API is missing or changed" --------------------------------------------


def server_error(conn: psycopg.Connection, statement: str, params: dict | None = None) -> psycopg.Error:
    try:
        conn.execute(statement, params)
    except psycopg.Error as error:
        return error
    raise AssertionError(f"{statement} did not fail")


@pytest.fixture
def scratch_url(postgres_server_url) -> Iterator[str]:
    with new_database(postgres_server_url, "pyswpt_test_api_errors") as url:
        yield url


@pytest.fixture
def scratch(scratch_url) -> Iterator[psycopg.Connection]:
    with psycopg.connect(scratch_url, autocommit=True) as c:
        c.execute("CREATE SCHEMA api")
        yield c


def test_a_missing_or_changed_api_is_an_infrastructure_error_and_data_errors_are_not(scratch, scratch_url):
    # (DDL first: psycopg forgets its prepared statements when it sees one.)
    # A function returning a table's rows, and a migration that adds a column to the table.
    scratch.execute("CREATE TABLE api.outbox (a integer)")
    scratch.execute("CREATE FUNCTION api.take() RETURNS SETOF api.outbox LANGUAGE sql AS 'SELECT a FROM api.outbox'")
    scratch.execute("ALTER TABLE api.outbox ADD COLUMN b integer")
    # The same for a PL/pgSQL function: its RETURN QUERY names the table's columns of before.
    scratch.execute(
        "CREATE FUNCTION api.take_plpgsql() RETURNS SETOF api.outbox LANGUAGE plpgsql"
        " AS 'BEGIN RETURN QUERY SELECT a FROM api.outbox; END'"
    )
    scratch.execute("CREATE FUNCTION api.rows(p_n integer) RETURNS TABLE (a integer) LANGUAGE sql AS 'SELECT p_n'")
    # psycopg prepares a statement on the server once it ran five times on a connection.
    for _ in range(6):
        scratch.execute("SELECT * FROM api.rows(p_n => %(n)s)", {"n": 1})
    with psycopg.connect(scratch_url, autocommit=True) as upgrade:
        upgrade.execute("DROP FUNCTION api.rows")
        # A column added to the result of a function, as a careless release might.
        upgrade.execute(
            "CREATE FUNCTION api.rows(p_n integer) RETURNS TABLE (a integer, b integer) LANGUAGE sql AS 'SELECT p_n, 2'"
        )
    api_errors = {
        "changed result of a prepared statement": server_error(
            scratch, "SELECT * FROM api.rows(p_n => %(n)s)", {"n": 1}
        ),
        "missing function": server_error(scratch, "SELECT api.nothing(p_n => 1)"),
        "renamed argument": server_error(scratch, "SELECT * FROM api.rows(p_count => 1)"),
        "missing schema": server_error(scratch, "SELECT pyswpt_api.anything(p_n => 1)"),
        "missing table": server_error(scratch, "SELECT * FROM api.nowhere"),
        "missing result column": server_error(scratch, "SELECT c FROM api.rows(p_n => 1)"),
        "table changed under its function": server_error(scratch, "SELECT * FROM api.take()"),
        "table changed under its PL/pgSQL function": server_error(scratch, "SELECT * FROM api.take_plpgsql()"),
        # What a plan naming a function re-created meanwhile raises (a race, not made on demand here).
        "function re-created under a session's plan": server_error(
            scratch,
            "DO $$ BEGIN RAISE EXCEPTION 'cache lookup failed for function 398306'"
            " USING ERRCODE = 'internal_error'; END $$",
        ),
    }
    assert {what: error.sqlstate for what, error in api_errors.items()} == {
        "changed result of a prepared statement": "0A000",
        "missing function": "42883",
        "renamed argument": "42883",
        "missing schema": "3F000",
        "missing table": "42P01",
        "missing result column": "42703",
        "table changed under its function": "42P13",
        "table changed under its PL/pgSQL function": "42804",
        "function re-created under a session's plan": "XX000",
    }
    for error in api_errors.values():
        assert is_api_missing(error) and is_infrastructure_error(error)
    data_errors = [
        server_error(scratch, "SELECT 1 / 0"),
        server_error(scratch, "SELECT 2147483647 + 1"),
        server_error(scratch, "DO $$ BEGIN RAISE EXCEPTION 'no' USING ERRCODE = 'feature_not_supported'; END $$"),
        server_error(scratch, "DO $$ BEGIN RAISE EXCEPTION 'no' USING ERRCODE = 'internal_error'; END $$"),
    ]
    for error in data_errors:
        assert not is_api_missing(error) and not is_infrastructure_error(error)


def test_the_wait_ends_after_its_bound_and_starts_over_after_a_success(scratch):
    missing = server_error(scratch, "SELECT api.process_things(p_n => 1)")
    lost = psycopg.OperationalError("the connection was lost")
    now = [100.0]
    wait = ApiWait(10.0, "the test loop", clock=lambda: now[0])
    wait.failed(missing)
    now[0] += 9.0
    wait.failed(lost)
    wait.failed(missing)
    wait.succeeded()
    now[0] += 9.0
    wait.failed(missing)
    now[0] += 9.0
    wait.failed(missing)
    now[0] += 1.0
    with pytest.raises(ApiUnavailable) as raised:
        wait.failed(missing)
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith("Stopping the test loop: ")
    assert "api.process_things(p_n => integer) does not exist" in line
    assert "pyswpt configure" in line


# The drivers on a running shard ---------------------------------------------------------------


def test_functions_dropped_while_the_drivers_run_are_waited_for_and_nothing_is_parked(shard):
    consumer, workers, flusher = shard.start("consumer", "workers", "flusher")
    sender, recipient = funded_pair(shard, FUNDS)
    newcomer = shard.creditor()
    # The workers and the flusher first: the consumer still queues what they must do (the
    # transfers it prepares and finalizes at once; balance changes from other shards it queues).
    drop_functions(shard, "process_balance_changes", "take_account_update_signals")
    prepare_transfers(shard, sender, recipient, range(1, 6))
    shard.balance_change(recipient, sender, change_id=1, principal_delta=1)
    shard.configure(newcomer)
    wait_for(lambda: "42883" in workers.log(), "the workers to meet the missing function")
    wait_for(lambda: "42883" in flusher.log(), "the flusher to meet the missing function")
    # Then the consumer, with a window of several messages.
    drop_functions(shard, "enqueue_transfer_request")
    prepare_transfers(shard, sender, recipient, range(6, 11))
    wait_for(lambda: "42883" in consumer.log(), "the consumer to meet the missing function")

    schema.apply_migrations(shard.database_url)  # `configure` of this release again

    shard.inbox.expect(
        *[Like("PreparedTransfer", creditor_id=sender, coordinator_request_id=n) for n in range(1, 11)],
        Like("AccountTransfer", creditor_id=recipient, acquired_amount=1),
        Like("AccountUpdate", creditor_id=newcomer),
        timeout_seconds=ROUND_TIMEOUT_SECONDS,
    )
    shard.settle()
    for driver in (consumer, workers, flusher):
        driver.assert_alive()
        assert "Traceback" not in driver.log()
    assert parked_count(shard) == 0
    assert shard.inbox.all_received(Like("RejectedTransfer")) == []
    assert "one at a time" not in consumer.log()
    assert "Skipped" not in workers.log()


def test_a_column_renamed_under_the_consumer_is_waited_for_and_no_message_is_parked(shard):
    consumer, _workers, _flusher = shard.start("consumer", "workers", "flusher")
    sender, recipient = funded_pair(shard, FUNDS)
    # A migration of the next release renamed a column that this release's functions still write.
    shard.conn.execute("ALTER TABLE transfer_request RENAME COLUMN final_interest_rate_ts TO next_release_ts")
    prepare_transfers(shard, sender, recipient, range(1, 6))
    # Retried as often as a message that fails alone is delivered before it is parked.
    wait_for(
        lambda: consumer.log().count("42703") > MAX_DELIVERY_ATTEMPTS,
        "the consumer to meet the missing column again and again",
        ROUND_TIMEOUT_SECONDS,
    )
    shard.conn.execute("ALTER TABLE transfer_request RENAME COLUMN next_release_ts TO final_interest_rate_ts")

    shard.inbox.expect(
        *[Like("PreparedTransfer", creditor_id=sender, coordinator_request_id=n) for n in range(1, 6)],
        timeout_seconds=ROUND_TIMEOUT_SECONDS,
    )
    assert parked_count(shard) == 0
    assert "one at a time" not in consumer.log()


def changed_sql_dir(tmp_path: Path) -> Path:
    """This release's sql/ as the next release might change it: a migration, every body
    changed, and a `_v2` entry point beside the old one. Every apply drops and creates the
    whole API schema again in one transaction (sql/migrations/9999_functions.py)."""
    sql_dir = tmp_path / "next-release-sql"
    shutil.copytree(schema.SQL_DIR, sql_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (sql_dir / "migrations" / "9000_next_release.sql").write_text(
        "ALTER TABLE pyswpt.account_transfer_signal ADD COLUMN next_release_note text;\n"
    )
    functions = sql_dir / "functions"
    for path in functions.glob("*.sql"):
        path.write_text(path.read_text().replace("AS $$\n", "AS $$\n    -- the next release\n"))
    (functions / "99_next_release.sql").write_text(
        """
CREATE FUNCTION pyswpt_api.is_reachable_account_v2(
    p_debtor_id bigint,
    p_creditor_id bigint,
    p_reachable_if_deleted boolean
)
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pyswpt, pyswpt_private, pg_temp
AS $$
    SELECT p_reachable_if_deleted
        OR pyswpt_api.is_reachable_account(p_debtor_id => p_debtor_id, p_creditor_id => p_creditor_id)
$$;
"""
    )
    return sql_dir


def test_configure_of_a_changed_function_set_under_load_completes_every_transfer_once(shard, tmp_path):
    consumer, workers, flusher = shard.start("consumer", "workers", "flusher")
    sender, recipient = funded_pair(shard, FUNDS)
    environ = shard.environment(PYSWPT_SQL_DIR=str(changed_sql_dir(tmp_path)))
    log_path = tmp_path / "configure.log"
    statuses: list[int] = []

    def configure_again_and_again() -> None:
        for _ in range(CONFIGURE_RUNS):
            with open(log_path, "ab") as log:
                statuses.append(
                    subprocess.run([*pyswpt_command(), "configure"], env=environ, stdout=log, stderr=log).returncode
                )

    configuring = threading.Thread(target=configure_again_and_again)
    configuring.start()
    rounds_after = 0
    next_request_id = 1
    finalized = []
    while rounds_after < ROUNDS_AFTER_CONFIGURE:
        rounds_after += 0 if configuring.is_alive() else 1
        request_ids = range(next_request_id, next_request_id + TRANSFERS_PER_ROUND)
        next_request_id += TRANSFERS_PER_ROUND
        prepare_transfers(shard, sender, recipient, request_ids)
        prepared = shard.inbox.expect(
            *[Like("PreparedTransfer", creditor_id=sender, coordinator_request_id=n) for n in request_ids],
            timeout_seconds=ROUND_TIMEOUT_SECONDS,
        )
        for message in prepared:
            shard.finalize(message.fields, 1)
        finalized += shard.inbox.expect(
            *[Like("FinalizedTransfer", creditor_id=sender, coordinator_request_id=n) for n in request_ids],
            timeout_seconds=ROUND_TIMEOUT_SECONDS,
        )
    configuring.join()
    shard.settle()

    assert statuses == [0] * CONFIGURE_RUNS, log_path.read_text()
    # The next release is installed: its migration and its new entry point.
    assert shard.count("SELECT count(*) FROM account_transfer_signal WHERE next_release_note IS NULL") == 0
    assert shard.conn.execute("SELECT pyswpt_api.is_reachable_account_v2(1, 2, true)").fetchone()[0] is True
    transfers = len(finalized)
    assert {message.fields["status_code"] for message in finalized} == {"OK"}
    assert len({message.fields["transfer_id"] for message in finalized}) == transfers
    assert len(shard.inbox.all_received(Like("FinalizedTransfer", creditor_id=sender))) == transfers
    assert len(shard.inbox.all_received(Like("AccountTransfer", creditor_id=recipient))) == transfers
    assert shard.inbox.all_received(Like("RejectedTransfer")) == []
    assert (shard.principal(sender), shard.principal(recipient)) == (FUNDS - transfers, transfers)
    assert parked_count(shard) == 0
    for driver in (consumer, workers, flusher):
        driver.assert_alive()
    assert "Skipped" not in workers.log()


# A function that stays missing ------------------------------------------------------------------

# (driver, the function it needs, the other drivers that bring it work)
STAYS_MISSING = [
    ("consumer", "enqueue_transfer_request", ()),
    ("workers", "process_balance_changes", ("consumer",)),
    ("flusher", "take_prepared_transfer_signals", ("consumer", "workers")),
    ("scan-accounts", "get_scanned_table_size", ()),
]


@pytest.mark.parametrize(("driver", "function", "helpers"), STAYS_MISSING, ids=[case[0] for case in STAYS_MISSING])
def test_a_driver_whose_function_stays_missing_exits_with_one_line_naming_it(shard, driver, function, helpers):
    sender, recipient = shard.creditor(), shard.creditor()
    drop_functions(shard, function)
    shard.start(*helpers)
    [waiting] = shard.start(driver, APP_API_WAIT_SECONDS=SHORT_API_WAIT_SECONDS)
    # Accounts first, so that the transfer requests get past intake; a balance change for the workers.
    shard.configure(sender)
    shard.configure(recipient)
    prepare_transfers(shard, sender, recipient, range(1, 4))
    shard.balance_change(recipient, sender, change_id=1, principal_delta=1)

    wait_for(lambda: waiting.process.poll() is not None, f"{driver} to give up", EXIT_DEADLINE_SECONDS)
    assert waiting.process.returncode == EXIT_API_UNAVAILABLE
    log = waiting.log()
    [line] = [line for line in log.splitlines() if "Stopping the" in line]
    assert f"{ENTRY_POINTS[function]}(" in line and "42883" in line and "pyswpt configure" in line
    assert "CRITICAL" in line
    assert "Traceback" not in log
    assert parked_count(shard) == 0


@pytest.fixture
def run_all_environment(shard, rabbitmq_url) -> Iterator[tuple[int, dict[str, str]]]:
    """The fetch API's port and the environment of `run all` on `shard`, with a chores queue of its own."""
    port = free_port()
    chores_queue = f"pyswpt_test_upgrade_chores_{uuid.uuid4().hex[:8]}"
    topology.declare_chores_queue(rabbitmq_url, chores_queue)
    try:
        yield (
            port,
            shard.environment(
                APP_API_WAIT_SECONDS=SHORT_API_WAIT_SECONDS,
                CHORES_BROKER_QUEUE=chores_queue,
                WEBSERVER_PORT=str(port),
                FETCH_API_URL=f"http://127.0.0.1:{port}",
            ),
        )
    finally:
        with topology.open_channel(rabbitmq_url) as channel:
            channel.queue_delete(chores_queue)


def test_run_all_stops_the_node_when_a_driver_gives_up_on_its_api(shard, run_all_environment, tmp_path):
    port, environ = run_all_environment
    log_path = tmp_path / "run-all.log"
    with process_group(["run", "all"], environ, log_path) as node:
        wait_for(lambda: set(started_pids(log_path.read_text())) == set(PROGRAMS), "every driver", START_SECONDS)
        wait_for(lambda: healthy(port), "the fetch API", START_SECONDS)
        sender = shard.creditor()
        open_account(shard, sender)
        drop_functions(shard, "enqueue_transfer_request")
        prepare_transfers(shard, sender, shard.creditor(), range(1, 4))
        wait_for(lambda: node.poll() is not None, "the node to stop", EXIT_DEADLINE_SECONDS + STOP_TIMEOUT_SECONDS)
    assert node.returncode == EXIT_API_UNAVAILABLE
    log = log_path.read_text()
    [reason] = [line for line in log.splitlines() if "Stopping the consumer" in line]
    assert f"{ENTRY_POINTS['enqueue_transfer_request']}(" in reason
    assert "consumer (pid" in log and "stopping the node" in log
    assert "restarting" not in log
    assert started_pids(log)["consumer"] == started_pids(log)["consumer"][:1]
    assert "Node stopped: a driver gave up waiting for its SQL API" in log
    assert parked_count(shard) == 0


def test_run_all_stops_the_node_when_a_driver_in_one_of_its_threads_gives_up_on_its_api(
    shard, run_all_environment, tmp_path
):
    """The scanners run in a thread of the supervisor, and stop the node the same way as a process."""
    _port, environ = run_all_environment
    drop_functions(shard, "get_scanned_table_size")
    log_path = tmp_path / "run-all.log"
    with process_group(["run", "all"], environ, log_path) as node:
        wait_for(lambda: node.poll() is not None, "the node to stop", EXIT_DEADLINE_SECONDS + STOP_TIMEOUT_SECONDS)
    assert node.returncode == EXIT_API_UNAVAILABLE
    log = log_path.read_text()
    [reason] = [line for line in log.splitlines() if "Stopping the" in line]
    assert f"{ENTRY_POINTS['get_scanned_table_size']}(" in reason
    assert "scanners found no SQL API it can use; stopping the node." in log
    assert "restarting" not in log
    assert f"Started scanners in a thread (pid {node.pid})" in log
    assert "Node stopped: a driver gave up waiting for its SQL API" in log


# The fetch API ------------------------------------------------------------------------------------------


@pytest.fixture
def own_database_url(postgres_server_url) -> Iterator[str]:
    with new_database(postgres_server_url, "pyswpt_test_upgrade_web") as url:
        schema.apply_migrations(url)
        yield url


def test_the_fetch_api_answers_503_never_404_while_its_function_is_missing_or_changed(own_database_url, tmp_path):
    path = "/accounts/1/2/reachable"
    function = ENTRY_POINTS["is_reachable_account"]
    with (
        psycopg.connect(own_database_url, autocommit=True) as admin,
        web_server(own_database_url, tmp_path, WEBSERVER_THREADS="1") as server,
    ):
        insert_account(admin, 1, 2)
        # Often enough for psycopg to prepare the statement on the one pooled connection.
        runs = PSYCOPG_PREPARE_THRESHOLD + 1
        assert [server.get(path).status_code for _ in range(runs)] == [204] * runs
        admin.execute(f"DROP FUNCTION {function}")
        missing = server.get(path)
        assert (missing.status_code, missing.headers["retry-after"]) == (503, "5")
        assert "cache-control" not in missing.headers
        # A release that broke the rule and changed the result type in place: the prepared
        # statement may fail once ("cached plan must not change result type").
        admin.execute(
            f"CREATE FUNCTION {function}(p_debtor_id bigint, p_creditor_id bigint)"
            " RETURNS integer LANGUAGE sql AS 'SELECT 1'"
        )
        answers = [server.get(path).status_code for _ in range(runs)]
        admin.execute(f"DROP FUNCTION {function}")
        schema.apply_migrations(own_database_url)
        wait_for(lambda: answers.append(server.get(path).status_code) or answers[-1] == 204, "the API back")
        assert set(answers) <= {503, 204}
