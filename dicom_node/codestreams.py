"""What a compressed frame's own header says about its size, read without decoding it.

A JPEG 2000 or JPEG frame carries its width and height in its first marker segments (JPEG 2000
SIZ, PS3.5 A.4.4 / ISO 15444-1 A.5.1; JPEG SOFn and JPEG-LS SOF55). A frame that claims more
than the data set's Rows and Columns is a lie the decoder would act on: 16384 x 16384 in the
header makes it allocate a gigabyte for a 200-pixel image. Intake compares the two first.
"""

from __future__ import annotations

import struct

HEAD_BYTES = 65536  # the markers before a JPEG's SOF (tables, APPn) fit in this many

_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# JPEG start-of-frame markers: SOF0-SOF15 without DHT (C4), JPG (C8) and DAC (CC); F7 is
# JPEG-LS's SOF55.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def declared_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) as the frame beginning with HEAD declares them; None when HEAD is no
    JPEG 2000 or JPEG stream, or its header does not fit in HEAD."""
    if head.startswith(_J2K_SOC_SIZ) or head[4:8] == b"jP  ":  # codestream, or JP2 file
        at = head.find(_J2K_SOC_SIZ)
        if at < 0 or len(head) < at + 24:
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", head, at + 8)
        return ysiz - yosiz, xsiz - xosiz
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(head)
    return None


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
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
            return rows, columns
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack_from(">H", head, at + 2)
        at += 2 + length
    return None
