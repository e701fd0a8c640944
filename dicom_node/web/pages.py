"""The dashboard page: server-rendered HTML (Jinja2) and one stylesheet served from here;
nothing is loaded from the internet. Log in with a token (kept in an HttpOnly, SameSite=Strict
cookie), find a study, open it, retry what failed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicom_node import admin
from dicom_node.intake import requeue_failed
from dicom_node.outbox import retry_deliveries
from dicom_node.tokens import Principal, authenticate
from dicom_node.web.auth import COOKIE, operator, viewer
from dicom_node.web.images import overlay_png

router = APIRouter(include_in_schema=False)
RECENT_STUDIES = 20  # on the dashboard; the API pages through all of them
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
# ISO times to the second for people ("2026-11-28 03:51:10 UTC"); the API keeps full precision.
templates.env.filters["when"] = lambda iso: f"{iso[:19].replace('T', ' ')} UTC" if iso else ""
Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {"error": ""})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, token: Annotated[str, Form()]) -> Response:
    if authenticate(request.app.state.sessions, token.strip()) is None:
        return templates.TemplateResponse(request, "login.html",
                                          {"error": "That token is unknown or revoked."},
                                          status_code=401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, who: Viewer, accession: str = "", patient_id: str = ""
              ) -> Response:
    sessions = request.app.state.sessions
    where = admin.StudyFilters(accession=accession.strip() or None,
                               patient_id=patient_id.strip() or None)
    studies, _ = admin.studies(sessions, where, limit=RECENT_STUDIES)
    return templates.TemplateResponse(request, "dashboard.html", {
        "who": who, "status": admin.node_status(sessions, request.app.state.queue.depth),
        "accession": accession, "patient_id": patient_id,
        "studies": studies})


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str, who: Viewer) -> Response:
    shown = admin.show(request.app.state.sessions, uid=study_uid)
    if shown is None:
        raise HTTPException(404, f"no study {study_uid}")
    return templates.TemplateResponse(request, "study.html", {"who": who, "study": shown})


@router.get("/overlays/{sop_instance_uid}.png")
def overlay(request: Request, sop_instance_uid: str, _: Viewer, width: int | None = None
            ) -> Response:
    png = overlay_png(request.app.state.sessions, sop_instance_uid, width)
    if png is None:
        raise HTTPException(404, f"no overlay {sop_instance_uid}")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private"})


@router.post("/deliveries/{delivery_id}/retry")
def retry_delivery(request: Request, delivery_id: int, _: Operator,
                   back: Annotated[str, Form()] = "/") -> Response:
    retry_deliveries(request.app.state.sessions, [delivery_id],
                     request.app.state.queue.enqueue_delivery)
    return RedirectResponse(_local(back), status_code=303)


@router.post("/instances/{sop_instance_uid}/requeue")
def requeue(request: Request, sop_instance_uid: str, who: Operator,
            back: Annotated[str, Form()] = "/") -> Response:
    requeue_failed(request.app.state.sessions, sop_instance_uid, who.name,
                   request.app.state.queue.enqueue_analysis)
    return RedirectResponse(_local(back), status_code=303)


def _local(path: str) -> str:
    """Only back to a page of ours (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"
