"""The size and the coding a compressed frame declares, read from its header, against real
encoders' output."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames

from dicom_node.codestreams import CODING_OF_SYNTAX, coding, declared_size
from tests.support.hostile import j2k_claiming
from tests.support.samples import real_cr, transcode
from training.synthetic import make_radiograph


def first_frame(ds) -> bytes:  # noqa: ANN001
    return next(generate_frames(ds.PixelData, number_of_frames=1))


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "jpeg-ls", "jpeg2000"])
def test_encoders_headers_give_rows_and_columns(tmp_path: Path, syntax: str) -> None:
    source = make_radiograph(tmp_path / "src.dcm", rows=300, columns=240)
    ds = dcmread(transcode(source, tmp_path / f"{syntax}.dcm", syntax))
    assert declared_size(first_frame(ds)) == (300, 240)


def test_a_real_jpeg_2000_cr() -> None:
    ds = dcmread(real_cr("RG3_J2KR.dcm"))
    assert declared_size(first_frame(ds)) == (ds.Rows, ds.Columns)


def test_what_is_not_jpeg_declares_nothing(tmp_path: Path) -> None:
    ds = dcmread(transcode(make_radiograph(tmp_path / "src.dcm"), tmp_path / "rle.dcm", "rle"))
    assert declared_size(first_frame(ds)) is None
    assert declared_size(b"") is None
    assert declared_size(b"\xff\xd8\xff\xe0\x00") is None  # cut before any SOF


def test_a_lying_header_is_read_as_it_lies(tmp_path: Path) -> None:
    ds = j2k_claiming(make_radiograph(tmp_path / "src.dcm"), 16384, 16384)
    assert declared_size(first_frame(ds)) == (16384, 16384)


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle"])
def test_encoders_frames_are_coded_as_their_transfer_syntax_says(tmp_path: Path,
                                                                 syntax: str) -> None:
    source = make_radiograph(tmp_path / "src.dcm", rows=300, columns=240)
    ds = dcmread(transcode(source, tmp_path / f"{syntax}.dcm", syntax))
    assert coding(first_frame(ds)) == CODING_OF_SYNTAX[ds.file_meta.TransferSyntaxUID]


def test_what_a_frame_is_coded_as() -> None:
    ds = dcmread(real_cr("RG3_J2KR.dcm"))
    assert coding(first_frame(ds)) == "JPEG 2000"
    assert coding(b"\xff\xd8\xff\xe0\x00") is None  # a JPEG whose frame header lies further on
    assert coding(b"\x00" * 64).startswith("not a JPEG")
    assert coding(b"\x10\x00\x00\x00\x40" + b"\x00" * 59).startswith("not a JPEG")  # 16 segments
