"""Logs: one line per record on stdout, as text or as JSON (APP_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from pyswpt import logs

LOG_SNIPPET = (
    "import logging; from pyswpt import config, logs; "
    "logs.configure_logging(config.load()); "
    "logging.getLogger('pyswpt.drivers.consumer').info('Consuming %s.', 'swpt_accounts'); "
    "logging.getLogger('pyswpt.drivers.consumer').debug('hidden'); "
    "logging.getLogger('other.library').info('hidden too')"
)


def log_lines(**environ: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", LOG_SNIPPET], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_json_format_writes_one_object_per_line():
    [line] = log_lines(APP_LOG_LEVEL="info", APP_LOG_FORMAT="json")
    entry = json.loads(line)
    assert entry["levelname"] == "INFO"
    assert entry["name"] == "pyswpt.drivers.consumer"
    assert entry["message"] == "Consuming swpt_accounts."
    assert entry["asctime"][10] == "T"


def test_text_format_names_time_level_logger_and_message():
    [line] = log_lines(APP_LOG_LEVEL="info", APP_LOG_FORMAT="text")
    assert line.endswith(":INFO:pyswpt.drivers.consumer:Consuming swpt_accounts.")


def test_default_level_hides_info():
    assert log_lines() == []


def test_json_lines_carry_the_context_of_a_record_as_fields():
    record = logging.LogRecord("pyswpt.applying", logging.ERROR, __file__, 1, "Rejected %s.", ("it",), None)
    record.debtor_id, record.creditor_id, record.sqlstate, record.secret = 1, 2, "23514", "not a context field"
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "Rejected it."
    assert (entry["debtor_id"], entry["creditor_id"], entry["sqlstate"]) == (1, 2, "23514")
    assert "secret" not in entry


def test_one_line_escapes_line_breaks_a_peer_could_send():
    assert logs.one_line('Unknown message type: "a\nFAKE:ERROR:x\r"') == 'Unknown message type: "a\\nFAKE:ERROR:x\\r"'
