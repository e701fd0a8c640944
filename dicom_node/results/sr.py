"""The TID 1500 Imaging Measurement Report (Comprehensive 3D SR), laid out so that OHIF draws it.

OHIF (its cornerstone-dicom-sr extension and the cornerstone3D/dcmjs adapters) reads only the
Image Library and the Imaging Measurements container; it expects every measurement group there
to carry spatial coordinates (a group without them crashed its viewport) and at least one group
(an SR without any crashed it too). So Imaging Measurements holds TID 1501 groups written as
cornerstone writes a rectangle: a tracking identifier starting ``Cornerstone3DTools@^0.1.0:
RectangleROI:`` (other viewers show it as text), the finding code, the algorithm, one NUM
(Probability in percent, which OHIF shows as "65.00 %") whose only child is the closed 5-point
polyline (INFERRED FROM) with its one source image, and a Comment that OHIF uses as the label:

- first the image's classification, inferred from the whole image (the polyline is the image's
  border): finding Normal or Abnormal, the ensemble's probability of abnormality, labelled
  "Abnormal (abnormality 81%)";
- then one group per lesion, labelled "Osteophytes 65%".

The report's Qualitative Evaluations container (TID 1500, CODE and TEXT items; OHIF leaves it
alone) repeats the answer for software: normality, a sentence, each member's probability.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.analysis import AnalysisResult
from dicom_node.results.common import (
    MANUFACTURER,
    MODEL_NAME,
    copy_study_attributes,
    date_the_series,
    declare_private_scheme,
    evidence_of,
    finding_code,
    private_code,
)
from dicom_node.routing import modality_of

SR_SERIES_NUMBER = 9901
PERCENT = CodedConcept("%", "UCUM", "percent")
PIXELS = CodedConcept("{pixels}", "UCUM", "Pixels")
PROCEDURE = private_code("SPINE-XR", "Spine radiograph")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
ENSEMBLE_PROBABILITY = private_code("ENSEMBLE-P", "Abnormality probability (ensemble)")
SOURCE_IMAGE = CodedConcept("260753009", "SCT", "Source")
# OHIF tracks a group as a rectangle only when its tracking identifier starts with this.
RECTANGLE_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:RectangleROI:"

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_ACQUISITION = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_MODALITIES = {"CR": codes.DCM.ComputedRadiography, "DX": codes.DCM.DigitalRadiography}


def percent(probability: float) -> str:
    """How a probability reads to a person: 0.6531 -> "65%"."""
    return f"{probability:.0%}"


def member_code(architecture: str) -> CodedConcept:
    return private_code(architecture[:16].upper(), f"DERNet member {architecture}")


def build_sr(source: Dataset, result: AnalysisResult, series_uid: str | None = None) -> Dataset:
    source = evidence_of(source)
    algorithm = hd.sr.AlgorithmIdentification(name=result.bundle_name,
                                              version=result.bundle_version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=MODEL_NAME, manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME),
    )
    columns, rows = float(source.Columns), float(source.Rows)
    border = [(0.0, 0.0), (columns, 0.0), (columns, rows), (0.0, rows), (0.0, 0.0)]
    groups = [_group(source, "Image classification", border, result.probability,
                     codes.SCT.Abnormal if result.abnormal else codes.SCT.Normal,
                     f"{result.label} (abnormality {percent(result.probability)})", algorithm)]
    groups += [_group(source, f"Lesion {index} {box.class_name}", box.outline(), box.score,
                      finding_code(box.class_name), f"{box.class_name} {percent(box.score)}",
                      algorithm)
               for index, box in enumerate(result.findings, start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    content = report[0].ContentSequence
    measurements = next(i for i, item in enumerate(content)
                        if item.ConceptNameCodeSequence[0].CodeValue
                        == codes.DCM.ImagingMeasurements.value)
    content.insert(measurements, _image_library([source]))
    content.append(_qualitative_evaluations(result))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=result.series_description("spine analysis report"),
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = list(result.software_versions)
    copy_study_attributes(source, sr)
    date_the_series(sr)
    declare_private_scheme(sr)
    return sr


def _group(source: Dataset, name: str, outline: list[tuple[float, float]], probability: float,
           finding: CodedConcept, label: str, algorithm: hd.sr.AlgorithmIdentification
           ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A measurement group as OHIF reads a rectangle: the ``probability`` of ``finding``,
    inferred from the closed polyline ``outline``, with ``label`` as its Comment."""
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(outline, dtype=np.float32),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(),
            identifier=f"{RECTANGLE_TRACKING_PREFIX}{name}"[:64]),
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability,
                                        value=round(100 * probability, 2), unit=PERCENT,
                                        referenced_coordinates=[region])],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=label, relationship_type=_CONTAINS))
    return group


def _image_library(sources: list[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 with the descriptors each image has (highdicom's own requires a projection
    radiograph's Patient Orientation and Imager Pixel Spacing, which many CRs lack)."""
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                       relationship_type=_CONTAINS)
    group.ContentSequence = [_library_entry(source) for source in sources]
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=_CONTAINS)
    library.ContentSequence = [group]
    return library


def _library_entry(source: Dataset) -> hd.sr.ImageContentItem:
    modality = modality_of(source)
    entry = hd.sr.ImageContentItem(
        name=SOURCE_IMAGE, referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type=_CONTAINS)
    descriptors = [
        hd.sr.CodeContentItem(name=codes.DCM.Modality,
                              value=_MODALITIES.get(modality, CodedConcept(modality, "DCM",
                                                                            modality)),
                              relationship_type=_ACQUISITION),
        hd.sr.NumContentItem(name=codes.DCM.PixelDataRows, value=int(source.Rows), unit=PIXELS,
                             relationship_type=_ACQUISITION),
        hd.sr.NumContentItem(name=codes.DCM.PixelDataColumns, value=int(source.Columns),
                             unit=PIXELS, relationship_type=_ACQUISITION),
    ]
    orientation = source.get("PatientOrientation")
    if orientation and len(orientation) == 2:
        descriptors += [
            hd.sr.TextContentItem(name=codes.DCM.PatientOrientationRow, value=orientation[0],
                                  relationship_type=_ACQUISITION),
            hd.sr.TextContentItem(name=codes.DCM.PatientOrientationColumn,
                                  value=orientation[1], relationship_type=_ACQUISITION)]
    spacing = source.get("ImagerPixelSpacing")
    if spacing and len(spacing) == 2:
        descriptors += [
            hd.sr.NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=float(spacing[1]),
                                 unit=codes.UCUM.Millimeter, relationship_type=_ACQUISITION),
            hd.sr.NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=float(spacing[0]),
                                 unit=codes.UCUM.Millimeter, relationship_type=_ACQUISITION)]
    entry.ContentSequence = descriptors
    return entry


def _qualitative_evaluations(result: AnalysisResult) -> hd.sr.ContainerContentItem:
    """The image-level answer: normality, a sentence a person reads, and each probability as
    its own item for software."""
    members = ", ".join(f"{name} {percent(p)}"
                        for name, p in sorted(result.member_probabilities.items()))
    summary = (f"{result.label}: abnormality probability {percent(result.probability)} "
               f"(threshold {percent(result.threshold)}; DERNet members {members}); "
               f"{len(result.findings)} findings; algorithm {result.bundle_name} "
               f"{result.bundle_version}")
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=_CONTAINS)
    container.ContentSequence = [
        hd.sr.CodeContentItem(name=codes.DCM.Normality,
                              value=codes.SCT.Abnormal if result.abnormal else codes.SCT.Normal,
                              relationship_type=_CONTAINS),
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=summary, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(name=ENSEMBLE_PROBABILITY, value=f"{result.probability:.6f}",
                              relationship_type=_CONTAINS),
        *(hd.sr.TextContentItem(name=member_code(name), value=f"{p:.6f}",
                                relationship_type=_CONTAINS)
          for name, p in sorted(result.member_probabilities.items())),
    ]
    return container
