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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analysis import AnalysisResult
from dicom_node.config import Settings
from dicom_node.db.leases import is_unavailable, renewed, take, when_database_returns
from dicom_node.db.models import (
    CLAIMABLE,
    Analysis,
    Delivery,
    Finding,
    Instance,
    InstanceEvent,
    InstanceStatus,
    Output,
    utcnow,
)
from dicom_node.outbox import destinations_for
from workers.app import enqueue_delivery
from workers.bundle import Bundle
from workers.decoding import decode_all
from workers.imaging import DecodedImage, DecodeError
from workers.results import BuiltOutput, build_outputs

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime

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
    calling_ae: str


@dataclass(frozen=True)
class Outcome:
    status: str  # done, failed, skipped (nothing to do), lost (our claim was taken over), retry
    detail: str = ""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(sessions: sessionmaker[Session], instance_id: int, lease_seconds: int,
          max_attempts: int, note: str = "") -> Claim | None:
    """Take the instance for this worker, or None if it is done, skipped or held by another."""
    token = str(uuid.uuid4())
    with sessions.begin() as session:
        if not take(session, Instance, instance_id, Instance.status.in_(CLAIMABLE),
                    Instance.status == InstanceStatus.PROCESSING, lease_seconds,
                    status=InstanceStatus.PROCESSING, claim_token=token,
                    claimed_by=worker_name(), updated_at=utcnow()):
            return None
        instance = session.get(Instance, instance_id)
        assert instance is not None
        if instance.attempts > max_attempts:
            message = f"gave up after {max_attempts} attempts; last error: {instance.last_error}"
            _set_failed(session, instance, message)
            return None
        detail = f"attempt {instance.attempts} by {worker_name()}"
        session.add(InstanceEvent(instance=instance, event="claimed",
                                  detail=f"{detail}, after {note}" if note else detail))
        return Claim(instance_id, token, instance.attempts, Path(instance.spool_path),
                     instance.sha256, instance.calling_ae)


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
                     instance_id: int, note: str = "") -> Outcome:
    """The task for one instance; with batching on, also whatever else waits in the queue.

    A database that cannot be reached at the claim raises (the task retries with backoff);
    after the claim, nothing raises: the instance is finished, failed or given back.
    """
    held = claim(sessions, instance_id, settings.task_lease_seconds, settings.max_attempts, note)
    if held is None:
        return Outcome("skipped", "not claimable (done, skipped, failed or held elsewhere)")
    batch = [held]
    # From the claim on, the lease is renewed while we work: loading the model included.
    with renewed(lambda: _renew_leases(sessions, batch, settings.task_lease_seconds),
                 settings.task_lease_seconds):
        return _work_on(settings, sessions, batch)


def _work_on(settings: Settings, sessions: sessionmaker[Session], batch: list[Claim]) -> Outcome:
    """Analyse the claimed instance (``batch[0]``), and others claimed into ``batch`` with it."""
    runtime = None
    if settings.bundle is not None:
        from workers.runtime import runtime_for  # torch only where a bundle is configured

        try:
            runtime = runtime_for(settings)
        except Exception as error:  # a bundle that will not load: retried, then failed
            return _release_for_retry(settings, sessions, batch[0],
                                      f"cannot load bundle: {error}")
    try:
        if runtime is not None and settings.batch_size > 1:
            _claim_batch(settings, sessions, batch)
        return _process_claims(settings, sessions, batch, runtime)[0]
    except Exception as error:
        # Whatever went wrong, nothing stays held until its lease runs out.
        ids = [c.instance_id for c in batch]
        if is_unavailable(error):  # an outage, not a bug: one line, no traceback
            message = f"database unavailable ({error.__class__.__name__})"
            log.warning("analysis of instances %s interrupted: %s", ids, message)
        else:
            log.exception("analysis of instances %s failed", ids)
            message = f"{error.__class__.__name__}: {error}"
        return [_release_for_retry(settings, sessions, claimed, message) for claimed in batch][0]


def _renew_leases(sessions: sessionmaker[Session], claims: list[Claim], lease_seconds: int) -> None:
    """Push the leases we still hold forward: a live worker's claim does not run out."""
    now = utcnow()
    with sessions.begin() as session:
        for held in list(claims):
            session.execute(
                update(Instance)
                .where(Instance.id == held.instance_id)
                .where(Instance.claim_token == held.token)
                .where(Instance.status == InstanceStatus.PROCESSING)
                .values(lease_until=now + timedelta(seconds=lease_seconds))
            )


def _claim_batch(settings: Settings, sessions: sessionmaker[Session], batch: list[Claim]) -> None:
    """Claim more queued instances into ``batch`` (up to batch_size), waiting at most
    batch_wait_ms for them. Each joins ``batch`` as soon as it is claimed, so the heartbeat
    renews its lease from then on.

    Their own tasks, when they arrive, find them claimed or done and do nothing.
    """
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while len(batch) < settings.batch_size:
        with sessions() as session:
            candidates = session.scalars(
                select(Instance.id).where(Instance.status == InstanceStatus.QUEUED)
                .order_by(Instance.queued_at, Instance.id)
                .limit(settings.batch_size - len(batch))
            ).all()
        for candidate in candidates:
            more = claim(sessions, candidate, settings.task_lease_seconds, settings.max_attempts)
            if more is not None:
                batch.append(more)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)


def _process_claims(settings: Settings, sessions: sessionmaker[Session], claims: list[Claim],
                    runtime: ModelRuntime | None) -> list[Outcome]:
    decoded = decode_all([held.spool_path for held in claims], settings.max_pixels,
                         settings.decode_workers)
    outcomes: dict[int, Outcome] = {}
    ready: list[tuple[Claim, DecodedImage]] = []
    for held, image in zip(claims, decoded, strict=True):
        if isinstance(image, DecodeError):
            outcomes[held.instance_id] = _finish_failed(settings, sessions, held, str(image))
        elif isinstance(image, OSError):
            if not held.spool_path.exists():
                outcomes[held.instance_id] = _finish_failed(
                    settings, sessions, held, f"spool file missing: {held.spool_path}")
            else:
                outcomes[held.instance_id] = _release_for_retry(
                    sessions, held, f"cannot read spool file: {image}")
        else:
            ready.append((held, image))
    to_analyse = [] if runtime is None else [
        (held, image) for held, image in ready
        if not _already_analysed(sessions, held, runtime.bundle)]
    results = {} if runtime is None or not to_analyse else dict(zip(
        (held.instance_id for held, _ in to_analyse),
        runtime.analyse([image.pixels for _, image in to_analyse]), strict=True))
    for held, image in ready:
        result = results.get(held.instance_id)
        outputs = [] if result is None or runtime is None else build_outputs(
            settings, held.spool_path, image, result,
            held.calling_ae)
        outcomes[held.instance_id] = _finish(settings, sessions, held, image, runtime, result,
                                             outputs)
    return [outcomes[held.instance_id] for held in claims]


def _finish(settings: Settings, sessions: sessionmaker[Session], held: Claim,
            image: DecodedImage, runtime: ModelRuntime | None, result: AnalysisResult | None,
            outputs: list[BuiltOutput]) -> Outcome:
    delivery_ids: list[int] = []

    def record(session: Session, instance: Instance) -> Outcome:
        _record_decode(session, instance, image)
        if runtime is None:
            instance.status = InstanceStatus.WAITING_FOR_MODEL
            session.add(InstanceEvent(instance=instance, event="waiting-for-model",
                                      detail="no model bundle configured"))
        else:
            instance.status = InstanceStatus.DONE
            if result is not None:
                analysis = _record_analysis(session, instance, runtime, image, result)
                deliveries = _record_outbox(session, settings, analysis, outputs,
                                            held.calling_ae)
                delivery_ids[:] = [delivery.id for delivery in deliveries]
        return Outcome(instance.status)

    # The work is done: kept through a database outage rather than done again.
    outcome = _under_claim(settings, sessions, held, "recording", record)
    if outcome.status == "lost":
        return outcome
    for delivery_id in delivery_ids:  # after the commit; the reconciler sends any this misses
        try:
            enqueue_delivery(delivery_id)
        except Exception as error:
            log.warning("could not queue delivery %d: %s", delivery_id, error)
    return outcome


def _record_outbox(session: Session, settings: Settings, analysis: Analysis,
                   outputs: list[BuiltOutput], calling_ae: str) -> list[Delivery]:
    """An Output row per object and a Delivery per (object, destination that wants it)."""
    destinations = destinations_for(settings, calling_ae)
    deliveries = []
    for built in outputs:
        output = Output(analysis=analysis, kind=built.kind, sop_class_uid=built.sop_class_uid,
                        sop_instance_uid=built.sop_instance_uid,
                        transfer_syntax_uid=built.transfer_syntax_uid, path=str(built.path))
        session.add(output)
        for destination in destinations:
            if built.kind in destination.kinds:
                deliveries.append(Delivery(output=output, destination=str(destination)))
    session.add_all(deliveries)
    session.flush()
    return deliveries


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
                     image: DecodedImage, result: AnalysisResult) -> Analysis:
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
        device=f"{runtime.device} {runtime.precision}",
    )
    session.add(analysis)
    session.add_all(
        Finding(analysis=analysis, class_index=box.class_index, class_name=box.class_name,
                score=box.score, x0=box.x0, y0=box.y0, x1=box.x1, y1=box.y1)
        for box in result.findings
    )
    session.add(InstanceEvent(
        instance=instance, event="analysed",
        detail=f"{runtime.bundle.label}: {analysis.label} p={classification.probability:.3f}, "
               f"{len(result.findings)} findings",
    ))
    log.info("instance %d analysed with %s: %s p=%.3f, %d findings", instance.id,
             runtime.bundle.label, analysis.label, classification.probability,
             len(result.findings))
    return analysis


def _under_claim(settings: Settings, sessions: sessionmaker[Session], held: Claim, what: str,
                 change: Callable[[Session, Instance], Outcome]) -> Outcome:
    """Apply ``change`` to the instance in one transaction while our claim on it stands; wait
    out a database outage (up to the settings' patience) instead of dropping the work."""
    def record() -> Outcome:
        with sessions.begin() as session:
            instance = _held(session, held)
            if instance is None:
                return Outcome("lost", "claim taken over after the lease ran out")
            return change(session, instance)

    try:
        return when_database_returns(record, settings.outage_patience_seconds,
                                     f"{what} instance {held.instance_id}")
    except SQLAlchemyError as error:
        if not is_unavailable(error):
            raise
        # Still unreachable: the lease runs out and the reconciler hands the instance out again.
        return Outcome("lost", "database unavailable")


def _finish_failed(settings: Settings, sessions: sessionmaker[Session], held: Claim,
                   message: str) -> Outcome:
    def record(session: Session, instance: Instance) -> Outcome:
        _set_failed(session, instance, message)
        log.warning("instance %d failed: %s", held.instance_id, message)
        return Outcome("failed", message)

    return _under_claim(settings, sessions, held, "failing", record)


def _release_for_retry(settings: Settings, sessions: sessionmaker[Session], held: Claim,
                       message: str) -> Outcome:
    """Give the instance back to the queue; the claim step counts the attempts."""
    def record(session: Session, instance: Instance) -> Outcome:
        instance.status = InstanceStatus.QUEUED
        instance.last_error = message
        instance.claim_token = None
        instance.lease_until = None
        instance.queued_at = utcnow()
        instance.updated_at = utcnow()
        session.add(InstanceEvent(instance=instance, event="retry", detail=message))
        log.warning("instance %d will be retried: %s", held.instance_id, message)
        return Outcome("retry", message)

    return _under_claim(settings, sessions, held, "giving back", record)
