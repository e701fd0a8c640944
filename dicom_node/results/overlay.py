"""The Secondary Capture overlay: the windowed source image with each box drawn and labelled,
a legend with the ensemble result and a banner saying what it is."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dicom_node.analysis import AnalysisResult
from dicom_node.results.common import (
    BANNER,
    MANUFACTURER,
    MODEL_NAME,
    copy_study_attributes,
    evidence_of,
)

SC_SERIES_NUMBER = 9902
# One colour per VinDr-SpineXR class (colour-blind-safe Okabe-Ito palette), grey for others.
CLASS_COLOURS = {
    "Osteophytes": (230, 159, 0),
    "Surgical implant": (86, 180, 233),
    "Spondylolysthesis": (0, 158, 115),
    "Foraminal stenosis": (240, 228, 66),
    "Disc space narrowing": (0, 114, 178),
    "Vertebral collapse": (213, 94, 0),
    "Other lesions": (204, 121, 167),
}
OTHER_COLOUR = (200, 200, 200)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    # The font matplotlib ships: on disk everywhere we run, nothing to download.
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size)


def render_overlay(grey: np.ndarray, result: AnalysisResult) -> np.ndarray:
    """(H, W) uint8 windowed image -> (H + bands, W, 3) uint8: the banner and the legend in
    bands above the image (so they hide no anatomy), boxes and labels on it."""
    height, width = grey.shape
    scale = max(height, width) / 1000
    line = max(2, round(3 * scale))
    font = _font(max(10, round(22 * scale)))
    banner = f"{BANNER}{'' if result.clinical_use else ' - NOT FOR CLINICAL USE'}"
    legend = (f"{result.label} (p = {result.probability:.2f}, threshold "
              f"{result.threshold:.2f}), {len(result.findings)} finding(s); "
              f"{result.bundle_name} {result.bundle_version}")
    _, top, _, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag",
                                                                            font=font)
    band = (bottom - top) + 2 * line
    image = Image.new("RGB", (width, height + 2 * band))
    image.paste(Image.fromarray(grey).convert("RGB"), (0, 2 * band))
    draw = ImageDraw.Draw(image)
    for row, (text, fill) in enumerate(((banner, (180, 0, 0)), (legend, (0, 0, 0)))):
        draw.rectangle([0, row * band, width, (row + 1) * band - 1], fill=fill)  # inclusive
        draw.text((line, row * band + line - top), text, fill=(255, 255, 255), font=font)
    for box in result.findings:
        colour = CLASS_COLOURS.get(box.class_name, OTHER_COLOUR)
        x0, y0, x1, y1 = box.x0, box.y0 + 2 * band, box.x1, box.y1 + 2 * band
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        label = f"{box.class_name} {box.score:.2f}"
        left, top_, right, bottom_ = draw.textbbox((0, 0), label, font=font)
        label_height = (bottom_ - top_) + 2 * line
        label_y = y0 - label_height if y0 - label_height >= 2 * band else y1
        draw.rectangle([x0, label_y, x0 + (right - left) + 2 * line, label_y + label_height],
                       fill=colour)
        draw.text((x0 + line, label_y + line - top_), label, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def build_overlay(source: Dataset, grey: np.ndarray, result: AnalysisResult,
                  series_uid: str | None = None, jpeg: bool = False) -> Dataset:
    evidence = evidence_of(source)
    known_orientation = len(source.get("PatientOrientation") or []) == 2
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence, pixel_array=render_overlay(grey, result),
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid or generate_uid(),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom wants an orientation; where the source has none we empty it below.
        patient_orientation=tuple(source.PatientOrientation) if known_orientation
        else ("L", "F"),
        transfer_syntax_uid=JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian,
        series_description=result.series_description("spine findings overlay"),
    )
    if not known_orientation:
        sc.PatientOrientation = ""  # type 2: unknown, as in the source
    sc.ManufacturerModelName = MODEL_NAME
    sc.SoftwareVersions = list(result.software_versions)
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = ""  # type 2C: the source's laterality is in the image, not this series
    sc.ImageComments = BANNER
    copy_study_attributes(source, sc)
    return sc
