"""The `pyswpt` command: set-up, administration and `run <driver>`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable, Sequence

from pyswpt import config as settings
from pyswpt import logs, schema

logger = logging.getLogger(__name__)

# `pyswpt run NAME` starts pyswpt.drivers.<module>.run(config).
DRIVERS = {
    "web": "web",
}

STARTUP_ATTEMPTS = 5
AWAIT_MIGRATIONS_POLL_SECONDS = 10.0


def with_backoff(what: str, action: Callable[[], object]) -> None:
    """Run a start-up step, retrying while a server is still starting (1, 2, 4, 8, 16 s)."""
    print(f"{what} ...", end="", flush=True)
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            action()
        except Exception as error:
            if attempt + 1 == STARTUP_ATTEMPTS:
                print(" failed.", flush=True)
                raise
            logger.warning("%s failed (attempt %d): %s", what, attempt + 1, error)
            time.sleep(2**attempt)
        else:
            print(" done.", flush=True)
            return


def command_configure(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import topology

    with_backoff("Running database schema upgrade", lambda: schema.apply_migrations(config.postgres_url))
    with_backoff(
        "Creating chores queue",
        lambda: topology.declare_chores_queue(config.chores_broker_url, config.chores_broker_queue),
    )
    if config.setup_rabbitmq_bindings:
        with_backoff(
            "Setting up message broker objects",
            lambda: topology.subscribe(
                config.protocol_broker_url,
                config.protocol_broker_queue,
                config.protocol_broker_queue_routing_key,
            ),
        )
    return 0


def command_await_migrations(config: settings.Config, args: argparse.Namespace) -> int:
    print("Awaiting database migrations to be applied...", flush=True)
    while True:
        try:
            if not schema.pending_schema_migrations(config.postgres_url):
                return 0
        except Exception as error:
            logger.warning("Cannot read the schema revision yet: %s", error)
        time.sleep(AWAIT_MIGRATIONS_POLL_SECONDS)


def command_run(config: settings.Config, args: argparse.Namespace) -> int:
    module = importlib.import_module(f"pyswpt.drivers.{DRIVERS[args.driver]}")
    return module.run(config) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyswpt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "configure", help="apply migrations and functions, create the chores queue (idempotent)"
    ).set_defaults(handler=command_configure)
    commands.add_parser(
        "await-migrations", help="wait until every schema migration has been applied"
    ).set_defaults(handler=command_await_migrations)
    run = commands.add_parser("run", help="start a long-running driver")
    run.add_argument("driver", choices=sorted(DRIVERS))
    run.set_defaults(handler=command_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = settings.load()
    except settings.ConfigError as error:
        print(f"pyswpt: configuration error: {error}", file=sys.stderr)
        return 2
    logs.configure_logging(config)
    return args.handler(config, args)


if __name__ == "__main__":
    sys.exit(main())
