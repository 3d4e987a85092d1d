"""Settings read from the environment, under the reference service's names.

Every variable keeps the reference's name and default so that an operator's
existing environment file works unchanged. A bad value raises ConfigError
with one line naming the variable, the value and what is allowed; the CLI
prints that line and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
import re
from collections.abc import Mapping

from pyswpt import sharding

SECONDS_IN_DAY = 86400
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
FALSE_WORDS = ("false", "off", "no", "")


class ConfigError(Exception):
    """An environment variable has a value the service cannot run with."""


@dataclasses.dataclass(frozen=True)
class Config:
    # The owner's (configure); each role's defaults to it (README "Database roles").
    postgres_url: str
    driver_postgres_url: str
    web_postgres_url: str
    operator_postgres_url: str
    fetch_api_url: str
    webserver_port: int
    webserver_processes: int
    webserver_threads: int
    metrics_port: int | None  # None: unset (`run all` then uses metrics.DEFAULT_METRICS_PORT)

    protocol_broker_url: str
    protocol_broker_queue: str
    protocol_broker_queue_routing_key: str
    protocol_broker_processes: int
    protocol_broker_threads: int
    protocol_broker_prefetch_count: int
    protocol_broker_prefetch_size: int

    chores_broker_url: str
    chores_broker_queue: str
    chores_broker_processes: int
    chores_broker_threads: int
    chores_broker_prefetch_count: int
    chores_broker_prefetch_size: int

    flush_processes: int
    flush_period_seconds: float
    process_transfer_requests_threads: int
    process_finalization_requests_threads: int
    process_balance_changes_threads: int
    delete_parent_shard_records: bool
    remove_from_archive_threshold_date: dt.datetime
    setup_rabbitmq_bindings: bool

    log_level: str
    log_format: str
    associated_loggers: tuple[str, ...]

    process_balance_changes_wait_seconds: float
    process_balance_changes_max_count: int
    process_transfer_requests_wait_seconds: float
    process_transfer_requests_max_count: int
    process_finalization_requests_wait_seconds: float
    process_finalization_requests_max_count: int
    flush_burst_counts: Mapping[str, int]

    accounts_scan_hours: float
    accounts_scan_blocks_per_query: int
    accounts_scan_beat_milliseconds: int
    prepared_transfers_scan_days: float
    prepared_transfers_scan_blocks_per_query: int
    prepared_transfers_scan_beat_milliseconds: int
    registered_balance_changes_scan_days: float
    registered_balance_changes_scan_blocks_per_query: int
    registered_balance_changes_scan_beat_milliseconds: int

    intranet_extreme_delay_days: float
    message_max_delay_days: float
    account_heartbeat_days: float
    account_update_delay_seconds: float
    prepared_transfer_remainder_days: float
    prepared_transfer_max_delay_days: float
    fetch_api_timeout_seconds: float
    fetch_dns_cache_seconds: float
    fetch_connections: int
    fetch_data_cache_size: int
    # The fetch-API proxy (`pyswpt run fetch-proxy`), under the Swaptacular API proxy's names.
    apiproxy_config_file: str
    apiproxy_port: int
    apiproxy_proxy_timeout_ms: int
    min_interest_capitalization_days: float
    max_interest_to_principal_ratio: float
    deletion_attempts_min_days: float
    verify_shard_yield_per: int
    verify_shard_sleep_seconds: float
    api_wait_seconds: float
    progress_interval_seconds: float

    # `pyswpt status` calls the node unhealthy beyond these.
    status_max_queue_messages: int
    status_max_outbox_age_seconds: float
    status_max_work_queue_rows: int
    status_max_work_queue_age_seconds: float
    status_max_parked_messages: int
    status_max_scanner_silence_seconds: float

    @functools.cached_property  # parsed once: the workers and the consumer ask for it per account
    def realm(self) -> sharding.Realm:
        return sharding.Realm.from_binding_key(self.protocol_broker_queue_routing_key)

    @property
    def commit_period_seconds(self) -> int:
        """The `commit_period` of AccountUpdate and of every prepared transfer."""
        return int(self.prepared_transfer_max_delay_days * SECONDS_IN_DAY)

    @property
    def message_max_delay_seconds(self) -> int:
        """The `ttl` of AccountUpdate and the too-old limit for new accounts."""
        return int(self.message_max_delay_days * SECONDS_IN_DAY)


# The eight outbox tables, by the names the flusher commands use.
OUTBOX_TYPES = (
    "rejected_transfers",
    "prepared_transfers",
    "finalized_transfers",
    "account_transfers",
    "account_updates",
    "account_purges",
    "rejected_configs",
    "pending_balance_changes",
)


class _Reader:
    """Typed access to an environment mapping, raising ConfigError on bad values."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def raw(self, name: str, default: str, *aliases: str) -> tuple[str, str]:
        for key in (name, *aliases):
            if key in self.environ:
                return key, self.environ[key]
        return name, default

    def string(self, name: str, default: str = "", *aliases: str) -> str:
        return self.raw(name, default, *aliases)[1]

    def integer(self, name: str, default: int, *aliases: str, minimum: int | None = None) -> int:
        key, text = self.raw(name, str(default), *aliases)
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not valid: expected an integer") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}={text!r} is not valid: expected an integer >= {minimum}")
        return value

    def optional_integer(self, name: str, *, minimum: int) -> int | None:
        if self.environ.get(name, "") == "":
            return None
        return self.integer(name, minimum, minimum=minimum)

    def number(self, name: str, default: float, *, positive: bool = False) -> float:
        key, text = self.raw(name, repr(default))
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not valid: expected a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}={text!r} is not valid: expected a finite number")
        if positive and value <= 0:
            raise ConfigError(f"{key}={text!r} is not valid: expected a number > 0")
        return value

    def boolean(self, name: str, default: str) -> bool:
        return self.string(name, default).strip().lower() not in FALSE_WORDS

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        text = self.string(name, default)
        if text.lower() not in allowed:
            raise ConfigError(f"{name}={text!r} is not valid: expected one of {', '.join(allowed)}")
        return text.lower()

    def threshold_date(self, name: str, default: str) -> dt.datetime:
        text = self.string(name, default)
        try:
            value = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not valid: expected an ISO 8601 date or date-time") from None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


# One default differs from the reference's (1), on purpose: a consumer applies
# its whole prefetch window in one transaction, so a window of one message
# costs a commit and an ack per message (benchmarks/end_to_end.py counted 40
# commits per transfer with windows of one, 4.5 with windows of up to 50). A
# window holds only what the broker already sent, so a quiet queue gains no
# latency. Chores keep the reference's 1: each chore locks its account, and a
# window of one keeps a chores transaction to one account lock (spec 02 §2.0).
DEFAULT_PROTOCOL_PREFETCH_COUNT = 50


def load(environ: Mapping[str, str] | None = None, *, now: dt.datetime | None = None) -> Config:
    """Read and check every setting; raise ConfigError on the first bad one."""
    env = _Reader(os.environ if environ is None else environ)
    routing_key = env.string("PROTOCOL_BROKER_QUEUE_ROUTING_KEY", "#")
    if not sharding.BINDING_KEY_PATTERN.fullmatch(routing_key):
        raise ConfigError(
            f"PROTOCOL_BROKER_QUEUE_ROUTING_KEY={routing_key!r} is not valid: expected "
            "zero to twenty '0.' or '1.' followed by '#', e.g. '#', '0.#', '1.0.#'"
        )
    postgres_url = normalize_postgres_url(env.string("POSTGRES_URL"))
    config = Config(
        postgres_url=postgres_url,
        driver_postgres_url=normalize_postgres_url(env.string("DRIVER_POSTGRES_URL") or postgres_url),
        web_postgres_url=normalize_postgres_url(env.string("WEB_POSTGRES_URL") or postgres_url),
        operator_postgres_url=normalize_postgres_url(env.string("OPERATOR_POSTGRES_URL") or postgres_url),
        fetch_api_url=env.string("FETCH_API_URL"),
        webserver_port=env.integer("WEBSERVER_PORT", 8080, "PORT", minimum=1),
        webserver_processes=env.integer("WEBSERVER_PROCESSES", 1, "WEBSERVER_WORKERS", minimum=1),
        webserver_threads=env.integer("WEBSERVER_THREADS", 3, minimum=1),
        metrics_port=env.optional_integer("METRICS_PORT", minimum=1),
        protocol_broker_url=env.string("PROTOCOL_BROKER_URL", "amqp://guest:guest@localhost:5672"),
        protocol_broker_queue=env.string("PROTOCOL_BROKER_QUEUE", "swpt_accounts"),
        protocol_broker_queue_routing_key=routing_key,
        protocol_broker_processes=env.integer("PROTOCOL_BROKER_PROCESSES", 1, minimum=0),
        protocol_broker_threads=env.integer("PROTOCOL_BROKER_THREADS", 1, minimum=1),
        protocol_broker_prefetch_count=env.integer(
            "PROTOCOL_BROKER_PREFETCH_COUNT", DEFAULT_PROTOCOL_PREFETCH_COUNT, minimum=0
        ),
        protocol_broker_prefetch_size=env.integer("PROTOCOL_BROKER_PREFETCH_SIZE", 0, minimum=0),
        chores_broker_url=env.string("CHORES_BROKER_URL", "amqp://guest:guest@localhost:5672"),
        chores_broker_queue=env.string("CHORES_BROKER_QUEUE", "swpt_accounts_chores"),
        chores_broker_processes=env.integer("CHORES_BROKER_PROCESSES", 1, minimum=0),
        chores_broker_threads=env.integer("CHORES_BROKER_THREADS", 1, minimum=1),
        chores_broker_prefetch_count=env.integer("CHORES_BROKER_PREFETCH_COUNT", 1, minimum=0),
        chores_broker_prefetch_size=env.integer("CHORES_BROKER_PREFETCH_SIZE", 0, minimum=0),
        flush_processes=env.integer("FLUSH_PROCESSES", 1, minimum=0),
        flush_period_seconds=env.number("FLUSH_PERIOD", 2.0, positive=True),
        process_transfer_requests_threads=env.integer("PROCESS_TRANSFER_REQUESTS_THREADS", 1, minimum=1),
        process_finalization_requests_threads=env.integer("PROCESS_FINALIZATION_REQUESTS_THREADS", 1, minimum=1),
        process_balance_changes_threads=env.integer("PROCESS_BALANCE_CHANGES_THREADS", 1, minimum=1),
        delete_parent_shard_records=env.boolean("DELETE_PARENT_SHARD_RECORDS", "false"),
        remove_from_archive_threshold_date=env.threshold_date("REMOVE_FROM_ARCHIVE_THRESHOLD_DATE", "1970-01-01"),
        setup_rabbitmq_bindings=env.string("SETUP_RABBITMQ_BINDINGS") == "yes",
        log_level=env.choice("APP_LOG_LEVEL", "warning", LOG_LEVELS),
        log_format=env.choice("APP_LOG_FORMAT", "text", LOG_FORMATS),
        associated_loggers=tuple(env.string("APP_ASSOCIATED_LOGGERS").split()),
        process_balance_changes_wait_seconds=env.number("APP_PROCESS_BALANCE_CHANGES_WAIT", 2.0),
        process_balance_changes_max_count=env.integer("APP_PROCESS_BALANCE_CHANGES_MAX_COUNT", 50000, minimum=1),
        process_transfer_requests_wait_seconds=env.number("APP_PROCESS_TRANSFER_REQUESTS_WAIT", 2.0),
        process_transfer_requests_max_count=env.integer("APP_PROCESS_TRANSFER_REQUESTS_MAX_COUNT", 50000, minimum=1),
        process_finalization_requests_wait_seconds=env.number("APP_PROCESS_FINALIZATION_REQUESTS_WAIT", 2.0),
        process_finalization_requests_max_count=env.integer(
            "APP_PROCESS_FINALIZATION_REQUESTS_MAX_COUNT", 50000, minimum=1
        ),
        flush_burst_counts={
            name: env.integer(f"APP_FLUSH_{name.upper()}_BURST_COUNT", 5000, minimum=1) for name in OUTBOX_TYPES
        },
        accounts_scan_hours=env.number("APP_ACCOUNTS_SCAN_HOURS", 8.0, positive=True),
        accounts_scan_blocks_per_query=env.integer("APP_ACCOUNTS_SCAN_BLOCKS_PER_QUERY", 40, minimum=1),
        accounts_scan_beat_milliseconds=env.integer("APP_ACCOUNTS_SCAN_BEAT_MILLISECS", 100, minimum=1),
        prepared_transfers_scan_days=env.number("APP_PREPARED_TRANSFERS_SCAN_DAYS", 1.0, positive=True),
        prepared_transfers_scan_blocks_per_query=env.integer(
            "APP_PREPARED_TRANSFERS_SCAN_BLOCKS_PER_QUERY", 40, minimum=1
        ),
        prepared_transfers_scan_beat_milliseconds=env.integer(
            "APP_PREPARED_TRANSFERS_SCAN_BEAT_MILLISECS", 100, minimum=1
        ),
        registered_balance_changes_scan_days=env.number("APP_REGISTERED_BALANCE_CHANGES_SCAN_DAYS", 7.0, positive=True),
        registered_balance_changes_scan_blocks_per_query=env.integer(
            "APP_REGISTERED_BALANCE_CHANGES_SCAN_BLOCKS_PER_QUERY", 40, minimum=1
        ),
        registered_balance_changes_scan_beat_milliseconds=env.integer(
            "APP_REGISTERED_BALANCE_CHANGES_SCAN_BEAT_MILLISECS", 100, minimum=1
        ),
        intranet_extreme_delay_days=env.number("APP_INTRANET_EXTREME_DELAY_DAYS", 14.0),
        message_max_delay_days=env.number("APP_MESSAGE_MAX_DELAY_DAYS", 7.0),
        account_heartbeat_days=env.number("APP_ACCOUNT_HEARTBEAT_DAYS", 7.0),
        account_update_delay_seconds=env.number("APP_ACCOUNT_UPDATE_DELAY_SECONDS", 5.0),
        prepared_transfer_remainder_days=env.number("APP_PREPARED_TRANSFER_REMAINDER_DAYS", 7.0),
        prepared_transfer_max_delay_days=env.number("APP_PREPARED_TRANSFER_MAX_DELAY_DAYS", 90.0),
        fetch_api_timeout_seconds=env.number("APP_FETCH_API_TIMEOUT_SECONDS", 5.0, positive=True),
        fetch_dns_cache_seconds=env.number("APP_FETCH_DNS_CACHE_SECONDS", 10.0),
        fetch_connections=env.integer("APP_FETCH_CONNECTIONS", 100, minimum=1),
        fetch_data_cache_size=env.integer("APP_FETCH_DATA_CACHE_SIZE", 1000, minimum=1),
        apiproxy_config_file=env.string("APIPROXY_CONFIG_FILE"),
        apiproxy_port=env.integer("APIPROXY_PORT", 8080, minimum=1),
        apiproxy_proxy_timeout_ms=env.integer("APIPROXY_PROXY_TIMEOUT", 10000, minimum=1),
        min_interest_capitalization_days=env.number("APP_MIN_INTEREST_CAPITALIZATION_DAYS", 14.0),
        max_interest_to_principal_ratio=env.number("APP_MAX_INTEREST_TO_PRINCIPAL_RATIO", 0.0001),
        deletion_attempts_min_days=env.number("APP_DELETION_ATTEMPTS_MIN_DAYS", 14.0),
        verify_shard_yield_per=env.integer("APP_VERIFY_SHARD_YIELD_PER", 10000, minimum=1),
        verify_shard_sleep_seconds=env.number("APP_VERIFY_SHARD_SLEEP_SECONDS", 0.005),
        api_wait_seconds=env.number("APP_API_WAIT_SECONDS", 300.0, positive=True),
        progress_interval_seconds=env.number("APP_PROGRESS_INTERVAL_SECONDS", 10.0),
        status_max_queue_messages=env.integer("APP_STATUS_MAX_QUEUE_MESSAGES", 10000, minimum=0),
        status_max_outbox_age_seconds=env.number("APP_STATUS_MAX_OUTBOX_AGE_SECONDS", 300.0, positive=True),
        status_max_work_queue_rows=env.integer("APP_STATUS_MAX_WORK_QUEUE_ROWS", 100000, minimum=0),
        status_max_work_queue_age_seconds=env.number("APP_STATUS_MAX_WORK_QUEUE_AGE_SECONDS", 900.0, positive=True),
        status_max_parked_messages=env.integer("APP_STATUS_MAX_PARKED_MESSAGES", 0, minimum=0),
        status_max_scanner_silence_seconds=env.number("APP_STATUS_MAX_SCANNER_SILENCE_SECONDS", 600.0, positive=True),
    )
    check_sanity(config, now or dt.datetime.now(dt.UTC))
    return config


def check_sanity(config: Config, now: dt.datetime) -> None:
    """The reference's start-up checks: settings that would break the ledger's guarantees."""
    max_delay = config.prepared_transfer_max_delay_days
    rules = [
        (max_delay >= 30, "APP_PREPARED_TRANSFER_MAX_DELAY_DAYS", max_delay, ">= 30"),
        (
            max_delay >= config.message_max_delay_days,
            "APP_PREPARED_TRANSFER_MAX_DELAY_DAYS",
            max_delay,
            f">= APP_MESSAGE_MAX_DELAY_DAYS ({config.message_max_delay_days})",
        ),
        (
            max_delay >= config.intranet_extreme_delay_days,
            "APP_PREPARED_TRANSFER_MAX_DELAY_DAYS",
            max_delay,
            f">= APP_INTRANET_EXTREME_DELAY_DAYS ({config.intranet_extreme_delay_days})",
        ),
        (
            0 < config.max_interest_to_principal_ratio <= 0.10,
            "APP_MAX_INTEREST_TO_PRINCIPAL_RATIO",
            config.max_interest_to_principal_ratio,
            "> 0 and <= 0.10",
        ),
        (
            config.min_interest_capitalization_days <= 92,
            "APP_MIN_INTEREST_CAPITALIZATION_DAYS",
            config.min_interest_capitalization_days,
            "<= 92",
        ),
        (config.accounts_scan_hours <= 48, "APP_ACCOUNTS_SCAN_HOURS", config.accounts_scan_hours, "<= 48"),
        (
            config.account_heartbeat_days <= 14,
            "APP_ACCOUNT_HEARTBEAT_DAYS",
            config.account_heartbeat_days,
            "<= 14",
        ),
        (
            0 <= config.account_update_delay_seconds <= 86400,
            "APP_ACCOUNT_UPDATE_DELAY_SECONDS",
            config.account_update_delay_seconds,
            ">= 0 and <= 86400",
        ),
    ]
    for holds, name, value, allowed in rules:
        if not holds:
            raise ConfigError(f"{name}={value!r} is not valid: expected {allowed}")
    latest_threshold = now - dt.timedelta(days=config.intranet_extreme_delay_days)
    if config.remove_from_archive_threshold_date > latest_threshold:
        raise ConfigError(
            "REMOVE_FROM_ARCHIVE_THRESHOLD_DATE="
            f"{config.remove_from_archive_threshold_date.isoformat()!r} is not valid: expected a "
            f"date at least APP_INTRANET_EXTREME_DELAY_DAYS ({config.intranet_extreme_delay_days}) "
            "days in the past"
        )


_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+[A-Za-z0-9_]+://")


def normalize_postgres_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs (`postgresql+psycopg://`) as pasted from old settings."""
    return _DRIVER_SUFFIX.sub("postgresql://", url.strip())
