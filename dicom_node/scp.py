"""The DICOM service class provider: C-ECHO and C-STORE over pynetdicom.

The C-STORE handler has the intake record the instance (status ``received``) and answers; a
dispatcher thread then sends the analysis task and marks the row ``queued``, so a slow broker
never delays the answer. If sending fails (broker down, node killed) the row stays ``received``
and the reconciler sends it later.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading

from pydicom import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.intake import Enqueue, Intake, StoreStatus, mark_queued
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, decodable_transfer_syntaxes

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


class StoreSCP:
    """The listening node: stores what it is sent and hands it to the dispatcher. The process
    must have called ``receive_into_spool`` first."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue):
        self.settings = settings
        self.intake = Intake(settings, sessions)
        self.dispatcher = Dispatcher(sessions, enqueue)
        self.ae = self._make_ae()
        self._server = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = self.settings.max_associations
        ae.require_called_aet = self.settings.require_called_ae
        if self.settings.allowed_calling_aes:
            ae.require_calling_aet = list(self.settings.allowed_calling_aes)
        ae.add_supported_context(Verification)
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def handle_store(self, event: evt.Event) -> Dataset | int:
        request = event.request
        try:
            outcome = self.intake.store(
                event.dataset_path,
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
        self.dispatcher.start()
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        address = (self.settings.bind_address, self.settings.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        log.info("%s listening on %s:%d", self.settings.ae_title, *address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.dispatcher.stop()
