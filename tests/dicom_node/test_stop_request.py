"""The stop request of serve, web and the intake processes: a signal that arrives while the
handler of the one before is still running (Python runs a handler between any two lines of the
main thread, a running handler's included) must not deadlock it."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from dicom_node.cli.common import stop_on_signal


@pytest.fixture
def own_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_during_the_handler_of_the_one_before(own_handlers: None) -> None:
    stop = stop_on_signal()
    handler = signal.getsignal(signal.SIGTERM)
    nested = []

    def second_signal_at_every_line(frame, event, arg):  # noqa: ANN001, ANN202
        # The handler again at each line that the first call runs, as a second SIGTERM would.
        if event == "line" and not nested:
            nested.append(frame.f_lineno)
            handler(signal.SIGTERM, None)
            nested.pop()
        return second_signal_at_every_line

    def first_signal() -> None:
        sys.settrace(second_signal_at_every_line)
        try:
            handler(signal.SIGTERM, None)
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=first_signal, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the handler deadlocked on a second signal"
    stop.wait()  # and the request stands


def test_a_request_from_another_thread_ends_the_wait(own_handlers: None) -> None:
    stop = stop_on_signal()
    threading.Timer(0.1, stop.set).start()
    stop.wait()
