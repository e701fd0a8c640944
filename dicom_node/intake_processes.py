"""Further intake processes: ``intake_processes - 1`` children of ``serve`` that listen on the
node's ports beside it (SO_REUSEPORT) and store into the same spool, database and queue.

One Python process receives a few hundred MB/s however many senders there are (the GIL: each
association's reading, hashing and writing takes turns), so several modalities sending at once
need several processes. The parent alone runs the reconciler, reporter, HTTP side and worker;
the children only take associations. Each child sends its counts (C-STORE answers, bytes,
rejected associations) to the parent, whose /metrics adds them up; a child that dies is
started again; a child whose parent dies stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue

from dicom_node.metrics import IntakeMetrics

log = logging.getLogger(__name__)

# A child that dies is started again, but not more often than this (one that cannot start at
# all must not spin).
RESTART_PAUSE_SECONDS = 5.0

# What a child runs: (environment of the node's settings, the queue its counts go to).
ChildMain = Callable[[dict[str, str], Queue], None]


class ForwardedCounts:
    """The SCP's counts in a child, sent to the parent's IntakeMetrics (IntakeCounts)."""

    def __init__(self, counts: Queue):
        self._counts = counts

    def stored(self, status: int, calling_ae: str, size: int) -> None:
        self._counts.put(("stored", status, calling_ae, size))

    def rejected(self, reason: str) -> None:
        self._counts.put(("rejected", reason))


def stop_with_parent(stop: Callable[[], None]) -> None:
    """In a child (whose SIGTERM, from the parent, calls STOP): the parent's end, whatever way
    it ended, calls STOP too. Ctrl-C reaches the whole process group; the parent decides, so
    the child ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            stop()

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class IntakeProcesses:
    """``count`` children running ``child_main``, restarted when they die, their counts added to
    ``metrics``."""

    def __init__(self, count: int, child_main: ChildMain, environment: dict[str, str],
                 metrics: IntakeMetrics):
        self._count = count
        self._child_main = child_main
        self._environment = environment
        self._metrics = metrics
        # spawn, not fork: the parent has threads (a forked copy of a held lock deadlocks).
        self._context = multiprocessing.get_context("spawn")
        self._counts: Queue | None = None  # made at start: with no children, nothing to run
        self._children: list[BaseProcess] = []
        self._started_at: list[float] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the supervisor's restart against stop() and pids
        self._threads: list[threading.Thread] = []

    @property
    def pids(self) -> list[int]:
        """The children's process ids (those alive)."""
        with self._lock:
            return [child.pid for child in self._children if child.is_alive() and child.pid]

    def start(self) -> None:
        if not self._count:
            return
        self._counts = self._context.Queue()
        for slot in range(self._count):
            self._children.append(self._spawn(slot))
            self._started_at.append(time.monotonic())
        self._threads = [threading.Thread(target=self._supervise, name="intake-supervisor",
                                          daemon=True),
                         threading.Thread(target=self._add_counts, name="intake-counts",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every child to stop, then wait. A child stops listening and exits at once: a
        C-STORE it had not answered was not acknowledged, so its sender sends it again."""
        with self._lock:  # no restart from here on
            self._stopping.set()
            children = list(self._children)
        for child in children:
            if child.is_alive():
                child.terminate()
        deadline = time.monotonic() + timeout
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                log.warning("intake process %s did not stop in %.0f s: killed", child.pid,
                            timeout)
                child.kill()
                child.join()
        if self._counts is not None:
            self._counts.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _spawn(self, slot: int) -> BaseProcess:
        # daemon: should serve itself exit without stop(), multiprocessing ends them at exit.
        child = self._context.Process(target=self._child_main, name=f"intake-{slot + 1}",
                                      args=(self._environment, self._counts), daemon=True)
        child.start()
        return child

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            sentinels = [child.sentinel for child in self._children]
            multiprocessing.connection.wait(sentinels, timeout=1.0)
            for slot, child in enumerate(self._children):
                if child.is_alive() or self._stopping.is_set():
                    continue
                pause = self._started_at[slot] + RESTART_PAUSE_SECONDS - time.monotonic()
                if pause > 0:
                    self._stopping.wait(pause)
                with self._lock:
                    if self._stopping.is_set():
                        return
                    log.warning("intake process %s exited with %s; starting it again",
                                child.pid, child.exitcode)
                    self._children[slot] = self._spawn(slot)
                    self._started_at[slot] = time.monotonic()

    def _add_counts(self) -> None:
        while (item := self._counts.get()) is not None:
            try:
                kind, *values = item
                if kind == "stored":
                    self._metrics.stored(*values)
                else:
                    self._metrics.rejected(*values)
            except Exception:  # a count lost, not the thread: children block on a full pipe
                log.exception("could not count %r from an intake process", item)
