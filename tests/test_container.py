"""The container image: its entrypoint runs the very `pyswpt` commands the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_entrypoint_runs_any_other_command_as_is():
    result = entrypoint("echo", "hello")
    assert result.stdout == "hello\n"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
@pytest.mark.parametrize("profile", ["test", "observability"])
def test_compose_file_is_valid(profile: str):
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "--profile", profile, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
