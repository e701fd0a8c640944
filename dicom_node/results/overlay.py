"""The Secondary Capture overlay: the windowed source image with each box drawn and labelled,
a legend with the ensemble result and a banner saying what it is."""

from __future__ import annotations

from dataclasses import dataclass
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
    date_the_series,
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


# Text height as a share of the image width, and the least that stays legible on a narrow image.
FONT_PER_WIDTH = 1 / 45
MIN_FONT_PIXELS = 11


@dataclass(frozen=True)
class TextBlock:
    """A piece of text as drawn: its lines and the rectangle they occupy (left, top, right,
    bottom, in the overlay's pixels)."""

    lines: tuple[str, ...]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Overlay:
    pixels: np.ndarray  # (H + bands, W, 3) uint8
    image_top: int  # the first row of the source image; the bands are above it
    texts: list[TextBlock]


def wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Lines of at most ``width`` pixels, broken between words, and inside a word only where
    the word alone is wider."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = max(1, max(n for n in range(1, len(current) + 1)
                             if font.getlength(current[:n]) <= width or n == 1))
            lines.append(current[:cut])
            current = current[cut:]
    return [*lines, current] if current else lines


def render_overlay(grey: np.ndarray, result: AnalysisResult) -> Overlay:
    """(H, W) uint8 windowed image -> the overlay: the banner and the legend in bands above the
    image (so they hide no anatomy), wrapped to its width; boxes and labels on the image, each
    label kept inside it. Text scales with the image width."""
    height, width = grey.shape
    font = _font(max(MIN_FONT_PIXELS, round(width * FONT_PER_WIDTH)))
    line = max(2, round(font.size / 8))
    _, ascent_top, _, descent_bottom = font.getbbox("Ag")
    line_height = descent_bottom - ascent_top + line
    banner = f"{BANNER}{'' if result.clinical_use else ' - NOT FOR CLINICAL USE'}"
    legend = (f"{result.label} (abnormality {result.probability:.0%}, threshold "
              f"{result.threshold:.0%}), {len(result.findings)} finding(s); "
              f"{result.bundle_name} {result.bundle_version}")
    text_width = width - 2 * line
    bands = [(wrap(banner, font, text_width), (180, 0, 0)),
             (wrap(legend, font, text_width), (0, 0, 0))]
    image_top = sum(len(lines) * line_height + 2 * line for lines, _ in bands)
    image = Image.new("RGB", (width, height + image_top))
    image.paste(Image.fromarray(grey).convert("RGB"), (0, image_top))
    draw = ImageDraw.Draw(image)
    texts = []
    top = 0
    for lines, fill in bands:
        bottom = top + len(lines) * line_height + 2 * line
        draw.rectangle([0, top, width - 1, bottom - 1], fill=fill)
        texts.append(_draw_lines(draw, lines, font, (line, top + line), line_height,
                                 ascent_top, (255, 255, 255)))
        top = bottom
    for box in result.findings:
        colour = CLASS_COLOURS.get(box.class_name, OTHER_COLOUR)
        x0, y0, x1, y1 = box.x0, box.y0 + image_top, box.x1, box.y1 + image_top
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        lines = wrap(f"{box.class_name} {box.score:.0%}", font, text_width)
        label_width = max(font.getlength(text) for text in lines) + 2 * line
        label_height = len(lines) * line_height + 2 * line
        # Above the box where there is room, else below it, else inside its top; never
        # outside the image.
        if y0 - label_height >= image_top:
            label_top = y0 - label_height
        elif y1 + label_height <= image_top + height:
            label_top = y1
        else:
            label_top = max(image_top, y0)
        label_left = max(0, min(x0, width - label_width))
        draw.rectangle([label_left, label_top, label_left + label_width - 1,
                        label_top + label_height - 1], fill=colour)
        texts.append(_draw_lines(draw, lines, font, (label_left + line, label_top + line),
                                 line_height, ascent_top, (0, 0, 0)))
    return Overlay(np.asarray(image), image_top, texts)


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font: ImageFont.FreeTypeFont,
                origin: tuple[float, float], line_height: int, ascent_top: int,
                fill: tuple[int, int, int]) -> TextBlock:
    left, top = origin
    boxes = []
    for index, text in enumerate(lines):
        position = (left, top + index * line_height - ascent_top)
        draw.text(position, text, fill=fill, font=font)
        boxes.append(draw.textbbox(position, text, font=font))
    return TextBlock(tuple(lines), (min(b[0] for b in boxes), min(b[1] for b in boxes),
                                    max(b[2] for b in boxes), max(b[3] for b in boxes)))


def build_overlay(source: Dataset, grey: np.ndarray, result: AnalysisResult,
                  series_uid: str | None = None, instance_number: int = 1,
                  jpeg: bool = False) -> Dataset:
    evidence = evidence_of(source)
    known_orientation = len(source.get("PatientOrientation") or []) == 2
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence, pixel_array=render_overlay(grey, result).pixels,
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid or generate_uid(),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=instance_number,
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
    date_the_series(sc)
    return sc
