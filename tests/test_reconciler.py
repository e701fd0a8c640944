"""The reconciler re-sends what a crash left half way, through the real embedded broker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from dicom_node.config import load_settings
from dicom_node.db import migrate
from dicom_node.db.models import Instance, InstanceStatus, Patient, Series, Study, utcnow
from dicom_node.db.session import session_factory
from dicom_node.dispatch import reconcile
from workers.app import configure, enqueue_analysis, queue_depth


def _instance(session, uid: str, status: InstanceStatus, age_seconds: float,
              lease_in: float | None = None) -> None:
    series = session.scalar(select(Series))
    if series is None:
        series = Series(series_uid="1.2.3", study=Study(study_uid="1.2",
                                                        patient=Patient(patient_id="P")))
    then = utcnow() - timedelta(seconds=age_seconds)
    session.add(Instance(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", series=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="0" * 64,
        spool_path="/nonexistent", status=status, received_at=then, queued_at=then,
        lease_until=None if lease_in is None else utcnow() + timedelta(seconds=lease_in),
    ))


def test_reconcile_requeues_what_was_left_half_way(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, reconcile_grace_seconds=30)
    settings.make_dirs()
    url = settings.effective_database_url
    migrate.upgrade(url)
    configure(settings)
    sessions = session_factory(url)
    with sessions.begin() as session:
        _instance(session, "1.1", InstanceStatus.RECEIVED, age_seconds=120)  # never queued
        _instance(session, "1.2", InstanceStatus.RECEIVED, age_seconds=1)  # still in flight
        _instance(session, "1.3", InstanceStatus.QUEUED, age_seconds=120)  # message lost
        _instance(session, "1.4", InstanceStatus.PROCESSING, 120, lease_in=-5)  # worker died
        _instance(session, "1.5", InstanceStatus.PROCESSING, 120, lease_in=300)  # working
        _instance(session, "1.6", InstanceStatus.DONE, age_seconds=120)
    assert queue_depth() == 0

    report = reconcile(settings, sessions, enqueue_analysis, queue_depth)
    with sessions() as session:
        ids = {row.sop_instance_uid: row.id for row in session.scalars(select(Instance))}
    assert report.never_queued == [ids["1.1"]]
    assert report.lost_from_broker == [ids["1.3"]]
    assert report.lease_expired == [ids["1.4"]]
    assert queue_depth() == 3
    with sessions() as session:
        status = {row.sop_instance_uid: row.status for row in session.scalars(select(Instance))}
    assert status == {"1.1": "queued", "1.2": "received", "1.3": "queued", "1.4": "queued",
                      "1.5": "processing", "1.6": "done"}

    # The broker now holds the queued ones: a second round sends nothing twice.
    again = reconcile(settings, sessions, enqueue_analysis, queue_depth)
    assert again.total == 0 and queue_depth() == 3
