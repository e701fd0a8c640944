"""Hostile pixel data made from a valid radiograph: what a fuzzer or an attacker sends.

Each keeps every attribute of the source and changes only what the name says, so the node's
answer is about that one lie.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless


def rle_overrun(source: Path, segment_bytes: int = 2_600_000) -> Dataset:
    """RLE Lossless whose segments each expand to SEGMENT_BYTES (runs of 128 zeros, two bytes
    each), far more than Rows x Columns: a decompression bomb that a decoder must stop."""
    ds = dcmread(source)
    segments = ds.BitsAllocated // 8 * int(ds.get("SamplesPerPixel", 1))
    runs = b"\x81\x00" * (segment_bytes // 128)  # header -127: the next byte 128 times
    offsets = [64 + k * len(runs) for k in range(segments)]
    header = struct.pack(f"<{1 + 15}I", segments, *offsets, *[0] * (15 - segments))
    ds.PixelData = encapsulate([header + runs * segments])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def j2k_claiming(source: Path, rows: int, columns: int) -> Dataset:
    """A JPEG 2000 image whose codestream header (SIZ) claims ROWS x COLUMNS while the data
    set's Rows and Columns stay the source's."""
    ds = dcmread(source)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    frame = bytearray(next(_frames(ds)))
    siz = frame.index(b"\xff\x51")  # Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
    struct.pack_into(">II", frame, siz + 6, columns, rows)
    struct.pack_into(">II", frame, siz + 14, 0, 0)
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def deflate_bomb(source: Path, target: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian file whose data set inflates to about
    INFLATED_BYTES: a private OB element of zeros, compressed about a thousandfold."""
    ds = dcmread(source)
    ds.add_new(0x00091010, "LO", "SPINENODE TEST")  # private creator of the block below
    ds.add_new(0x00091001, "OB", bytes(inflated_bytes))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = DicomBytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = deflater.compress(body.getvalue()) + deflater.flush()
    target.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + packed)
    return target


def _frames(ds: Dataset):  # noqa: ANN202
    from pydicom.encaps import generate_frames

    return generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)))
