"""Instructions PostgreSQL executes per transfer on the SQL path, counted by callgrind (run on demand, not a test).

CPU times move by 5–10 % between runs on a shared machine, so a change that
saves a few percent inside the SQL functions is lost in them. callgrind
(valgrind) counts the instructions a process executes: the same count on
every run of the same binary with the same inputs, whatever else the
machine does.

The script makes a scratch PostgreSQL cluster in a temporary folder (initdb,
the binaries of `pg_config --bindir`), starts its server under callgrind,
installs this checkout's schema and functions (or PYSWPT_SQL_DIR's) and runs
benchmarks/transfers.py's pairs — intake, prepare, the flusher's take,
finalization intake, finalize, credit, each step a transaction — on one
connection. Each backend writes its count when its connection closes; a run
of SHORT pairs and a run of SHORT + --pairs pairs, each on a new connection,
give the count per pair as their difference over --pairs, without the
connection's start and the first calls' planning. "batch 1" is one request
per step, as the workers mostly see them; "batch 10" is ten per step.

    .venv/bin/python benchmarks/sql_instructions.py
    PYSWPT_SQL_DIR=../other-checkout/sql .venv/bin/python benchmarks/sql_instructions.py

Needs valgrind and the PostgreSQL server binaries. PostgreSQL refuses to run
as root: as root the cluster belongs to the `postgres` system user. Under
callgrind the server runs about fifty times slower; the default run takes a
few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import transfers  # noqa: E402  (benchmarks/, the script's own folder)
from drivers import free_port  # noqa: E402  (tests/drivers.py)

DATABASE = "pyswpt_instructions"
SERVER_USER = "postgres"  # owns the cluster when the script runs as root
SERVER_START_SECONDS = 300.0
COUNT_WRITE_SECONDS = 120.0
SHORT_RUN_PAIRS = 50
SCENARIOS = ("spread", "hot")
BATCH_SIZES = (1, 10)
# Settings of the scratch server: nothing but the backends under test runs, and
# a flush to disk costs no instructions in the process.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "autovacuum": "off",
    "max_connections": "10",
}


@dataclasses.dataclass(frozen=True)
class Server:
    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def count_file(self, backend_pid: int) -> Path:
        return self.folder / f"callgrind.out.{backend_pid}"


def as_server_user() -> dict:
    """subprocess arguments that run a command as the cluster's owner."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(SERVER_USER)
    return {"user": user.pw_uid, "group": user.pw_gid}


@contextlib.contextmanager
def server_under_callgrind(bindir: Path) -> Iterator[Server]:
    """A scratch cluster whose server, and every backend it forks, runs under callgrind."""
    folder = Path(tempfile.mkdtemp(prefix="pyswpt_instructions_"))
    try:
        with started_server(bindir, folder) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def started_server(bindir: Path, folder: Path) -> Iterator[Server]:
    """initdb in `folder`, then the server under callgrind until the block ends."""
    owner = as_server_user()
    if owner:
        os.chown(folder, owner["user"], owner["group"])
    data = folder / "data"
    subprocess.run(
        [bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
        **owner,
    )
    server = Server(folder, free_port())
    settings = [arg for name, value in SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    with open(folder / "server.log", "wb") as log:
        postmaster = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={folder}/callgrind.out.%p",
                bindir / "postgres",
                "-D",
                data,
                "-p",
                str(server.port),
                "-k",
                folder,
                *settings,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            **owner,
        )
    try:
        wait_until_accepting(server, postmaster)
        yield server
    finally:
        postmaster.send_signal(signal.SIGINT)  # fast shutdown
        postmaster.wait(timeout=SERVER_START_SECONDS)


def wait_until_accepting(server: Server, postmaster: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        if postmaster.poll() is not None:
            raise RuntimeError(f"the server exited; see {server.folder / 'server.log'}")
        try:
            psycopg.connect(server.admin_url, connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def instructions(server: Server, backend_pid: int) -> int:
    """The instructions a closed connection's backend executed, from the file callgrind writes at its exit."""
    path = server.count_file(backend_pid)
    deadline = time.monotonic() + COUNT_WRITE_SECONDS
    while time.monotonic() < deadline:
        # The file has the summary near its top and the totals last: without them it is still being written.
        text = path.read_text(errors="replace") if path.exists() else ""
        if "\ntotals:" in text:
            (summary,) = [line for line in text.splitlines() if line.startswith("summary:")]
            return int(summary.split()[1])
        time.sleep(0.2)
    raise TimeoutError(f"no instruction count in {path}")


def counted_run(server: Server, scenario: str, batch: int, pairs: int, first_round: int) -> int:
    """Instructions of one connection's backend that runs `pairs` pairs, its start included."""
    conn = transfers.connect(server.url, "off")
    try:
        backend_pid = conn.info.backend_pid
        transfers.run_pairs(conn, scenario, 0, pairs, batch, credit=True, first_round=first_round)
    finally:
        conn.close()
    return instructions(server, backend_pid)


def instructions_per_pair(server: Server, scenario: str, batch: int, pairs: int) -> float:
    transfers.empty_queues_and_outbox(server.url)
    short = counted_run(server, scenario, batch, SHORT_RUN_PAIRS, first_round=0)
    long = counted_run(server, scenario, batch, SHORT_RUN_PAIRS + pairs, first_round=SHORT_RUN_PAIRS // batch)
    return (long - short) / pairs


def pg_bindir() -> Path:
    found = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True)
    return Path(found.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs of the longer run beyond the shorter one's")
    parser.add_argument("--scenario", choices=SCENARIOS, nargs="+", default=list(SCENARIOS))
    parser.add_argument("--batch", type=int, choices=BATCH_SIZES, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--bindir", type=Path, help="the PostgreSQL server's binaries (default: pg_config --bindir)")
    args = parser.parse_args()
    if args.pairs % max(BATCH_SIZES) or args.pairs <= 0:
        parser.error(f"--pairs must be a positive multiple of {max(BATCH_SIZES)}")
    with server_under_callgrind(args.bindir or pg_bindir()) as server:
        with psycopg.connect(server.admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {DATABASE}")
        if not transfers.set_up(server.url, connections=1):
            raise SystemExit("the SQL API has no process_balance_changes: the pair's credit step is missing")
        print(f"instructions per transfer pair (prepare + finalize + credit), {args.pairs} pairs, callgrind")
        print("| scenario | batch | M instructions per pair |")
        print("|---|---|---|")
        for scenario in args.scenario:
            for batch in args.batch:
                per_pair = instructions_per_pair(server, scenario, batch, args.pairs)
                print(f"| {scenario} | {batch} | {per_pair / 1e6:.3f} |", flush=True)


if __name__ == "__main__":
    main()
