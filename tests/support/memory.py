"""The memory a process tree holds, sampled while something runs."""

from __future__ import annotations

import threading

import psutil


def tree_rss(pid: int) -> int:
    """Resident bytes of PID and all its children (the node's worker, its pool, ...)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass  # ended between the listing and the asking
    return total


class PeakRss:
    """Samples a process tree's RSS every INTERVAL seconds from start to stop."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self.first = self.peak = self.last = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last = tree_rss(self.pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.pid))
