"""DCMTK storescu -> spinenode serve (real subprocess) -> decoded, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.db.models import InstanceEvent
from dicom_node.db.session import session_factory
from tests.support.hostile import rle_overrun
from tests.support.node import DECODED, instances, storescu, wait_until_settled
from tests.support.samples import CR_SOP_CLASS, make_radiograph, real_cr, transcode, with_new_uids

# storescu proposes only uncompressed syntaxes unless told which compressed one to offer.
PROPOSE = {"jpeg-lossless": "-xs", "jpeg-ls": "-xt", "rle": "-xr", "jpeg2000": "-xv",
           "deflated": "-xd", "big-endian": "-xb", "implicit": "-xi", "explicit": "-xe"}


def test_storescu_syntaxes_and_real_cr_end_decoded(tmp_path: Path, database_url: str,
                                                   start_node) -> None:
    node = start_node(database_url)
    source = make_radiograph(tmp_path / "dx.dcm", rows=300, columns=240, bits_stored=12)
    sent: dict[str, tuple[Path, str]] = {}
    for syntax in ("explicit", "jpeg-lossless", "jpeg-ls", "jpeg2000", "rle", "deflated"):
        fresh = with_new_uids(source, tmp_path / f"fresh-{syntax}.dcm")
        sent[syntax] = (transcode(fresh, tmp_path / f"{syntax}.dcm", syntax), PROPOSE[syntax])
    # Real MONOCHROME1 CRs (RG1 is labelled CHEST: relabel it as a lumbar spine study).
    sent["rg1"] = (with_new_uids(real_cr("RG1_UNCR.dcm"), tmp_path / "rg1.dcm",
                                 BodyPartExamined="LSPINE"), "-xe")
    sent["rg3-j2k"] = (with_new_uids(real_cr("RG3_J2KR.dcm"), tmp_path / "rg3.dcm",
                                     BodyPartExamined="LSPINE"), "-xv")
    # VinDr-SpineXR style: CR SOP class, no Modality, no body part.
    sent["cr-no-modality"] = (make_radiograph(tmp_path / "cr.dcm", sop_class=CR_SOP_CLASS,
                                              modality=None, body_part=None,
                                              photometric="MONOCHROME1"), "-xe")
    # RLE whose runs expand past Rows x Columns: acknowledged (nothing in the header gives it
    # away), then failed with its reason, never left in processing.
    bomb = rle_overrun(with_new_uids(source, tmp_path / "fresh-bomb.dcm"))
    bomb.save_as(tmp_path / "bomb.dcm")
    assert storescu(node.port, [tmp_path / "bomb.dcm"], "-xr", "-R").returncode == 0
    for name, (path, propose) in sent.items():
        result = storescu(node.port, [path], propose, "-R")
        assert result.returncode == 0, f"{name}: {result.stderr}"
    rows = {row.sop_instance_uid: row for row in wait_until_settled(database_url, len(sent) + 1)}
    assert len(rows) == len(sent) + 1
    failed = rows.pop(bomb.SOPInstanceUID)
    assert failed.status == "failed" and "cannot decode pixel data" in failed.last_error
    for name, (path, _) in sent.items():
        ds = dcmread(path, stop_before_pixels=True)
        row = rows[ds.SOPInstanceUID]
        assert row.status == DECODED, f"{name}: {row.status} {row.last_error} {row.reason}"
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, name
        assert (row.rows, row.columns) == (ds.Rows, ds.Columns), name
        assert row.photometric_interpretation == ds.PhotometricInterpretation, name
        assert row.decode_seconds is not None and row.decode_seconds > 0
        assert Path(row.spool_path).is_file()
        assert Path(row.spool_path).resolve().is_relative_to((node.data_dir / "spool").resolve())
        stored = dcmread(row.spool_path, stop_before_pixels=True)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert not list((node.data_dir / "spool" / "incoming").iterdir()), "temp files left behind"


def test_duplicate_is_acknowledged_once_and_new_bytes_are_analysed_again(
        tmp_path: Path, sqlite_url: str, start_node) -> None:
    node = start_node(sqlite_url)
    first = make_radiograph(tmp_path / "a.dcm", seed=1)
    assert storescu(node.port, [first]).returncode == 0
    wait_until_settled(sqlite_url, 1)
    assert storescu(node.port, [first]).returncode == 0  # the same bytes again
    (row,) = wait_until_settled(sqlite_url, 1)
    with session_factory(sqlite_url)() as session:
        query = select(InstanceEvent).order_by(InstanceEvent.id)
        events = [event.event for event in session.scalars(query)]
    assert events.count("claimed") == 1 and events.count("decoded") == 1
    assert "duplicate" in events and row.revision == 1

    # A corrected image under the same UID: kept beside the first, analysed again.
    ds = dcmread(first)
    ds.PixelData = bytes(reversed(ds.PixelData))
    second = tmp_path / "b.dcm"
    ds.save_as(second)
    assert storescu(node.port, [second]).returncode == 0
    (row,) = wait_until_settled(sqlite_url, 1)
    assert row.revision == 2 and row.status == DECODED
    spooled = sorted(Path(node.data_dir / "spool").rglob(f"{ds.SOPInstanceUID}.*.dcm"))
    assert len(spooled) == 2


def test_non_spine_and_non_image_are_stored_and_skipped(tmp_path: Path, sqlite_url: str,
                                                        start_node) -> None:
    node = start_node(sqlite_url)
    chest = make_radiograph(tmp_path / "chest.dcm", body_part="CHEST")
    sc = make_radiograph(tmp_path / "sc.dcm", sop_class="1.2.840.10008.5.1.4.1.1.7",
                         modality="OT")
    assert storescu(node.port, [chest, sc]).returncode == 0
    rows = wait_until_settled(sqlite_url, 2)
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert "CHEST" in rows[0].reason and "modality OT" in rows[1].reason
    assert all(r.attempts == 0 for r in instances(sqlite_url))


@pytest.mark.parametrize("keep", [False, True])
def test_a_routed_study_of_every_kind_is_acknowledged_and_skipped(
        tmp_path: Path, sqlite_url: str, start_node, keep: bool) -> None:
    """A PACS routes whole studies: CT, MR, US and an SR come along with the spine image. Each
    gets 0x0000 (nothing left failed in the PACS's routing queue), is recorded as skipped with
    why, and its file is dropped (kept with SPINENODE_KEEP_SKIPPED=true)."""
    from pydicom.data import get_testdata_file

    node = start_node(sqlite_url, env={"SPINENODE_KEEP_SKIPPED": "true" if keep else "false"})
    others = {name: Path(get_testdata_file(name))
              for name in ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "test-SR.dcm")}
    for name, path in others.items():
        # Each in its own transfer syntax (storescu proposes what the file is in, -R).
        result = storescu(node.port, [path], "-R")
        assert result.returncode == 0, (name, result.stderr)
    rows = wait_until_settled(sqlite_url, 4)
    assert [r.status for r in rows] == ["skipped"] * 4
    reasons = sorted(r.reason for r in rows)
    assert reasons == sorted(f"not an image SOP class ({kind})" for kind in (
        "CT Image Storage", "MR Image Storage", "Ultrasound Image Storage",
        "Comprehensive SR Storage"))
    assert all(Path(r.spool_path).exists() is keep for r in rows)


@pytest.mark.parametrize("calling,called,ok", [("MODALITY", "SPINENODE", True),
                                               ("INTRUDER", "SPINENODE", False),
                                               ("MODALITY", "WRONGAE", False)])
def test_calling_and_called_ae_checks(tmp_path: Path, sqlite_url: str, start_node,
                                      calling: str, called: str, ok: bool) -> None:
    node = start_node(sqlite_url, env={"SPINENODE_ALLOWED_CALLING_AES": "MODALITY,PACS"})
    path = make_radiograph(tmp_path / "a.dcm")
    import subprocess

    result = subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1",
                             str(node.port), str(path)], capture_output=True, text=True)
    assert (result.returncode == 0) is ok, result.stderr
    assert len(instances(sqlite_url)) == (1 if ok else 0)
