"""Receiving one instance: check it, spool it durably, record it. The C-STORE handler's work.

Order matters (nothing acknowledged is ever lost): the file is fsynced and renamed into the spool,
then one DB transaction records it, and only then may the caller answer 0x0000. Any failure on
the way returns a PS3.4 failure status and leaves nothing that claims to be stored.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.codestreams import CODING_OF_SYNTAX, HEAD_BYTES, coding, declared_size
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

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # whole value: fullmatch
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
    return 0 < len(value) <= 64 and bool(_UID.fullmatch(value))


def spool_path_for(spool_dir: Path, sop_instance_uid: str, sha256: str) -> Path:
    """Where an instance's bytes live; derived from the (validated) UID, never a raw peer string.

    Two hash-named levels keep any one folder small; the content hash keeps every revision.
    """
    if not is_valid_uid(sop_instance_uid):
        raise ValueError(f"not a UID: {sop_instance_uid!r}")
    bucket = hashlib.sha1(sop_instance_uid.encode()).hexdigest()
    return spool_dir / bucket[:2] / bucket[2:4] / f"{sop_instance_uid}.{sha256[:16]}.dcm"


# What a data set may hold besides its pixel data: a deflated one inflating to more than its
# image needs plus this is a decompression bomb, not a radiograph.
MAX_HEADER_BYTES = 16 * 2**20


def read_header(path: Path, max_pixels: int) -> Dataset:
    """Parse everything but the bulk values, and check that the bulk values are really there."""
    inflated = _inflated_size(path, limit=4 * max_pixels + MAX_HEADER_BYTES)
    try:
        ds = dcmread(path, defer_size=4096)
    except Exception as error:  # pydicom raises many kinds on garbage; none may reach the peer
        raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                            f"unreadable data set: {error}") from None
    syntax = ds.file_meta.TransferSyntaxUID
    # pydicom reads a data set encoded otherwise than its transfer syntax says (with only a
    # warning); a sender that does that cannot be trusted with the rest either.
    if syntax.is_transfer_syntax and syntax != DeflatedExplicitVRLittleEndian:
        explicit = _first_element_has_vr(path, ds)
        if explicit is not None and explicit == syntax.is_implicit_VR:
            raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                                f"data set encoded {'explicit' if explicit else 'implicit'} VR, "
                                f"sent as {syntax.name}")
    _check_order(ds)
    _read_every_value(ds)
    if inflated is not None:
        needs = _int(ds, "Rows") * _int(ds, "Columns") * max(_int(ds, "NumberOfFrames", 1), 1) \
            * _int(ds, "SamplesPerPixel", 1) * _int(ds, "BitsAllocated") // 8
        if inflated > needs + MAX_HEADER_BYTES:
            raise IntakeRefused(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                f"deflated data set inflates to {inflated} bytes, its image "
                                f"needs {needs}")
    else:
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


def _inflated_size(path: Path, limit: int) -> int | None:
    """The size a deflated data set inflates to, counted in bounded memory and refused past
    LIMIT before anything holds it; None when the file is not deflated."""
    try:
        meta = read_file_meta_info(path)
    except Exception as error:  # noqa: BLE001 - garbage: read_header's dcmread says so
        log.debug("no readable file meta: %s", error)
        return None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    with open(path, "rb") as file:
        file.seek(132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0)))
        pending = b""
        while chunk := pending or file.read(2**16):
            try:
                size += len(inflater.decompress(chunk, 2**20))
            except zlib.error as error:
                raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                                    f"deflated data set cannot be inflated: {error}") from None
            pending = inflater.unconsumed_tail  # output was capped: go on with the same input
            if size > limit:
                raise IntakeRefused(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                    f"deflated data set inflates past {limit} bytes")
    return size


_VRS = {vr.value.encode() for vr in VR}


def _first_element_has_vr(path: Path, ds: Dataset) -> bool | None:
    """Whether the data set's first element carries a VR (explicit VR encoding); None when the
    data set is empty."""
    start = 132 + 12 + int(ds.file_meta.get("FileMetaInformationGroupLength", 0))
    with open(path, "rb") as file:
        file.seek(start)
        head = file.read(6)
    return None if len(head) < 6 else head[4:6] in _VRS


def _check_order(ds: Dataset) -> None:
    """PS3.5 7.1: elements in ascending tag order. pydicom reads them in any order (its keys
    keep the order read) and writes them sorted, so a file kept as received would differ from
    every copy made of it."""
    tags = list(ds.keys())
    for before, after in itertools.pairwise(tags):
        if after < before:
            raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                                f"elements out of order: {after} after {before}")


def _read_every_value(ds: Dataset) -> None:
    """Convert each value now (not the deferred bulk ones): a value that cannot be read (an FD
    of 26 bytes, say) is the sender's error, answered as such, not a crash later."""
    for tag in list(ds.keys()):
        element = ds.get_item(tag, keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is None:
            continue  # deferred bulk data: its length is checked below
        try:
            ds[tag]
        except Exception as error:  # noqa: BLE001 - whatever the parser raises
            raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                                f"element {tag} cannot be read: {error}") from None


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    value = ds.get(keyword)
    if value is None or value == "":  # absent or empty: the default; a 0 stays a 0
        return default
    try:
        return int(value)
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
    if frames < 1:
        raise IntakeRefused(bad, "Number of Frames is 0")
    samples = _int(ds, "SamplesPerPixel", 1)
    bits_allocated = _int(ds, "BitsAllocated")
    pixels = rows * columns * frames * samples
    if rows <= 0 or columns <= 0 or bits_allocated not in (1, 8, 16, 32):
        raise IntakeRefused(bad, "Rows, Columns or Bits Allocated out of range")
    if pixels > max_pixels:
        raise IntakeRefused(bad, f"image of {pixels} pixels exceeds the limit of {max_pixels}")
    _check_pixel_description(ds, samples, bits_allocated)
    pixel_data = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(pixel_data, RawDataElement):  # deferred: its length, without reading it
        length = pixel_data.length
        encapsulated = length == 0xFFFFFFFF
    else:  # small enough to have been read already
        length = len(pixel_data.value or b"")
        encapsulated = pixel_data.is_undefined_length
    native = not ds.file_meta.TransferSyntaxUID.is_compressed
    if native == encapsulated:  # encapsulated exactly when compressed
        raise IntakeRefused(StoreStatus.CANNOT_UNDERSTAND,
                            f"Pixel Data {'encapsulated' if native else 'native'} but sent as "
                            f"{ds.file_meta.TransferSyntaxUID.name}")
    if native:
        expected = (pixels * bits_allocated + 7) // 8
        # One byte more is the padding to an even length; more than that is a contradiction.
        if not expected <= length <= expected + 1:
            raise IntakeRefused(
                bad, f"Pixel Data holds {length} bytes, Rows x Columns x frames needs {expected}"
            )


# PS3.3 C.7.6.3.1.2: how many samples each photometric interpretation has.
_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
            "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3}


def _check_pixel_description(ds: Dataset, samples: int, bits_allocated: int) -> None:
    """The Image Pixel module's attributes must agree with each other (PS3.3 C.7.6.3)."""
    bad = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if photometric in _SAMPLES and samples != _SAMPLES[photometric]:
        raise IntakeRefused(bad, f"{photometric} with {samples} samples per pixel")
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    if not 0 < bits_stored <= bits_allocated:
        raise IntakeRefused(bad, f"Bits Stored {bits_stored} with Bits Allocated "
                                 f"{bits_allocated}")
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise IntakeRefused(bad, "Pixel Representation is neither 0 nor 1")


def check_frame_header(ds: Dataset, path: Path) -> None:
    """Refuse a compressed image whose first frame is coded otherwise than its transfer syntax
    says, or whose header declares another size than Rows and Columns (a decoder believes the
    frame and allocates for it)."""
    if "PixelData" not in ds or not ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    element = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None:  # deferred: read its head
        with open(path, "rb") as file:
            file.seek(element.value_tell)
            head = _first_fragment_head(file.read)
    else:
        head = _first_fragment_head(io.BytesIO(ds.PixelData).read)
    expected_coding = CODING_OF_SYNTAX.get(ds.file_meta.TransferSyntaxUID)
    found = coding(head) if head else None
    if expected_coding and found and found != expected_coding:
        raise IntakeRefused(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                            f"first frame is {found}, sent as "
                            f"{ds.file_meta.TransferSyntaxUID.name}")
    declared = declared_size(head) if head else None
    if declared is None:
        return
    rows, columns = declared
    expected = _int(ds, "Rows"), _int(ds, "Columns")
    if columns != expected[1] or rows not in (0, expected[0]):  # JPEG rows 0: given later (DNL)
        raise IntakeRefused(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                            f"compressed frame declares {rows} x {columns} pixels, Rows x "
                            f"Columns say {expected[0]} x {expected[1]}")


def _first_fragment_head(read: Callable[[int], bytes]) -> bytes | None:
    """The first HEAD_BYTES of the first fragment of encapsulated pixel data read from READ
    (positioned at the value): the Basic Offset Table item is skipped."""
    for item in range(2):
        header = read(8)
        if len(header) < 8 or header[:4] != b"\xfe\xff\x00\xe0":  # (FFFE,E000) Item
            return None
        (length,) = struct.unpack("<I", header[4:])
        if item == 1:
            return read(min(length, HEAD_BYTES))
        read(length)  # the offset table: 4 bytes a frame
    return None


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    return str(ds.get(keyword, "") or "")[:limit]


_INSERT = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}  # ON CONFLICT is per dialect


def _id_of(session: Session, model: type, key: dict, values: Callable[[], dict]) -> int:
    """The id of the row with ``key``, inserted with ``values()`` if there is none. ON CONFLICT
    DO NOTHING lets a sender storing the same study at once win the race without an error
    (or a SAVEPOINT round trip); its row is then read."""
    found = session.scalar(select(model.id).filter_by(**key))
    if found is not None:
        return found
    insert = _INSERT[session.get_bind().dialect.name](model)
    inserted = session.scalar(insert.values(**key, **values()).on_conflict_do_nothing()
                              .returning(model.id))
    return inserted if inserted is not None else session.scalar(
        select(model.id).filter_by(**key))


def _patient_id(session: Session, ds: Dataset) -> int:
    return _id_of(session, Patient,
                  {"patient_id": _text(ds, "PatientID", 64),
                   "issuer": _text(ds, "IssuerOfPatientID", 64)},
                  lambda: {"name": _text(ds, "PatientName", 324),
                           "birth_date": _text(ds, "PatientBirthDate", 8),
                           "sex": _text(ds, "PatientSex", 16)})


def _study_id(session: Session, ds: Dataset) -> int:
    return _id_of(session, Study, {"study_uid": str(ds.StudyInstanceUID)},
                  lambda: {"patient_pk": _patient_id(session, ds),
                           "accession_number": _text(ds, "AccessionNumber", 16),
                           "study_date": _text(ds, "StudyDate", 8),
                           "description": _text(ds, "StudyDescription", 64)})


def _series_id(session: Session, ds: Dataset) -> int:
    """The series' id; its study and patient are looked up only for a new series, so an image
    of a series already here costs one query."""
    return _id_of(session, Series, {"series_uid": str(ds.SeriesInstanceUID)},
                  lambda: {"study_pk": _study_id(session, ds), "modality": modality_of(ds),
                           "body_part": _text(ds, "BodyPartExamined", 64),
                           "series_number": _int(ds, "SeriesNumber", 0) or None})


class Intake:
    """Stores received instances for one node (one settings object, one database)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions

    def store(self, received: Path, *, sop_class_uid: str, sop_instance_uid: str,
              calling_ae: str, called_ae: str, sha256: str | None = None) -> StoreOutcome:
        """Take the file a C-STORE streamed to ``received`` (on the spool's file system);
        ``sha256`` is its digest where it was hashed while it was received."""
        try:
            return self._store(received, sop_class_uid, sop_instance_uid, calling_ae, called_ae,
                               sha256)
        except IntakeRefused as refused:
            log.warning("refused %s from %s: %s", _loggable(sop_instance_uid), calling_ae,
                        refused)
            return StoreOutcome(refused.status, str(refused))

    def _store(self, received: Path, sop_class_uid: str, sop_instance_uid: str,
               calling_ae: str, called_ae: str, sha256: str | None) -> StoreOutcome:
        free = shutil.disk_usage(self.settings.spool_dir).free
        if free < self.settings.min_free_disk_mb * 1024 * 1024:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                f"spool has {free // 2**20} MiB free, below the minimum")
        ds = read_header(received, self.settings.max_pixels)
        check_dataset(ds, sop_class_uid, sop_instance_uid, self.settings.max_pixels)
        check_frame_header(ds, received)
        try:
            digest, size = sha256 or sha256_of(received), received.stat().st_size
            fsync_file(received)
        except OSError as error:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                f"spool write failed: {error}") from None
        uid = str(ds.SOPInstanceUID)
        final = spool_path_for(self.settings.spool_dir, uid, digest)
        moved = False
        # One transaction for the lookups and the record: each round trip to the database
        # holds up the association's next C-STORE. A second try where another association
        # recorded the same SOP Instance UID while this one looked (a modality's retry beside
        # its first send, two routes to us): the first try found no row, the insert then hit
        # the unique UID. It is a duplicate or a revision now, not an error for the sender.
        for attempt in (1, 2):
            try:
                with self.sessions.begin() as session:
                    existing = session.scalar(select(Instance).filter_by(sop_instance_uid=uid))
                    if existing is not None and existing.sha256 == digest:
                        session.add(InstanceEvent(instance=existing, event="duplicate",
                                                  detail="same bytes received again"))
                        log.info("duplicate %s (same bytes): acknowledged, not analysed again",
                                 uid)
                        return StoreOutcome(StoreStatus.SUCCESS, "duplicate")
                    decision = route(ds, self.settings, ours=self._is_our_output(session, ds))
                    moved = self._move_into_spool(received, final) or moved
                    instance_id = self._record(session, existing, ds, final, digest, size,
                                               decision, calling_ae, called_ae)
                break
            except IntegrityError as error:
                if attempt == 2:
                    if moved:
                        self._remove_unless_recorded(final)
                    log.error("could not record %s: %s", uid, error.__class__.__name__)
                    raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                        "could not record it, retry") from None
                log.info("%s was recorded by another association meanwhile: looking again",
                         uid)
            except SQLAlchemyError as error:
                if moved:
                    self._remove_unless_recorded(final)
                log.error("database unavailable while storing %s: %s", uid,
                          error.__class__.__name__)
                raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                    "database unavailable") from None
        if not decision.analyse and not self.settings.keep_skipped:
            final.unlink(missing_ok=True)  # recorded; the bytes are not ours to keep
        log.info("stored %s (%s) from %s: %s", uid, ds.file_meta.TransferSyntaxUID.name,
                 calling_ae, "analyse" if decision.analyse else f"skipped: {decision.reason}",
                 extra={"instance_id": instance_id, "sop_instance_uid": uid,
                        "study_uid": str(ds.StudyInstanceUID)})
        return StoreOutcome(StoreStatus.SUCCESS, "stored", instance_id, decision.analyse)

    def _remove_unless_recorded(self, path: Path) -> None:
        """Remove a file this store moved into the spool but could not record, unless a row
        names it: another association's, committed meanwhile for the same UID and bytes (hence
        the same path). Where the database cannot say, the file stays; the sender's retry (same
        UID and bytes) finds it in place and records it."""
        try:
            with self.sessions() as session:
                named = session.scalar(select(Instance.id).filter_by(spool_path=str(path))
                                       .limit(1))
        except SQLAlchemyError:
            return
        if named is None:
            path.unlink(missing_ok=True)

    @staticmethod
    def _move_into_spool(received: Path, final: Path) -> bool:
        """Rename the received file to its place, on disk before the row that names it is
        committed; False when that place already holds the same bytes."""
        if final.exists():
            return False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(received, final)
            fsync_dir(final.parent)
            fsync_dir(final.parent.parent)
        except OSError as error:
            raise IntakeRefused(StoreStatus.OUT_OF_RESOURCES,
                                f"spool write failed: {error}") from None
        return True

    @staticmethod
    def _is_our_output(session: Session, ds: Dataset) -> bool:
        """One of the objects we made, routed back to us (by signature or by its UID)."""
        if (str(ds.get("Manufacturer", "")) == MANUFACTURER
                and str(ds.get("ManufacturerModelName", "")) == MODEL_NAME):
            return True
        return session.scalar(select(Output.id).filter_by(
            sop_instance_uid=str(ds.SOPInstanceUID))) is not None

    def _record(self, session: Session, instance: Instance | None, ds: Dataset, path: Path,
                digest: str, size: int, decision: RoutingDecision, calling_ae: str,
                called_ae: str) -> int:
        """The instance's row (new, or ``instance`` revised), with its patient, study and
        series where they are new; its id."""
        status = InstanceStatus.RECEIVED if decision.analyse else InstanceStatus.SKIPPED
        series_id = _series_id(session, ds)  # before the instance is added: queries autoflush
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
        instance.series_pk = series_id
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
            kept = "file kept" if self.settings.keep_skipped else "file not kept"
            instance.purged_at = None if self.settings.keep_skipped else utcnow()
            session.add(InstanceEvent(instance=instance, event="skipped",
                                      detail=f"{decision.reason}; {kept}"))
        session.flush()
        return instance.id


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


def requeue_failed(sessions: sessionmaker[Session], sop_instance_uid: str, by: str,
                   enqueue: Enqueue) -> bool:
    """An operator sends a failed instance through analysis again (fresh attempt count): False
    when there is no such failed instance (or retention took its pixel data). The event
    names who asked."""
    with sessions.begin() as session:
        instance = session.scalar(select(Instance).where(
            Instance.sop_instance_uid == sop_instance_uid,
            Instance.status == InstanceStatus.FAILED,
            Instance.purged_at.is_(None)))  # its pixel data must still be there
        if instance is None:
            return False
        instance.status = InstanceStatus.RECEIVED
        instance.attempts = 0
        instance.updated_at = utcnow()
        session.add(InstanceEvent(instance_pk=instance.id, event="retry-requested",
                                  detail=f"by {by} (was: {instance.last_error})"[:2000]))
        instance_id = instance.id
    enqueue(instance_id)  # if this fails, the reconciler queues the received row
    mark_queued(sessions, [instance_id], "")
    return True
