"""The fetch API (spec 01 §6.1), over real HTTP against `pyswpt run web`.

Each server is a subprocess reading the environment like in production.
Tables are emptied before every test (the `conn` fixture), so a server shared
by a module sees only what the test arranged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from drivers import free_port, pyswpt_command, spawned_children, wait_for
from factories import CONFIG_SCHEDULED_FOR_DELETION, STATUS_DELETED, insert_account
from uvicorn.config import STARTUP_FAILURE

from pyswpt.drivers.web import CONCURRENCY_LIMIT, REQUEST_HEAD_TIMEOUT_SECONDS
from pyswpt.processes import WEBSERVER_SHARES_PORT_VARIABLE

STARTUP_DEADLINE_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.05
ACCOUNT_HEADERS = {"content-type": "text/plain; charset=utf-8", "cache-control": "max-age=86400"}
MAX_U64 = "18446744073709551615"

# Spec 01 §4.2: (123, 456) is not in shard `1.#`; (1, 2) is.
FOREIGN_UNDER_1 = (123, 456)
OWNED_UNDER_1 = (1, 2)


@dataclasses.dataclass
class WebServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, self.url(path), timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_healthy(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"pyswpt run web exited with {self.process.returncode}:\n{self.log()}")
        try:
            return self.get("/accounts/healthz").status_code == 200
        except httpx.TransportError:
            return False


@contextlib.contextmanager
def web_server(postgres_url: str, log_dir: Path, **settings: str) -> Iterator[WebServer]:
    """`pyswpt run web` on a free port, healthy when yielded, terminated afterwards."""
    port = free_port()
    environ = {
        **os.environ,
        "POSTGRES_URL": postgres_url,
        "WEBSERVER_PORT": str(port),
        "WEBSERVER_PROCESSES": "1",
        "WEBSERVER_THREADS": "3",
        "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": "#",
        "APP_LOG_LEVEL": "warning",
        "APP_LOG_FORMAT": "text",
        **settings,
    }
    log_path = log_dir / f"web-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*pyswpt_command(), "run", "web"], env=environ, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = WebServer(process, port, log_path)
    try:
        wait_for(server.is_healthy, "the web server to answer healthz", STARTUP_DEADLINE_SECONDS)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    with web_server(migrated_database_url, tmp_path_factory.mktemp("web")) as running:
        yield running


@pytest.fixture(scope="module")
def shard_1_server(migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """A server for the shard `1.#`: half of the pairs are not its own."""
    with web_server(
        migrated_database_url, tmp_path_factory.mktemp("web"), PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.#"
    ) as running:
        yield running


def raw_request(server: WebServer, method: str, path: str) -> tuple[bytes, bytes]:
    """Head and body bytes exactly as sent, for what an HTTP client would hide."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_SECONDS) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


# healthz ---------------------------------------------------------------------


def test_healthz_answers_i_am_healthy_without_cache_control(server):
    response = server.get("/accounts/healthz")
    assert response.status_code == 200
    assert response.text == "I am healthy"
    assert response.headers["content-type"].startswith("text/plain")
    assert "cache-control" not in response.headers


def test_healthz_answers_while_the_database_is_unreachable(tmp_path):
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with web_server(nowhere, tmp_path) as unconnected:
        assert unconnected.get("/accounts/healthz").text == "I am healthy"


# reachable -------------------------------------------------------------------


def test_missing_root_account_is_reachable(server, conn):
    response = server.get("/accounts/5/0/reachable")
    assert response.status_code == 204
    assert response.content == b""


def test_existing_account_is_reachable(server, conn):
    insert_account(conn, 5, 7)
    assert server.get("/accounts/5/7/reachable").status_code == 204


def test_missing_account_is_not_reachable(server, conn):
    insert_account(conn, 5, 8)
    response = server.get("/accounts/5/7/reachable")
    assert response.status_code == 404
    assert response.content == b""


def test_deleted_account_is_not_reachable(server, conn):
    insert_account(conn, 5, 7, status_flags=STATUS_DELETED)
    assert server.get("/accounts/5/7/reachable").status_code == 404


def test_account_scheduled_for_deletion_is_not_reachable(server, conn):
    insert_account(conn, 5, 7, config_flags=CONFIG_SCHEDULED_FOR_DELETION)
    assert server.get("/accounts/5/7/reachable").status_code == 404


# config ----------------------------------------------------------------------


def test_config_answers_the_stored_config_data(server, conn):
    insert_account(conn, 5, 0, config_data='{"rate": 1.0}')
    response = server.get("/accounts/5/0/config")
    assert response.status_code == 200
    assert response.text == '{"rate": 1.0}'


def test_config_of_a_deleted_account_is_still_answered(server, conn):
    insert_account(conn, 5, 0, config_data='{"rate": 2.0}', status_flags=STATUS_DELETED)
    response = server.get("/accounts/5/0/config")
    assert response.status_code == 200
    assert response.text == '{"rate": 2.0}'


def test_empty_config_is_200_with_an_empty_body(server, conn):
    insert_account(conn, 5, 0, config_data="")
    response = server.get("/accounts/5/0/config")
    assert response.status_code == 200
    assert response.content == b""


def test_config_body_is_utf8(server, conn):
    insert_account(conn, 5, 0, config_data='{"info": "Лев €"}')
    assert server.get("/accounts/5/0/config").content == '{"info": "Лев €"}'.encode()


def test_config_of_a_missing_account_is_404_with_an_empty_body(server, conn):
    insert_account(conn, 5, 1, config_data="other")
    response = server.get("/accounts/5/0/config")
    assert response.status_code == 404
    assert response.content == b""


@pytest.mark.parametrize(
    ("path", "status_code"),
    [
        ("/accounts/5/7/reachable", 204),
        ("/accounts/5/9/reachable", 404),
        ("/accounts/5/7/config", 200),
        ("/accounts/5/9/config", 404),
    ],
)
def test_account_answers_are_text_cacheable_for_a_day(server, conn, path, status_code):
    insert_account(conn, 5, 7, config_data="x")
    response = server.get(path)
    assert response.status_code == status_code
    assert {name: response.headers.get(name) for name in ACCOUNT_HEADERS} == ACCOUNT_HEADERS


# ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("u64", "i64"), [(MAX_U64, -1), ("9223372036854775808", -(2**63)), ("9223372036854775807", 2**63 - 1)]
)
def test_u64_debtor_id_is_the_i64_with_the_same_bits(server, conn, u64, i64):
    insert_account(conn, i64, 1, config_data=f"debtor {i64}")
    assert server.get(f"/accounts/{u64}/1/reachable").status_code == 204
    assert server.get(f"/accounts/{u64}/1/config").text == f"debtor {i64}"


def test_u64_creditor_id_is_the_i64_with_the_same_bits(server, conn):
    insert_account(conn, 1, -1)
    assert server.get(f"/accounts/1/{MAX_U64}/reachable").status_code == 204


@pytest.mark.parametrize(
    "path",
    [
        "/accounts/01/1/reachable",
        "/accounts/1/01/config",
        "/accounts/00/0/config",
        "/accounts/18446744073709551616/1/reachable",
        "/accounts/99999999999999999999/1/reachable",
        "/accounts/123456789012345678901/1/reachable",
        "/accounts/-1/1/reachable",
        "/accounts/+1/1/reachable",
        "/accounts/1/1/reachable/",
        "/accounts/1/1/config/",
        "/accounts/healthz/",
        "/accounts/1/1",
        "/accounts/1/1/other",
        "/accounts/",
        "/accounts/a/1/config",
        "/healthz",
    ],
)
def test_invalid_paths_are_404_without_cache_control(server, conn, path):
    # Rows every lenient reading of these paths would find.
    insert_account(conn, 1, 1, config_data="found")
    insert_account(conn, -1, 1, config_data="found")
    insert_account(conn, 0, 0, config_data="found")
    response = server.get(path)
    assert response.status_code == 404
    assert "cache-control" not in response.headers


# methods ---------------------------------------------------------------------


def test_head_answers_like_get_without_a_body(server, conn):
    insert_account(conn, 5, 0, config_data='{"rate": 1.0}')
    head, body = raw_request(server, "HEAD", "/accounts/5/0/config")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ncontent-length: 13" in head.lower()
    assert b"\r\ncache-control: max-age=86400" in head.lower()
    assert body == b""


def test_head_of_reachable_is_204(server, conn):
    assert server.request("HEAD", "/accounts/5/0/reachable").status_code == 204


@pytest.mark.parametrize("path", ["/accounts/healthz", "/accounts/5/7/reachable", "/accounts/5/7/config"])
def test_options_lists_the_allowed_methods(server, conn, path):
    response = server.request("OPTIONS", path)
    assert response.status_code == 200
    assert response.headers["allow"] == "OPTIONS, HEAD, GET"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(server, conn, method):
    insert_account(conn, 5, 7)
    assert server.request(method, "/accounts/5/7/reachable").status_code == 405
    assert server.request(method, "/accounts/healthz").status_code == 405


# shards and failures ---------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["reachable", "config"])
def test_pair_outside_this_shard_is_500(shard_1_server, conn, endpoint):
    debtor_id, creditor_id = FOREIGN_UNDER_1
    insert_account(conn, debtor_id, creditor_id)
    response = shard_1_server.get(f"/accounts/{debtor_id}/{creditor_id}/{endpoint}")
    assert response.status_code == 500
    assert "cache-control" not in response.headers
    wait_for(
        lambda: f"account ({debtor_id}, {creditor_id}), which is not in this shard" in shard_1_server.log(),
        "the out-of-shard log line",
    )


def test_pair_inside_a_partial_shard_is_answered(shard_1_server, conn):
    debtor_id, creditor_id = OWNED_UNDER_1
    insert_account(conn, debtor_id, creditor_id)
    assert shard_1_server.get(f"/accounts/{debtor_id}/{creditor_id}/reachable").status_code == 204


def test_missing_sql_api_is_503_never_404_and_the_worker_keeps_serving(fresh_database_url, tmp_path):
    # A database without the pyswpt schema: as if `configure` had not run yet.
    with web_server(fresh_database_url, tmp_path) as broken:
        for path in ("/accounts/1/2/reachable", "/accounts/1/0/config", "/accounts/1/2/reachable"):
            response = broken.get(path)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert "cache-control" not in response.headers
        assert broken.get("/accounts/healthz").status_code == 200
        wait_for(
            lambda: "Database error in the fetch API for account (1, 2)" in broken.log(),
            "the database error log line",
        )
        assert broken.process.poll() is None


def test_database_reads_are_limited_to_webserver_threads(database_url, tmp_path):
    threads = 2
    requests = 6
    with (
        web_server(database_url, tmp_path, WEBSERVER_THREADS=str(threads)) as limited,
        psycopg.connect(database_url) as locker,
        psycopg.connect(database_url, autocommit=True) as observer,
    ):
        # Every read blocks behind this lock, so concurrent reads pile up in PostgreSQL.
        locker.execute("LOCK TABLE pyswpt.account IN ACCESS EXCLUSIVE MODE")

        def blocked_reads() -> int:
            return observer.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'pyswpt-web' "
                "AND wait_event_type = 'Lock'"
            ).fetchone()[0]

        with concurrent.futures.ThreadPoolExecutor(requests) as executor:
            answers = [
                executor.submit(limited.get, f"/accounts/5/{creditor_id}/reachable")
                for creditor_id in range(1, requests + 1)
            ]
            wait_for(lambda: blocked_reads() >= threads, "the reads to block on the lock")
            # A bounded observation window, not synchronisation: more reads
            # would have had ample time to reach PostgreSQL.
            window_end = time.monotonic() + 1.0
            while time.monotonic() < window_end:
                assert blocked_reads() == threads
                time.sleep(POLL_INTERVAL_SECONDS)
            locker.commit()
            assert [answer.result().status_code for answer in answers] == [404] * requests


# connections -------------------------------------------------------------------

# A connection given up on is closed within this; it would stay open forever otherwise.
CLOSED_WITHIN_SECONDS = REQUEST_HEAD_TIMEOUT_SECONDS + 5
STALLED_CONNECTIONS = 20
HEALTHZ_HEAD = b"GET /accounts/healthz HTTP/1.1\r\nHost: localhost\r\n"


def connect(server: WebServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_HEAD_TIMEOUT_SECONDS)


def left_open(sockets: list[socket.socket], deadline_seconds: float) -> list[socket.socket]:
    """The sockets the server has not closed within `deadline_seconds`, reading whatever it sends."""
    deadline = time.monotonic() + deadline_seconds
    still_open = []
    for sock in sockets:
        try:
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                if not sock.recv(65536):
                    break
        except ConnectionResetError:
            pass
        except TimeoutError:
            still_open.append(sock)
    return still_open


def test_silent_connections_are_closed_after_the_request_head_timeout(server):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(server)) for _ in range(STALLED_CONNECTIONS)]

        assert left_open(sockets, CLOSED_WITHIN_SECONDS) == []
    assert server.is_healthy()


def test_half_sent_request_heads_are_closed_after_the_request_head_timeout(server):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(server)) for _ in range(STALLED_CONNECTIONS)]
        for sock in sockets:
            sock.sendall(HEALTHZ_HEAD)  # without the blank line that ends a head

        assert left_open(sockets, CLOSED_WITHIN_SECONDS) == []
    assert server.is_healthy()


def test_a_head_half_sent_after_a_response_is_closed_after_the_request_head_timeout(server):
    """The next request's first bytes stop the keep-alive timeout; the head must still come in time."""
    with connect(server) as sock:
        sock.sendall(HEALTHZ_HEAD + b"\r\n")
        received = b""
        while not received.endswith(b"I am healthy"):
            received += sock.recv(65536)
        sock.sendall(HEALTHZ_HEAD)

        assert left_open([sock], CLOSED_WITHIN_SECONDS) == []


def test_requests_beyond_the_concurrency_limit_are_answered_503(database_url, tmp_path):
    with web_server(database_url, tmp_path) as limited:
        with contextlib.ExitStack() as stack:
            for _ in range(CONCURRENCY_LIMIT):
                stack.enter_context(connect(limited))

            assert limited.get("/accounts/healthz").status_code == 503

        wait_for(limited.is_healthy, "healthz to answer once the connections are closed")


# processes and logs ------------------------------------------------------------


def test_two_worker_processes_serve(database_url, conn, tmp_path):
    insert_account(conn, 5, 7, config_data="seven")
    with web_server(database_url, tmp_path, WEBSERVER_PROCESSES="2") as forked:
        wait_for(lambda: len(spawned_children(forked.process.pid)) == 2, "two worker processes")
        for _ in range(10):
            assert forked.get("/accounts/5/7/reachable").status_code == 204
            assert forked.get("/accounts/5/7/config").text == "seven"
            assert forked.get("/accounts/5/8/reachable").status_code == 404


def test_a_process_sharing_the_port_exits_with_one_line_when_the_port_is_taken(database_url, tmp_path):
    """As `run all` starts each of several web processes: a port held without SO_REUSEPORT cannot be shared."""
    with socket.create_server(("0.0.0.0", 0)) as holder:
        port = holder.getsockname()[1]
        environ = {
            **os.environ,
            "POSTGRES_URL": database_url,
            "WEBSERVER_PORT": str(port),
            "PROTOCOL_BROKER_QUEUE_ROUTING_KEY": "#",
            "APP_LOG_FORMAT": "text",
            WEBSERVER_SHARES_PORT_VARIABLE: "1",
        }
        finished = subprocess.run(
            [*pyswpt_command(), "run", "web"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STARTUP_DEADLINE_SECONDS,
        )
    assert finished.returncode == STARTUP_FAILURE
    assert f"Cannot bind the fetch API's port {port}: [Errno 98] Address already in use." in finished.stdout
    assert "Traceback" not in finished.stdout


def test_access_log_is_written_at_debug_level(database_url, tmp_path):
    with web_server(database_url, tmp_path, APP_LOG_LEVEL="debug") as debug:
        debug.get("/accounts/healthz", headers={"User-Agent": "pyswpt-test", "X-Forwarded-For": "203.0.113.7"})
        wait_for(
            lambda: any(
                line.startswith("203.0.113.7 - - [")
                and '"GET /accounts/healthz HTTP/1.1" 200 12 ' in line
                and line.endswith('"-" "-" "pyswpt-test"')
                for line in access_lines(debug.log())
            ),
            "the access log line",
        )


def test_access_log_is_off_below_debug_level(shard_1_server, conn):
    shard_1_server.get("/accounts/healthz")
    # The out-of-shard error line is written while the next request is
    # handled, so once it is there the healthz request was logged, if at all.
    debtor_id, creditor_id = FOREIGN_UNDER_1
    shard_1_server.get(f"/accounts/{debtor_id}/{creditor_id}/reachable")
    wait_for(lambda: "which is not in this shard" in shard_1_server.log(), "the out-of-shard log line")
    assert access_lines(shard_1_server.log()) == []


def access_lines(log: str) -> list[str]:
    marker = ":pyswpt.drivers.web.access:"
    return [line.partition(marker)[2] for line in log.splitlines() if marker in line]
