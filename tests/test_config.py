"""Settings: the reference's names, defaults, aliases and start-up checks."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest

from pyswpt import config

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def load(**environ: str) -> config.Config:
    return config.load(environ, now=NOW)


def test_defaults_are_the_reference_defaults_but_the_smp_prefetch_window():
    settings = load()
    assert settings.webserver_port == 8080
    assert settings.webserver_processes == 1
    assert settings.webserver_threads == 3
    assert settings.protocol_broker_queue == "swpt_accounts"
    assert settings.protocol_broker_queue_routing_key == "#"
    assert settings.chores_broker_queue == "swpt_accounts_chores"
    # A larger window than the reference's 1, on purpose (config.DEFAULT_PROTOCOL_PREFETCH_COUNT).
    assert settings.protocol_broker_prefetch_count == 50
    assert settings.chores_broker_prefetch_count == 1
    assert settings.flush_period_seconds == 2.0
    assert settings.flush_burst_counts["account_updates"] == 5000
    assert settings.commit_period_seconds == 7776000
    assert settings.message_max_delay_seconds == 604800
    assert settings.remove_from_archive_threshold_date == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert settings.delete_parent_shard_records is False
    assert settings.setup_rabbitmq_bindings is False


def test_port_and_workers_aliases_are_accepted():
    settings = load(PORT="8001", WEBSERVER_WORKERS="4")
    assert settings.webserver_port == 8001
    assert settings.webserver_processes == 4


def test_reference_names_win_over_aliases():
    settings = load(PORT="8001", WEBSERVER_PORT="9000", WEBSERVER_WORKERS="4", WEBSERVER_PROCESSES="2")
    assert settings.webserver_port == 9000
    assert settings.webserver_processes == 2


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:p@db:5432/ledger",
        "postgresql+psycopg2://u:p@db:5432/ledger",
        "postgresql://u:p@db:5432/ledger",
    ],
)
def test_postgres_url_accepts_a_driver_suffix(url: str):
    assert load(POSTGRES_URL=url).postgres_url == "postgresql://u:p@db:5432/ledger"


def test_every_role_uses_postgres_url_unless_given_its_own():
    owner = "postgresql://owner@db/ledger"
    settings = load(POSTGRES_URL=owner)
    assert (settings.driver_postgres_url, settings.web_postgres_url, settings.operator_postgres_url) == (owner,) * 3
    settings = load(
        POSTGRES_URL=owner,
        DRIVER_POSTGRES_URL="postgresql+psycopg://driver@db/ledger",
        WEB_POSTGRES_URL="postgresql://web@db/ledger",
        OPERATOR_POSTGRES_URL="postgresql://operator@db/ledger",
    )
    assert settings.postgres_url == owner
    assert settings.driver_postgres_url == "postgresql://driver@db/ledger"
    assert settings.web_postgres_url == "postgresql://web@db/ledger"
    assert settings.operator_postgres_url == "postgresql://operator@db/ledger"


@pytest.mark.parametrize("text", ["false", "OFF", "no", ""])
def test_false_words_are_false(text: str):
    assert load(DELETE_PARENT_SHARD_RECORDS=text).delete_parent_shard_records is False


@pytest.mark.parametrize("text", ["true", "1", "yes", "anything"])
def test_any_other_word_is_true(text: str):
    assert load(DELETE_PARENT_SHARD_RECORDS=text).delete_parent_shard_records is True


def test_setup_bindings_needs_exactly_yes():
    assert load(SETUP_RABBITMQ_BINDINGS="yes").setup_rabbitmq_bindings is True
    assert load(SETUP_RABBITMQ_BINDINGS="true").setup_rabbitmq_bindings is False


def test_threshold_date_without_zone_is_utc():
    settings = load(REMOVE_FROM_ARCHIVE_THRESHOLD_DATE="2022-07-30T18:59:59")
    assert settings.remove_from_archive_threshold_date == dt.datetime(2022, 7, 30, 18, 59, 59, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APP_PREPARED_TRANSFER_MAX_DELAY_DAYS", "29"),
        ("APP_MAX_INTEREST_TO_PRINCIPAL_RATIO", "0"),
        ("APP_MAX_INTEREST_TO_PRINCIPAL_RATIO", "0.2"),
        ("APP_MIN_INTEREST_CAPITALIZATION_DAYS", "93"),
        ("APP_ACCOUNTS_SCAN_HOURS", "49"),
        ("APP_ACCOUNT_HEARTBEAT_DAYS", "15"),
        ("REMOVE_FROM_ARCHIVE_THRESHOLD_DATE", "2025-12-25"),
        ("REMOVE_FROM_ARCHIVE_THRESHOLD_DATE", "yesterday"),
        ("PROTOCOL_BROKER_QUEUE_ROUTING_KEY", "1.1"),
        ("PROTOCOL_BROKER_QUEUE_ROUTING_KEY", ".#"),
        ("PROTOCOL_BROKER_QUEUE_ROUTING_KEY", "0." * 21 + "#"),
        ("APP_LOG_LEVEL", "loud"),
        ("APP_LOG_FORMAT", "xml"),
        ("PROTOCOL_BROKER_THREADS", "1.5"),
        ("FLUSH_PERIOD", "soon"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name: str, value: str):
    with pytest.raises(config.ConfigError) as error:
        load(**{name: value})
    assert str(error.value).startswith(f"{name}=")


def test_max_delay_must_cover_message_delay():
    with pytest.raises(config.ConfigError, match="APP_MESSAGE_MAX_DELAY_DAYS"):
        load(APP_PREPARED_TRANSFER_MAX_DELAY_DAYS="40", APP_MESSAGE_MAX_DELAY_DAYS="41")


def test_twenty_bit_routing_key_defines_the_realm():
    settings = load(PROTOCOL_BROKER_QUEUE_ROUTING_KEY="1.0.1.#")
    assert settings.realm.mask == 0xE0000000
    assert settings.realm.realm == 0xA0000000


def test_command_prints_one_line_and_exits_non_zero_on_a_bad_value():
    environ = {**os.environ, "FLUSH_PROCESSES": "many"}
    result = subprocess.run(
        [sys.executable, "-m", "pyswpt.cli", "await-migrations"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "pyswpt: configuration error: FLUSH_PROCESSES='many' is not valid: expected an integer"
    ]
