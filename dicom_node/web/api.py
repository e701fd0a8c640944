"""The results API, JSON under /api/v1: read for viewers, retry and re-queue for operators."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy import select

from dicom_node import admin
from dicom_node.db.models import AuditEntry, DeliveryStatus, InstanceStatus
from dicom_node.intake import requeue_failed
from dicom_node.outbox import list_deliveries, retry_deliveries
from dicom_node.tokens import Principal
from dicom_node.web.auth import operator, viewer

router = APIRouter(prefix="/api/v1", tags=["results"])
Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]


def filters(
    accession: str | None = None, patient_id: str | None = None, study_uid: str | None = None,
    series_uid: str | None = None, sop_instance_uid: str | None = None,
    calling_ae: str | None = None, status: InstanceStatus | None = None,
    label: Literal["normal", "abnormal"] | None = None,
    finding: Annotated[str | None, Query(description="a finding class, e.g. Osteophytes")] = None,
    since: Annotated[datetime | None, Query(description="received at or after (ISO 8601)")]
    = None,
    until: Annotated[datetime | None, Query(description="received before (ISO 8601)")] = None,
) -> admin.Filters:
    return admin.Filters(accession=accession, patient_id=patient_id, study_uid=study_uid,
                         series_uid=series_uid, sop_instance_uid=sop_instance_uid,
                         calling_ae=calling_ae, status=status, label=label, finding=finding,
                         since=since, until=until)


Filters = Annotated[admin.Filters, Depends(filters)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Order = Annotated[admin.Order, Query(description="by time received: newest or oldest first")]


def study_filters(
    accession: str | None = None, patient_id: str | None = None,
    label: Annotated[Literal["normal", "abnormal"] | None,
                     Query(description="of the study's latest report")] = None,
    since: Annotated[datetime | None,
                     Query(description="first image received at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None,
                     Query(description="first image received before (ISO 8601)")] = None,
) -> admin.StudyFilters:
    return admin.StudyFilters(accession=accession, patient_id=patient_id, label=label,
                              since=since, until=until)


StudyFilters = Annotated[admin.StudyFilters, Depends(study_filters)]


def _page(listing: Callable[[], tuple[list[dict], str | None]]) -> dict:
    try:
        items, next_cursor = listing()
    except admin.BadCursor as error:
        raise HTTPException(400, str(error)) from None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/status")
def status(request: Request, _: Viewer) -> dict:
    """Instances per status, the broker's queue depth and the oldest waiting instance."""
    return admin.node_status(request.app.state.sessions, request.app.state.queue.depth)


@router.get("/instances")
def instances(request: Request, _: Viewer, where: Filters, limit: Limit = 50,
              cursor: str | None = None, order: Order = "newest") -> dict:
    """Instances by time received, each with its latest analysis (member probabilities,
    threshold, bundle, timings, device, findings). ``next_cursor`` fetches the next page."""
    return _page(lambda: admin.search(request.app.state.sessions, where, limit, cursor, order))


@router.get("/studies")
def studies(request: Request, _: Viewer, where: StudyFilters, limit: Limit = 50,
            cursor: str | None = None, order: Order = "newest") -> dict:
    """Studies by when their first image arrived, each with its image count and its latest
    report (label, probability, findings). ``next_cursor`` fetches the next page."""
    return _page(lambda: admin.studies(request.app.state.sessions, where, limit, cursor, order))


@router.get("/studies/{study_uid}")
def study(request: Request, study_uid: str, _: Viewer) -> dict:
    """One study: its reports and, per instance, analysis, objects, deliveries and timeline."""
    return _shown(admin.show(request.app.state.sessions, uid=study_uid), study_uid)


@router.get("/instances/{sop_instance_uid}")
def instance(request: Request, sop_instance_uid: str, _: Viewer) -> dict:
    """One instance within its study: analysis, objects, deliveries and event timeline."""
    shown = admin.show(request.app.state.sessions, uid=sop_instance_uid)
    if shown is not None and len(shown["instances"]) != 1:  # a study UID given here
        shown = None
    return _shown(shown, sop_instance_uid)


def _shown(shown: dict | None, uid: str) -> dict:
    if shown is None:
        raise HTTPException(404, f"nothing received with UID {uid}")
    return shown


@router.get("/deliveries")
def deliveries(request: Request, _: Viewer, status: DeliveryStatus | None = None,
               limit: Limit = 100) -> list[dict]:
    """Deliveries newest first: destination, attempts, last error."""
    return list_deliveries(request.app.state.sessions, status=status, limit=limit)


@router.post("/deliveries/{delivery_id}/retry")
def retry_delivery(request: Request, delivery_id: int, _: Operator) -> dict:
    """A failed delivery is sent again with a fresh attempt count (operators)."""
    if not retry_deliveries(request.app.state.sessions, [delivery_id],
                            request.app.state.queue.enqueue_delivery):
        raise HTTPException(409, f"delivery {delivery_id} is not failed (or does not exist)")
    return {"delivery": delivery_id, "status": "pending"}


@router.post("/instances/{sop_instance_uid}/requeue")
def requeue(request: Request, sop_instance_uid: str, who: Operator) -> dict:
    """A failed instance goes through analysis again (operators)."""
    if not requeue_failed(request.app.state.sessions, sop_instance_uid, who.name,
                          request.app.state.queue.enqueue_analysis):
        raise HTTPException(409, f"instance {sop_instance_uid} is not failed "
                                 "(or does not exist)")
    return {"sop_instance_uid": sop_instance_uid, "status": "queued"}


@router.get("/audit")
def audit(request: Request, _: Operator, limit: Limit = 100) -> list[dict]:
    """The newest accesses to patient data through this API and page (operators)."""
    with request.app.state.sessions() as session:
        rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
        return [{"at": row.at.isoformat(timespec="seconds"), "token": row.token_name,
                 "role": row.role, "client": row.client, "method": row.method,
                 "path": row.path, "status": row.status_code} for row in rows]
