"""A background thread that runs one step now and then until stopped: the reconciler, the study
reporter and the worker heartbeat. A step that raises is logged once per distinct error (not
every few seconds) and tried again next time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, interval: float, step: Callable[[], object],
                 run_first: bool = False):
        self.name = name
        self._interval = interval
        self._step = step
        self._run_first = run_first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        if self._run_first:
            self._step_once()
        while not self._stop.wait(self._interval):
            self._step_once()

    def _step_once(self) -> None:
        try:
            self._step()
            self._last_error = ""
        except Exception as error:  # the database is down, a spool file is gone...
            message = f"{error.__class__.__name__}: {error}".splitlines()[0]
            if message != self._last_error:
                log.warning("%s: %s", self.name, message)
            self._last_error = message
