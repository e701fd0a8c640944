"""What an admin asks the result database: counts per status, lists of instances, one study
or instance in full, and analysis results for export."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import (
    Analysis,
    Finding,
    Instance,
    InstanceStatus,
    Output,
    Series,
    Study,
    StudyReport,
    utcnow,
)


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
    since = _aware(instance.received_at)
    return {"id": instance.id, "status": instance.status, "since": since.isoformat(),
            "age_seconds": round((utcnow() - since).total_seconds(), 1)}


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive UTC; PostgreSQL aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _aware(moment).isoformat(timespec="seconds")


def show(sessions: sessionmaker[Session], uid: str | None = None,
         accession: str | None = None) -> dict | None:
    """One study (by Study Instance UID or accession number) or one instance of it (by SOP
    Instance UID): its reports, and per instance the analysis with findings, the objects made
    and their deliveries, and the event timeline. None when nothing matches."""
    with sessions() as session:
        only: Instance | None = None
        if accession:
            study = session.scalars(select(Study).where(Study.accession_number == accession)
                                    .order_by(Study.id.desc()).limit(1)).first()
        else:
            study = session.scalars(select(Study).where(Study.study_uid == uid)).first()
            if study is None:
                only = session.scalars(select(Instance)
                                       .where(Instance.sop_instance_uid == uid)).first()
                study = only.series.study if only is not None else None
        if study is None:
            return None
        instances = [only] if only is not None else session.scalars(
            select(Instance).join(Instance.series).where(Series.study_pk == study.id)
            .order_by(Instance.received_at, Instance.id)).all()
        reports = session.scalars(select(StudyReport).where(StudyReport.study_pk == study.id)
                                  .order_by(StudyReport.version)).all()
        return {
            "study_uid": study.study_uid, "accession_number": study.accession_number,
            "study_date": study.study_date, "patient_id": study.patient.patient_id,
            "reports": [{"version": r.version, "label": r.label, "probability": r.probability,
                         "image_count": r.image_count, "finding_count": r.finding_count,
                         "created_at": _iso(r.created_at),
                         "objects": [_object(o) for o in r.outputs]} for r in reports],
            "instances": [_instance(instance) for instance in instances],
        }


def _object(output: Output) -> dict:
    return {"kind": output.kind, "sop_instance_uid": output.sop_instance_uid,
            "deliveries": [{"destination": d.destination, "status": d.status,
                            "attempts": d.attempts, "last_error": d.last_error,
                            "delivered_at": _iso(d.delivered_at)} for d in output.deliveries]}


def _instance(instance: Instance) -> dict:
    analysis = instance.analyses[-1] if instance.analyses else None
    return {
        "id": instance.id, "sop_instance_uid": instance.sop_instance_uid,
        "series_uid": instance.series.series_uid, "modality": instance.series.modality,
        "status": instance.status, "received_at": _iso(instance.received_at),
        "calling_ae": instance.calling_ae, "last_error": instance.last_error,
        "reason": instance.reason,
        "analysis": None if analysis is None else {
            "label": analysis.label, "probability": analysis.probability,
            "threshold": analysis.threshold,
            "member_probabilities": analysis.member_probabilities,
            "bundle": f"{analysis.bundle_name} {analysis.bundle_version}",
            "device": analysis.device,
            "seconds": {"decode": analysis.decode_seconds,
                        "classify": analysis.classify_seconds,
                        "detect": analysis.detect_seconds},
            "findings": [{"class": f.class_name, "score": f.score,
                          "box": [f.x0, f.y0, f.x1, f.y1]} for f in analysis.findings],
            "objects": [_object(o) for o in analysis.outputs]},
        "events": [{"at": _iso(e.at), "event": e.event, "detail": e.detail}
                   for e in instance.events],
    }


def results(sessions: sessionmaker[Session], *, accession: str | None = None,
            study_uid: str | None = None, label: str | None = None,
            finding: str | None = None, since: datetime | None = None,
            limit: int = 10_000) -> list[dict]:
    """One row per analysed instance (its latest analysis), newest first, for export."""
    latest = select(func.max(Analysis.id)).group_by(Analysis.instance_pk)
    query = (select(Analysis, Instance, Study).join(Analysis.instance).join(Instance.series)
             .join(Series.study).where(Analysis.id.in_(latest))
             .order_by(Instance.received_at.desc(), Instance.id.desc()).limit(limit))
    if accession:
        query = query.where(Study.accession_number == accession)
    if study_uid:
        query = query.where(Study.study_uid == study_uid)
    if label:
        query = query.where(Analysis.label == label)
    if since:
        query = query.where(Instance.received_at >= since)
    if finding:
        query = query.where(Analysis.findings.any(Finding.class_name == finding))
    with sessions() as session:
        return [
            {"study_uid": study.study_uid, "accession_number": study.accession_number,
             "sop_instance_uid": instance.sop_instance_uid,
             "received_at": _iso(instance.received_at), "calling_ae": instance.calling_ae,
             "label": analysis.label, "probability": round(analysis.probability, 6),
             "threshold": analysis.threshold,
             "bundle": f"{analysis.bundle_name} {analysis.bundle_version}",
             "findings": len(analysis.findings),
             "finding_classes": ";".join(sorted({f.class_name for f in analysis.findings}))}
            for analysis, instance, study in session.execute(query).all()
        ]
