"""Client of the fetch API (spec 01 §6.3): other shards' accounts and root configs.

Requests go to FETCH_API_URL (usually a caching proxy in front of every
shard). Every request has a timeout — the reference applies none to the
reachability check, so one hung proxy could stall a consumer forever.
Answers are cached in a bounded, time-limited cache; errors are not cached.
"""

from __future__ import annotations

import collections
import http.client
import logging
import threading
import time
import urllib.parse
from typing import Generic, TypeVar

from pyswpt import metrics
from pyswpt.sharding import u64_string

logger = logging.getLogger(__name__)

ROOT_CONFIG_CACHE_SECONDS = 7200.0
# Short: a recipient that opens its account should not wait long to be paid.
REACHABILITY_CACHE_SECONDS = 60.0
ROOT_CREDITOR_ID = 0

T = TypeVar("T")


class FetchError(Exception):
    """The fetch API gave no usable answer."""


class ExpiringCache(Generic[T]):
    """At most `max_entries` answers, each kept for `ttl_seconds`; the oldest go first."""

    def __init__(self, name: str, max_entries: int, ttl_seconds: float):
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        # pyswpt_fetch_client_cache_lookups_total of this cache, by whether the key was found.
        self._lookups = {
            found: metrics.FETCH_CLIENT_CACHE_LOOKUPS.labels(name, "hit" if found else "miss")
            for found in (True, False)
        }
        self._entries: collections.OrderedDict[object, tuple[float, T]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> tuple[bool, T | None]:
        with self._lock:
            entry = self._entries.get(key)
            found = entry is not None and entry[0] >= time.monotonic()
        self._lookups[found].inc()
        return (True, entry[1]) if found else (False, None)

    def put(self, key: object, value: T) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (time.monotonic() + self.ttl_seconds, value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class FetchClient:
    """Keeps one keep-alive HTTP connection per thread to the fetch API."""

    def __init__(self, base_url: str, *, timeout_seconds: float, cache_size: int):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"FETCH_API_URL={base_url!r} is not an http(s) URL")
        self._scheme = parsed.scheme
        self._netloc = parsed.netloc
        self._timeout_seconds = timeout_seconds
        self._local = threading.local()
        self._reachable = ExpiringCache[bool]("reachable", cache_size, REACHABILITY_CACHE_SECONDS)
        self._root_configs = ExpiringCache[str | None]("root_config", cache_size, ROOT_CONFIG_CACHE_SECONDS)

    def is_reachable(self, debtor_id: int, creditor_id: int) -> bool:
        """Whether the account may receive transfers; any error means "no" (and is logged)."""
        key = (debtor_id, creditor_id)
        found, answer = self._reachable.get(key)
        if found:
            return bool(answer)
        try:
            status, _body = self._get(f"/accounts/{u64_string(debtor_id)}/{u64_string(creditor_id)}/reachable")
        except FetchError:
            logger.exception("Caught error while making a fetch request.")
            return False
        if status not in (204, 404):
            logger.error("Fetch API answered %d for the reachability of (%d, %d).", status, *key)
            return False
        self._reachable.put(key, status == 204)
        return status == 204

    def root_config_data(self, debtor_id: int) -> str | None:
        """The root account's config_data; None when it has no root account.

        Raises FetchError when the fetch API gives no usable answer.
        """
        found, answer = self._root_configs.get(debtor_id)
        if found:
            return answer
        status, body = self._get(f"/accounts/{u64_string(debtor_id)}/{ROOT_CREDITOR_ID}/config")
        if status == 200:
            config_data: str | None = body.decode("utf-8")
        elif status == 404:
            config_data = None
        else:
            raise FetchError(f"fetch API answered {status} for the root config of debtor {debtor_id}")
        self._root_configs.put(debtor_id, config_data)
        return config_data

    def _get(self, path: str) -> tuple[int, bytes]:
        # One retry on a fresh connection: a keep-alive connection may have been
        # closed by the server while idle.
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                self._local.connection = None
                if attempt == 2 or isinstance(error, TimeoutError):
                    raise FetchError(f"GET {path}: {error}") from error
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection_class = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = connection_class(self._netloc, timeout=self._timeout_seconds)
            self._local.connection = connection
        return connection
