"""CPU time and memory of the processes a benchmark involves, read from /proc (Linux only).

A Sampler reads /proc once a second during a measuring window and sums, per
group of processes, the CPU time they spent inside the window. A process's CPU
time includes its reaped children's (cutime, cstime), so a worker that a
driver forked and reaped in the window is counted under the driver; a process
that appears during the window counts from zero. Sampling keeps the last
value of a process that exits between samples (less at most one interval).

The machine's own busy time (/proc/stat) is sampled too: what no group
accounts for is the rest of the machine — other programs, PostgreSQL's
background processes, the kernel.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SAMPLE_INTERVAL_SECONDS = 1.0
MACHINE = "machine"
# Fields of /proc/PID/stat after the command name, counted from 0 at the state.
PPID, SESSION, UTIME, STIME, CUTIME, CSTIME, RSS_PAGES = 1, 3, 11, 12, 13, 14, 21


@dataclasses.dataclass(frozen=True)
class ProcessStat:
    pid: int
    command: str  # the short name in /proc/PID/stat
    parent: int
    session: int
    cpu_seconds: float  # own user + system time, and its reaped children's
    rss_bytes: int


def read_stat(pid: int) -> ProcessStat | None:
    """One process's figures, or None if it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    command = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    ticks = sum(int(fields[index]) for index in (UTIME, STIME, CUTIME, CSTIME))
    return ProcessStat(
        pid,
        command,
        int(fields[PPID]),
        int(fields[SESSION]),
        ticks / CLOCK_TICKS_PER_SECOND,
        int(fields[RSS_PAGES]) * PAGE_BYTES,
    )


def all_stats() -> list[ProcessStat]:
    stats = (read_stat(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [stat for stat in stats if stat is not None]


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def proportional_set_bytes(pid: int) -> int:
    """PSS: the process's private pages plus its share of pages it shares (forked workers)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """CPU time all cores spent on anything but idling since boot (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / CLOCK_TICKS_PER_SECOND


# Decides which group a process belongs to (None: none of ours). Called once per process per sample.
Classifier = Callable[[ProcessStat], str | None]


@dataclasses.dataclass
class Window:
    """What one measuring window found."""

    seconds: float
    cpu_seconds: dict[str, float]  # per group, and MACHINE for the whole machine
    max_rss_bytes: dict[str, int]  # per group, the largest sum seen in one sample
    pss_bytes: dict[str, int]  # per group, at the end of the window

    def per_second(self, group: str) -> float:
        return self.cpu_seconds.get(group, 0.0) / self.seconds


class Sampler:
    """Samples the processes `classify` puts in a group, in a thread, between start() and stop()."""

    def __init__(self, classify: Classifier, before_sample: Callable[[], None] = lambda: None):
        self.classify = classify
        self.before_sample = before_sample  # e.g. to learn which PostgreSQL backends serve the node now
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.baseline: dict[int, float] = {}
        self.latest: dict[int, tuple[str, float]] = {}
        self.max_rss: dict[str, int] = {}
        self.started_at = time.monotonic()
        self.machine_at_start = machine_busy_seconds()
        for _group, stat in self.sample():
            self.baseline[stat.pid] = stat.cpu_seconds
        self.stopping.clear()
        self.thread = threading.Thread(target=self.run, name="cpu sampler", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_INTERVAL_SECONDS):
            self.sample()

    def sample(self) -> list[tuple[str, ProcessStat]]:
        self.before_sample()
        found = [(group, stat) for stat in all_stats() if (group := self.classify(stat)) is not None]
        rss: dict[str, int] = {}
        with self.lock:
            for group, stat in found:
                self.latest[stat.pid] = (group, stat.cpu_seconds)
                rss[group] = rss.get(group, 0) + stat.rss_bytes
            for group, total in rss.items():
                self.max_rss[group] = max(self.max_rss.get(group, 0), total)
        return found

    def stop(self) -> Window:
        self.stopping.set()
        self.thread.join()
        final = self.sample()
        seconds = time.monotonic() - self.started_at
        cpu: dict[str, float] = {MACHINE: machine_busy_seconds() - self.machine_at_start}
        with self.lock:
            for pid, (group, cpu_seconds) in self.latest.items():
                cpu[group] = cpu.get(group, 0.0) + cpu_seconds - self.baseline.get(pid, 0.0)
        pss: dict[str, int] = {}
        for group, stat in final:
            pss[group] = pss.get(group, 0) + proportional_set_bytes(stat.pid)
        return Window(seconds, cpu, dict(self.max_rss), pss)
