"""The outbox: deliveries of our objects to destinations (C-STORE to a DICOM peer, STOW-RS to a
DICOMweb server), retried with exponential backoff until the peer has them, or dead-lettered
(status failed) with the reason."""

from __future__ import annotations

import base64
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import code_to_category
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination, Settings
from dicom_node.db.leases import abandoned_or, extend, renewed, take, when_database_returns
from dicom_node.db.models import Delivery, DeliveryStatus, Output, utcnow
from dicom_node.tls import client_context

log = logging.getLogger(__name__)


def destinations_for(settings: Settings, calling_ae: str) -> list[Destination]:
    """Where the results of an image from ``calling_ae`` go."""
    replies = [d for d in settings.reply_to_calling_ae if d.ae_title == calling_ae]
    chosen = list(settings.destinations)
    chosen += [d for d in replies if d.address not in {c.address for c in chosen}]
    return chosen


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: base * 2^(attempts - 1), capped."""
    return min(settings.delivery_retry_seconds * 2 ** max(attempts - 1, 0),
               settings.delivery_max_backoff_seconds)


def retry_delay(settings: Settings, attempts: int) -> float:
    """The backoff give or take 20 %: deliveries that failed together (a PACS went down) do
    not all come back to it in the same second when it recovers."""
    return backoff_seconds(settings, attempts) * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class DeliveryOutcome:
    status: str  # delivered, pending (retry later), failed (dead letter), skipped (not ours)
    retry_in: float | None = None
    reason: str = ""


def _pending_before(moment: datetime) -> ColumnElement[bool]:
    return (Delivery.status == DeliveryStatus.PENDING) & (Delivery.next_attempt_at <= moment)


_SENDING = Delivery.status == DeliveryStatus.SENDING


def _claim(sessions: sessionmaker[Session], delivery_id: int,
           lease_seconds: int) -> tuple[Path, Destination, int] | None:
    with sessions.begin() as session:
        if not take(session, Delivery, delivery_id, _pending_before(utcnow()), _SENDING,
                    lease_seconds, status=DeliveryStatus.SENDING):
            return None
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        return Path(delivery.output.path), Destination.parse(delivery.destination), \
            delivery.attempts


def _renew_lease(sessions: sessionmaker[Session], delivery_id: int, lease_seconds: int) -> None:
    with sessions.begin() as session:
        extend(session, Delivery, (Delivery.id == delivery_id) & _SENDING, lease_seconds)


def deliver(settings: Settings, sessions: sessionmaker[Session],
            delivery_id: int) -> DeliveryOutcome:
    """Send one delivery if it is due. A database that cannot be reached before the send
    raises (the task retries); after the send, its result is written as soon as the database
    answers, so that a peer that has the object is not sent it again."""
    lease = settings.task_lease_seconds
    claimed = _claim(sessions, delivery_id, lease)
    if claimed is None:
        return DeliveryOutcome("skipped", reason="not due, or delivered, or held elsewhere")
    path, destination, attempts = claimed
    with renewed(lambda: _renew_lease(sessions, delivery_id, lease), lease):
        try:
            result = (stow_file(path, destination, settings.dicomweb_secrets_dir,
                                Timeouts.of(settings))
                      if destination.url else
                      send_file(path, destination, settings.ae_title, settings.max_pdu,
                                Timeouts.of(settings),
                                tls=client_context(settings) if destination.tls else None))
        except Exception as error:  # a missing file, a network error: try again later
            result_reason = f"{error.__class__.__name__}: {error}"
            delivered, permanent = False, not path.exists()
        else:
            result_reason, delivered, permanent = (result.reason, result.delivered,
                                                   result.permanent)
    return when_database_returns(
        lambda: _record_attempt(settings, sessions, delivery_id, destination, attempts,
                                delivered, permanent, result_reason),
        settings.outage_patience_seconds, f"recording delivery {delivery_id}")


def _record_attempt(settings: Settings, sessions: sessionmaker[Session], delivery_id: int,
                    destination: Destination, attempts: int, delivered: bool, permanent: bool,
                    result_reason: str) -> DeliveryOutcome:
    now = utcnow()
    with sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.lease_until = None
        delivery.last_error = result_reason
        if delivered:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = now
            log.info("delivery %d to %s done", delivery_id, destination.address,
                     extra={"delivery_id": delivery_id})
            return DeliveryOutcome("delivered", reason=result_reason)
        if permanent or attempts >= settings.max_delivery_attempts:
            delivery.status = DeliveryStatus.FAILED
            if not permanent:
                delivery.last_error = f"gave up after {attempts} attempts; last: {result_reason}"
            log.warning("delivery %d to %s failed for good: %s", delivery_id,
                        destination.address, delivery.last_error)
            return DeliveryOutcome("failed", reason=delivery.last_error)
        delay = retry_delay(settings, attempts)
        delivery.status = DeliveryStatus.PENDING
        delivery.next_attempt_at = now + timedelta(seconds=delay)
        log.info("delivery %d to %s will be retried in %.0f s: %s", delivery_id,
                 destination.address, delay, result_reason)
        return DeliveryOutcome("pending", retry_in=delay, reason=result_reason)


def due_deliveries(sessions: sessionmaker[Session], lease_seconds: float,
                   due_before: datetime | None = None) -> list[int]:
    """Pending deliveries due (before ``due_before``, default now), and sends whose worker died
    (lease ran out before ``due_before``)."""
    before = due_before or utcnow()
    due = abandoned_or(Delivery, _pending_before(before), _SENDING, before, lease_seconds)
    with sessions() as session:
        return list(session.scalars(select(Delivery.id).where(due).order_by(Delivery.id)).all())


def retry_deliveries(sessions: sessionmaker[Session], ids: list[int] | None,
                     enqueue_delivery: Callable[[int], None]) -> list[int]:
    """Make failed deliveries (these, or all of them) due again with a fresh attempt count, and
    queue them (one the queue misses is due: the reconciler sends it)."""
    with sessions.begin() as session:
        query = select(Delivery).where(Delivery.status == DeliveryStatus.FAILED)
        if ids is not None:
            query = query.where(Delivery.id.in_(ids))
        rows = session.scalars(query).all()
        for delivery in rows:
            delivery.status = DeliveryStatus.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = utcnow()
        retried = [delivery.id for delivery in rows]
    for delivery_id in retried:
        enqueue_delivery(delivery_id)
    return retried


def list_deliveries(sessions: sessionmaker[Session], status: str | None = None,
                    limit: int = 100) -> list[dict]:
    query = (select(Delivery, Output).join(Delivery.output)
             .order_by(Delivery.id.desc()).limit(limit))
    if status:
        query = query.where(Delivery.status == status)
    with sessions() as session:
        return [
            {"id": delivery.id, "status": delivery.status, "destination": delivery.destination,
             "kind": output.kind, "sop_instance_uid": output.sop_instance_uid,
             "attempts": delivery.attempts, "last_error": delivery.last_error,
             "next_attempt_at": delivery.next_attempt_at.isoformat(timespec="seconds"),
             "delivered_at": delivery.delivered_at.isoformat(timespec="seconds")
             if delivery.delivered_at else None}
            for delivery, output in session.execute(query).all()
        ]


# Statuses that mean "try again later" (PS3.4 B.2.3: out of resources); other failures are the
# object's or the peer's configuration's fault, and repeating them changes nothing.
_TRANSIENT_STATUS_PREFIX = 0xA700


@dataclass(frozen=True)
class SendResult:
    delivered: bool
    permanent: bool  # a failure that retrying will not cure
    reason: str


def _refused(destination: Destination, sop_class, syntax, result: int | None) -> SendResult:  # noqa: ANN001
    detail = f" (presentation context result {result:#04x})" if result is not None else ""
    return SendResult(False, True, f"{destination.address} refused {sop_class.name} in "
                                   f"{syntax.name}{detail}")


@dataclass(frozen=True)
class Timeouts:
    """How long the sender waits, in seconds: for the connection and the association's answer
    (ACSE), for the C-STORE response (DIMSE), and on a silent connection (network). The SCP's
    settings."""

    acse: float = 30.0
    dimse: float = 30.0
    network: float = 60.0

    @classmethod
    def of(cls, settings: Settings) -> Timeouts:
        return cls(settings.acse_timeout_seconds, settings.dimse_timeout_seconds,
                   settings.network_timeout_seconds)


def requesting_ae(calling_ae: str, timeouts: Timeouts) -> AE:
    """An AE that asks a peer for associations, waiting only as long as ``timeouts`` say."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (timeouts.acse, timeouts.dimse,
                                                             timeouts.network)
    # pynetdicom's connect waits as long as the kernel does: over 2 minutes for a firewall
    # that drops the connection, with the worker (or an admin's `spinenode echo`) held.
    ae.connection_timeout = timeouts.acse
    return ae


def send_file(path: Path, destination: Destination, calling_ae: str, max_pdu: int,
              timeouts: Timeouts = Timeouts(), tls: ssl.SSLContext | None = None  # noqa: B008
              ) -> SendResult:
    ds = dcmread(path)
    sop_class = ds.SOPClassUID
    syntax = ds.file_meta.TransferSyntaxUID
    ae = requesting_ae(calling_ae, timeouts)
    ae.maximum_pdu_size = max_pdu
    # This object's SOP class in its own transfer syntax and, where that is compressed, in
    # Explicit VR Little Endian: a PACS that takes no JPEG still gets the object, decompressed.
    ae.add_requested_context(sop_class, syntax)
    if syntax.is_compressed:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=(tls, destination.host) if tls else None)
    if not assoc.is_established and assoc.rejected_contexts:
        # The peer answered but took none of our contexts: pynetdicom then aborts.
        return _refused(destination, sop_class, syntax, assoc.rejected_contexts[0].result)
    if not assoc.is_established:
        if assoc.is_rejected:
            return SendResult(False, False, f"{destination.address} rejected the association")
        return SendResult(False, False, f"no association with {destination.address} "
                                        "(peer down or unreachable)")
    try:
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                     if cx.abstract_syntax == sop_class}
        if not accepted:
            rejected = assoc.rejected_contexts[0] if assoc.rejected_contexts else None
            return _refused(destination, sop_class, syntax,
                            rejected.result if rejected is not None else None)
        if syntax not in accepted:
            # To Explicit VR Little Endian, the context the peer took. The same pixels, so the
            # same object: its UID stays (pydicom would make a new one).
            ds.decompress(generate_instance_uid=False)
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return SendResult(False, False, f"no C-STORE response from {destination.address}")
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return SendResult(True, False, "" if code == 0 else f"delivered with warning {code:#06x}")
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    reason = f"{destination.address} answered {code:#06x} ({category}){comment}"
    return SendResult(False, (code & 0xFF00) != _TRANSIENT_STATUS_PREFIX, reason)


# HTTP answers that may change if asked again later (PS3.18 10.5.3: 409 is a conflict the
# server may resolve; 408/429 and 5xx are the server's trouble); others are the object's fault.
_TRANSIENT_HTTP = {408, 409, 429}


def stow_file(path: Path, destination: Destination, secrets_dir: Path | None,
              timeouts: Timeouts = Timeouts()) -> SendResult:  # noqa: B008
    """STOW-RS one of our objects to a DICOMweb server (with the credentials in its secrets
    file, if one is there). As for a DICOM peer, connecting and sending wait at most
    ``timeouts.acse`` for each step, and the answer may go silent at most ``timeouts.dimse``."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    headers = {}
    credentials = _credentials(destination, secrets_dir)
    if credentials:
        headers["Authorization"] = credentials
    ds = dcmread(path)
    client = DICOMwebClient(destination.url, headers=headers,
                            timeout=(timeouts.acse, timeouts.dimse))
    # dicomweb-client tries each request 5 times over 30 s, on any exception and on 408, 429,
    # 503 and 504, inside the task: a worker (the analysis worker, on the embedded default)
    # sat 30 s on a server that was down, and then the outbox's backoff came on top. One try
    # a task; the outbox decides when the next is.
    client.set_http_retry_params(retry=False)
    try:
        response = client.store_instances([ds])
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        permanent = 400 <= status < 500 and status not in _TRANSIENT_HTTP
        return SendResult(False, permanent, f"{destination.url} answered HTTP {status}")
    except requests.RequestException as error:
        return SendResult(False, False, f"no answer from {destination.url} "
                                        f"({error.__class__.__name__})")
    failed = response.get("FailedSOPSequence", [])
    if failed:
        reason = int(failed[0].get("FailureReason", 0))
        return SendResult(False, (reason & 0xFF00) != _TRANSIENT_STATUS_PREFIX,
                          f"{destination.url} refused the object (failure reason "
                          f"{reason:#06x})")
    return SendResult(True, False, "")


def _credentials(destination: Destination, secrets_dir: Path | None) -> str:
    """The Authorization value for a DICOMweb host: its file in the secrets folder, named
    after the host (and port, as host_port), holding "Bearer <token>" or
    "Basic <user>:<password>"."""
    if secrets_dir is None:
        return ""
    parts = urlsplit(destination.url)
    name = parts.hostname + (f"_{parts.port}" if parts.port else "")
    path = secrets_dir / name
    if not path.is_file():
        return ""
    scheme, _, value = path.read_text().strip().partition(" ")
    if scheme.lower() == "basic" and ":" in value:
        return "Basic " + base64.b64encode(value.encode()).decode()
    return f"{scheme} {value}"
