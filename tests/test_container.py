"""The container image: its entrypoint runs the very `pyswpt` commands the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pyswpt import cli, config, fetch_routes

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"

# Every command of the reference image that starts pyswpt (spec 01 §8.1).
REFERENCE_COMMANDS = [
    "all",
    "configure",
    "webserver",
    "consume_messages",
    "consume_chore_messages",
    "await_migrations",
    "flush_all",
    "flush_rejected_transfers",
    "flush_prepared_transfers",
    "flush_finalized_transfers",
    "flush_account_transfers",
    "flush_account_updates",
    "flush_account_purges",
    "flush_rejected_configs",
    "flush_pending_balance_changes",
    "process_transfer_requests",
    "process_finalization_requests",
    "process_balance_changes",
    "scan_accounts",
    "scan_prepared_transfers",
    "scan_registered_balance_changes",
    "subscribe",
    "unsubscribe",
    "delete_queue",
    "verify_shard_content",
]


def entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", REFERENCE_COMMANDS)
def test_entrypoint_maps_each_reference_command_to_a_pyswpt_command(command: str):
    result = entrypoint(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: pyswpt")


def test_entrypoint_accepts_consume_messages_draining_mode():
    # --help exits before unknown flags are refused: the help text must list the flag.
    result = entrypoint("consume_messages", "--draining-mode", "--help")
    assert result.returncode == 0, result.stderr
    assert "--draining-mode" in result.stdout


# The reference's options of its queue processors and scanners (spec 01 §8.1), each with a
# value that is not a number: the command must take it as that option, not as help.
REFERENCE_OPTIONS = [
    ("process_transfer_requests", "-t", "--threads"),
    ("process_transfer_requests", "-w", "--wait"),
    ("process_finalization_requests", "-t", "--threads"),
    ("process_finalization_requests", "-w", "--wait"),
    ("process_balance_changes", "-t", "--threads"),
    ("process_balance_changes", "-w", "--wait"),
    ("scan_accounts", "-h", "--hours"),
    ("scan_prepared_transfers", "-d", "--days"),
    ("scan_registered_balance_changes", "-d", "--days"),
]


@pytest.mark.parametrize(("command", "short", "long"), REFERENCE_OPTIONS)
def test_entrypoint_accepts_the_reference_options_of_processors_and_scanners(command: str, short: str, long: str):
    for flag in (short, long):
        result = entrypoint(command, flag, "not-a-number")
        assert result.returncode == 2, result.stdout
        assert f"argument {short}/{long}: " in result.stderr
        assert "'not-a-number'" in result.stderr


@pytest.mark.parametrize(
    ("command", "args", "settings"),
    [
        (
            "process_transfer_requests",
            ["-t", "3", "-w", "0.5"],
            {"process_transfer_requests_threads": 3, "process_transfer_requests_wait_seconds": 0.5},
        ),
        (
            "process_finalization_requests",
            ["--threads", "4", "--wait", "0.25"],
            {"process_finalization_requests_threads": 4, "process_finalization_requests_wait_seconds": 0.25},
        ),
        (
            "process_balance_changes",
            ["-t", "5", "-w", "7"],
            {"process_balance_changes_threads": 5, "process_balance_changes_wait_seconds": 7.0},
        ),
        ("scan_accounts", ["-h", "2.5"], {"accounts_scan_hours": 2.5}),
        ("scan_prepared_transfers", ["-d", "0.5"], {"prepared_transfers_scan_days": 0.5}),
        ("scan_registered_balance_changes", ["--days", "3"], {"registered_balance_changes_scan_days": 3.0}),
    ],
)
def test_reference_options_set_the_driver_settings(command: str, args: list[str], settings: dict[str, object]):
    pyswpt_args = pyswpt_arguments_of(command, args)
    parsed = cli.build_parser().parse_args(pyswpt_args)
    configured = cli.driver_config(config.load({}), parsed)
    assert {name: getattr(configured, name) for name in settings} == settings


def pyswpt_arguments_of(command: str, args: list[str]) -> list[str]:
    """The arguments the entrypoint passes to `pyswpt` for a reference command (read from `set -x`)."""
    fake_bin = ROOT / "tests" / "bin-that-does-not-exist"
    environ = {"PATH": f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    traced = subprocess.run(
        ["sh", "-x", str(ENTRYPOINT), command, *args], env=environ, capture_output=True, text=True, timeout=60
    )
    [exec_line] = [line for line in traced.stderr.splitlines() if line.startswith("+ exec pyswpt ")]
    return exec_line.removeprefix("+ exec pyswpt ").split()


def test_entrypoint_runs_any_other_command_as_is():
    result = entrypoint("echo", "hello")
    assert result.stdout == "hello\n"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
@pytest.mark.parametrize(
    ("compose_file", "profile"),
    [("compose.yaml", "test"), ("compose.yaml", "observability"), ("compose.shards.yaml", "test")],
)
def test_compose_file_is_valid(compose_file: str, profile: str):
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / compose_file), "--profile", profile, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_two_shards_of_the_compose_example_own_halves_and_reach_each_other_through_the_cache():
    services = yaml.safe_load((ROOT / "compose.shards.yaml").read_text())["services"]
    shards = {name: services[name]["environment"] for name in ("shard-0", "shard-1")}
    for name, environment in shards.items():
        # `configure` subscribes the queue the shard consumes, with the shard's key, in its database.
        assert services[name.replace("shard", "configure")]["environment"] == environment
        assert environment["FETCH_API_URL"] == "http://fetch-cache:8080"
    assert [environment["PROTOCOL_BROKER_QUEUE_ROUTING_KEY"] for environment in shards.values()] == ["0.#", "1.#"]
    for setting in ("POSTGRES_URL", "PROTOCOL_BROKER_QUEUE", "CHORES_BROKER_QUEUE"):
        assert len({environment[setting] for environment in shards.values()}) == 2, setting

    # The proxy routes each half to the shard that owns it, on the fetch API's port.
    proxy = services["fetch-proxy"]
    assert proxy["command"] == ["pyswpt", "run", "fetch-proxy"]
    [mount] = proxy["volumes"]
    local_folder, container_folder = mount.split(":")[:2]
    routes_path = proxy["environment"]["APIPROXY_CONFIG_FILE"]
    routes_text = (ROOT / local_folder / Path(routes_path).relative_to(container_folder)).read_text()
    routes = fetch_routes.parse_routes(routes_text)
    assert routes.servers == {"0": "http://shard-0:8080", "1": "http://shard-1:8080"}

    # nginx caches in front of the proxy, on the port of FETCH_API_URL.
    nginx_conf = (ROOT / "docker" / "fetch-cache.nginx.conf").read_text()
    assert f"server fetch-proxy:{proxy['environment']['APIPROXY_PORT']};" in nginx_conf
    assert "listen 8080;" in nginx_conf
    assert "proxy_cache fetch;" in nginx_conf
