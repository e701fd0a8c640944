"""The SCP hashes each data set while pynetdicom writes it (dicom_node.receiving): the digest
stored for an image is the SHA-256 of the file kept in the spool, the file is not read back to
compute it, and the image arrives whole through the larger socket reads."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pynetdicom.dimse_messages
import pytest
from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.transport import AssociationSocket
from sqlalchemy import select

from dicom_node import intake
from dicom_node.cli.common import free_port
from dicom_node.config import load_settings
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Instance
from dicom_node.db.session import session_factory
from dicom_node.scp import StoreSCP, receive_into_spool
from training.synthetic import make_radiograph


def _no_second_read(path: Path) -> str:
    raise AssertionError(f"{path} was read back to hash it")


def test_an_image_is_hashed_as_it_arrives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    # receive_into_spool changes pynetdicom and tempfile process-wide: put them back after.
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(pynetdicom.dimse_messages, "NamedTemporaryFile",
                        pynetdicom.dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(AssociationSocket, "recv", AssociationSocket.recv)
    monkeypatch.setattr(intake, "sha256_of", _no_second_read)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = load_settings(data_dir=tmp_path / "var", database_url=url, port=free_port(),
                             bind_address="127.0.0.1")
    receive_into_spool(settings)
    sessions = session_factory(url)
    scp = StoreSCP(settings, sessions, lambda instance_id: None)
    scp.start()
    try:
        # 1.2 MB of pixels in 16 kB PDUs: many fragments, each hashed as it is written.
        source = dcmread(make_radiograph(tmp_path / "dx.dcm", rows=800, columns=750))
        sender = AE(ae_title="MODALITY")
        sender.maximum_pdu_size = 16384
        sender.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        association = sender.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
        assert association.is_established
        status = association.send_c_store(source)
        association.release()
    finally:
        scp.stop()
    assert status.Status == 0x0000
    with sessions() as session:
        row = session.scalars(select(Instance)).one()
    kept = Path(row.spool_path).read_bytes()
    assert row.sha256 == hashlib.sha256(kept).hexdigest()
    assert row.size_bytes == len(kept)
    assert dcmread(row.spool_path).PixelData == source.PixelData
    assert not list(settings.incoming_dir.iterdir())  # pynetdicom removed its file
