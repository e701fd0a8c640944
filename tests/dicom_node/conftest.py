"""Fixtures of the SCP's own tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pynetdicom.dimse_messages
import pytest
from pynetdicom import _config
from pynetdicom.transport import AssociationSocket

from dicom_node.cli.common import free_port
from dicom_node.config import load_settings
from dicom_node.db.migrate import upgrade
from dicom_node.db.session import session_factory
from dicom_node.scp import StoreSCP, receive_into_spool


@pytest.fixture
def store_scp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreSCP]:
    """The node's SCP on a free local port with a fresh SQLite database, receiving into its
    spool as ``serve`` has it (and queueing nothing). What ``receive_into_spool`` changes
    process-wide (pynetdicom's receive settings, the temporary folder) is put back after."""
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(pynetdicom.dimse_messages, "NamedTemporaryFile",
                        pynetdicom.dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(AssociationSocket, "recv", AssociationSocket.recv)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = load_settings(data_dir=tmp_path / "var", database_url=url, port=free_port(),
                             bind_address="127.0.0.1")
    receive_into_spool(settings)
    scp = StoreSCP(settings, session_factory(url), lambda instance_id: None)
    scp.start()
    yield scp
    scp.stop()
