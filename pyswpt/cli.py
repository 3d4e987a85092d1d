"""The `pyswpt` command: set-up, administration and `run <driver>`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

from pyswpt import config as settings
from pyswpt import logs, metrics_directory, sharding

logger = logging.getLogger(__name__)
# A setting that cannot work: like argparse, status 2.
EXIT_BAD_SETTING = 2


@dataclasses.dataclass(frozen=True)
class Option:
    """A command-line option of a driver that overrides one setting."""

    flags: tuple[str, ...]
    setting: str  # a field of config.Config
    type: Callable[[str], object]
    help: str
    # More fields of config.Config that take the same value.
    also: tuple[str, ...] = ()

    @property
    def settings(self) -> tuple[str, ...]:
        return (self.setting, *self.also)


@dataclasses.dataclass(frozen=True)
class Switch:
    """A command-line flag of a driver, passed to its run() as a keyword argument."""

    flag: str
    keyword: str
    help: str


@dataclasses.dataclass(frozen=True)
class Driver:
    """`pyswpt run NAME` starts pyswpt.drivers.<module>.run(config, **names)."""

    module: str
    help: str
    options: tuple[Option, ...] = ()
    # Optional positional names passed to run() as this keyword, e.g. flusher tables.
    names_keyword: str | None = None
    name_choices: tuple[str, ...] = ()
    switches: tuple[Switch, ...] = ()


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected an integer >= 1")
    return value


def broker_options(prefix: str, what: str) -> tuple[Option, ...]:
    return (
        Option(("-u", "--url"), f"{prefix}_url", str, f"{what} broker URL"),
        Option(("-q", "--queue"), f"{prefix}_queue", str, f"{what} queue"),
        Option(("-p", "--processes"), f"{prefix}_processes", int, "consumer processes"),
        Option(("-t", "--threads"), f"{prefix}_threads", int, "consumer threads per process"),
        Option(("-s", "--prefetch-size"), f"{prefix}_prefetch_size", int, "basic.qos prefetch size in bytes"),
        Option(("-c", "--prefetch-count"), f"{prefix}_prefetch_count", int, "basic.qos prefetch count"),
    )


DRIVERS = {
    "all": Driver("supervisor", "every driver of one node, restarted when one dies"),
    "web": Driver("web", "the fetch API"),
    "metrics": Driver("metrics", "serve the Prometheus metrics of every process of the node, and the database's"),
    "consumer": Driver(
        "consumer",
        "consume SMP messages",
        broker_options("protocol_broker", "SMP"),
        switches=(
            Switch(
                "--draining-mode",
                "draining_mode",
                "retire a parent shard's queue after a split: step back from the queue when it is idle, hand "
                "the sibling shard's messages on to it, and exit with status 0 once the queue is deleted",
            ),
        ),
    ),
    "chores": Driver("chores", "consume chore messages", broker_options("chores_broker", "chores")),
    "flusher": Driver(
        "flusher",
        "publish the outbox (all tables, or the named ones)",
        (
            Option(("-p", "--processes"), "flush_processes", int, "flusher processes"),
            Option(("-w", "--wait"), "flush_period_seconds", float, "seconds between flush rounds"),
        ),
        names_keyword="table_names",
        name_choices=settings.OUTBOX_TYPES,
    ),
    "workers": Driver(
        "workers",
        "process queued transfer requests, finalizations and balance changes (all, or the named stages)",
        (
            Option(
                ("-t", "--threads"),
                "process_transfer_requests_threads",
                at_least_one,
                "threads of each stage",
                also=("process_finalization_requests_threads", "process_balance_changes_threads"),
            ),
            Option(
                ("-w", "--wait"),
                "process_transfer_requests_wait_seconds",
                float,
                "longest pause in seconds between rounds of each stage",
                also=("process_finalization_requests_wait_seconds", "process_balance_changes_wait_seconds"),
            ),
        ),
        names_keyword="stage_names",
        name_choices=("transfer_requests", "finalization_requests", "balance_changes"),
    ),
    "scan-accounts": Driver(
        "scanners.accounts",
        "heartbeats, purges and chores from a slow pass over the accounts",
        (Option(("-h", "--hours"), "accounts_scan_hours", float, "duration of one pass"),),
    ),
    "scan-prepared-transfers": Driver(
        "scanners.prepared_transfers",
        "reminders of old prepared transfers",
        (Option(("-d", "--days"), "prepared_transfers_scan_days", float, "duration of one pass"),),
    ),
    "scan-registered-balance-changes": Driver(
        "scanners.registered_balance_changes",
        "archive cleanup",
        (Option(("-d", "--days"), "registered_balance_changes_scan_days", float, "duration of one pass"),),
    ),
    # What `run all` runs: the three above in one process.
    "scanners": Driver("scanners.every", "the three scanners above, in threads of one process"),
    # Not a driver of a node (not in `run all`): one proxy routes the fetch requests of every shard.
    "fetch-proxy": Driver(
        "fetch_proxy", "route fetch API requests to the shard owning each account (APIPROXY_CONFIG_FILE)"
    ),
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
    from pyswpt import schema, topology

    if problem := schema.missing_sql():
        print(f"pyswpt configure: {problem}", file=sys.stderr)
        return EXIT_BAD_SETTING

    # The installer warns when the database roles are missing and this user may
    # not create them: the statements for a DBA are part of this command's output.
    with warnings.catch_warnings(record=True) as installer_warnings:
        warnings.simplefilter("always")
        with_backoff("Running database schema upgrade", lambda: schema.apply_migrations(config.postgres_url))
    for warning in [w for w in installer_warnings if schema.is_installer_warning(w.filename)][-1:]:
        print(warning.message, flush=True)
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
    from pyswpt import schema

    print("Awaiting database migrations to be applied...", flush=True)
    while True:
        try:
            if not schema.pending_schema_migrations(config.driver_postgres_url):
                return 0
        except Exception as error:
            logger.warning("Cannot read the schema revision yet: %s", error)
        time.sleep(AWAIT_MIGRATIONS_POLL_SECONDS)


def show_broker_steps() -> None:
    """Broker administration prints what it did: those lines are the command's output."""
    topology_logger = logging.getLogger("pyswpt.topology")
    topology_logger.setLevel(min(topology_logger.getEffectiveLevel(), logging.INFO))


def command_subscribe(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import topology

    show_broker_steps()
    topology.subscribe(
        args.url or config.protocol_broker_url,
        args.queue or config.protocol_broker_queue,
        args.queue_routing_key or config.protocol_broker_queue_routing_key,
    )
    return 0


def command_unsubscribe(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import topology

    show_broker_steps()
    topology.unsubscribe(
        args.url or config.protocol_broker_url,
        args.queue or config.protocol_broker_queue,
        args.queue_routing_key or config.protocol_broker_queue_routing_key,
        args.chores_url or config.chores_broker_url,
        args.chores_queue or config.chores_broker_queue,
    )
    return 0


def command_delete_queue(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import progress, topology

    show_broker_steps()
    queue = args.queue or config.protocol_broker_queue
    with progress.track(f"delete-queue {queue}", 0, " messages", config.progress_interval_seconds) as shown:
        topology.delete_queue(args.url or config.protocol_broker_url, queue, on_message_count=progress.Drain(shown))
    return 0


def binding_key(text: str) -> str:
    if not sharding.BINDING_KEY_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard binding key: expected e.g. '#', '0.#', '1.0.#'")
    return text


def add_broker_commands(commands: argparse._SubParsersAction) -> None:
    """subscribe / unsubscribe / delete-queue (spec 01 §3.7); defaults come from the environment."""
    subscribe = commands.add_parser(
        "subscribe", help="declare the exchanges, the SMP queue and its binding (idempotent)"
    )
    unsubscribe = commands.add_parser(
        "unsubscribe", help="unbind the SMP queue from accounts_in and delete the chores queue"
    )
    delete_queue = commands.add_parser(
        "delete-queue", help="delete the SMP queue once it has no messages (waits until then)"
    )
    for parser in (subscribe, unsubscribe, delete_queue):
        parser.add_argument("-u", "--url", help="SMP broker URL (default: PROTOCOL_BROKER_URL)")
        parser.add_argument("-q", "--queue", help="SMP queue (default: PROTOCOL_BROKER_QUEUE)")
    for parser in (subscribe, unsubscribe):
        parser.add_argument(
            "-k",
            "--queue-routing-key",
            type=binding_key,
            help="accounts_in binding key (default: PROTOCOL_BROKER_QUEUE_ROUTING_KEY)",
        )
    unsubscribe.add_argument("-U", "--chores-url", help="chores broker URL (default: CHORES_BROKER_URL)")
    unsubscribe.add_argument("-Q", "--chores-queue", help="chores queue (default: CHORES_BROKER_QUEUE)")
    subscribe.set_defaults(handler=command_subscribe)
    unsubscribe.set_defaults(handler=command_unsubscribe)
    delete_queue.set_defaults(handler=command_delete_queue)


def driver_config(config: settings.Config, args: argparse.Namespace) -> settings.Config:
    """The settings with the driver's command-line options in place of the environment's."""
    overrides = {
        setting: getattr(args, option.setting)
        for option in DRIVERS[args.driver].options
        if getattr(args, option.setting) is not None
        for setting in option.settings
    }
    return dataclasses.replace(config, **overrides)


def command_run(config: settings.Config, args: argparse.Namespace) -> int:
    driver = DRIVERS[args.driver]
    names = {driver.names_keyword: args.names or None} if driver.names_keyword else {}
    with metrics_of(args.driver, config):
        # Imported only now: the driver's modules import prometheus_client (see metrics_of),
        # and so do pyswpt.upgrades, through pyswpt.transactions, and pyswpt.processes.
        from pyswpt import processes, upgrades

        processes.die_with_supervisor()
        module = importlib.import_module(f"pyswpt.drivers.{driver.module}")
        switches = {switch.keyword: getattr(args, switch.keyword) for switch in driver.switches}
        try:
            return module.run(driver_config(config, args), **names, **switches) or 0
        except upgrades.ApiUnavailable as error:
            logger.critical("%s", error)
            return upgrades.EXIT_API_UNAVAILABLE


@contextlib.contextmanager
def metrics_of(driver: str, config: settings.Config) -> Iterator[None]:
    """Where the command's metrics go while it runs, and the endpoint it serves itself, if any.

    `run all` gets a fresh directory for the whole node, which its supervisor
    serves on METRICS_PORT. A driver run alone serves its own endpoint
    only when METRICS_PORT is set, unless PROMETHEUS_MULTIPROC_DIR is set
    already: then it writes there, beside other processes (under `run all`,
    or sharing a volume), and whoever serves that directory serves it.
    Either way the directory is prepared before prometheus_client is
    imported, which is when it reads the variable (pyswpt.metrics_directory).
    """
    if driver == "all":
        with metrics_directory.fresh_directory():
            yield
        return
    if driver == "metrics" or config.metrics_port is None or metrics_directory.is_set():
        yield
        return
    with metrics_directory.fresh_directory():
        from pyswpt import metrics

        server = metrics.serve(config.metrics_port, metrics.own_registry())
        try:
            yield
        finally:
            server.shutdown()


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(choices)}")
        return text

    return check


def add_run_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="start a long-running driver")
    drivers = run.add_subparsers(dest="driver", required=True, metavar="DRIVER")
    for name, driver in DRIVERS.items():
        # The reference's scan_accounts takes -h for hours: help is then --help only.
        takes_h = any("-h" in option.flags for option in driver.options)
        parser = drivers.add_parser(name, help=driver.help, add_help=not takes_h)
        if takes_h:
            parser.add_argument("--help", action="help", help="show this help message and exit")
        for option in driver.options:
            metavar = option.flags[-1].removeprefix("--").upper().replace("-", "_")
            parser.add_argument(*option.flags, dest=option.setting, type=option.type, metavar=metavar, help=option.help)
        for switch in driver.switches:
            parser.add_argument(switch.flag, dest=switch.keyword, action="store_true", help=switch.help)
        if driver.names_keyword:
            # Not `choices=`: argparse refuses an empty `nargs="*"` list against choices.
            parser.add_argument(
                "names",
                nargs="*",
                type=one_of(driver.name_choices),
                metavar="NAME",
                help=f"any of: {', '.join(driver.name_choices)}",
            )
        parser.set_defaults(handler=command_run)


def command_verify_shard_content(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import shard_content

    return shard_content.verify_shard_content(config)


def command_parked_list(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import parked

    return parked.list_parked(config, args.reason, args.source, args.json)


def command_parked_show(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import parked

    return parked.show_parked(config, args.id)


def command_parked_replay(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import parked

    return parked.replay_parked(config, args.ids, args.all_with_reason)


def command_parked_discard(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import parked

    return parked.discard_parked(config, args.ids, args.all_with_reason)


def add_parked_commands(commands: argparse._SubParsersAction) -> None:
    """parked list / show / replay / discard: the messages the drivers set aside (issue 8)."""
    parked = commands.add_parser("parked", help="list, show, replay or discard parked messages")
    actions = parked.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="parked messages, oldest first, without their bodies")
    listing.add_argument("--reason", metavar="CODE", help="only those parked for this reason code")
    listing.add_argument("--source", metavar="NAME", help="only those from this queue or outbox table")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=command_parked_list)
    show = actions.add_parser("show", help="one parked message with its headers and body")
    show.add_argument("id", type=int, metavar="ID")
    show.set_defaults(handler=command_parked_show)
    replay = actions.add_parser(
        "replay", help="publish again (consumed messages to accounts_in) and discard those the broker took"
    )
    discard = actions.add_parser("discard", help="forget parked messages")
    for parser in (replay, discard):
        chosen = parser.add_mutually_exclusive_group(required=True)
        chosen.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
        chosen.add_argument("--all-with-reason", metavar="CODE", help="every message parked for this reason code")
    replay.set_defaults(handler=command_parked_replay)
    discard.set_defaults(handler=command_parked_discard)


def command_audit(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import audit

    return audit.audit(config, as_json=args.json)


def command_status(config: settings.Config, args: argparse.Namespace) -> int:
    from pyswpt import status

    return status.status(config, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyswpt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "configure", help="apply migrations and functions, create the chores queue (idempotent)"
    ).set_defaults(handler=command_configure)
    commands.add_parser("await-migrations", help="wait until every schema migration has been applied").set_defaults(
        handler=command_await_migrations
    )
    add_broker_commands(commands)
    commands.add_parser(
        "verify-shard-content",
        help="exit 1 if any record belongs to another shard (after a split), else 0",
    ).set_defaults(handler=command_verify_shard_content)
    add_parked_commands(commands)
    audit = commands.add_parser("audit", help="check the ledger's invariants; exit 1 on any violation, else 0")
    audit.add_argument("--json", action="store_true", help="print the checks as JSON")
    audit.set_defaults(handler=command_audit)
    status = commands.add_parser(
        "status", help="schema, queues, backlogs, parked messages, scanners; exit 1 with the reasons if unhealthy"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=command_status)
    add_run_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = settings.load()
    except settings.ConfigError as error:
        print(f"pyswpt: configuration error: {error}", file=sys.stderr)
        return EXIT_BAD_SETTING
    logs.configure_logging(config)
    return args.handler(config, args)


if __name__ == "__main__":
    sys.exit(main())
