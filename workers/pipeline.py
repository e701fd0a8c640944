"""The work done for one instance, exactly once however often its task is delivered.

A worker first *claims* the instance in the database (one atomic UPDATE, with a lease), works,
then commits the result only if its claim still stands. A re-delivered task finds the instance
done and does nothing; a worker that died leaves a lease that runs out, and the reconciler hands
the instance out again.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.db.models import (
    CLAIMABLE,
    Analysis,
    Finding,
    Instance,
    InstanceEvent,
    InstanceStatus,
    utcnow,
)
from workers.bundle import Bundle
from workers.imaging import DecodedImage, DecodeError, decode

if TYPE_CHECKING:
    from workers.runtime import ImageAnalysis, ModelRuntime

log = logging.getLogger(__name__)

# A transient failure (database or file system hiccup) is retried after this many seconds.
RETRY_DELAY_SECONDS = 10


@dataclass(frozen=True)
class Claim:
    instance_id: int
    token: str
    attempt: int
    spool_path: Path
    sha256: str


@dataclass(frozen=True)
class Outcome:
    status: str  # done, failed, skipped (nothing to do), lost (our claim was taken over), retry
    detail: str = ""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(sessions: sessionmaker[Session], instance_id: int, lease_seconds: int,
          max_attempts: int) -> Claim | None:
    """Take the instance for this worker, or None if it is done, skipped or held by another."""
    now = utcnow()
    token = str(uuid.uuid4())
    with sessions.begin() as session:
        result = session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .where(
                or_(
                    Instance.status.in_(CLAIMABLE),
                    (Instance.status == InstanceStatus.PROCESSING) & (Instance.lease_until < now),
                )
            )
            .values(
                status=InstanceStatus.PROCESSING,
                attempts=Instance.attempts + 1,
                claim_token=token,
                claimed_by=worker_name(),
                lease_until=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
        )
        if result.rowcount != 1:
            return None
        instance = session.get(Instance, instance_id)
        assert instance is not None
        if instance.attempts > max_attempts:
            message = f"gave up after {max_attempts} attempts; last error: {instance.last_error}"
            _set_failed(session, instance, message)
            return None
        session.add(InstanceEvent(instance=instance, event="claimed",
                                  detail=f"attempt {instance.attempts} by {worker_name()}"))
        return Claim(instance_id, token, instance.attempts, Path(instance.spool_path),
                     instance.sha256)


def _set_failed(session: Session, instance: Instance, message: str) -> None:
    instance.status = InstanceStatus.FAILED
    instance.last_error = message
    instance.claim_token = None
    instance.lease_until = None
    instance.updated_at = utcnow()
    session.add(InstanceEvent(instance=instance, event="failed", detail=message))


def _held(session: Session, held: Claim) -> Instance | None:
    """The instance if our claim on it still stands (no one took it over after our lease)."""
    instance = session.get(Instance, held.instance_id, with_for_update=True)
    if instance is None or instance.claim_token != held.token:
        return None
    return instance


def process_instance(settings: Settings, sessions: sessionmaker[Session],
                     instance_id: int) -> Outcome:
    held = claim(sessions, instance_id, settings.task_lease_seconds, settings.max_attempts)
    if held is None:
        return Outcome("skipped", "not claimable (done, skipped, failed or held elsewhere)")
    try:
        image = decode(held.spool_path, max_pixels=settings.max_pixels)
    except DecodeError as error:
        return _finish_failed(sessions, held, str(error))
    except OSError as error:
        if not held.spool_path.exists():
            return _finish_failed(sessions, held, f"spool file missing: {held.spool_path}")
        return _release_for_retry(sessions, held, f"cannot read spool file: {error}")
    runtime = None
    if settings.bundle is not None:
        from workers.runtime import runtime_for  # torch only where a bundle is configured

        try:
            runtime = runtime_for(settings)
        except Exception as error:  # a bundle that will not load: retried, then failed
            return _release_for_retry(sessions, held, f"cannot load bundle: {error}")
    if runtime is not None and not _already_analysed(sessions, held, runtime.bundle):
        result = runtime.analyse([image.pixels])[0]
    else:
        result = None
    try:
        with sessions.begin() as session:
            instance = _held(session, held)
            if instance is None:
                return Outcome("lost", "claim taken over after the lease ran out")
            _record_decode(session, instance, image)
            if runtime is None:
                instance.status = InstanceStatus.WAITING_FOR_MODEL
                session.add(InstanceEvent(instance=instance, event="waiting-for-model",
                                          detail="no model bundle configured"))
            else:
                instance.status = InstanceStatus.DONE
                if result is not None:
                    _record_analysis(session, instance, runtime, image, result)
    except SQLAlchemyError as error:
        return _release_for_retry(sessions, held, f"database error: {error.__class__.__name__}")
    return Outcome(instance.status)


def _record_decode(session: Session, instance: Instance, image: DecodedImage) -> None:
    instance.rows = image.rows
    instance.columns = image.columns
    instance.photometric_interpretation = image.photometric_interpretation
    instance.bits_stored = image.bits_stored
    instance.decode_seconds = image.decode_seconds
    instance.decoded_at = utcnow()
    instance.updated_at = utcnow()
    instance.claim_token = None
    instance.lease_until = None
    instance.last_error = ""
    session.add(InstanceEvent(
        instance=instance, event="decoded",
        detail=f"{image.columns}x{image.rows} {image.photometric_interpretation} "
               f"in {image.decode_seconds:.3f} s",
    ))


def _already_analysed(sessions: sessionmaker[Session], held: Claim, bundle: Bundle) -> bool:
    with sessions() as session:
        return session.scalar(
            select(Analysis.id).filter_by(instance_pk=held.instance_id,
                                          source_sha256=held.sha256,
                                          bundle_name=bundle.manifest.name,
                                          bundle_version=bundle.manifest.version)
        ) is not None


def _record_analysis(session: Session, instance: Instance, runtime: ModelRuntime,
                     image: DecodedImage, result: ImageAnalysis) -> None:
    manifest = runtime.bundle.manifest
    classification = result.classification
    analysis = Analysis(
        instance=instance, source_sha256=instance.sha256, bundle_name=manifest.name,
        bundle_version=manifest.version, clinical_use=manifest.clinical_use,
        member_probabilities=classification.member_probabilities,
        probability=classification.probability, threshold=classification.threshold,
        label="abnormal" if classification.abnormal else "normal",
        decode_seconds=image.decode_seconds, classify_seconds=result.classify_seconds,
        detect_seconds=result.detect_seconds,
        device=f"{runtime.device} {str(runtime.dtype).removeprefix('torch.')}",
    )
    session.add(analysis)
    session.add_all(
        Finding(analysis=analysis, class_index=box.class_index, class_name=box.class_name,
                score=box.score, x0=box.x0, y0=box.y0, x1=box.x1, y1=box.y1)
        for box in result.boxes
    )
    session.add(InstanceEvent(
        instance=instance, event="analysed",
        detail=f"{runtime.bundle.label}: {analysis.label} p={classification.probability:.3f}, "
               f"{len(result.boxes)} findings",
    ))
    log.info("instance %d analysed with %s: %s p=%.3f, %d findings", instance.id,
             runtime.bundle.label, analysis.label, classification.probability,
             len(result.boxes))


def _finish_failed(sessions: sessionmaker[Session], held: Claim, message: str) -> Outcome:
    with sessions.begin() as session:
        instance = _held(session, held)
        if instance is None:
            return Outcome("lost")
        _set_failed(session, instance, message)
    log.warning("instance %d failed: %s", held.instance_id, message)
    return Outcome("failed", message)


def _release_for_retry(sessions: sessionmaker[Session], held: Claim, message: str) -> Outcome:
    """Give the instance back to the queue; the claim step counts the attempts."""
    try:
        with sessions.begin() as session:
            instance = _held(session, held)
            if instance is None:
                return Outcome("lost")
            instance.status = InstanceStatus.QUEUED
            instance.last_error = message
            instance.claim_token = None
            instance.lease_until = None
            instance.queued_at = utcnow()
            instance.updated_at = utcnow()
            session.add(InstanceEvent(instance=instance, event="retry", detail=message))
    except SQLAlchemyError:
        pass  # the lease runs out and the reconciler hands the instance out again
    log.warning("instance %d will be retried: %s", held.instance_id, message)
    return Outcome("retry", message)
