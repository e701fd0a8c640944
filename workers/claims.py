"""A worker's hold on the instances it works on: claimed in the database with a lease, renewed
while it works, and ended by exactly one write (done, failed, or given back for a retry).

The claim is one atomic UPDATE: a re-delivered task finds the instance done or held and does
nothing; a worker that died leaves a lease that runs out, and the reconciler hands the instance
out again. Every ending write checks that our claim still stands, so a worker that lost its
lease never overwrites the one that took over.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.db.leases import extend, is_unavailable, renewed, take, when_database_returns
from dicom_node.db.models import CLAIMABLE, Instance, InstanceEvent, InstanceStatus, utcnow

log = logging.getLogger(__name__)


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


class Claims:
    """Claiming, renewing and ending claims on instances, for one worker process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self.lease_seconds = settings.task_lease_seconds
        self.max_attempts = settings.max_attempts
        self.outage_patience_seconds = settings.outage_patience_seconds

    def claim(self, instance_id: int, note: str = "") -> Claim | None:
        """Take the instance, or None if it is done, skipped, failed or held by another worker.
        ``note`` says why this is a retry (recorded in the claim event)."""
        token = str(uuid.uuid4())
        with self.sessions.begin() as session:
            if not take(session, Instance, instance_id, Instance.status.in_(CLAIMABLE),
                        Instance.status == InstanceStatus.PROCESSING, self.lease_seconds,
                        status=InstanceStatus.PROCESSING, claim_token=token,
                        claimed_by=worker_name(), updated_at=utcnow()):
                return None
            instance = session.get(Instance, instance_id)
            assert instance is not None
            if instance.attempts > self.max_attempts:
                _set_failed(session, instance, f"gave up after {self.max_attempts} attempts; "
                                               f"last error: {instance.last_error}")
                return None
            detail = f"attempt {instance.attempts} by {worker_name()}"
            session.add(InstanceEvent(instance=instance, event="claimed",
                                      detail=f"{detail}, after {note}" if note else detail))
            return Claim(instance_id, token, instance.attempts, Path(instance.spool_path),
                         instance.sha256, instance.calling_ae)

    def claim_more(self, batch: list[Claim], size: int, wait_seconds: float) -> None:
        """Claim more queued instances into ``batch`` (up to ``size``), waiting at most
        ``wait_seconds`` for them. Each joins ``batch`` as soon as it is claimed, so the
        heartbeat renews its lease from then on. Their own tasks, when they arrive, find them
        claimed or done and do nothing."""
        deadline = time.monotonic() + wait_seconds
        while len(batch) < size:
            with self.sessions() as session:
                candidates = session.scalars(
                    select(Instance.id).where(Instance.status == InstanceStatus.QUEUED)
                    .order_by(Instance.queued_at, Instance.id).limit(size - len(batch))
                ).all()
            for candidate in candidates:
                more = self.claim(candidate)
                if more is not None:
                    batch.append(more)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)

    @contextmanager
    def held(self, batch: list[Claim]) -> Iterator[None]:
        """While the block runs, renew the lease of every claim in ``batch`` (it may grow)."""
        def renew() -> None:
            tokens = [held.token for held in list(batch)]
            with self.sessions.begin() as session:
                extend(session, Instance, Instance.claim_token.in_(tokens)
                       & (Instance.status == InstanceStatus.PROCESSING), self.lease_seconds)

        with renewed(renew, self.lease_seconds):
            yield

    def end(self, held: Claim, what: str,
            change: Callable[[Session, Instance], Outcome]) -> Outcome:
        """Apply ``change`` (the ending write) in one transaction while our claim stands; wait
        out a database outage (up to the patience) rather than drop finished work."""
        def write() -> Outcome:
            with self.sessions.begin() as session:
                instance = session.get(Instance, held.instance_id, with_for_update=True)
                if instance is None or instance.claim_token != held.token:
                    return Outcome("lost", "claim taken over after the lease ran out")
                return change(session, instance)

        try:
            return when_database_returns(write, self.outage_patience_seconds,
                                         f"{what} instance {held.instance_id}")
        except SQLAlchemyError as error:
            if not is_unavailable(error):
                raise
            # Still unreachable: the lease runs out and the reconciler hands it out again.
            return Outcome("lost", "database unavailable")

    def fail(self, held: Claim, message: str) -> Outcome:
        """End the claim for good: retrying cannot help (an undecodable file, say)."""
        def write(session: Session, instance: Instance) -> Outcome:
            _set_failed(session, instance, message)
            log.warning("instance %d failed: %s", held.instance_id, message)
            return Outcome("failed", message)

        return self.end(held, "failing", write)

    def give_back(self, held: Claim, message: str) -> Outcome:
        """Return the instance to the queue for another attempt (the claim counts them)."""
        def write(session: Session, instance: Instance) -> Outcome:
            instance.status = InstanceStatus.QUEUED
            instance.last_error = message
            instance.claim_token = None
            instance.lease_until = None
            instance.queued_at = utcnow()
            instance.updated_at = utcnow()
            session.add(InstanceEvent(instance=instance, event="retry", detail=message))
            log.warning("instance %d will be retried: %s", held.instance_id, message)
            return Outcome("retry", message)

        return self.end(held, "giving back", write)


def _set_failed(session: Session, instance: Instance, message: str) -> None:
    instance.status = InstanceStatus.FAILED
    instance.last_error = message
    instance.claim_token = None
    instance.lease_until = None
    instance.updated_at = utcnow()
    session.add(InstanceEvent(instance=instance, event="failed", detail=message))
