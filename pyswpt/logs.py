"""Log set-up: one line per record on stdout, as text or JSON (APP_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import sys

from pyswpt.config import Config

TEXT_FORMAT = "%(asctime)s:%(levelname)s:%(name)s:%(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S%z"
JSON_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
# Context that log calls pass with `extra=`; JSON lines carry it as fields.
CONTEXT_FIELDS = (
    "queue",
    "delivery_tag",
    "message_type",
    "debtor_id",
    "creditor_id",
    "reason_code",
    "sqlstate",
    "table",
    "stage",
    # The ready and stop lines of `pyswpt run all`.
    "drivers",
    "fetch_api_port",
    "metrics_port",
    "routing_key",
    "shard_realm",
    "stop_reason",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: asctime, levelname, name, message (and exc_info)."""

    def __init__(self) -> None:
        super().__init__(datefmt=JSON_DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "asctime": self.formatTime(record, self.datefmt),
            "levelname": record.levelname,
            "name": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def one_line(text: str) -> str:
    """`text` without line breaks: a peer's string must not forge or split log lines."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def configure_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    level = logging.getLevelName(config.log_level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    for name in ("pyswpt", *config.associated_loggers):
        logging.getLogger(name).setLevel(level)
