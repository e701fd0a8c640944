"""The Grayscale Softcopy Presentation State: every box as a graphic with a text label on the
source image, shown with the VOI window the analysis used. Off by default, per destination."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_node.analysis import AnalysisResult
from dicom_node.results.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    copy_study_attributes,
    date_the_series,
    evidence_of,
)

GSPS_SERIES_NUMBER = 9903


def build_gsps(source: Dataset, result: AnalysisResult, window: tuple[float, float] | None,
               series_uid: str | None = None, instance_number: int = 1) -> Dataset:
    """``window``: the VOI the analysis used, (center, width) in the source's modality values,
    or None for the source's own VOI LUT Sequence (which the GSPS then carries)."""
    evidence = evidence_of(source)
    layer = hd.pr.GraphicLayer(layer_name="SPINENODE", order=1,
                               description="AI findings (spinenode)")
    graphics = [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array(b.outline(), dtype=np.float32),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
        )
        for b in result.findings
    ]
    texts = [
        hd.pr.TextObject(text_value=f"{b.class_name} {b.score:.2f}"[:64],
                         units=hd.pr.AnnotationUnitsValues.PIXEL,
                         anchor_point=(b.x0, max(b.y0 - 2.0, 0.0)), anchor_point_visible=False)
        for b in result.findings
    ]
    texts.append(hd.pr.TextObject(
        text_value=f"AI: {result.label} p={result.probability:.2f}"[:64],
        units=hd.pr.AnnotationUnitsValues.PIXEL, anchor_point=(5.0, 5.0),
        anchor_point_visible=False, text_justification="LEFT"))
    annotation = hd.pr.GraphicAnnotation(referenced_images=[evidence], graphic_layer=layer,
                                         graphic_objects=graphics or None, text_objects=texts)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[evidence], series_instance_uid=series_uid or generate_uid(),
        series_number=GSPS_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
        software_versions=list(result.software_versions),
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="SPINENODE_AI", content_description="AI spine findings"[:64],
        graphic_annotations=[annotation], graphic_layers=[layer],
        voi_lut_transformations=[_voi(source, window)],
        series_description=result.series_description("spine findings GSPS"),
    )
    gsps.Laterality = ""  # type 2C: the source's laterality is in the image, not this series
    copy_study_attributes(source, gsps)
    date_the_series(gsps)
    return gsps


def _voi(source: Dataset, window: tuple[float, float] | None
         ) -> hd.pr.SoftcopyVOILUTTransformation:
    if window is not None:
        center, width = window
        return hd.pr.SoftcopyVOILUTTransformation(window_center=float(center),
                                                  window_width=max(float(width), 1.0))
    lut = source.VOILUTSequence[0]
    entries, first_mapped, bits = (int(value) for value in lut.LUTDescriptor)
    raw = lut.LUTData  # US: numbers; OW: bytes, one 16-bit word per entry
    data = np.frombuffer(raw, dtype="<u2") if isinstance(raw, bytes) else np.asarray(raw)
    data = data[:entries or 65536].astype(np.uint8 if bits <= 8 else np.uint16)
    return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[hd.VOILUT(
        first_mapped_value=first_mapped, lut_data=data,
        lut_explanation=str(lut.get("LUTExplanation", "") or "") or None)])
