"""What an admin asks the result database: counts per status, lists of instances, one study
or instance in full, and analysis results for export."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, and_, exists, func, select, tuple_
from sqlalchemy.orm import Session, aliased, sessionmaker

from dicom_node.config import OVERLAY_KINDS
from dicom_node.db.models import (
    Analysis,
    Finding,
    Instance,
    InstanceStatus,
    Output,
    Patient,
    Series,
    Study,
    StudyReport,
    aware,
    utcnow,
)
from dicom_node.heartbeat import heartbeats


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
    since = aware(instance.received_at)
    return {"id": instance.id, "status": instance.status, "since": since.isoformat(),
            "age_seconds": round((utcnow() - since).total_seconds(), 1)}


def node_status(sessions: sessionmaker[Session], queue_depth: Callable[[], int]) -> dict:
    """Instances per status, the broker's queue depth (None when the broker cannot be asked:
    the rest still answers), the oldest waiting instance and the workers' heartbeats."""
    try:
        depth: int | None = queue_depth()
    except Exception:  # noqa: BLE001 - a broker that is down is a value here, not an error
        depth = None
    return {"instances": status_counts(sessions), "queue_depth": depth,
            "oldest_waiting": oldest_waiting(sessions), "workers": heartbeats(sessions)}


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
    # Full precision: an API client pages and filters by these times.
    return None if moment is None else aware(moment).isoformat()


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
            "deliveries": [{"id": d.id, "destination": d.destination, "status": d.status,
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
            **_analysis(analysis, analysis.findings),
            "objects": [_object(o) for o in analysis.outputs]},
        "events": [{"at": _iso(e.at), "event": e.event, "detail": e.detail}
                   for e in instance.events],
    }


@dataclass(frozen=True)
class Filters:
    """What an admin searches by; every field left None matches all."""

    accession: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    calling_ae: str | None = None
    status: str | None = None
    label: str | None = None  # of the latest analysis: normal | abnormal
    finding: str | None = None  # a finding class in the latest analysis
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before
    analysed: bool = False  # only instances with an analysis


class BadCursor(ValueError):
    pass


Order = Literal["newest", "oldest"]


def encode_cursor(order: Order, moment: datetime, row_id: int) -> str:
    """The position after which the next page starts, in the order it was asked in."""
    text = f"{order}|{aware(moment).isoformat()}|{row_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, order: Order) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        given, moment, row_id = text.split("|")
        if given != order:
            raise ValueError(f"a cursor of a {given}-first listing")
        return datetime.fromisoformat(moment), int(row_id)
    except ValueError as error:
        raise BadCursor(f"cursor {cursor!r} is not one this server gave out for "
                        f"order={order}") from error


def _keyset_page(query: Select, time: Any, row_id: Any, order: Order, limit: int,
                 cursor: str | None) -> Select:
    """``query`` ordered by (time, id) in ``order``, one row more than a page (to know whether
    there is a next one), after ``cursor``. Keyset pagination: a page is as fast at the end as
    at the start, and rows that arrive meanwhile do not shift it."""
    key = tuple_(time, row_id)
    if order == "newest":
        query = query.order_by(time.desc(), row_id.desc())
    else:
        query = query.order_by(time, row_id)
    if cursor:
        after = _decode_cursor(cursor, order)
        query = query.where(key < after if order == "newest" else key > after)
    return query.limit(limit + 1)


def _fetch_page(session: Session, query: Select, limit: int, order: Order,
                position: Callable[[Any], tuple[datetime, int]]) -> tuple[list, str | None]:
    """The rows of a ``_keyset_page`` query, at most ``limit``, and the cursor of the next page
    (None on the last); ``position`` gives a row's (time, id)."""
    rows = session.execute(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(order, *position(rows[-1])) if more else None


def _instance_search(filters: Filters) -> Select:
    """Instances with their study, patient ID and latest analysis (None if not analysed),
    unordered. "Latest" is "no later analysis of the same instance": one index probe a row,
    so a page costs the same on a million instances as on ten."""
    later = aliased(Analysis)
    latest = and_(Analysis.instance_pk == Instance.id,
                  ~exists().where(later.instance_pk == Analysis.instance_pk,
                                  later.id > Analysis.id))
    query = (select(Instance, Study, Patient.patient_id, Analysis)
             .join(Instance.series).join(Series.study).join(Study.patient)
             .join(Analysis, latest, isouter=not (filters.analysed or filters.label
                                                  or filters.finding)))
    equal = ((Study.accession_number, filters.accession), (Patient.patient_id, filters.patient_id),
             (Study.study_uid, filters.study_uid), (Series.series_uid, filters.series_uid),
             (Instance.sop_instance_uid, filters.sop_instance_uid),
             (Instance.calling_ae, filters.calling_ae), (Instance.status, filters.status),
             (Analysis.label, filters.label))
    for column, value in equal:
        if value:
            query = query.where(column == value)
    if filters.finding:
        query = query.where(exists().where(Finding.analysis_pk == Analysis.id,
                                           Finding.class_name == filters.finding))
    if filters.since:
        query = query.where(Instance.received_at >= filters.since)
    if filters.until:
        query = query.where(Instance.received_at < filters.until)
    return query


def search(sessions: sessionmaker[Session], filters: Filters, limit: int = 50,
           cursor: str | None = None, order: Order = "newest") -> tuple[list[dict], str | None]:
    """One page of instances matching ``filters`` by time received and the cursor of the next
    page (None on the last)."""
    query = _keyset_page(_instance_search(filters), Instance.received_at, Instance.id, order,
                         limit, cursor)
    with sessions() as session:
        rows, next_cursor = _fetch_page(session, query, limit, order,
                                        lambda row: (row[0].received_at, row[0].id))
        findings = _findings_of(session, [a.id for *_, a in rows if a is not None])
        items = [_search_row(instance, study, patient_id, analysis,
                             findings.get(analysis.id, []) if analysis else [])
                 for instance, study, patient_id, analysis in rows]
    return items, next_cursor


@dataclass(frozen=True)
class StudyFilters:
    """What an admin finds a study by; every field left None matches all."""

    accession: str | None = None
    patient_id: str | None = None
    label: str | None = None  # of the study's latest report: normal | abnormal
    since: datetime | None = None  # first image received at or after
    until: datetime | None = None  # first image received before


def studies(sessions: sessionmaker[Session], filters: StudyFilters, limit: int = 50,
            cursor: str | None = None, order: Order = "newest") -> tuple[list[dict], str | None]:
    """One page of studies by when their first image arrived, each with its image count, the
    last arrival and its latest report (what its images say together; None before the first),
    and the cursor of the next page."""
    later = aliased(StudyReport)
    latest = and_(StudyReport.study_pk == Study.id,
                  ~exists().where(later.study_pk == StudyReport.study_pk,
                                  later.version > StudyReport.version))
    query = (select(Study, Patient.patient_id, StudyReport).join(Study.patient)
             .join(StudyReport, latest, isouter=not filters.label))
    for column, value in ((Study.accession_number, filters.accession),
                          (Patient.patient_id, filters.patient_id),
                          (StudyReport.label, filters.label)):
        if value:
            query = query.where(column == value)
    if filters.since:
        query = query.where(Study.created_at >= filters.since)
    if filters.until:
        query = query.where(Study.created_at < filters.until)
    query = _keyset_page(query, Study.created_at, Study.id, order, limit, cursor)
    with sessions() as session:
        rows, next_cursor = _fetch_page(session, query, limit, order,
                                        lambda row: (row[0].created_at, row[0].id))
        images = {study_pk: (count, last) for study_pk, count, last in session.execute(
            select(Series.study_pk, func.count(Instance.id), func.max(Instance.received_at))
            .join(Instance.series).where(Series.study_pk.in_([s.id for s, *_ in rows]))
            .group_by(Series.study_pk))}
        overlays = _report_overlays(session, [report for *_, report in rows if report])
        items = [{
            "study_uid": study.study_uid, "accession_number": study.accession_number,
            "patient_id": patient_id, "study_date": study.study_date,
            "first_received_at": _iso(study.created_at),
            "last_received_at": _iso(images[study.id][1]), "images": images[study.id][0],
            "report": None if report is None else {
                "version": report.version, "label": report.label,
                "probability": report.probability, "image_count": report.image_count,
                "finding_count": report.finding_count, "created_at": _iso(report.created_at),
                "overlay_sop_instance_uid": overlays.get(report.id)},
        } for study, patient_id, report in rows]
    return items, next_cursor


def _report_overlays(session: Session, reports: list[StudyReport]) -> dict[int, str]:
    """By report id: the SC overlay of the image that gave the report its probability (of that
    image's analysis the report took), for a thumbnail of the study."""
    top = {(report.top_instance_pk, analysis_id): report.id for report in reports
           for analysis_id in report.analysis_ids}
    if not top:
        return {}
    rows = session.execute(
        select(Analysis.instance_pk, Analysis.id, Output.sop_instance_uid)
        .join(Output, Output.analysis_pk == Analysis.id)
        .where(Analysis.id.in_({analysis_id for _, analysis_id in top}),
               Output.kind.in_(OVERLAY_KINDS))
        .order_by(Output.id))
    return {top[(instance_pk, analysis_id)]: uid for instance_pk, analysis_id, uid in rows
            if (instance_pk, analysis_id) in top}


def _findings_of(session: Session, analysis_ids: list[int]) -> dict[int, list[Finding]]:
    found: dict[int, list[Finding]] = {}
    if analysis_ids:
        for finding in session.scalars(select(Finding).where(Finding.analysis_pk.in_(analysis_ids))
                                       .order_by(Finding.id)):
            found.setdefault(finding.analysis_pk, []).append(finding)
    return found


def _search_row(instance: Instance, study: Study, patient_id: str, analysis: Analysis | None,
                findings: list[Finding]) -> dict:
    return {
        "sop_instance_uid": instance.sop_instance_uid, "study_uid": study.study_uid,
        "accession_number": study.accession_number, "patient_id": patient_id,
        "study_date": study.study_date, "received_at": _iso(instance.received_at),
        "calling_ae": instance.calling_ae, "status": instance.status,
        "last_error": instance.last_error,
        "analysis": None if analysis is None else _analysis(analysis, findings),
    }


def _analysis(analysis: Analysis, findings: list[Finding]) -> dict:
    return {
        "label": analysis.label, "probability": analysis.probability,
        "threshold": analysis.threshold, "member_probabilities": analysis.member_probabilities,
        "bundle": f"{analysis.bundle_name} {analysis.bundle_version}", "device": analysis.device,
        "seconds": {"decode": analysis.decode_seconds, "classify": analysis.classify_seconds,
                    "detect": analysis.detect_seconds},
        "findings": [{"class": f.class_name, "score": f.score, "box": [f.x0, f.y0, f.x1, f.y1]}
                     for f in findings],
    }


def results(sessions: sessionmaker[Session], filters: Filters, limit: int = 10_000
            ) -> list[dict]:
    """One flat row per analysed instance (its latest analysis), newest first, for export."""
    rows, _ = search(sessions, replace(filters, analysed=True), limit=limit)
    return [
        {"study_uid": row["study_uid"], "accession_number": row["accession_number"],
         "sop_instance_uid": row["sop_instance_uid"], "received_at": row["received_at"],
         "calling_ae": row["calling_ae"], "label": row["analysis"]["label"],
         "probability": round(row["analysis"]["probability"], 6),
         "threshold": row["analysis"]["threshold"], "bundle": row["analysis"]["bundle"],
         "findings": len(row["analysis"]["findings"]),
         "finding_classes": ";".join(sorted({f["class"] for f in row["analysis"]["findings"]}))}
        for row in rows
    ]
