"""The embedded queue's broker writes each message whole before a consumer can take it
(workers/file_broker.py): kombu's own filesystem transport leaves an empty message file for a
moment, which a consumer takes and cannot read. And an acknowledgement wakes its consumer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import filesystem

from workers import file_broker


def _takeable_while_writing(transport: type, folder: Path, monkeypatch: pytest.MonkeyPatch
                            ) -> list[str]:
    """Put one message; the files a consumer would take (``*.msg``, what kombu's _get lists)
    at the moment the message is being serialised, i.e. before its bytes are in the file."""
    seen: list[str] = []
    module = file_broker if transport is file_broker.Transport else filesystem

    def dumps_and_look(payload: object) -> str:
        seen.extend(name for name in sorted(p.name for p in folder.iterdir())
                    if name.endswith(".msg"))
        return json.dumps(payload)

    monkeypatch.setattr(module, "dumps", dumps_and_look)
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    with Connection("filesystem://", transport=transport, transport_options=options) as conn:
        conn.default_channel._put("analysis", {"body": "x"})
    return seen


def test_kombus_own_transport_shows_an_empty_message(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # What the fix is for: kombu's file is takeable before its bytes are written.
    assert len(_takeable_while_writing(filesystem.Transport, tmp_path, monkeypatch)) == 1


def test_a_message_is_takeable_only_once_written(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert _takeable_while_writing(file_broker.Transport, tmp_path, monkeypatch) == []
    monkeypatch.undo()
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    with Connection("filesystem://", transport=file_broker.Transport,
                    transport_options=options) as conn:
        assert conn.default_channel._get("analysis") == {"body": "x"}
    assert list(tmp_path.iterdir()) == []  # taken, and no partial file left behind


def test_the_embedded_queue_uses_it(tmp_path: Path) -> None:
    from dicom_node.config import load_settings
    from workers.tasks import TaskQueue

    settings = load_settings(data_dir=tmp_path)
    settings.make_dirs()
    queue = TaskQueue(settings)
    with queue.app.connection_for_write() as connection:
        assert isinstance(connection.transport, file_broker.Transport)
    queue.enqueue_analysis(7)
    assert queue.depth() == 1
    assert [p.suffix for p in settings.queue_dir.iterdir() if p.is_file()] == [".msg"]


@contextmanager
def _queue_holding(tmp_path: Path, name: str, count: int) -> Iterator[tuple[Connection, Queue]]:
    """A connection through our transport (a 60 s polling interval) and queue ``name`` holding
    ``count`` messages, {"n": 1} onwards. Each test takes a name of its own: kombu keeps exchange
    bindings per process, across connections."""
    (tmp_path / "control").mkdir()
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path),
               "control_folder": str(tmp_path / "control"), "polling_interval": 60}
    queue = Queue(name, Exchange(name), name)
    with Connection("filesystem://", transport=file_broker.Transport,
                    transport_options=options) as conn:
        for number in range(1, count + 1):
            conn.Producer().publish({"n": number}, exchange=queue.exchange, routing_key=name,
                                    declare=[queue])
        yield conn, queue


def test_an_acknowledgement_wakes_the_consumer(tmp_path: Path) -> None:
    """With one message in flight (prefetch 1, as the workers run), the next is taken when the
    first is acknowledged, not at the consumer's next look a polling interval later."""
    taken: list = []
    with _queue_holding(tmp_path, "wakes", 2) as (conn, queue):
        with conn.Consumer(queue, callbacks=[lambda body, message: taken.append(message)],
                           prefetch_count=1):
            conn.drain_events(timeout=5)
            assert len(taken) == 1  # either one: both were put in the same millisecond
            second = threading.Thread(target=conn.drain_events, daemon=True)
            second.start()
            time.sleep(0.3)  # it looks, finds the first still in flight, and waits
            taken[0].ack()  # as the worker's result thread does when the task is done
            # Woken by the ack; unwoken, it would look again only after the 60 s interval.
            second.join(timeout=10)
            assert not second.is_alive()
    assert sorted(m.payload["n"] for m in taken) == [1, 2]


def test_a_late_acknowledgement_after_the_channel_closed_is_quiet(tmp_path: Path) -> None:
    """A task finishing after its worker's connection was closed (a restart) acks into a closed
    channel: that must not raise (Celery would log a traceback for it)."""
    taken: list = []
    with _queue_holding(tmp_path, "late", 1) as (conn, queue):
        with conn.Consumer(queue, callbacks=[lambda body, message: taken.append(message)],
                           prefetch_count=1):
            conn.drain_events(timeout=5)
        channel = taken[0].channel
        channel.close()
        assert channel.connection is None  # what kombu does to a closed channel
        taken[0].ack()


def test_an_idle_consumer_returns_as_soon_as_its_worker_is_asked_to_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery looks at a stop request (SIGTERM sets it) only between drain_events calls, and
    asks for 2 s each: an idle worker went on looking for the rest of them. It stops at the
    next look instead, whatever the timeout; not asked to, it waits the timeout out."""
    from celery.worker import state

    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path),
               "polling_interval": 0.1}
    with Connection("filesystem://", transport=file_broker.Transport,
                    transport_options=options) as conn:
        queue = Queue("stops", Exchange("stops"), "stops")
        with conn.Consumer(queue, callbacks=[lambda body, message: None]):
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.5)
            assert time.monotonic() - start >= 0.5
            monkeypatch.setattr(state, "should_stop", 0)  # a warm stop's exit code, EX_OK
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=60)
            assert time.monotonic() - start < 30
