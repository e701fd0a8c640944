"""The SCP hashes each data set while pynetdicom writes it (dicom_node.receiving): the digest
stored for an image is the SHA-256 of the file kept in the spool, the file is not read back to
compute it, and the image arrives whole through the larger socket reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select

from dicom_node import intake, receiving
from dicom_node.db.models import Instance
from dicom_node.db.session import session_factory
from dicom_node.scp import StoreSCP
from training.synthetic import make_radiograph


def _no_second_read(path: Path) -> str:
    raise AssertionError(f"{path} was read back to hash it")


def test_an_image_is_hashed_as_it_arrives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          store_scp: StoreSCP) -> None:
    monkeypatch.setattr(intake, "sha256_of", _no_second_read)
    settings = store_scp.settings
    # 1.2 MB of pixels in 16 kB PDUs: many fragments, each hashed as it is written.
    source = dcmread(make_radiograph(tmp_path / "dx.dcm", rows=800, columns=750))
    sender = AE(ae_title="MODALITY")
    sender.maximum_pdu_size = 16384
    sender.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
    association = sender.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    assert association.is_established
    status = association.send_c_store(source)
    association.release()
    assert status.Status == 0x0000
    with session_factory(settings.database_url)() as session:
        row = session.scalars(select(Instance)).one()
    kept = Path(row.spool_path).read_bytes()
    assert row.sha256 == hashlib.sha256(kept).hexdigest()
    assert row.size_bytes == len(kept)
    assert dcmread(row.spool_path).PixelData == source.PixelData
    assert not list(settings.incoming_dir.iterdir())  # pynetdicom removed its file


def test_writeback_starts_in_whole_stretches_that_cover_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux is asked to start writing each 2 MiB once written (not each fragment: a call per
    128 KiB fragment cost intake 10-20% of its MB/s), in order and without gaps; what is left
    under 2 MiB the fsync before 0x0000 writes."""
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(receiving, "_start_writeback",
                        lambda fd, offset, length: started.append((offset, length)))
    monkeypatch.setattr(receiving.tempfile, "tempdir", str(tmp_path))
    received = receiving.HashingFile()
    data = bytes(range(256)) * 512  # 128 KiB, a PDU's worth
    for _ in range(40):  # 5 MiB
        received.write(data)
    digest = receiving.finish(received.name)
    received.close()
    assert digest == hashlib.sha256(data * 40).hexdigest()
    offsets = [offset for offset, _ in started]
    assert offsets == [sum(length for _, length in started[:i]) for i in range(len(started))]
    assert all(length >= receiving._WRITEBACK_BYTES for _, length in started)
    assert 40 * len(data) - sum(length for _, length in started) < receiving._WRITEBACK_BYTES
    assert len(started) == 2
