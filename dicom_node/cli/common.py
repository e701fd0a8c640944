"""What every command group shares: settings flags, logging, the one-line failure, start-up
checks of the database, the broker and the bundle."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import Settings, load_settings, redact

if TYPE_CHECKING:
    from workers.tasks import TaskQueue


def add_settings_flags(parser: argparse.ArgumentParser, server: bool = False) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, help="spool, queue and default database folder")
    parser.add_argument("--database-url", help="sqlite:///... or postgresql://...")
    parser.add_argument("--broker-url", help="'embedded' (default) or redis://host:6379/0")
    if server:
        parser.add_argument("--ae-title", help="our AE title (default SPINENODE)")
        parser.add_argument("--bind-address", help="address to listen on (default 0.0.0.0)")
        parser.add_argument("--port", type=int, help="port to listen on (default 11112)")
        parser.add_argument("--http-port", type=int,
                            help="results API and page port (default 8080, 0 = off)")


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in ("data_dir", "database_url", "broker_url", "ae_title", "bind_address", "port",
                     "http_port", "worker_concurrency")
    }
    return load_settings(getattr(args, "config", None), **overrides)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        from dicom_node.log_format import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    logging.captureWarnings(True)  # pydicom's warnings as log lines, in the same format
    # pynetdicom logs every PDU at INFO; the node logs what matters itself.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # "no hostname" for files


def announce(settings: Settings, message: str) -> None:
    """A line for whoever started the node: printed, or logged where logs are JSON (so that
    every line of the output is one JSON object)."""
    if settings.log_format == "json":
        logging.getLogger("spinenode").info(message)
    else:
        print(message, flush=True)


class StopRequest:
    """Set by a signal, or by ``set()`` from any thread; ``wait()`` (one thread) returns once
    it is. The signal handler only writes a byte to a pipe. One that set a threading.Event
    deadlocked: Python runs a handler between any two lines of the main thread, the first
    handler's included, so a second SIGTERM (docker stop on the parent, which passes it on to
    its children, beside a kill of the whole group) found the first holding the Event's lock."""

    def __init__(self, signals: tuple[signal.Signals, ...]):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        for signum in signals:
            signal.signal(signum, self.set)

    def set(self, *_: object) -> None:
        try:
            os.write(self._write, b"x")
        except BlockingIOError:  # the pipe is full: asked many times already
            pass

    def wait(self) -> None:
        os.read(self._read, 1)


def stop_on_signal(signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
                   ) -> StopRequest:
    """A stop request set by SIGINT or SIGTERM (Ctrl-C, docker stop), from now on: a command
    asks for it before it starts anything, so a stop during start-up is a clean stop too."""
    return StopRequest(signals)


class Fatal(Exception):
    """Stop with this one line and exit status 2."""


def prepare_database(settings: Settings, upgrade_if_sqlite: bool) -> None:
    from alembic.script import ScriptDirectory

    from dicom_node.db import migrate

    url = settings.effective_database_url
    try:
        if upgrade_if_sqlite and url.startswith("sqlite"):
            migrate.upgrade(url)
            return
        current = migrate.current_revision(url)
    except Exception as error:
        raise Fatal(f"cannot use database {redact(url)}: {error.__class__.__name__}: "
                    f"{str(error).splitlines()[0]}") from None
    head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    if current != head:
        raise Fatal(f"database {redact(url)} is at revision {current}, not {head}: "
                    "run 'spinenode db upgrade'")


def check_broker_or_stop(settings: Settings, tasks: TaskQueue) -> None:
    """Refuse to start when the broker will not let us in; a broker that is merely down is said
    once and waited for (the node keeps what it receives; the reconciler queues it later)."""
    if settings.embedded_broker:
        return
    from workers.tasks import BrokerUnusable

    try:
        unreachable = tasks.check()
    except BrokerUnusable as error:
        raise Fatal(f"broker {redact(settings.broker_url)} refused us: {error}") from None
    if unreachable:
        logging.getLogger(__name__).warning(
            "broker %s unreachable (%s): images are kept and queued once it is back",
            redact(settings.broker_url), unreachable)


def check_bundle(settings: Settings) -> None:
    """A configured bundle must load (schema, files, checksums) before we take any work."""
    if settings.bundle is None:
        return
    from workers.bundle import BundleError, load_bundle

    try:
        load_bundle(settings.bundle, public_key=settings.bundle_public_key)
    except BundleError as error:
        raise Fatal(str(error)) from None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it): for the demo's peers
    (and the tests' and benchmarks')."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
