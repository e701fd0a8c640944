"""The DICOM service class provider: C-ECHO and C-STORE over pynetdicom.

The C-STORE handler has the intake record the instance (status ``received``) and answers; a
dispatcher thread then sends the analysis task and marks the row ``queued``, so a slow broker
never delays the answer. If sending fails (broker down, node killed) the row stays ``received``
and the reconciler sends it later.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import socket
import tempfile
import threading

from pydicom import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import pynetdicom_fixes, receiving, waking_reactor
from dicom_node.config import Settings
from dicom_node.intake import Enqueue, Intake, StoreStatus, mark_queued
from dicom_node.metrics import IntakeCounts
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, decodable_transfer_syntaxes
from dicom_node.tls import server_context

log = logging.getLogger(__name__)


def _status(status: StoreStatus, comment: str) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    if comment:
        response.ErrorComment = comment[:64]  # LO
    return response


def receive_into_spool(settings: Settings) -> None:
    """Make pynetdicom stream each data set to a file instead of memory, in the spool's own
    folder, so that keeping it is a rename (and it never lands in a world-readable system temp
    dir). Both are process-wide (pynetdicom has no per-AE option): the serve command sets them
    once, before the SCP starts."""
    settings.make_dirs()
    _config.STORE_RECV_CHUNKED_DATASET = True
    receiving.install()
    tempfile.tempdir = str(settings.incoming_dir.resolve())


class Dispatcher:
    """A thread that sends analysis tasks for freshly stored instances, in batches."""

    def __init__(self, sessions: sessionmaker[Session], enqueue: Enqueue):
        self._sessions = sessions
        self._enqueue = enqueue
        self._pending: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, instance_id: int) -> None:
        self._pending.put(instance_id)

    def stop(self, timeout: float = 10.0) -> None:
        self._pending.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._pending.get()]
            while True:  # take what else is waiting: one DB update for the lot
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            sent = []
            for instance_id in (i for i in batch if i is not None):
                try:
                    self._enqueue(instance_id)
                    sent.append(instance_id)
                except Exception as error:  # broker down: the reconciler sends it later
                    log.warning("could not queue instance %d: %s", instance_id, error)
            try:
                mark_queued(self._sessions, sent, reason="")
            except Exception as error:
                log.warning("could not mark %d instances queued: %s", len(sent), error)


class SharedPortServer(ThreadedAssociationServer):
    """A listener that other processes of this node (same user) may bind beside: the kernel
    hands each new connection to one of them (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class FirstSharedPortServer(SharedPortServer):
    """The node's first listener on a shared port. It must find the port free, as a plain
    listener would: else a second node started by mistake on the same port would bind beside
    this one and silently take a share of the associations into its own data dir."""

    def server_bind(self) -> None:
        with socket.socket(self.address_family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(self.server_address)  # EADDRINUSE where anything listens there
        super().server_bind()


class PortSharing(enum.Enum):
    """How a StoreSCP listens: alone, as the first of the node's intake processes on its
    ports, or beside that first one."""

    NONE = ThreadedAssociationServer
    FIRST = FirstSharedPortServer
    BESIDE = SharedPortServer


class StoreSCP:
    """The listening node: stores what it is sent and hands it to the dispatcher. The process
    must have called ``receive_into_spool`` first. Where the node has several intake processes
    (dicom_node.intake_processes), each has a StoreSCP on the same ports (``sharing``)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue,
                 metrics: IntakeCounts | None = None,
                 sharing: PortSharing = PortSharing.NONE):
        self.settings = settings
        self.metrics = metrics
        self._allowed = settings.allowed_peers
        self.intake = Intake(settings, sessions)
        self.dispatcher = Dispatcher(sessions, enqueue)
        self.ae = self._make_ae()
        self._server_class = sharing.value
        self._servers: list[ThreadedAssociationServer] = []

    def _make_ae(self) -> AE:
        pynetdicom_fixes.apply()  # process-wide; applying it again changes nothing
        waking_reactor.install()
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout_seconds
        ae.dimse_timeout = self.settings.dimse_timeout_seconds
        ae.network_timeout = self.settings.network_timeout_seconds
        # Called and calling AE (with the peer's address) are checked by handle_request, which
        # can say why and count it; pynetdicom's own checks stay off.
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def refusal(self, called_ae: str, calling_ae: str, address: str) -> tuple[int, str] | None:
        """(PS3.8 diagnostic, reason) to reject an association request with, or None."""
        if self.settings.require_called_ae and called_ae.strip() != self.settings.ae_title:
            return 0x07, "called-ae"  # called AE title not recognised
        peers = self._allowed
        if peers and not any(peer.admits(calling_ae.strip(), address) for peer in peers):
            return 0x03, "not-allowed"  # calling AE title not recognised
        return None

    def handle_request(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling, called = request.calling_ae_title, request.called_ae_title
        address = assoc.requestor.address
        refused = self.refusal(called, calling, address)
        if refused is None:
            return
        diagnostic, reason = refused
        log.warning("association rejected: calling AE %r from %s to called AE %r: %s", calling,
                    address, called, reason)
        if self.metrics is not None:
            self.metrics.rejected(reason)
        assoc.acse.send_reject(0x01, 0x01, diagnostic)  # rejected-permanent, by the service user
        assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out

    def handle_store(self, event: evt.Event) -> Dataset | int:
        sha256 = receiving.finish(event.dataset_path)
        size = os.path.getsize(event.dataset_path) if self.metrics else 0
        response = self._store(event, sha256)
        if self.metrics is not None:
            status = response if isinstance(response, int) else int(response.Status)
            self.metrics.stored(status, event.assoc.requestor.ae_title, size)
        return response

    def _store(self, event: evt.Event, sha256: str | None) -> Dataset | int:
        request = event.request
        try:
            outcome = self.intake.store(
                event.dataset_path,
                sha256=sha256,
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                calling_ae=event.assoc.requestor.ae_title,
                called_ae=event.assoc.acceptor.ae_title,
            )
        except Exception:
            # Unknown trouble: ask the sender to try again later rather than lose the image.
            log.exception("unexpected error storing an instance")
            return _status(StoreStatus.OUT_OF_RESOURCES, "internal error, retry later")
        if outcome.enqueue and outcome.instance_id is not None:
            self.dispatcher.submit(outcome.instance_id)
        if outcome.status != StoreStatus.SUCCESS:
            return _status(outcome.status, outcome.message)
        return 0x0000

    def start(self) -> None:
        """Listen on the plain port (unless tls_only) and on the TLS port (if set)."""
        self.dispatcher.start()
        handlers = [(evt.EVT_REQUESTED, self.handle_request),
                    (evt.EVT_C_STORE, self.handle_store)]
        for port, tls in self._ports():
            address = (self.settings.bind_address, port)
            # What AE.start_server(block=False) does, with our server class (the AE's list of
            # servers is where it counts active associations and what shutdown() leaves).
            server = self.ae.make_server(
                address, evt_handlers=handlers, server_class=self._server_class,
                ssl_context=server_context(self.settings) if tls else None)
            threading.Thread(target=server.serve_forever, name=f"listener:{port}",
                             daemon=True).start()
            self.ae._servers.append(server)
            self._servers.append(server)
            log.info("%s listening on %s:%d%s", self.settings.ae_title, *address,
                     " (DICOM TLS)" if tls else "")

    def _ports(self) -> list[tuple[int, bool]]:
        """(port, over TLS): the plain port unless tls_only, and the TLS port if set."""
        ports = [] if self.settings.tls_only else [(self.settings.port, False)]
        return ports + ([(self.settings.tls_port, True)] if self.settings.tls_port else [])

    @property
    def listening(self) -> str:
        """Where associations are taken, for the start-up line."""
        return " and ".join(f"{self.settings.bind_address}:{port}{' (DICOM TLS)' if tls else ''}"
                            for port, tls in self._ports())

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self.dispatcher.stop()
