"""The fetch API (spec 01 §6.1): other shards ask whether an account is reachable
and read a root account's configuration.

A Starlette app served by uvicorn on WEBSERVER_PORT with WEBSERVER_PROCESSES
worker processes. Each process runs at most WEBSERVER_THREADS database reads
at a time, through a pool of as many connections. Under `run all` each of the
WEBSERVER_PROCESSES is a driver of its own, and they share the port
(processes.WEBSERVER_SHARES_PORT_VARIABLE): the supervisor restarts one that
dies, so no uvicorn parent process is kept for that alone. The only SQL called
is the two read-only functions of sql/functions/60_fetch_api.sql. Beside the
liveness probe /accounts/healthz (no database access, spec 01 §6.1), the
readiness probe /accounts/readyz says whether the node reaches its database
and brokers (Readiness).

No client can hold on to the server: a connection must deliver each request's
head in time (RequestHeadDeadlineProtocol) and is closed once idle after a
response, and from CONCURRENCY_LIMIT open connections on, requests are
answered 503.

While the database, or the SQL API during an upgrade, is unavailable,
requests are answered 503 — never 404, which the caching proxy would keep for
a day and which would make the account unreachable for other shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import h11
import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from pyswpt import amqp, db, logs, metrics, processes, queries, sharding
from pyswpt import config as settings
from pyswpt.transactions import is_infrastructure_error

logger = logging.getLogger(__name__)
access_logger = logging.getLogger(f"{__name__}.access")

LISTEN_HOST = "0.0.0.0"
POOL_NAME = "pyswpt-web"
# Import string of the app factory, so that uvicorn can start it in each worker process.
APP_FACTORY = f"{__name__}:create_app_from_environment"
# In-flight requests get this long to finish after SIGTERM.
GRACEFUL_SHUTDOWN_SECONDS = 10
# A connection is closed when it stays this long without a new request after a response.
KEEP_ALIVE_TIMEOUT_SECONDS = 5
# ... and when the head of a request (request line and headers) has not fully
# come this long after the connection opened, or after its first bytes.
REQUEST_HEAD_TIMEOUT_SECONDS = 10
# Open connections (or requests in progress) per process from which a request
# is answered 503 and its connection closed. Far above what the caching proxy
# in front needs: requests wait for one of WEBSERVER_THREADS database
# connections anyway.
CONCURRENCY_LIMIT = 500
# Connections the kernel queues before a process accepts them; beyond it, it refuses them.
LISTEN_BACKLOG_CONNECTIONS = 1024

# A client may ask again this soon after a 503 (database or SQL API unavailable).
RETRY_AFTER_SECONDS = "5"
# Answers about accounts may be cached for a day by the caching proxy, negative ones too.
ACCOUNT_CACHE_CONTROL = "max-age=86400"
# Starlette appends "; charset=utf-8" to text media types.
TEXT_PLAIN = "text/plain"
ALLOWED_METHODS = "OPTIONS, HEAD, GET"
HEALTHY_TEXT = "I am healthy"
READY_TEXT = "I am ready"
# Readiness is checked at most this often, whatever the number of probes...
READINESS_CACHE_SECONDS = 2.0
# ... and each of its connection attempts (database, each broker) gives up after this long.
READINESS_TIMEOUT_SECONDS = 2
# The route label of a request that matched no route.
UNMATCHED_ROUTE = "unmatched"
# Account ids in paths are u64 strings: no sign, no leading zeros, at most 20 digits.
U64_PATH_REGEX = "0|[1-9][0-9]{0,19}"


class U64Convertor(Convertor[int]):
    """A path segment in canonical u64 form; the range check is AccountRoute's."""

    regex = U64_PATH_REGEX

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("u64", U64Convertor())


class AccountRoute(Route):
    """A route with two u64 ids; a 20-digit number of 2^64 or more does not match (404)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            params = child_scope["path_params"]
            if max(params["debtor_id"], params["creditor_id"]) > sharding.MAX_UINT64:
                return Match.NONE, {}
        return match, child_scope


class ServerError(Exception):
    """The request cannot be answered; the raiser has logged why. Answered with 500, or 503
    when the cause is passing (the database or its SQL API is unavailable)."""

    def __init__(self, passing: bool = False):
        super().__init__()
        self.passing = passing


async def answer_server_error(request: Request, error: ServerError) -> Response:
    if error.passing:
        return PlainTextResponse("Service Unavailable", status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})
    return PlainTextResponse("Internal Server Error", status_code=500)


def account_response(status_code: int, body: str = "") -> Response:
    return Response(
        body,
        status_code=status_code,
        media_type=TEXT_PLAIN,
        headers={"Cache-Control": ACCOUNT_CACHE_CONTROL},
    )


def options_response() -> Response:
    return Response(status_code=200, headers={"Allow": ALLOWED_METHODS})


class FetchApi:
    """The endpoints, with what they share: the shard's realm, the pool and the thread limit."""

    def __init__(self, config: settings.Config):
        self.realm = config.realm
        self.threads = config.webserver_threads
        self.pool = db.create_pool(
            config.web_postgres_url,
            min_size=1,
            max_size=config.webserver_threads,
            name=POOL_NAME,
            read_only=True,  # The web server never writes: let PostgreSQL enforce that.
        )
        self.limiter: anyio.CapacityLimiter | None = None
        self.readiness = Readiness(config)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Created here, inside the worker's event loop, which it belongs to.
        self.limiter = anyio.CapacityLimiter(self.threads)
        # Not waiting: healthz must answer even while the database is down.
        self.pool.open(wait=False)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self.pool.close)

    async def healthz(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return options_response()
        return PlainTextResponse(HEALTHY_TEXT)

    async def readyz(self, request: Request) -> Response:
        """200 when the node reaches its database and brokers, else 503 with one line per problem."""
        if request.method == "OPTIONS":
            return options_response()
        problems = await anyio.to_thread.run_sync(self.readiness.problems)
        if problems:
            return PlainTextResponse("\n".join(problems) + "\n", status_code=503)
        return PlainTextResponse(READY_TEXT)

    async def reachable(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return options_response()
        is_reachable = await self.read(queries.IS_REACHABLE_ACCOUNT, self.owned_pair(request))
        return account_response(204 if is_reachable else 404)

    async def config(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return options_response()
        config_data = await self.read(queries.GET_ACCOUNT_CONFIG_DATA, self.owned_pair(request))
        if config_data is None:
            return account_response(404)
        return account_response(200, config_data)

    def owned_pair(self, request: Request) -> tuple[int, int]:
        """The (debtor_id, creditor_id) of the path as i64, if this shard owns it."""
        debtor_id = sharding.i64_from_u64(request.path_params["debtor_id"])
        creditor_id = sharding.i64_from_u64(request.path_params["creditor_id"])
        if not self.realm.owns(debtor_id, creditor_id):
            # A proxy routed the request to the wrong shard: an operator must fix the routing.
            logger.error(
                "Fetch API request for account (%d, %d), which is not in this shard.",
                debtor_id,
                creditor_id,
            )
            raise ServerError
        return debtor_id, creditor_id

    async def read(self, statement: str, pair: tuple[int, int]) -> Any:
        """One value from a read-only SQL function, in a worker thread, WEBSERVER_THREADS at most."""
        try:
            return await anyio.to_thread.run_sync(self.read_blocking, statement, pair, limiter=self.limiter)
        except psycopg.Error as error:
            # Pool timeouts are psycopg errors too. One line per request, no
            # traceback: during an outage every request fails the same way.
            logger.error(
                "Database error in the fetch API for account (%d, %d): %s: %s",
                *pair,
                type(error).__name__,
                first_line(str(error)),
            )
            raise ServerError(passing=is_infrastructure_error(error)) from error

    def read_blocking(self, statement: str, pair: tuple[int, int]) -> Any:
        with self.pool.connection() as conn:
            debtor_id, creditor_id = pair
            row = conn.execute(statement, {"debtor_id": debtor_id, "creditor_id": creditor_id}).fetchone()
        assert row is not None, "a scalar function returns one row"
        return row[0]


class Readiness:
    """Whether the node can reach its database and its brokers (the readiness probe).

    Unlike healthz (liveness: the process answers), this opens connections,
    so it is done at most every READINESS_CACHE_SECONDS, by one probe at a
    time, each attempt bounded by READINESS_TIMEOUT_SECONDS: a probe waits
    about 2 s per unreachable server at most.
    """

    def __init__(self, config: settings.Config):
        self.postgres_url = config.web_postgres_url
        # Named by their variables: a URL may hold a password.
        self.brokers = {"PROTOCOL_BROKER_URL": config.protocol_broker_url}
        if config.chores_broker_url != config.protocol_broker_url:
            self.brokers["CHORES_BROKER_URL"] = config.chores_broker_url
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._problems: list[str] = []

    def problems(self) -> list[str]:
        """What keeps the node from working, as of READINESS_CACHE_SECONDS ago at most; blocking."""
        with self._lock:
            if time.monotonic() - self._checked_at >= READINESS_CACHE_SECONDS:
                self._problems = [*self.database_problems(), *self.broker_problems()]
                self._checked_at = time.monotonic()
            return self._problems

    def database_problems(self) -> list[str]:
        try:
            with db.connect(
                self.postgres_url,
                application_name="pyswpt readiness",
                read_only=True,
                connect_timeout_seconds=READINESS_TIMEOUT_SECONDS,
            ) as conn:
                if not conn.execute(queries.ACCEPTS_WRITES).fetchone()[0]:
                    return ["POSTGRES_URL: the database is a standby in recovery; it takes no writes"]
        except psycopg.Error as error:
            return [f"POSTGRES_URL: {first_line(str(error))}"]
        return []

    def broker_problems(self) -> list[str]:
        problems = []
        for variable, url in self.brokers.items():
            try:
                amqp.probe(url, READINESS_TIMEOUT_SECONDS)
            except Exception as error:  # noqa: BLE001 - whatever the failure, the broker is not usable
                problems.append(f"{variable}: {type(error).__name__}: {first_line(str(error))}")
        return problems


class RequestMetrics:
    """Counts and times every request (pyswpt_fetch_api_*), by route template, never by path."""

    def __init__(self, app: ASGIApp, routes: dict[Any, str]):
        self.app = app
        # endpoint -> path template, as Starlette's router puts the endpoint in the scope.
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        response = {"status": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = self.routes.get(scope.get("endpoint"), UNMATCHED_ROUTE)
            metrics.FETCH_API_REQUESTS.labels(route, str(response["status"])).inc()
            metrics.FETCH_API_REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)


def first_line(text: str) -> str:
    """PostgreSQL errors carry the query position on further lines; a log line needs only the first."""
    return text.strip().partition("\n")[0]


def create_app(config: settings.Config) -> Starlette:
    api = FetchApi(config)
    methods = ["GET", "OPTIONS"]  # Starlette adds HEAD to GET routes.
    routes = [
        Route("/accounts/healthz", api.healthz, methods=methods),
        Route("/accounts/readyz", api.readyz, methods=methods),
        AccountRoute("/accounts/{debtor_id:u64}/{creditor_id:u64}/reachable", api.reachable, methods=methods),
        AccountRoute("/accounts/{debtor_id:u64}/{creditor_id:u64}/config", api.config, methods=methods),
    ]
    app = Starlette(
        routes=routes,
        lifespan=api.lifespan,
        exception_handlers={ServerError: answer_server_error},
    )
    # A trailing slash is a different path (404), never a redirect.
    app.router.redirect_slashes = False
    app.add_middleware(RequestMetrics, routes={route.endpoint: route.path for route in routes})
    if config.log_level == "debug":
        app.add_middleware(AccessLog)
    return app


class RequestHeadDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for the head of every request.

    uvicorn closes a connection left idle after a response (KEEP_ALIVE_TIMEOUT_SECONDS)
    but would wait forever for the first request of a connection, and for the
    rest of a head whose first bytes came: silent and half-sent connections
    stayed open. Here they are closed REQUEST_HEAD_TIMEOUT_SECONDS after the
    connection opened, or after the first bytes of a head.
    """

    head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h11 leaves the client IDLE until a whole head has come.
        if self.conn.their_state is h11.IDLE:
            if self.head_deadline is None:
                self.arm_head_deadline()
        else:
            self.cancel_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_deadline()
        super().connection_lost(exc)

    def arm_head_deadline(self) -> None:
        # No request is in progress: the connection is closed as an idle one.
        self.head_deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT_SECONDS, self.timeout_keep_alive_handler)

    def cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None


def create_app_from_environment() -> Starlette:
    """The app of one uvicorn worker process, which inherits the parent's environment."""
    parent = multiprocessing.parent_process()
    assert parent is not None, "uvicorn calls the factory in its worker processes only"
    # uvicorn starts its worker processes from the main thread of `pyswpt run web`.
    processes.die_with_parent(parent.pid)
    config = settings.load()
    logs.configure_logging(config)
    return create_app(config)


def serving_options(port: int) -> dict[str, Any]:
    """uvicorn's settings for a server that no client can hold on to (see the module's doc)."""
    return {
        "host": LISTEN_HOST,
        "port": port,
        "lifespan": "on",
        # Our own logging set-up stays in place; uvicorn's error logger
        # propagates to the root logger. The access log is ours (AccessLog).
        "log_config": None,
        "access_log": False,
        # AccessLog reads X-Forwarded-For itself, trusting one proxy hop.
        "proxy_headers": False,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        "http": RequestHeadDeadlineProtocol,
        "timeout_keep_alive": KEEP_ALIVE_TIMEOUT_SECONDS,
        "limit_concurrency": CONCURRENCY_LIMIT,
        "backlog": LISTEN_BACKLOG_CONNECTIONS,
    }


def run(config: settings.Config) -> int:
    shares_port = os.environ.pop(processes.WEBSERVER_SHARES_PORT_VARIABLE, None) is not None
    logger.info(
        "Starting the fetch API: port %d, processes %d%s, threads per process %d.",
        config.webserver_port,
        config.webserver_processes,
        " (this one of them, sharing the port)" if shares_port else "",
        config.webserver_threads,
    )
    options = serving_options(config.webserver_port)
    if shares_port:
        return serve_on_shared_port(config, options)
    if config.webserver_processes == 1:
        uvicorn.run(create_app(config), **options)
    else:
        uvicorn.run(APP_FACTORY, factory=True, workers=config.webserver_processes, **options)
    return 0


def serve_on_shared_port(config: settings.Config, options: dict[str, Any]) -> int:
    """One of `run all`'s web processes; a port it cannot bind ends it as uvicorn.run would, in one line."""
    try:
        sock = shared_socket(config.webserver_port)
    except OSError as error:
        logger.error("Cannot bind the fetch API's port %d: %s.", config.webserver_port, error)
        return STARTUP_FAILURE
    server = uvicorn.Server(uvicorn.Config(create_app(config), **options))
    server.run([sock])
    # uvicorn exits by itself when the app's lifespan fails; a release that returns instead leaves `started` false.
    return 0 if server.started else STARTUP_FAILURE


def shared_socket(port: int) -> socket.socket:
    """A socket bound to `port` that other processes bind too; uvicorn listens on it.

    Each process has its own accept queue: the kernel spreads new connections
    over them by a hash of their addresses, and connections still queued at a
    process that dies are reset (the caching proxy in front asks again). Any
    process of the same user that sets SO_REUSEPORT may join; in a node's
    container there is none but the node's own."""
    shared = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    shared.bind((LISTEN_HOST, port))
    return shared


class AccessLog:
    """One line per request (spec 01 §8.5), only with APP_LOG_LEVEL=debug.

    Fields, as the reference's web server wrote them: remote address, ident,
    user, time, request line, status, response size, duration in
    microseconds, X-Logging-Context response header, referer, user agent.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        response: dict[str, Any] = {"status": 500, "size": 0, "context": "-"}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-logging-context":
                        response["context"] = value.decode("latin-1")
            elif message["type"] == "http.response.body" and scope["method"] != "HEAD":
                response["size"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            duration_us = int((time.perf_counter() - started) * 1_000_000)
            access_logger.info(access_line(scope, response, duration_us))


def access_line(scope: Scope, response: dict[str, Any], duration_us: int) -> str:
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    forwarded_for = headers.get("x-forwarded-for")
    if forwarded_for:
        remote = forwarded_for.split(",")[-1].strip()
    else:
        remote = scope["client"][0] if scope.get("client") else "-"
    target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    request_line = f"{scope['method']} {target} HTTP/{scope.get('http_version', '1.1')}"
    timestamp = dt.datetime.now().astimezone().strftime("[%d/%b/%Y:%H:%M:%S %z]")
    return (
        f'{remote} - - {timestamp} "{request_line}" {response["status"]} {response["size"]} '
        f'{duration_us} "{response["context"]}" "{headers.get("referer", "-")}" '
        f'"{headers.get("user-agent", "-")}"'
    )
