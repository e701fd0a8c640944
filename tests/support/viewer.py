"""A radiologist's viewer for tests: OHIF's prebuilt web app (npm ``@ohif/app``, fetched once by
``scripts/setup --test`` into the cache) served beside a same-origin proxy to Orthanc's DICOMweb,
and the system Chromium driven headless by Playwright."""

from __future__ import annotations

import http.client
import json
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OHIF_VERSION = "3.13.2"  # keep in step with scripts/setup
CHROMIUM = "/usr/bin/chromium"

# OHIF reading from this server's /dicom-web (proxied to Orthanc): no CORS, no internet.
APP_CONFIG = "window.config = " + json.dumps({
    "routerBasename": "/",
    "extensions": [],
    "modes": [],
    "showStudyList": True,
    "showLoadingIndicator": False,
    "showWarningMessageForCrossOrigin": False,
    "showCPUFallbackMessage": False,
    "investigationalUseDialog": {"option": "never"},
    "defaultDataSourceName": "orthanc",
    "dataSources": [{
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test)", "name": "orthanc",
            "wadoUriRoot": "/dicom-web", "qidoRoot": "/dicom-web", "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False, "imageRendering": "wadors",
            "thumbnailRendering": "wadors", "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False, "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }],
}) + ";\n"


def ohif_dist() -> Path:
    cache = Path(os.environ.get("SPINENODE_CACHE", Path.home() / ".cache" / "spinenode"))
    dist = cache / f"ohif-{OHIF_VERSION}"
    if not (dist / "index.html").is_file():
        raise AssertionError(f"OHIF {OHIF_VERSION} is not in {dist}: run scripts/setup --test")
    return dist


class _Handler(SimpleHTTPRequestHandler):
    """OHIF's files, our app-config.js, index.html for the app's own routes, and /dicom-web
    forwarded to Orthanc."""

    def __init__(self, *args, orthanc_port: int, **kwargs):  # noqa: ANN002, ANN003
        self.orthanc_port = orthanc_port
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the test reads the browser's console, not every request

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web"):
            return self._forward()
        if path == "/app-config.js":
            return self._send(200, "application/javascript", APP_CONFIG.encode())
        if not Path(self.translate_path(path)).exists():
            self.path = "/index.html"  # a route of the single-page app
        return super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self._forward()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in ("connection", "accept-encoding")}
        connection = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=60)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ViewerServer:
    """OHIF at http://127.0.0.1:{port}/, reading Orthanc (at ``orthanc_port``) same-origin."""

    def __init__(self, orthanc_port: int):
        handler = partial(_Handler, directory=str(ohif_dist()), orthanc_port=orthanc_port)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def study_url(self, study_uid: str) -> str:
        return f"http://127.0.0.1:{self.port}/viewer?StudyInstanceUIDs={study_uid}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
