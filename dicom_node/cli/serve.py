"""``spinenode serve`` and ``spinenode worker``: the composition root that wires the SCP, the
queue, the reconciler and the workers."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from dicom_node.cli.common import (
    Fatal,
    add_settings_flags,
    announce,
    check_broker_or_stop,
    check_bundle,
    configure_logging,
    prepare_database,
    settings_from,
    stop_on_signal,
)
from dicom_node.config import Settings, load_settings, redact

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from dicom_node.metrics import IntakeCounts
    from dicom_node.scp import StoreSCP
    from workers.tasks import TaskQueue


class EmbeddedWorker:
    """``spinenode serve`` runs one worker as a child process, restarted if it dies."""

    def __init__(self, settings: Settings):
        self._env = {**os.environ, **settings.as_environment()}
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            if self._process is not None:
                logging.getLogger(__name__).warning(
                    "embedded worker exited with %s; restarting it", self._process.returncode)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "worker"], env=self._env)

    def stop(self) -> None:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                return
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()


def _store_scp(settings: Settings, tasks: TaskQueue, counts: IntakeCounts, *,
               first: bool) -> StoreSCP:
    """The SCP of serve's own process (the FIRST) or of a further intake process."""
    from dicom_node.db.session import session_factory
    from dicom_node.scp import PortSharing, StoreSCP, receive_into_spool

    receive_into_spool(settings)
    sharing = (PortSharing.NONE if settings.intake_processes == 1
               else PortSharing.FIRST if first else PortSharing.BESIDE)
    return StoreSCP(settings, session_factory(settings.effective_database_url),
                    tasks.enqueue_analysis, counts, sharing)


def serve_intake(environment: dict[str, str], counts: Queue) -> None:
    """A further intake process of serve (dicom_node.intake_processes): the SCP alone."""
    from dicom_node.intake_processes import ForwardedCounts, stop_with_parent
    from workers.tasks import TaskQueue

    os.environ.update(environment)
    settings = load_settings(None)
    configure_logging(settings)
    stop = stop_on_signal((signal.SIGTERM,))
    stop_with_parent(stop.set)
    scp = _store_scp(settings, TaskQueue(settings), ForwardedCounts(counts), first=False)
    scp.start()
    stop.wait()
    scp.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.cli.web import start_http
    from dicom_node.db.session import session_factory
    from dicom_node.dispatch import Reconciler, remove_incoming_files
    from dicom_node.intake_processes import IntakeProcesses
    from dicom_node.metrics import IntakeMetrics, node_registry
    from dicom_node.study_reports import StudyReporter
    from workers.tasks import TaskQueue

    settings = settings_from(args)
    configure_logging(settings)
    settings.make_dirs()
    prepare_database(settings, upgrade_if_sqlite=True)
    check_bundle(settings)
    tasks = TaskQueue(settings)
    check_broker_or_stop(settings, tasks)
    # Not listening yet: whatever is in incoming was left by an association that never ended.
    remove_incoming_files(settings.incoming_dir, older_than=0)
    sessions = session_factory(settings.effective_database_url)
    registry = node_registry(sessions, tasks.depth)
    metrics = IntakeMetrics(registry)
    scp = _store_scp(settings, tasks, metrics, first=True)
    intake = IntakeProcesses(settings.intake_processes - 1, serve_intake,
                             settings.as_environment(), metrics)
    metrics.processes.set_function(lambda: 1 + len(intake.pids))
    worker = None if args.no_worker else EmbeddedWorker(settings)
    reconciler = Reconciler(settings, sessions, tasks.enqueue_analysis, tasks.depth,
                            enqueue_delivery=tasks.enqueue_delivery,
                            also=worker.ensure_running if worker else None)
    reporter = (StudyReporter(settings, sessions, tasks.enqueue_delivery)
                if settings.result_scope == "study" else None)
    stop = stop_on_signal()
    try:
        scp.start()
    except OSError as error:
        raise Fatal(f"cannot listen on {settings.bind_address} port {settings.port}"
                    f"{f' or TLS port {settings.tls_port}' if settings.tls_port else ''}: "
                    f"{error.strerror or error}") from None
    http = start_http(settings, sessions, tasks, registry)
    if worker is not None:
        worker.ensure_running()
    reconciler.start()
    if reporter is not None:
        reporter.start()
    intake.start()  # last: nothing after it may fail and leave children behind
    broker = "embedded queue" if settings.embedded_broker else redact(settings.broker_url)
    processes = settings.intake_processes
    announce(settings,
             f"spinenode: {settings.ae_title} listening on {scp.listening}"
             f"{f' in {processes} processes' if processes > 1 else ''}; "
             f"database {redact(settings.effective_database_url)}; {broker}; "
             f"spool {settings.spool_dir.resolve()}; "
             f"worker {'embedded' if worker else 'separate (spinenode worker)'}; "
             f"{'page and API ' + http.url if http else 'no HTTP (http_port 0)'}")
    stop.wait()
    announce(settings, "spinenode: stopping")
    intake.stop()
    scp.stop()
    if http is not None:
        http.stop()
    reconciler.stop()
    if reporter is not None:
        reporter.stop()
    if worker is not None:
        worker.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import socket

    from workers.tasks import QUEUE, TaskQueue, worker_app

    settings = settings_from(args)
    configure_logging(settings)
    prepare_database(settings, upgrade_if_sqlite=False)
    check_bundle(settings)
    check_broker_or_stop(settings, TaskQueue(settings))
    app = worker_app(settings)
    # A batching worker is one process that owns the models (and the GPU) and starts its own
    # decoding processes, which a prefork child (a daemon) may not; it runs tasks itself.
    pool = ["--pool", "solo"] if settings.batch_size > 1 else [
        "--pool", "prefork", "--concurrency", str(settings.worker_concurrency)]
    argv = [
        "--quiet",  # no banner: the node logs what the worker does
        "worker", "--queues", QUEUE, *pool,
        "--hostname", f"spinenode-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ]
    if settings.embedded_broker:
        argv.append("--without-heartbeat")  # the file broker has no fan-out exchange
    app.worker_main(argv)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """serve, worker"""
    serve = commands.add_parser("serve", help="run the DICOM node (SCP, queue, reconciler)")
    add_settings_flags(serve, server=True)
    serve.add_argument("--no-worker", action="store_true",
                       help="do not run an embedded worker (run 'spinenode worker' elsewhere)")
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser("worker", help="run a worker that analyses queued instances")
    add_settings_flags(worker)
    worker.add_argument("--concurrency", dest="worker_concurrency", type=int,
                        help="worker processes (default 1)")
    worker.set_defaults(handler=cmd_worker)
