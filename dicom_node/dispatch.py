"""The reconciler: finds work that a crash, an outage or a lost message left half way, and
sends it again. Nothing here is on an image's normal path (see README, "How an image flows").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.db.leases import lease_ran_out
from dicom_node.db.models import Instance, InstanceEvent, InstanceStatus, utcnow
from dicom_node.intake import Enqueue, mark_queued
from dicom_node.outbox import due_deliveries
from dicom_node.periodic import Periodic
from dicom_node.retention import purge

log = logging.getLogger(__name__)

QueueDepth = Callable[[], int]


@dataclass
class ReconcileReport:
    lease_expired: list[int] = field(default_factory=list)
    never_queued: list[int] = field(default_factory=list)
    lost_from_broker: list[int] = field(default_factory=list)
    model_now_configured: list[int] = field(default_factory=list)
    deliveries_due: list[int] = field(default_factory=list)
    stale_files_removed: list[str] = field(default_factory=list)
    purged: int = 0  # files (or their pixel data) retention removed
    failed_duties: list[str] = field(default_factory=list)  # each failed alone; the rest ran

    @property
    def total(self) -> int:
        return (len(self.lease_expired) + len(self.never_queued) + len(self.lost_from_broker)
                + len(self.model_now_configured) + len(self.deliveries_due))


PURGES_PER_ROUND = 1000  # files retention removes in one reconciler round at most


def reconcile(settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue,
              queue_depth: QueueDepth, enqueue_delivery: Enqueue | None = None
              ) -> ReconcileReport:
    """Send again every instance and delivery that a crash, an outage or a lost message left half
    way. Each duty runs on its own: one that fails (broker down, database down) is logged and
    the others still run."""
    report = ReconcileReport()
    settled = utcnow() - timedelta(seconds=settings.reconcile_grace_seconds)
    depth_before_round = cache(queue_depth)  # asked once, before this round adds messages

    def expired_leases() -> None:
        report.lease_expired = _release_expired_leases(sessions, settings.task_lease_seconds)
        _send(sessions, enqueue, report.lease_expired, "lease expired", InstanceStatus.RECEIVED)

    def never_queued() -> None:
        report.never_queued = _ids(sessions, Instance.status == InstanceStatus.RECEIVED,
                                   Instance.received_at < settled)
        _send(sessions, enqueue, report.never_queued, "never queued", InstanceStatus.RECEIVED)

    def lost_from_broker() -> None:
        # Queued rows with an empty broker: the message was lost (a worker that consumed it met
        # a database outage, a Redis restart, the embedded broker after a crash). A duplicate
        # message is harmless: the worker's claim admits one.
        queued = _ids(sessions, Instance.status == InstanceStatus.QUEUED,
                      Instance.queued_at < settled)
        if queued and depth_before_round() == 0:
            report.lost_from_broker = queued
            _send(sessions, enqueue, queued, "lost from the broker", InstanceStatus.QUEUED)

    def model_now_configured() -> None:
        if settings.bundle is not None:
            report.model_now_configured = _ids(
                sessions, Instance.status == InstanceStatus.WAITING_FOR_MODEL)
            _send(sessions, enqueue, report.model_now_configured, "model bundle configured",
                  InstanceStatus.WAITING_FOR_MODEL)

    def deliveries_due() -> None:
        # Deliveries due for a while with an empty broker: their message was lost (a worker
        # died holding a retry's countdown, a broker restart). A duplicate finds nothing to
        # claim, but a slow queue is not flooded with them while their own messages wait.
        if enqueue_delivery is not None:
            overdue = due_deliveries(sessions, settings.task_lease_seconds, due_before=settled)
            if overdue and depth_before_round() == 0:
                report.deliveries_due = overdue
                _enqueue_each(enqueue_delivery, overdue, "delivery")

    def stale_files() -> None:
        report.stale_files_removed = remove_incoming_files(
            settings.incoming_dir, older_than=settings.incoming_stale_seconds)

    def retention() -> None:
        # A bounded share a round: a lowered size cap may make a million files due at once,
        # and the round's other duties (leases, lost tasks, deliveries) must not wait for them.
        report.purged = len(purge(settings, sessions, limit=PURGES_PER_ROUND))

    # Lost from the broker first: it reads the queue depth before this round adds to it.
    failures: dict[str, list[str]] = {}  # error -> the duties that met it
    for name, duty in (("lost from the broker", lost_from_broker),
                       ("lease expired", expired_leases), ("never queued", never_queued),
                       ("model bundle configured", model_now_configured),
                       ("deliveries due", deliveries_due), ("stale incoming files", stale_files),
                       ("retention", retention)):
        try:
            duty()
        except Exception as error:  # this duty waits for the next round; the others go on
            report.failed_duties.append(name)
            message = f"{error.__class__.__name__}: {error}".splitlines()[0]
            failures.setdefault(message, []).append(name)
    for message, names in failures.items():  # a database outage is one line, not six
        log.warning("reconciler: %s check%s failed: %s", ", ".join(names),
                    "s" if len(names) > 1 else "", message)
    return report


def _ids(sessions: sessionmaker[Session], *conditions: ColumnElement[bool]) -> list[int]:
    with sessions() as session:
        return list(session.scalars(select(Instance.id).where(*conditions)
                                    .order_by(Instance.id)).all())


def _release_expired_leases(sessions: sessionmaker[Session], lease_seconds: float) -> list[int]:
    """A worker died holding these (or lost the database for longer than its lease)."""
    now = utcnow()
    expired_now = lease_ran_out(Instance, Instance.status == InstanceStatus.PROCESSING, now,
                                lease_seconds)
    with sessions.begin() as session:
        expired = list(session.scalars(select(Instance.id).where(expired_now)).all())
        if expired:
            session.execute(
                update(Instance).where(Instance.id.in_(expired)).where(expired_now)
                .values(status=InstanceStatus.RECEIVED, claim_token=None, lease_until=None,
                        updated_at=now)
            )
            session.add_all(InstanceEvent(instance_pk=pk, event="lease-expired",
                                          detail="worker stopped before finishing")
                            for pk in expired)
    return expired


def _send(sessions: sessionmaker[Session], enqueue: Enqueue, ids: list[int], reason: str,
          from_status: InstanceStatus) -> None:
    # Marked first: should sending fail, the lost-from-the-broker duty sends them later.
    mark_queued(sessions, ids, reason=reason, from_status=from_status)
    sent = _enqueue_each(enqueue, ids, "instance")
    if sent:
        log.info("reconciler re-queued %d instances (%s)", sent, reason)


def _enqueue_each(enqueue: Enqueue, ids: list[int], what: str) -> int:
    """Queue each id; on the first failure (the broker is down) stop and say so once."""
    for sent, item in enumerate(ids):
        try:
            enqueue(item)
        except Exception as error:
            raise RuntimeError(f"could not queue {what} {item} ({len(ids) - sent} left for the "
                               f"next round): {error}") from error
    return len(ids)


def remove_incoming_files(incoming_dir: Path, older_than: float) -> list[str]:
    """Delete what aborted associations left in spool/incoming.

    Nothing there was ever acknowledged: a received file leaves that folder (renamed into the
    spool) before the node answers 0x0000. At start-up, before the node listens, everything
    there goes (``older_than=0``); while it runs, only files nobody has written to for a while.
    """
    cutoff = time.time() - older_than
    removed = []
    for path in incoming_dir.glob("*"):
        try:
            if path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink()
                removed.append(path.name)
        except FileNotFoundError:  # pynetdicom removed it itself meanwhile
            continue
    if removed:
        log.info("removed %d incomplete files from %s (never acknowledged)", len(removed),
                 incoming_dir)
    return removed


class Reconciler:
    """Runs ``reconcile`` at start-up and then every ``reconcile_interval_seconds``, and then
    ``also`` (the embedded worker's watchdog)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue,
                 queue_depth: QueueDepth, enqueue_delivery: Enqueue | None = None,
                 also: Callable[[], None] | None = None):
        self._args = (settings, sessions, enqueue, queue_depth, enqueue_delivery)
        self._also = also
        self._thread = Periodic("reconciler", settings.reconcile_interval_seconds, self._round,
                                run_first=True)
        self.start, self.stop = self._thread.start, self._thread.stop

    def _round(self) -> None:
        reconcile(*self._args)  # never raises: each duty guards itself
        if self._also is not None:
            self._also()
