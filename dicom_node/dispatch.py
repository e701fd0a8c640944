"""Handing stored instances to the queue, off the C-STORE path, and finding work left half way.

The C-STORE handler only records the instance (status ``received``) and drops its id here; a
background thread sends the task and marks the row ``queued``. If that fails (broker down, node
killed) the row stays ``received`` and the reconciler sends it later.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.db.models import Instance, InstanceEvent, InstanceStatus, utcnow
from dicom_node.outbox import due_deliveries

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]
QueueDepth = Callable[[], int]


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


@dataclass
class ReconcileReport:
    lease_expired: list[int] = field(default_factory=list)
    never_queued: list[int] = field(default_factory=list)
    lost_from_broker: list[int] = field(default_factory=list)
    model_now_configured: list[int] = field(default_factory=list)
    deliveries_due: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (len(self.lease_expired) + len(self.never_queued) + len(self.lost_from_broker)
                + len(self.model_now_configured) + len(self.deliveries_due))


def reconcile(settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue,
              queue_depth: QueueDepth, enqueue_delivery: Enqueue | None = None
              ) -> ReconcileReport:
    """Send again every instance that a crash or a lost message left half way."""
    now = utcnow()
    settled = now - timedelta(seconds=settings.reconcile_grace_seconds)
    report = ReconcileReport()
    with sessions.begin() as session:
        # A worker died holding it: its lease ran out. Back to the queue (attempts counted).
        expired = session.scalars(
            select(Instance.id)
            .where(Instance.status == InstanceStatus.PROCESSING)
            .where(Instance.lease_until < now)
        ).all()
        if expired:
            session.execute(
                update(Instance)
                .where(Instance.id.in_(expired))
                .where(Instance.status == InstanceStatus.PROCESSING)
                .where(Instance.lease_until < now)
                .values(status=InstanceStatus.RECEIVED, claim_token=None, lease_until=None,
                        updated_at=now)
            )
            session.add_all(InstanceEvent(instance_pk=pk, event="lease-expired",
                                          detail="worker stopped before finishing")
                            for pk in expired)
        report.lease_expired = list(expired)
        report.never_queued = list(session.scalars(
            select(Instance.id)
            .where(Instance.status == InstanceStatus.RECEIVED)
            .where(Instance.received_at < settled)
            .where(Instance.id.not_in(expired) if expired else True)
        ).all())
        # Queued rows with an empty broker: the message was lost (embedded broker after a crash,
        # a flushed Redis). A duplicate message is harmless: the worker's claim admits one.
        queued_rows = session.scalars(
            select(Instance.id)
            .where(Instance.status == InstanceStatus.QUEUED)
            .where(Instance.queued_at < settled)
        ).all()
        if settings.bundle is not None:
            report.model_now_configured = list(session.scalars(
                select(Instance.id).where(Instance.status == InstanceStatus.WAITING_FOR_MODEL)
            ).all())
    if queued_rows and queue_depth() == 0:
        report.lost_from_broker = list(queued_rows)
    for reason, ids, from_status in (
        ("lease expired", report.lease_expired, InstanceStatus.RECEIVED),
        ("never queued", report.never_queued, InstanceStatus.RECEIVED),
        ("lost from the broker", report.lost_from_broker, InstanceStatus.QUEUED),
        ("model bundle configured", report.model_now_configured,
         InstanceStatus.WAITING_FOR_MODEL),
    ):
        # Marked first: should sending fail, the lost-from-the-broker rule sends them later.
        mark_queued(sessions, ids, reason=reason, from_status=from_status)
        for instance_id in ids:
            try:
                enqueue(instance_id)
            except Exception as error:
                log.warning("reconciler could not queue instance %d: %s", instance_id, error)
        if ids:
            log.info("reconciler re-queued %d instances (%s)", len(ids), reason)
    if enqueue_delivery is not None:
        # Due retries and sends whose worker died; a duplicate task finds nothing to claim.
        report.deliveries_due = due_deliveries(sessions)
        for delivery_id in report.deliveries_due:
            try:
                enqueue_delivery(delivery_id)
            except Exception as error:
                log.warning("reconciler could not queue delivery %d: %s", delivery_id, error)
    return report


class Reconciler:
    """Runs ``reconcile`` at start-up and then every ``reconcile_interval_seconds``."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue,
                 queue_depth: QueueDepth, enqueue_delivery: Enqueue | None = None,
                 also: Callable[[], None] | None = None):
        self._args = (settings, sessions, enqueue, queue_depth, enqueue_delivery)
        self._interval = settings.reconcile_interval_seconds
        self._also = also
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                reconcile(*self._args)
                if self._also is not None:
                    self._also()
            except Exception as error:  # DB down: try again next round
                log.warning("reconciler round failed: %s", error)
            if self._stop.wait(self._interval):
                return
