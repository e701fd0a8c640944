"""What a compressed frame's own header says about its size and its coding, read without
decoding it.

A JPEG 2000 or JPEG frame carries its width and height in its first marker segments (JPEG 2000
SIZ, PS3.5 A.4.4 / ISO 15444-1 A.5.1; JPEG SOFn and JPEG-LS SOF55). A frame that claims more
than the data set's Rows and Columns is a lie the decoder would act on: 16384 x 16384 in the
header makes it allocate a gigabyte for a 200-pixel image. Intake compares the two first, and
refuses a frame coded otherwise than its transfer syntax says (a JPEG sent as JPEG 2000): the
decoder chosen by the transfer syntax would fail on it, or worse, half-succeed.
"""

from __future__ import annotations

import struct

from pydicom.uid import (
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)

HEAD_BYTES = 65536  # the markers before a JPEG's SOF (tables, APPn) fit in this many

_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# JPEG start-of-frame markers: SOF0-SOF15 without DHT (C4), JPG (C8) and DAC (CC); F7 is
# JPEG-LS's SOF55.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


# What each compressed transfer syntax's frames must be coded as (PS3.5 A.4).
CODING_OF_SYNTAX = {
    **dict.fromkeys(JPEGTransferSyntaxes, "JPEG"),
    **dict.fromkeys(JPEGLSTransferSyntaxes, "JPEG-LS"),
    **dict.fromkeys(JPEG2000TransferSyntaxes, "JPEG 2000"),  # HTJ2K included
    **dict.fromkeys(RLETransferSyntaxes, "RLE"),
}


def _is_j2k(head: bytes) -> bool:
    return head.startswith(_J2K_SOC_SIZ) or head[4:8] == b"jP  "  # codestream, or JP2 file


def declared_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) as the frame beginning with HEAD declares them; None when HEAD is no
    JPEG 2000 or JPEG stream, or its header does not fit in HEAD."""
    if _is_j2k(head):
        at = head.find(_J2K_SOC_SIZ)
        if at < 0 or len(head) < at + 24:
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", head, at + 8)
        return ysiz - yosiz, xsiz - xosiz
    sof = _jpeg_sof(head)
    return None if sof is None else sof[1:]


def coding(head: bytes) -> str | None:
    """How the frame beginning with HEAD is coded, as CODING_OF_SYNTAX names it; None when
    its first bytes say nothing certain (a JPEG whose frame header lies beyond HEAD)."""
    if _is_j2k(head):
        return "JPEG 2000"
    if head.startswith(b"\xff\xd8"):
        sof = _jpeg_sof(head)
        return None if sof is None else "JPEG-LS" if sof[0] == 0xF7 else "JPEG"
    if len(head) >= 64:  # RLE: a 64-byte header, 1-15 segments, the first right after it
        segments, first = struct.unpack_from("<II", head)
        if 1 <= segments <= 15 and first == 64:
            return "RLE"
    return "not a JPEG, JPEG-LS, JPEG 2000 or RLE stream"


def _jpeg_sof(head: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, rows, columns) of a JPEG or JPEG-LS stream; None if not found in HEAD."""
    if not head.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 9 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _SOF:
            rows, columns = struct.unpack_from(">HH", head, at + 5)
            return marker, rows, columns
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack_from(">H", head, at + 2)
        at += 2 + length
    return None
