"""Receiving one instance: check it, spool it durably, record it. The C-STORE handler's work.

Order matters (nothing acknowledged is ever lost): the file is fsynced and renamed into the spool,
then one DB transaction records it, and only then may the caller answer 0x0000. Any failure on
the way returns a PS3.4 failure status and leaves nothing that claims to be stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.db.models import (
    Instance,
    InstanceEvent,
    InstanceStatus,
    Output,
    Patient,
    Series,
    Study,
    utcnow,
)
from dicom_node.files import fsync_dir, fsync_file, sha256_of
from dicom_node.results.identity import MANUFACTURER, MODEL_NAME
from dicom_node.routing import RoutingDecision, modality_of, route
from dicom_node.sop_classes import IMAGE_SOP_CLASS_MODALITY

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]  # hands an instance (by id) to the workers' queue

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_REQUIRED_IMAGE_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated", "PixelData")


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class IntakeRefused(Exception):
    def __init__(self, status: StoreStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoreOutcome:
    status: StoreStatus
    message: str
    instance_id: int | None = None
    enqueue: bool = False  # a new analysis is due: hand the instance to the queue


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and bool(_UID.match(value))


def spool_path_for(spool_dir: Path, sop_instance_uid: str, sha256: str) -> Path:
    """Where an instance's bytes live; derived from the (validated) UID, never a raw peer string.

    Two hash-named levels keep any one folder small; the content hash keeps every revision.
    """
    if not is_valid_uid(sop_instance_uid):
        raise ValueError(f"not a UID: {sop_instance_uid!r}")
    bucket = hashlib.sha1(sop_instance_uid.encode()).hexdigest()
    return spool_dir / bucket[:2] / bucket[2:4] / f"{sop_instance_uid}.{sha256[:16]}.dcm"


def read_header(path: Path) -> Dataset:
    """Parse everything but the bulk values, and check that the bulk values are really there."""
    try:
        ds = dcmread(path, defer_size=4096)
    except Exception as error:  # pydicom raises many kinds on garbage; none may reach the peer
        raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                            f"unreadable data set: {error}") from None
    if ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
        file_size = path.stat().st_size
        for tag in list(ds.keys()):
            element = ds.get_item(tag, keep_deferred=True)
            if (
                isinstance(element, RawDataElement)
                and element.length != 0xFFFFFFFF
                and element.value_tell + element.length > file_size
            ):
                raise IntakeRefused(
                    StoreStatus.CANNOT_UNDERSTAND,
                    f"truncated data set: element {tag} runs past the end of the data",
                )
    return ds


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise IntakeRefused(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is not a number"
        ) from None


def check_dataset(ds: Dataset, command_sop_class: str, command_sop_instance: str,
                  max_pixels: int) -> None:
    """Refuse what does not match its SOP class or its C-STORE request."""
    bad = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    for keyword in _REQUIRED_UIDS:
        value = str(ds.get(keyword, "") or "")
        if not value:
            raise IntakeRefused(bad, f"{keyword} is missing")
        if not is_valid_uid(value):
            raise IntakeRefused(bad, f"{keyword} is not a valid UID")
    if ds.SOPClassUID != command_sop_class:
        raise IntakeRefused(bad, "SOP Class UID differs from the C-STORE request's")
    if ds.SOPInstanceUID != command_sop_instance:
        raise IntakeRefused(bad, "SOP Instance UID differs from the C-STORE request's")
    if UID(ds.SOPClassUID) not in IMAGE_SOP_CLASS_MODALITY:
        return
    missing = [keyword for keyword in _REQUIRED_IMAGE_ATTRIBUTES if keyword not in ds]
    if missing:
        raise IntakeRefused(bad, f"image without {', '.join(missing)}")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1)
    samples = _int(ds, "SamplesPerPixel", 1)
    bits_allocated = _int(ds, "BitsAllocated")
    pixels = rows * columns * frames * samples
    if rows <= 0 or columns <= 0 or bits_allocated not in (1, 8, 16, 32):
        raise IntakeRefused(bad, "Rows, Columns or Bits Allocated out of range")
    if pixels > max_pixels:
        raise IntakeRefused(bad, f"image of {pixels} pixels exceeds the limit of {max_pixels}")
    pixel_data = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(pixel_data, RawDataElement):  # deferred: its length, without reading it
        length = pixel_data.length
    else:
        length = len(pixel_data.value or b"")
    native = not ds.file_meta.TransferSyntaxUID.is_compressed
    if native and length != 0xFFFFFFFF:
        expected = (pixels * bits_allocated + 7) // 8
        if length < expected:
            raise IntakeRefused(
                bad, f"Pixel Data holds {length} bytes, Rows x Columns x frames needs {expected}"
            )


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    return str(ds.get(keyword, "") or "")[:limit]


def _get_or_create(session: Session, model: type, key: dict, values: dict):  # noqa: ANN202
    """The row with ``key``, created with ``values`` if new; safe against a concurrent insert."""
    row = session.scalar(select(model).filter_by(**key))
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = model(**key, **values)
            session.add(row)
        return row
    except IntegrityError:
        return session.scalar(select(model).filter_by(**key))


class Intake:
    """Stores received instances for one node (one settings object, one database)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions

    def store(self, received: Path, *, sop_class_uid: str, sop_instance_uid: str,
              calling_ae: str, called_ae: str) -> StoreOutcome:
        """Take the file a C-STORE streamed to ``received`` (on the spool's file system)."""
        try:
            return self._store(received, sop_class_uid, sop_instance_uid, calling_ae, called_ae)
        except IntakeRefused as refused:
            log.warning("refused %s from %s: %s", _loggable(sop_instance_uid), calling_ae,
                        refused)
            return StoreOutcome(refused.status, str(refused))

    def _store(self, received: Path, sop_class_uid: str, sop_instance_uid: str,
               calling_ae: str, called_ae: str) -> StoreOutcome:
        free = shutil.disk_usage(self.settings.spool_dir).free
        if free < self.settings.min_free_disk_mb * 1024 * 1024:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                f"spool has {free // 2**20} MiB free, below the minimum")
        ds = read_header(received)
        check_dataset(ds, sop_class_uid, sop_instance_uid, self.settings.max_pixels)
        try:
            digest, size = sha256_of(received), received.stat().st_size
            fsync_file(received)
        except OSError as error:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                f"spool write failed: {error}") from None
        uid = str(ds.SOPInstanceUID)
        final = spool_path_for(self.settings.spool_dir, uid, digest)
        if self._is_known_duplicate(uid, digest):
            log.info("duplicate %s (same bytes): acknowledged, not analysed again", uid)
            return StoreOutcome(StoreStatus.SUCCESS, "duplicate")
        moved = not final.exists()
        try:
            if moved:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(received, final)
                fsync_dir(final.parent)
                fsync_dir(final.parent.parent)
        except OSError as error:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                f"spool write failed: {error}") from None
        decision = route(ds, self.settings, ours=self._is_our_output(ds))
        try:
            instance_id, enqueue = self._record(ds, final, digest, size, decision,
                                                calling_ae, called_ae)
        except SQLAlchemyError as error:
            if moved:
                final.unlink(missing_ok=True)
            log.error("database unavailable while storing %s: %s", uid, error.__class__.__name__)
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES, "database unavailable") from None
        log.info("stored %s (%s) from %s: %s", uid, ds.file_meta.TransferSyntaxUID.name,
                 calling_ae, "analyse" if decision.analyse else f"skipped: {decision.reason}",
                 extra={"instance_id": instance_id, "sop_instance_uid": uid,
                        "study_uid": str(ds.StudyInstanceUID)})
        return StoreOutcome(StoreStatus.SUCCESS, "stored", instance_id, enqueue)

    def _is_our_output(self, ds: Dataset) -> bool:
        """One of the objects we made, routed back to us (by signature or by its UID)."""
        if (str(ds.get("Manufacturer", "")) == MANUFACTURER
                and str(ds.get("ManufacturerModelName", "")) == MODEL_NAME):
            return True
        try:
            with self.sessions() as session:
                return session.scalar(select(Output.id).filter_by(
                    sop_instance_uid=str(ds.SOPInstanceUID))) is not None
        except SQLAlchemyError:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES, "database unavailable") from None

    def _is_known_duplicate(self, uid: str, digest: str) -> bool:
        try:
            with self.sessions.begin() as session:
                existing = session.scalar(select(Instance).filter_by(sop_instance_uid=uid))
                if existing is None or existing.sha256 != digest:
                    return False
                session.add(InstanceEvent(instance=existing, event="duplicate",
                                          detail="same bytes received again"))
                return True
        except SQLAlchemyError:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES, "database unavailable") from None

    def _record(self, ds: Dataset, path: Path, digest: str, size: int,
                decision: RoutingDecision, calling_ae: str, called_ae: str) -> tuple[int, bool]:
        status = InstanceStatus.RECEIVED if decision.analyse else InstanceStatus.SKIPPED
        with self.sessions.begin() as session:
            patient = _get_or_create(
                session, Patient,
                {"patient_id": _text(ds, "PatientID", 64),
                 "issuer": _text(ds, "IssuerOfPatientID", 64)},
                {"name": _text(ds, "PatientName", 324),
                 "birth_date": _text(ds, "PatientBirthDate", 8),
                 "sex": _text(ds, "PatientSex", 16)},
            )
            study = _get_or_create(
                session, Study, {"study_uid": str(ds.StudyInstanceUID)},
                {"patient": patient, "accession_number": _text(ds, "AccessionNumber", 16),
                 "study_date": _text(ds, "StudyDate", 8),
                 "description": _text(ds, "StudyDescription", 64)},
            )
            series = _get_or_create(
                session, Series, {"series_uid": str(ds.SeriesInstanceUID)},
                {"study": study, "modality": modality_of(ds),
                 "body_part": _text(ds, "BodyPartExamined", 64),
                 "series_number": _int(ds, "SeriesNumber", 0) or None},
            )
            instance = session.scalar(
                select(Instance).filter_by(sop_instance_uid=str(ds.SOPInstanceUID))
            )
            event = "received"
            if instance is None:
                instance = Instance(sop_instance_uid=str(ds.SOPInstanceUID), revision=1)
                session.add(instance)
            else:
                # New bytes under a known UID (a corrected image): keep the old file, analyse anew.
                event = "revised"
                instance.revision += 1
                instance.attempts = 0
                instance.last_error = ""
                instance.claim_token = None
                instance.lease_until = None
                instance.rows = instance.columns = instance.bits_stored = None
                instance.decode_seconds = None
                instance.decoded_at = None
                instance.photometric_interpretation = ""
            instance.sop_class_uid = str(ds.SOPClassUID)
            instance.series = series
            instance.transfer_syntax_uid = str(ds.file_meta.TransferSyntaxUID)
            instance.calling_ae = calling_ae
            instance.called_ae = called_ae
            instance.received_at = utcnow()
            instance.updated_at = utcnow()
            instance.size_bytes = size
            instance.sha256 = digest
            instance.spool_path = str(path)
            instance.status = status
            instance.reason = decision.reason
            detail = f"from {calling_ae}, {size} bytes"
            session.add(InstanceEvent(instance=instance, event=event, detail=detail))
            if not decision.analyse:
                session.add(InstanceEvent(instance=instance, event="skipped",
                                          detail=decision.reason))
            session.flush()
            return instance.id, decision.analyse


def _loggable(uid: str) -> str:
    return uid if is_valid_uid(uid) else repr(uid[:70])


def mark_queued(sessions: sessionmaker[Session], instance_ids: list[int], reason: str,
                from_status: InstanceStatus = InstanceStatus.RECEIVED) -> None:
    """Record that tasks for these instances are in the broker (unless a worker got there first)."""
    if not instance_ids:
        return
    now = utcnow()
    with sessions.begin() as session:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(instance_ids))
            .where(Instance.status == from_status)
            .values(status=InstanceStatus.QUEUED, queued_at=now, updated_at=now)
        )
        if reason:
            session.add_all(
                InstanceEvent(instance_pk=pk, event="requeued", detail=reason)
                for pk in instance_ids
            )
