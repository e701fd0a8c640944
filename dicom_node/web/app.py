"""The HTTP app (results API, dashboard page, /health, /metrics, /docs) and the server that runs
it beside the SCP (``spinenode serve``) or alone (``spinenode web``)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

import swagger_ui_bundle
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from dicom_node.config import Settings
from dicom_node.web import api, pages
from dicom_node.web.auth import AuditMiddleware, LoginRequired
from dicom_node.web.health import readiness

log = logging.getLogger(__name__)


class Queue(Protocol):
    """What the app needs of the workers' queue (workers.tasks.TaskQueue has it)."""

    def enqueue_analysis(self, instance_id: int) -> None: ...
    def enqueue_delivery(self, delivery_id: int) -> None: ...
    def depth(self) -> int: ...
    def check(self, timeout: float = 5.0) -> str | None: ...


def create_app(settings: Settings, sessions: sessionmaker[Session], queue: Queue,
               registry: CollectorRegistry) -> FastAPI:
    app = FastAPI(title="spinenode", version="1",
                  description="Results of the spine radiograph AI node. Send "
                              "`Authorization: Bearer <token>` (spinenode tokens create).",
                  docs_url=None, redoc_url=None)
    app.state.settings, app.state.sessions, app.state.queue = settings, sessions, queue
    app.add_middleware(AuditMiddleware)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="docs-assets")

    @app.exception_handler(LoginRequired)
    def to_login(request: Request, _: LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:  # the Swagger UI from a Python package, not from a CDN
        return get_swagger_ui_html(openapi_url="/openapi.json", title="spinenode API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/health/live", tags=["health"])
    def live() -> dict:
        """The process answers."""
        return {"live": True}

    @app.get("/health/ready", tags=["health"])
    def ready() -> Response:
        """200 when the node can take and analyse images now, 503 (with what is wrong)."""
        report = readiness(settings, sessions, lambda: queue.check(timeout=2.0))
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        """Prometheus exposition format."""
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


class HttpServer:
    """uvicorn in a thread of the node's process (``serve``), stopped with the node."""

    def __init__(self, settings: Settings, app: FastAPI):
        self.settings = settings
        ssl = ({"ssl_certfile": str(settings.http_ssl_certfile),
                "ssl_keyfile": str(settings.http_ssl_keyfile)}
               if settings.http_ssl_certfile else {})
        config = uvicorn.Config(app, host=settings.http_bind_address, port=settings.http_port,
                                log_config=None, access_log=False, **ssl)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.http_ssl_certfile else "http"
        return f"{scheme}://{self.settings.http_bind_address}:{self.settings.http_port}/"

    def start(self, timeout: float = 15.0) -> None:
        """Returns once it listens; raises OSError when it cannot."""
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"cannot listen on {self.settings.http_bind_address}:"
                              f"{self.settings.http_port}")
            self._thread.join(0.05)
            waited += 0.05
            if waited > timeout:
                raise OSError("the HTTP server did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
