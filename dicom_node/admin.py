"""What an admin asks the result database: counts per status and lists of instances."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, InstanceStatus, Series, Study, utcnow


def status_counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(
            select(Instance.status, func.count()).group_by(Instance.status)
        ).all()
    counts = {status.value: 0 for status in InstanceStatus}
    counts.update({status: count for status, count in rows})
    return counts


WAITING = (InstanceStatus.RECEIVED, InstanceStatus.QUEUED, InstanceStatus.PROCESSING)


def oldest_waiting(sessions: sessionmaker[Session]) -> dict | None:
    """The instance that has waited longest for its analysis (received, queued or processing),
    or None when nothing waits: how far behind the workers are."""
    with sessions() as session:
        instance = session.scalar(select(Instance).where(Instance.status.in_(WAITING))
                                  .order_by(Instance.received_at, Instance.id).limit(1))
    if instance is None:
        return None
    since = instance.received_at
    if since.tzinfo is None:  # SQLite hands back naive UTC
        since = since.replace(tzinfo=UTC)
    return {"id": instance.id, "status": instance.status, "since": since.isoformat(),
            "age_seconds": round((utcnow() - since).total_seconds(), 1)}


def list_instances(sessions: sessionmaker[Session], status: str | None = None,
                   since: datetime | None = None, limit: int = 100) -> list[dict]:
    query = (
        select(Instance, Series.modality, Study.study_uid)
        .join(Instance.series)
        .join(Series.study)
        .order_by(Instance.received_at.desc(), Instance.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(Instance.status == status)
    if since:
        query = query.where(Instance.received_at >= since)
    with sessions() as session:
        rows = session.execute(query).all()
    return [
        {
            "id": instance.id,
            "sop_instance_uid": instance.sop_instance_uid,
            "study_uid": study_uid,
            "modality": modality,
            "status": instance.status,
            "received_at": instance.received_at.isoformat(timespec="seconds"),
            "calling_ae": instance.calling_ae,
            "transfer_syntax_uid": instance.transfer_syntax_uid,
            "size_bytes": instance.size_bytes,
            "attempts": instance.attempts,
            "rows": instance.rows,
            "columns": instance.columns,
            "photometric_interpretation": instance.photometric_interpretation,
            "decode_seconds": instance.decode_seconds,
            "reason": instance.reason,
            "last_error": instance.last_error,
        }
        for instance, modality, study_uid in rows
    ]
