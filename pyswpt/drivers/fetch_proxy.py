"""The routing part of the fetch-API proxy (`pyswpt run fetch-proxy`, spec 01 §6.2).

With several shards, FETCH_API_URL points at one URL for all of them: an HTTP
cache (nginx `proxy_cache` in compose.shards.yaml) in front of this proxy,
which forwards `/accounts/{debtor}/{creditor}/...` to the shard that owns the
pair. It computes the pair's 32-bit sharding key as the shards do
(pyswpt.sharding) and picks the server from the route specifiers in
APIPROXY_CONFIG_FILE (pyswpt.fetch_routes), and relays the shard's status,
headers (Cache-Control for the cache in front) and body as they are.

It listens on APIPROXY_PORT and is not part of `run all`: one proxy serves
every shard. The route file is read again when it changes; a new file that
cannot be used is logged and the routes in force stay. A shard that cannot be
reached is answered 502, one that does not answer within
APIPROXY_PROXY_TIMEOUT milliseconds 504; connections to the shards are kept
alive and reused, at most UPSTREAM_CONNECTIONS_MAX at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pyswpt import config as settings
from pyswpt import fetch_routes, sharding
from pyswpt.drivers.web import ALLOWED_METHODS, AccessLog, AccountRoute, serving_options

logger = logging.getLogger(__name__)

# A changed route file is noticed within this time.
ROUTES_POLL_SECONDS = 1.0
UPSTREAM_CONNECTIONS_MAX = 100
# Answers of the fetch API are a few bytes (a config_data at most a few kB):
# a larger one is not relayed, so that no shard can make the proxy hold much.
UPSTREAM_BODY_MAX_BYTES = 1024 * 1024
# Headers that belong to one connection (RFC 9110 §7.6.1), not to the message;
# Host and Content-Length are set anew for the hop to the shard.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_HEADERS_SET_ANEW = HOP_BY_HOP_HEADERS | {b"host", b"content-length"}
# httpx asks for gzip by default; a client that asked for no encoding must get none.
UPSTREAM_DEFAULT_HEADERS = {"Accept-Encoding": "identity"}
EXIT_BAD_ROUTES = 2  # like a bad setting


class RouteFile:
    """The routes in force, and the text of the file they were last compared with."""

    def __init__(self, path: Path, routes: fetch_routes.Routes, text: str):
        self.path = path
        self.routes = routes
        self.seen_text: str | None = text

    def reload_if_changed(self) -> None:
        """Apply the file if its text changed and its routes can be used; else log why not, once."""
        try:
            text: str | None = self.path.read_text()
        except OSError as error:
            text = None
            problem = f"cannot be read ({error.strerror})"
        if text == self.seen_text:
            return
        self.seen_text = text
        if text is not None:
            try:
                self.routes = fetch_routes.parse_routes(text)
            except fetch_routes.RoutesError as error:
                problem = str(error)
            else:
                logger.info("Applied the routes of %s: %s.", self.path, describe(self.routes))
                return
        logger.error("APIPROXY_CONFIG_FILE %s %s; the previous routes stay in force.", self.path, problem)


def describe(routes: fetch_routes.Routes) -> str:
    return ", ".join(f"{fetch_routes.specifier(bits)} {server}" for bits, server in sorted(routes.servers.items()))


def load_route_file(path_text: str) -> RouteFile:
    """The routes of APIPROXY_CONFIG_FILE at start-up; RoutesError if they cannot be used."""
    if not path_text:
        raise fetch_routes.RoutesError("APIPROXY_CONFIG_FILE is not set: it must name the file of routes")
    path = Path(path_text)
    try:
        text = path.read_text()
    except OSError as error:
        raise fetch_routes.RoutesError(f"APIPROXY_CONFIG_FILE={path_text!r} cannot be read: {error.strerror}") from None
    try:
        return RouteFile(path, fetch_routes.parse_routes(text), text)
    except fetch_routes.RoutesError as error:
        raise fetch_routes.RoutesError(f"APIPROXY_CONFIG_FILE={path_text!r}: {error}") from None


class FetchProxy:
    """Forwards each request to the shard owning its pair, over a shared pool of connections."""

    def __init__(self, route_file: RouteFile, timeout_seconds: float):
        self.route_file = route_file
        self.timeout_seconds = timeout_seconds
        self.client: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Created here, inside the server's event loop, which its connections belong to.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_seconds),
            limits=httpx.Limits(
                max_connections=UPSTREAM_CONNECTIONS_MAX, max_keepalive_connections=UPSTREAM_CONNECTIONS_MAX
            ),
            headers=UPSTREAM_DEFAULT_HEADERS,
            follow_redirects=False,
        )
        watcher = asyncio.create_task(self.watch_routes())
        try:
            yield
        finally:
            watcher.cancel()
            await self.client.aclose()

    async def watch_routes(self) -> None:
        while True:
            await asyncio.sleep(ROUTES_POLL_SECONDS)
            self.route_file.reload_if_changed()

    async def forward(self, request: Request) -> Response:
        assert self.client is not None, "the lifespan has started"
        debtor_id = sharding.i64_from_u64(request.path_params["debtor_id"])
        creditor_id = sharding.i64_from_u64(request.path_params["creditor_id"])
        server = self.route_file.routes.server_for(sharding.shard_key(debtor_id, creditor_id))
        target = server + request.scope["raw_path"].decode("latin-1")
        if request.scope["query_string"]:
            target += "?" + request.scope["query_string"].decode("latin-1")
        headers = [(name, value) for name, value in request.headers.raw if name not in REQUEST_HEADERS_SET_ANEW]
        upstream_request = self.client.build_request(request.method, target, headers=headers)
        try:
            upstream = await self.client.send(upstream_request, stream=True)
            try:
                body = await read_bounded(upstream)
            finally:
                await upstream.aclose()
        except httpx.TimeoutException as error:
            return failure(504, request, server, f"{type(error).__name__}: no answer within {self.timeout_seconds:g} s")
        except (httpx.RequestError, UpstreamBodyTooLarge) as error:
            return failure(502, request, server, f"{type(error).__name__}: {error}")
        return relayed(upstream, body, request.method)


class UpstreamBodyTooLarge(Exception):
    pass


async def read_bounded(upstream: httpx.Response) -> bytes:
    """The body as it came (still encoded, if the shard encoded it), at most UPSTREAM_BODY_MAX_BYTES."""
    chunks = []
    size = 0
    async for chunk in upstream.aiter_raw():
        size += len(chunk)
        if size > UPSTREAM_BODY_MAX_BYTES:
            raise UpstreamBodyTooLarge(f"the answer is larger than {UPSTREAM_BODY_MAX_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def relayed(upstream: httpx.Response, body: bytes, method: str) -> Response:
    """The shard's answer: its status, its end-to-end headers and its body."""
    response = Response(body, status_code=upstream.status_code)
    headers = [(name.lower(), value) for name, value in upstream.headers.raw if name.lower() not in HOP_BY_HOP_HEADERS]
    has_length = any(name == b"content-length" for name, _value in headers)
    # A chunked answer arrives whole: say its length (a HEAD answer has none to say).
    if not has_length and method != "HEAD" and upstream.status_code not in (204, 304):
        headers.append((b"content-length", str(len(body)).encode()))
    response.raw_headers = headers
    return response


def failure(status_code: int, request: Request, server: str, reason: str) -> Response:
    logger.error("Fetch proxy: %s %s to %s failed: %s", request.method, request.url.path, server, reason)
    return PlainTextResponse(f"The shard at {server} gave no answer.\n", status_code=status_code)


def create_app(config: settings.Config, route_file: RouteFile) -> Starlette:
    proxy = FetchProxy(route_file, config.apiproxy_proxy_timeout_ms / 1000)
    methods = [method.strip() for method in ALLOWED_METHODS.split(",")]
    routes = [AccountRoute("/accounts/{debtor_id:u64}/{creditor_id:u64}/{rest:path}", proxy.forward, methods=methods)]
    app = Starlette(routes=routes, lifespan=proxy.lifespan)
    # A trailing slash is a different path (404), never a redirect.
    app.router.redirect_slashes = False
    if config.log_level == "debug":
        app.add_middleware(AccessLog)
    return app


def run(config: settings.Config) -> int:
    try:
        route_file = load_route_file(config.apiproxy_config_file)
    except fetch_routes.RoutesError as error:
        print(f"pyswpt fetch-proxy: {error}", file=sys.stderr)
        return EXIT_BAD_ROUTES
    logger.info("Routing fetch requests: %s.", describe(route_file.routes))
    uvicorn.run(create_app(config, route_file), **serving_options(config.apiproxy_port))
    return 0
