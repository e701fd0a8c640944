"""Bad input over a real association: the right failure status, nothing stored or written outside
the spool, and the node keeps serving (C-ECHO after each)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, _config

from tests.support.hostile import deflate_bomb, j2k_claiming
from tests.support.node import echo, files_outside, instances
from tests.support.samples import make_radiograph, transcode

DX = DigitalXRayImageStorageForPresentation


def part10(target: Path, body: bytes, sop_instance_uid: str, sop_class: str = DX) -> Path:
    """A file whose meta names the UIDs the C-STORE request will carry, followed by ``body``."""
    ds = dcmread(make_radiograph(target.with_suffix(".tmp.dcm")))
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=False)
    target.write_bytes(buffer.getvalue() + body)
    return target


def dataset_body(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta."""
    data = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    offset = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[offset:]


def store_raw(port: int, path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Send a file's bytes as they are (pynetdicom's chunked send does not re-encode them)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX, read_file_meta_info(path).TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return int(status.Status)


def _variant(tmp_path: Path, name: str, **changes: object) -> tuple[Path, str]:
    """A valid radiograph changed as given, encoded as a body for ``part10``."""
    source = make_radiograph(tmp_path / f"{name}-src.dcm")
    ds = dcmread(source)
    uid = str(ds.SOPInstanceUID)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(tmp_path / f"{name}-changed.dcm", enforce_file_format=False)
    return tmp_path / f"{name}-changed.dcm", uid


def cases(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    good = make_radiograph(tmp_path / "good.dcm")
    good_uid = str(dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    body = dataset_body(good)
    made: dict[str, tuple[Path, int]] = {}
    made["not dicom"] = (part10(tmp_path / "noise.dcm", os.urandom(4000) + b"\xff" * 64,
                                "1.2.3.4.5"), 0xC000)
    made["truncated"] = (part10(tmp_path / "trunc.dcm", body[: len(body) // 2], good_uid),
                         0xC000)
    changed, uid = _variant(tmp_path, "nouid", SOPInstanceUID=None)
    made["missing SOP Instance UID"] = (part10(tmp_path / "nouid.dcm", dataset_body(changed),
                                               uid), 0xA900)
    evil = "../../../../../tmp/spinenode-evil"
    changed, _ = _variant(tmp_path, "evil", SOPInstanceUID=evil)
    made["UID crafted as a path"] = (part10(tmp_path / "evil.dcm", dataset_body(changed), evil),
                                     0xA900)
    changed, uid = _variant(tmp_path, "huge", Rows=60000, Columns=60000,
                            PixelData=b"\x00" * 64)
    made["huge Rows x Columns"] = (part10(tmp_path / "huge.dcm", dataset_body(changed), uid),
                                   0xA900)
    changed, uid = _variant(tmp_path, "short", Rows=4000, Columns=3000, PixelData=b"\x00" * 64)
    made["pixel data shorter than Rows x Columns"] = (
        part10(tmp_path / "short.dcm", dataset_body(changed), uid), 0xA900)
    changed, uid = _variant(tmp_path, "noframes", NumberOfFrames=0)
    made["Number of Frames 0"] = (part10(tmp_path / "noframes.dcm", dataset_body(changed), uid),
                                  0xA900)
    source = dcmread(good)
    changed, uid = _variant(tmp_path, "double", PixelData=source.PixelData * 2)
    made["pixel data twice Rows x Columns"] = (
        part10(tmp_path / "double.dcm", dataset_body(changed), uid), 0xA900)
    # The SOP Class UID element relabelled FD (26 bytes: no whole number of doubles).
    at = body.index(b"\x08\x00\x16\x00UI")
    wrong_vr = body[:at + 4] + b"FD" + body[at + 6:]
    made["value of a wrong VR"] = (part10(tmp_path / "fd.dcm", wrong_vr, good_uid), 0xC000)
    # The data set encoded implicit VR, the meta (and context) saying explicit.
    implicit = DicomBytesIO()
    implicit.is_implicit_VR, implicit.is_little_endian = True, True
    write_dataset(implicit, source)
    made["implicit VR sent as explicit"] = (
        part10(tmp_path / "implicit.dcm", implicit.getvalue(), good_uid), 0xC000)
    changed, uid = _variant(tmp_path, "ct", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    made["data set of another SOP class"] = (part10(tmp_path / "ct.dcm", dataset_body(changed),
                                                    uid), 0xA900)
    # Rows after Columns: (0028,0011) before (0028,0010), each with its own value.
    rows, columns = body.index(b"\x28\x00\x10\x00US"), body.index(b"\x28\x00\x11\x00US")
    swapped = body[:rows] + body[columns:columns + 10] + body[rows:rows + 10] + body[columns + 10:]
    made["elements out of order"] = (part10(tmp_path / "order.dcm", swapped, good_uid), 0xC000)
    changed, uid = _variant(tmp_path, "palette", PhotometricInterpretation="PALETTE COLOR",
                            SamplesPerPixel=3)
    made["PALETTE COLOR with three samples"] = (
        part10(tmp_path / "palette.dcm", dataset_body(changed), uid), 0xA900)
    changed, uid = _variant(tmp_path, "bits", BitsStored=20)
    made["Bits Stored above Bits Allocated"] = (
        part10(tmp_path / "bits.dcm", dataset_body(changed), uid), 0xA900)
    # Decompression bombs: a JPEG 2000 header claiming a gigapixel for a 256 x 200 image, and
    # 140 kB that inflate to 64 MiB. Refused before anything decodes or inflates them whole.
    j2k_claiming(make_radiograph(tmp_path / "j2k-src.dcm"), 16384, 16384).save_as(
        tmp_path / "j2k.dcm")
    made["JPEG 2000 header claiming 16384 x 16384"] = (tmp_path / "j2k.dcm", 0xA900)
    # A JPEG stream labelled JPEG 2000 (file meta and presentation context alike).
    mislabelled = dcmread(transcode(good, tmp_path / "jpeg.dcm", "jpeg-lossless"))
    mislabelled.file_meta.TransferSyntaxUID = JPEG2000Lossless
    mislabelled.save_as(tmp_path / "jpeg-as-j2k.dcm")
    made["JPEG stream sent as JPEG 2000"] = (tmp_path / "jpeg-as-j2k.dcm", 0xA900)
    made["deflated data set inflating to 64 MiB"] = (
        deflate_bomb(make_radiograph(tmp_path / "deflate-src.dcm"), tmp_path / "deflate.dcm",
                     64 * 2**20), 0xA900)
    return made


def test_bad_input_gets_failure_status_and_node_keeps_serving(
        tmp_path: Path, sqlite_url: str, start_node, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = cases(tmp_path / "inputs")
    node = start_node(sqlite_url)
    spool = node.data_dir / "spool"
    queue = node.data_dir / "queue"  # the embedded broker's own files (kombu makes some late)
    before = files_outside(tmp_path, spool, queue)
    for name, (path, expected) in inputs.items():
        assert store_raw(node.port, path, monkeypatch) == expected, name
        assert echo(node.port) == 0, f"no C-ECHO after {name}"
    # Logs and the database may grow; nothing else may appear outside the spool.
    new = {p for p in files_outside(tmp_path, spool, queue) - before
           if p.suffix != ".log" and "spinenode.sqlite" not in p.name}
    assert not new, new
    assert not list(Path("/tmp").glob("spinenode-evil*"))
    assert [p for p in spool.rglob("*") if p.is_file()] == []
    assert instances(sqlite_url) == []
    # And a good image still goes through afterwards.
    good = make_radiograph(tmp_path / "after.dcm")
    assert store_raw(node.port, good, monkeypatch) == 0
    assert len(instances(sqlite_url)) == 1
