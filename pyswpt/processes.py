"""Process plumbing shared by the drivers: worker processes and graceful stops."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from pyswpt import metrics
from pyswpt.upgrades import EXIT_API_UNAVAILABLE, ApiUnavailable

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What a child gets when its parent dies: the ordinary stop request, so that it
# finishes its current batch, acks what committed, stops its own workers and
# closes its connections, as on any stop. SIGKILL would be as safe (acks only
# follow commits) but would have the broker redeliver every batch in flight
# and leave a driver no time to stop its workers. A child that does not stop
# is killed by `pyswpt run all` with what remains of its driver's process group.
PARENT_DEATH_SIGNAL = signal.SIGTERM
# prctl(2) option: the signal sent to this process when the thread that created it ends.
PR_SET_PDEATHSIG = 1
# The pid of `run all`'s supervisor, in the environment of each driver it starts (die_with_supervisor).
SUPERVISOR_PID_VARIABLE = "PYSWPT_SUPERVISOR_PID"
# Set by `run all` for each process of a fetch API of several (pyswpt.drivers.web): serve
# alone, on a socket that the others bind too (SO_REUSEPORT; the kernel spreads the connections).
WEBSERVER_SHARES_PORT_VARIABLE = "PYSWPT_WEBSERVER_SHARES_PORT"
# Exit status of a child that found its parent already gone before it could start.
ORPHANED_AT_START_STATUS = 1
# Exit status of a worker whose target returned True: its work is finished (a drained queue is gone).
WORK_DONE_STATUS = 3
WORKER_STOP_TIMEOUT_SECONDS = 30.0
# The main thread wakes up this often while it waits for its threads (join_threads).
JOIN_SLICE_SECONDS = 0.5


class StopRequest(threading.Event):
    """Set by a stop signal; says which one came first, so that a stop can say why."""

    signal_name: str | None = None


def stop_event_on_signals() -> StopRequest:
    """An event that SIGTERM, SIGINT or SIGHUP sets: loops finish their step and return.

    The handler only writes the signal's number to a pipe; a thread of its own
    reads it and sets the event. Python runs a handler in the main thread
    between two of its steps, which may be inside the event's own set() or
    wait(), or inside an earlier run of the handler, a second signal coming
    close behind the first (the parent's death and a stop of the whole group,
    say): all hold the event's lock, which is not reentrant, and a handler that
    set the event itself would wait for that lock for ever (seen: a driver that
    never stopped).
    """
    stopping = StopRequest()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def request_stop(signum: int, _frame) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a stop request
            os.write(write_end, bytes([signum]))

    def set_on_requests() -> None:
        while True:
            name = signal.Signals(os.read(read_end, 1)[0]).name
            logger.info("Received %s; stopping after the current step.", name)
            if stopping.signal_name is None:
                stopping.signal_name = name
            stopping.set()

    threading.Thread(target=set_on_requests, name="stop-signals", daemon=True).start()
    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    return stopping


def join_threads(threads: Sequence[threading.Thread]) -> None:
    """Wait until every thread has ended, waking up every JOIN_SLICE_SECONDS.

    A signal may land on any thread, but Python runs the handler in the main
    thread, and only once that thread wakes up: a plain join() would sleep
    through a SIGTERM that another thread took, and the stop would never come.
    """
    for thread in threads:
        while thread.is_alive():
            thread.join(JOIN_SLICE_SECONDS)


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded once in the parent: a forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


_prctl = _load_prctl()


def die_with_parent(parent_pid: int) -> None:
    """Have PARENT_DEATH_SIGNAL sent to this process when `parent_pid`, its parent, dies.

    Called in a child right after fork or, for a program the parent started,
    first thing after exec (die_with_supervisor), on Linux (elsewhere a child
    outlives a killed parent). The kernel sends the signal when the parent's
    thread that forked the child ends, so children are started from the main
    thread. A parent that died before the signal was armed sends nothing: the
    child then finds another parent and exits at once, having done nothing yet.
    """
    if _prctl is None:
        return
    if _prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}")
    if os.getppid() != parent_pid:
        # Nothing is set up yet, logging included: one plain line says why the process ends.
        os.write(2, f"The parent process (pid {parent_pid}) is gone; exiting before anything started.\n".encode())
        os._exit(ORPHANED_AT_START_STATUS)


def die_with_supervisor() -> None:
    """Under `run all`, tie this driver's life to the supervisor that started it.

    The supervisor names itself in SUPERVISOR_PID_VARIABLE rather than arming the
    signal between fork and exec (preexec_fn), which is unsafe in a process
    with threads, and the supervisor has some (its metrics endpoint). The
    variable is removed at once, so that what this driver starts in turn does
    not take the supervisor for its own parent.
    """
    parent_pid = os.environ.pop(SUPERVISOR_PID_VARIABLE, None)
    if parent_pid is not None:
        die_with_parent(int(parent_pid))


def _worker_main(parent_pid: int, target: Callable[..., None], args: tuple) -> None:
    die_with_parent(parent_pid)
    # Forked with the stop signals blocked: one that came meanwhile (the parent's
    # death included) is delivered now, to this process's own handler.
    stopping = stop_event_on_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        done = target(*args, stopping)
    except ApiUnavailable as error:
        logger.critical("%s", error)
        raise SystemExit(EXIT_API_UNAVAILABLE) from None
    except Exception:
        logger.exception("Uncaught exception in worker process %s.", multiprocessing.current_process().pid)
        raise SystemExit(1) from None
    if done:
        raise SystemExit(WORK_DONE_STATUS)


def run_worker_processes(count: int, target: Callable[..., None], *args) -> int:
    """Run `target(*args, stopping)` in `count` processes until one of them ends.

    When any worker ends (error or stop), the others are asked to stop and the
    exit status is 1, so that a supervisor restarts the whole group. The one
    exception: a worker whose target returned True has finished its work (a
    draining consumer whose queue is gone), and so has the command, with
    status 0; and a worker that gave up waiting for its SQL API makes
    it EXIT_API_UNAVAILABLE. With count < 1 the command idles until it is stopped, as the
    reference does. With count 1, the one worker runs in this process (run_here).
    """
    stopping = stop_event_on_signals()
    if count < 1:
        stopping.wait()
        return 0
    if count == 1:
        return run_here(target, args, stopping)
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker_main, args=(os.getpid(), target, args), name=f"{target.__name__}-{n}")
        for n in range(count)
    ]
    # Until a worker has installed its own handlers, a stop signal would run the
    # inherited one, which sets the parent's event: it must wait (spec 01 §8.3).
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for worker in workers:
            worker.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    while not stopping.is_set() and all(worker.is_alive() for worker in workers):
        stopping.wait(0.5)
    finished = not stopping.is_set() and any(worker.exitcode == WORK_DONE_STATUS for worker in workers)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(WORKER_STOP_TIMEOUT_SECONDS)
        if worker.is_alive():
            logger.error("Worker %s did not stop in time; killing it.", worker.pid)
            worker.kill()
            worker.join()
        metrics.forget_process(worker.pid)
    if any(worker.exitcode == EXIT_API_UNAVAILABLE for worker in workers):
        return EXIT_API_UNAVAILABLE
    return 0 if finished else 1


def run_here(target: Callable[..., None], args: tuple, stopping: threading.Event) -> int:
    """Run one worker in this process, with the exit status a group of one forked worker would give.

    A forked worker would only add a parent that watches it, and a
    process's memory (about 40 MiB): `run all` starts each driver once, so
    it saves three processes. ApiUnavailable propagates, as from any driver.
    """
    try:
        done = target(*args, stopping)
    except ApiUnavailable:
        raise
    except Exception:
        logger.exception("Uncaught exception in worker %s.", target.__name__)
        return 1
    return 0 if done or stopping.is_set() else 1
