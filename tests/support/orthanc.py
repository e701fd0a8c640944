"""Orthanc (Debian's package) as a PACS for tests and benchmarks: a fresh instance in a folder,
auto-routing every stored instance to the node (Lua OnStoredInstance), with DICOMweb (Debian's
orthanc-dicomweb) for the viewer and STOW-RS."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path

from tests.support.node import free_port, wait_for

ROUTE_EVERYTHING = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'spinenode')
end
"""

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    def __init__(self, folder: Path, node_port: int, dicomweb: bool = False,
                 users: dict[str, str] | None = None):
        """``users``: HTTP basic-auth users (name: password); none means no authentication."""
        folder.mkdir(parents=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        (folder / "route.lua").write_text(ROUTE_EVERYTHING)
        config = {
            "Name": "test-pacs", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "HttpServerEnabled": True,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "LuaScripts": [str(folder / "route.lua")],
            "DicomModalities": {"spinenode": ["SPINENODE", "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        name, password = next(iter((users or {"": ""}).items()))
        token = base64.b64encode(f"{name}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"} if users else {}
        self.log = open(folder / "orthanc.log", "wb")
        self.process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._alive() and self.get("/system"), 60, what="Orthanc to start")

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.process.returncode}")
        return True

    def get(self, path: str) -> object:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                             headers=self._headers)
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except OSError:
            return None

    def study_instances(self, study_uid: str) -> list[dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/find", method="POST",
            headers=self._headers,
            data=json.dumps({"Level": "Instance", "Expand": True,
                             "Query": {"StudyInstanceUID": study_uid}}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def has_series(self, study_uid: str, modality: str) -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/find", method="POST",
            headers=self._headers,
            data=json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid,
                                                          "Modality": modality}}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return bool(json.load(response))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()
