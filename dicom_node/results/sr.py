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

A study's report has these for each of its images (an Image Library entry each, the ROIs on
their own images). The report's Qualitative Evaluations container (TID 1500, CODE and TEXT
items; OHIF leaves it alone) holds the answer for all of them: normality (abnormal if any image
is), a sentence, the highest probability, and a sentence per image with its members'.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def build_sr(images: Sequence[tuple[Dataset, AnalysisResult]], series_uid: str | None = None,
             instance_number: int = 1, previous: Dataset | None = None) -> Dataset:
    """The report on one image, or on a study's images together (abnormal if any image is).
    ``previous``: the SR this one supersedes (a new version, after more images arrived)."""
    sources = [evidence_of(source) for source, _ in images]
    results = [result for _, result in images]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=MODEL_NAME, manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME),
    )
    groups = []
    for number, (source, result) in enumerate(zip(sources, results, strict=True), start=1):
        algorithm = hd.sr.AlgorithmIdentification(name=result.bundle_name,
                                                  version=result.bundle_version)
        columns, rows = float(source.Columns), float(source.Rows)
        border = [(0.0, 0.0), (columns, 0.0), (columns, rows), (0.0, rows), (0.0, 0.0)]
        groups.append(_group(
            source, f"Image {number} classification", border, result.probability,
            codes.SCT.Abnormal if result.abnormal else codes.SCT.Normal,
            f"{result.label} (abnormality {percent(result.probability)})", algorithm))
        groups += [_group(source, f"Image {number} lesion {index} {box.class_name}",
                          box.outline(), box.score, finding_code(box.class_name),
                          f"{box.class_name} {percent(box.score)}", algorithm)
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
    content.insert(measurements, _image_library(sources))
    content.append(_qualitative_evaluations(sources, results))
    # A report made with any bundle not for clinical use says so.
    signer = min(results, key=lambda result: result.clinical_use)
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=report, series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=instance_number, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None,
        series_description=signer.series_description("spine analysis report"),
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = list(dict.fromkeys(version for result in results
                                             for version in result.software_versions))
    copy_study_attributes(images[0][0], sr)
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


def _qualitative_evaluations(sources: list[Dataset], results: list[AnalysisResult]
                             ) -> hd.sr.ContainerContentItem:
    """The answer for all the images together (abnormal if any is; the highest probability and
    its image), a sentence per image a person reads, and the highest probability for software.
    """
    top = max(range(len(results)), key=lambda index: results[index].probability)
    abnormal = any(result.abnormal for result in results)
    findings = sum(len(result.findings) for result in results)
    bundles = ", ".join(dict.fromkeys(f"{r.bundle_name} {r.bundle_version}" for r in results))
    summary = (f"{'Abnormal' if abnormal else 'Normal'}: highest abnormality probability "
               f"{percent(results[top].probability)} (image {top + 1} of {len(results)}); "
               f"{findings} findings; algorithm {bundles}")
    items = [
        hd.sr.CodeContentItem(name=codes.DCM.Normality,
                              value=codes.SCT.Abnormal if abnormal else codes.SCT.Normal,
                              relationship_type=_CONTAINS),
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=summary, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(name=ENSEMBLE_PROBABILITY,
                              value=f"{results[top].probability:.6f}",
                              relationship_type=_CONTAINS),
    ]
    for number, (source, result) in enumerate(zip(sources, results, strict=True), start=1):
        members = ", ".join(f"{name} {percent(p)}"
                            for name, p in sorted(result.member_probabilities.items()))
        items.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, relationship_type=_CONTAINS,
            value=(f"Image {number} ({source.SOPInstanceUID}): {result.label}, abnormality "
                   f"probability {percent(result.probability)} (threshold "
                   f"{percent(result.threshold)}; DERNet members {members}); "
                   f"{len(result.findings)} findings")))
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=_CONTAINS)
    container.ContentSequence = items
    return container
