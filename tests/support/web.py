"""The node's HTTP side as a client sees it: JSON requests with a bearer token, and tokens made
with the real CLI."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.node import SPINENODE, NodeProcess


def make_token(node: NodeProcess, name: str, role: str) -> str:
    env = {**os.environ, "SPINENODE_DATA_DIR": str(node.data_dir),
           "SPINENODE_DATABASE_URL": node.database_url}
    result = subprocess.run([*SPINENODE, "tokens", "create", name, "--role", role], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


class Http:
    """Requests to one node's HTTP port; answers are (status, parsed JSON or text)."""

    def __init__(self, port: int, token: str = "", https_ca: Path | None = None):
        self.port, self.token, self.https_ca = port, token, https_ca
        self.base = f"{'https' if https_ca else 'http'}://127.0.0.1:{port}"
        # Over HTTPS, only the given certificate is trusted (and the host name checked).
        self._tls = ssl.create_default_context(cafile=str(https_ca)) if https_ca else None

    def as_(self, token: str) -> Http:
        return Http(self.port, token, self.https_ca)

    def request(self, method: str, path: str) -> tuple[int, object]:
        request = urllib.request.Request(self.base + path, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._tls) as response:
                status, body, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, body, kind = error.code, error.read(), error.headers
        if kind.get_content_type() == "application/json":
            return status, json.loads(body)
        return status, body.decode(errors="replace")

    def live(self) -> bool:
        try:
            return self.get("/health/live")[0] == 200
        except urllib.error.URLError:  # not listening yet
            return False

    def get(self, path: str) -> tuple[int, object]:
        return self.request("GET", path)

    def post(self, path: str) -> tuple[int, object]:
        return self.request("POST", path)

    def ok(self, path: str) -> object:
        status, body = self.get(path)
        assert status == 200, (path, status, body)
        return body
