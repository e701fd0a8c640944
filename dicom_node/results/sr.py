"""The TID 1500 Imaging Measurement Report (Comprehensive 3D SR) that viewers such as OHIF read.

One image-level group (Normality, ensemble and member probabilities, algorithm) and one planar
ROI group per lesion (closed 5-point polyline in the source image's pixels, tracking id/UID,
finding type, probability).
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
    declare_private_scheme,
    evidence_of,
    finding_code,
    private_code,
)

SR_SERIES_NUMBER = 9901
PROBABILITY_UNIT = CodedConcept("1", "UCUM", "no units")
PROCEDURE = private_code("SPINE-XR", "Spine radiograph")
IMAGE_FINDING = private_code("SPINE-XR-READ", "Spine radiograph abnormality assessment")


def _probability(value: float, method: CodedConcept | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(value), 6),
                             unit=PROBABILITY_UNIT, method=method)


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
    normality = codes.SCT.Abnormal if result.abnormal else codes.SCT.Normal
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                     identifier="Image classification"),
        finding_type=IMAGE_FINDING,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.Normality, normality)],
        measurements=[_probability(result.probability)] + [
            _probability(p, method=private_code(name[:16].upper(), f"DERNet member {name}"))
            for name, p in sorted(result.member_probabilities.items())
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    lesions = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=f"Lesion {index} {box.class_name}"[:64]),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array(box.outline(), dtype=np.float32),
                source_image=hd.sr.SourceImageForRegion.from_source_image(source)),
            finding_type=finding_code(box.class_name),
            algorithm_id=algorithm,
            measurements=[_probability(box.score)],
        )
        for index, box in enumerate(result.findings, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=[image_group, *lesions],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=result.series_description("spine analysis report"),
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = list(result.software_versions)
    copy_study_attributes(source, sr)
    declare_private_scheme(sr)
    return sr
