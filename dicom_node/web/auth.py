"""Who may see what: a bearer token (API clients) or the same token in a cookie set at the
page's login; viewers read, operators also act. Every request for patient data is audited,
refused ones too."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from dicom_node.db.models import AuditEntry
from dicom_node.tokens import Principal, authenticate

COOKIE = "spinenode_token"
# Paths without patient data: nobody needs a token for them, and they are not audited.
# ("/docs" covers /docs-assets, the Swagger UI's files.)
OPEN_PATHS = ("/health/", "/metrics", "/static/", "/login", "/logout", "/docs", "/openapi.json")


def _secret(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE, "")


class LoginRequired(Exception):
    """A page asked for without a valid token: the page side answers with the login form."""


def viewer(request: Request) -> Principal:
    """The caller, or 401; remembered on the request for the audit log."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    secret = _secret(request)
    principal = authenticate(sessions, secret) if secret else None
    if principal is None:
        if request.url.path.startswith("/api/"):
            raise HTTPException(401, "a valid bearer token is needed",
                                headers={"WWW-Authenticate": "Bearer"})
        raise LoginRequired()
    request.state.principal = principal
    return principal


def operator(principal: Principal = Depends(viewer)) -> Principal:  # noqa: B008
    if not principal.may_operate:
        raise HTTPException(403, f"token {principal.name!r} is a viewer; this needs an operator")
    return principal


class AuditMiddleware(BaseHTTPMiddleware):
    """One audit row per request for patient data: who (token name, or none), from where,
    what (method, path and query), and the answer's status."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        path = request.url.path
        if not path.startswith(OPEN_PATHS):
            principal: Principal | None = getattr(request.state, "principal", None)
            entry = AuditEntry(
                token_name=principal.name if principal else "",
                role=principal.role if principal else "",
                client=request.client.host if request.client else "",
                method=request.method,
                path=path + (f"?{request.url.query}" if request.url.query else ""),
                status_code=response.status_code)
            await run_in_threadpool(_write, request.app.state.sessions, entry)
        return response


def _write(sessions: sessionmaker[Session], entry: AuditEntry) -> None:
    with sessions.begin() as session:
        session.add(entry)
