"""The SC overlays we made, as PNG for the page (full size or a thumbnail)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import OVERLAY_KINDS
from dicom_node.db.models import Output


def overlay_png(sessions: sessionmaker[Session], sop_instance_uid: str,
                width: int | None = None) -> bytes | None:
    """The overlay's pixels as PNG, scaled down to ``width`` if given; None if no such SC."""
    with sessions() as session:
        path = session.scalar(select(Output.path).where(
            Output.sop_instance_uid == sop_instance_uid, Output.kind.in_(OVERLAY_KINDS)))
    if path is None or not Path(path).is_file():
        return None
    image = Image.fromarray(dcmread(path).pixel_array)
    if width and width < image.width:
        image = image.resize((width, max(1, round(image.height * width / image.width))),
                             Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
