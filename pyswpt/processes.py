"""Process plumbing shared by the drivers: worker processes and graceful stops."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WORKER_STOP_TIMEOUT_SECONDS = 30.0


def stop_event_on_signals() -> threading.Event:
    """An event that SIGTERM, SIGINT or SIGHUP sets: loops finish their step and return."""
    stopping = threading.Event()

    def request_stop(signum: int, _frame) -> None:
        logger.info("Received %s; stopping after the current step.", signal.Signals(signum).name)
        stopping.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    return stopping


def _worker_main(target: Callable[..., None], args: tuple) -> None:
    stopping = stop_event_on_signals()
    try:
        target(*args, stopping)
    except Exception:
        logger.exception("Uncaught exception in worker process %s.", multiprocessing.current_process().pid)
        raise SystemExit(1) from None


def run_worker_processes(count: int, target: Callable[..., None], *args) -> int:
    """Run `target(*args, stopping)` in `count` processes until one of them ends.

    When any worker ends (error or stop), the others are asked to stop and the
    exit status is 1, so that a supervisor restarts the whole group. With
    count < 1 the command idles until it is stopped, as the reference does.
    """
    stopping = stop_event_on_signals()
    if count < 1:
        stopping.wait()
        return 0
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker_main, args=(target, args), name=f"{target.__name__}-{n}")
        for n in range(count)
    ]
    for worker in workers:
        worker.start()
    while not stopping.is_set() and all(worker.is_alive() for worker in workers):
        stopping.wait(0.5)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(WORKER_STOP_TIMEOUT_SECONDS)
        if worker.is_alive():
            logger.error("Worker %s did not stop in time; killing it.", worker.pid)
            worker.kill()
            worker.join()
    return 1
