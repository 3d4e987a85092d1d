"""`pyswpt run fetch-proxy`: each fetch request reaches the shard owning its pair, and its answer comes back.

The proxy runs as a real process. The shards here are small HTTP servers
that record what reaches them and answer as the fetch API does; the proxy in
front of real nodes is proven by tests/test_multi_shard.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import http.client
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from drivers import Running, driver_environment, free_port, pyswpt_command, running, wait_for

from pyswpt.sharding import u64_string

# Spec 01 §4.2: (123, 456) is in the realm 0.#, (1, 2) in 1.#.
PAIR_OF_SHARD_0 = (123, 456)
PAIR_OF_SHARD_1 = (1, 2)
CACHE_CONTROL = "max-age=86400"
PROXY_TIMEOUT_MS = 500


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    client_port: int


class StubShard:
    """A fetch API that records the requests it gets; `hang` makes it wait before answering."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real fetch API

            def do_GET(self) -> None:
                self.answer(with_body=True)

            def do_HEAD(self) -> None:
                self.answer(with_body=False)

            def answer(self, *, with_body: bool) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                stub.seen.append(Seen(self.command, self.path, headers, self.client_address[1]))
                if stub.hang.is_set():
                    stub.release.wait(10)
                body = b"" if self.path.endswith("/reachable") else f"config at {stub.port}".encode()
                self.send_response(204 if not body else 200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Cache-Control", CACHE_CONTROL)
                self.send_header("X-Shard", str(stub.port))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def stub_shard() -> Iterator[StubShard]:
    stub = StubShard()
    try:
        yield stub
    finally:
        stub.close()


@dataclasses.dataclass
class Proxy:
    process: Running
    port: int
    routes: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, pair: tuple[int, int], what: str = "reachable", method: str = "GET") -> httpx.Response:
        return self.request(method, account_path(pair, what))

    def request(self, method: str, path: str) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=10)


def account_path(pair: tuple[int, int], what: str) -> str:
    debtor_id, creditor_id = pair
    return f"/accounts/{u64_string(debtor_id)}/{u64_string(creditor_id)}/{what}"


def answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    except httpx.TransportError:
        return False
    return True


@contextlib.contextmanager
def fetch_proxy(routes_text: str, tmp_path: Path, **settings: str) -> Iterator[Proxy]:
    """`pyswpt run fetch-proxy` with these routes, listening."""
    routes = tmp_path / "apiproxy.conf"
    routes.write_text(routes_text)
    port = free_port()
    environ = driver_environment(
        "",
        "",
        APIPROXY_CONFIG_FILE=str(routes),
        APIPROXY_PORT=str(port),
        APIPROXY_PROXY_TIMEOUT=str(PROXY_TIMEOUT_MS),
        **settings,
    )
    with running(["run", "fetch-proxy"], environ, tmp_path) as process:
        wait_for(lambda: process.assert_alive() or answers(port), "the fetch proxy to listen")
        yield Proxy(process, port, routes)


@pytest.fixture(scope="module")
def running_shards() -> Iterator[tuple[StubShard, StubShard]]:
    with stub_shard() as shard_0, stub_shard() as shard_1:
        yield shard_0, shard_1


@pytest.fixture
def shards(running_shards) -> tuple[StubShard, StubShard]:
    """The two shards, which have seen nothing yet."""
    for shard in running_shards:
        shard.seen.clear()
    return running_shards


@pytest.fixture(scope="module")
def proxy(running_shards, tmp_path_factory) -> Iterator[Proxy]:
    """One proxy for the tests that leave its routes alone: each start takes seconds."""
    shard_0, shard_1 = running_shards
    with fetch_proxy(f"0.* {shard_0.url}\n1.* {shard_1.url}/\n", tmp_path_factory.mktemp("proxy")) as started:
        yield started


def test_each_request_reaches_the_shard_owning_its_pair_and_its_answer_comes_back(shards, proxy):
    shard_0, shard_1 = shards

    reachable = proxy.get(PAIR_OF_SHARD_0, "reachable")
    config = proxy.get(PAIR_OF_SHARD_1, "config")

    assert [seen.path for seen in shard_0.seen] == [account_path(PAIR_OF_SHARD_0, "reachable")]
    assert [seen.path for seen in shard_1.seen] == [account_path(PAIR_OF_SHARD_1, "config")]
    assert (reachable.status_code, reachable.content) == (204, b"")
    assert (config.status_code, config.content) == (200, f"config at {shard_1.port}".encode())
    for response, shard in ((reachable, shard_0), (config, shard_1)):
        assert response.headers["cache-control"] == CACHE_CONTROL
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["x-shard"] == str(shard.port)


def test_head_is_forwarded_and_answered_without_a_body(shards, proxy):
    shard_0, _ = shards
    response = proxy.get(PAIR_OF_SHARD_0, "config", method="HEAD")
    assert [(seen.method, seen.path) for seen in shard_0.seen] == [("HEAD", account_path(PAIR_OF_SHARD_0, "config"))]
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["cache-control"] == CACHE_CONTROL


def test_the_client_headers_are_passed_on_and_the_host_is_the_shards(shards, proxy):
    shard_0, _ = shards
    # http.client sends only the headers it is given (and Host, Accept-Encoding: identity unless skipped).
    client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    client.putrequest("GET", account_path(PAIR_OF_SHARD_0, "reachable"), skip_accept_encoding=True)
    client.putheader("X-Forwarded-For", "10.1.2.3")
    client.putheader("User-Agent", "nginx-cache")
    client.endheaders()
    assert client.getresponse().status == 204
    client.close()
    [seen] = shard_0.seen
    assert seen.headers["x-forwarded-for"] == "10.1.2.3"
    assert seen.headers["user-agent"] == "nginx-cache"
    assert seen.headers["host"] == f"127.0.0.1:{shard_0.port}"
    # No compression the client did not ask for.
    assert seen.headers["accept-encoding"] == "identity"


def test_connections_to_a_shard_are_reused(shards, proxy):
    shard_0, _ = shards
    for _ in range(5):
        assert proxy.get(PAIR_OF_SHARD_0).status_code == 204
    assert len(shard_0.seen) == 5
    assert len({seen.client_port for seen in shard_0.seen}) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/accounts/healthz",
        "/accounts/123/456",
        "/accounts/0123/456/reachable",  # not a canonical u64
        "/accounts/18446744073709551616/1/reachable",  # 2^64
        "/other/123/456/reachable",
    ],
)
def test_a_path_without_an_account_is_not_found_and_reaches_no_shard(shards, proxy, path):
    response = proxy.request("GET", path)
    assert response.status_code == 404
    assert [seen for shard in shards for seen in shard.seen] == []


def test_other_methods_are_not_allowed(shards, proxy):
    response = proxy.request("POST", account_path(PAIR_OF_SHARD_0, "reachable"))
    assert response.status_code == 405
    assert [seen for shard in shards for seen in shard.seen] == []


def test_an_unreachable_shard_is_answered_502(tmp_path):
    with fetch_proxy(f"* http://127.0.0.1:{free_port()}\n", tmp_path) as proxy:
        response = proxy.get(PAIR_OF_SHARD_0)
        assert response.status_code == 502
        assert "cache-control" not in response.headers
        wait_for(lambda: "Fetch proxy: GET /accounts/123/456/reachable to" in proxy.process.log(), "the log line")


def test_a_shard_that_does_not_answer_in_time_is_answered_504(tmp_path):
    with stub_shard() as late, fetch_proxy(f"* {late.url}\n", tmp_path) as proxy:
        late.hang.set()
        response = proxy.get(PAIR_OF_SHARD_0)
        assert response.status_code == 504
        assert "cache-control" not in response.headers
        line = f"GET /accounts/123/456/reachable to {late.url} failed: ReadTimeout: no answer within 0.5 s"
        wait_for(lambda: line in proxy.process.log(), "the log line")


def test_a_route_file_that_does_not_cover_every_key_stops_the_start_with_one_line(tmp_path):
    routes = tmp_path / "apiproxy.conf"
    routes.write_text("0.* http://shard-0:8080\n")
    environ = driver_environment("", "", APIPROXY_CONFIG_FILE=str(routes), APIPROXY_PORT=str(free_port()))
    result = subprocess.run(
        [*pyswpt_command(), "run", "fetch-proxy"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pyswpt fetch-proxy: APIPROXY_CONFIG_FILE={str(routes)!r}: no route for the keys of 1.*: "
        "the routes must cover every key"
    ]


def test_a_changed_route_file_is_applied_and_a_bad_one_keeps_the_routes_in_force(shards, tmp_path):
    shard_0, shard_1 = shards
    with fetch_proxy(f"0.* {shard_0.url}\n1.* {shard_1.url}\n", tmp_path) as proxy:
        assert proxy.get(PAIR_OF_SHARD_0).headers["x-shard"] == str(shard_0.port)

        proxy.routes.write_text(f"* {shard_1.url}\n")
        wait_for(lambda: proxy.get(PAIR_OF_SHARD_0).headers["x-shard"] == str(shard_1.port), "the new routes")

        proxy.routes.write_text(f"1.* {shard_0.url}\n")
        wait_for(lambda: "the previous routes stay in force" in proxy.process.log(), "the refusal to be logged")
        assert "no route for the keys of 0.*" in proxy.process.log()
        assert proxy.get(PAIR_OF_SHARD_0).headers["x-shard"] == str(shard_1.port)
        assert proxy.get(PAIR_OF_SHARD_1).headers["x-shard"] == str(shard_1.port)
        proxy.process.assert_alive()


# --- the cache in front (docker/fetch-cache.nginx.conf) -----------------------------------

NGINX_CONF = Path(__file__).resolve().parent.parent / "docker" / "fetch-cache.nginx.conf"


@contextlib.contextmanager
def nginx_cache(proxy: Proxy, tmp_path: Path) -> Iterator[str]:
    """nginx with the compose example's configuration, in front of `proxy`; yields its URL."""
    port = free_port()
    tmp_path.mkdir()
    conf = (
        NGINX_CONF.read_text()
        .replace("server fetch-proxy:8080;", f"server 127.0.0.1:{proxy.port};")
        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
        .replace("/var/cache/nginx/fetch", str(tmp_path / "cache"))
    )
    (tmp_path / "fetch-cache.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        # Workers as this user, who owns the temporary folders (ignored unless root).
        f"user {getpass.getuser()};\nerror_log {tmp_path}/error.log;\npid {tmp_path}/nginx.pid;\nevents {{}}\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {tmp_path}/body;\nproxy_temp_path {tmp_path}/proxy;\n"
        f"include {tmp_path}/fetch-cache.conf;\n}}\n"
    )
    process = subprocess.Popen(
        ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: process.poll() is None and answers(port), "nginx to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_the_cache_keeps_the_shards_answers_as_their_cache_control_says(shards, proxy, tmp_path):
    shard_0, _ = shards
    with nginx_cache(proxy, tmp_path / "nginx") as cache_url:
        paths = [account_path(PAIR_OF_SHARD_0, what) for what in ("reachable", "config")]
        first = [httpx.get(cache_url + path, timeout=10) for path in paths]
        again = [httpx.get(cache_url + path, timeout=10) for path in paths]
        assert [seen.path for seen in shard_0.seen] == paths
        assert [r.headers["x-cache-status"] for r in first + again] == ["MISS", "MISS", "HIT", "HIT"]
        assert [(r.status_code, r.content) for r in again] == [(r.status_code, r.content) for r in first]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_the_cache_keeps_no_failure(tmp_path):
    with (
        fetch_proxy(f"* http://127.0.0.1:{free_port()}\n", tmp_path) as proxy,
        nginx_cache(proxy, tmp_path / "nginx") as cache_url,
    ):
        path = account_path(PAIR_OF_SHARD_0, "reachable")
        assert [httpx.get(cache_url + path, timeout=10).status_code for _ in range(2)] == [502, 502]
        # Both reached the proxy: its 502 has no Cache-Control.
        wait_for(lambda: proxy.process.log().count(f"GET {path} to ") == 2, "both failures at the proxy")
