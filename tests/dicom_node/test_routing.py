"""The default routing rules."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from dicom_node.config import load_settings
from dicom_node.routing import route
from dicom_node.sop_classes import Comprehensive3DSRStorage


def _ds(sop_class: str, modality: str | None = None, body_part: str | None = None,
        region: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if region is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = region, "SCT", "x"
        ds.AnatomicRegionSequence = [code]
    return ds


@pytest.mark.parametrize("ds,analyse", [
    (_ds(ComputedRadiographyImageStorage), True),  # VinDr: CR, no Modality, no body part
    (_ds(ComputedRadiographyImageStorage, "CR", "LSPINE"), True),
    (_ds(DigitalXRayImageStorageForPresentation, "DX", "CSPINE"), True),
    (_ds(DigitalXRayImageStorageForProcessing, "DX", "spine"), True),
    (_ds(DigitalXRayImageStorageForPresentation, "DX", None, "122496007"), True),
    (_ds(DigitalXRayImageStorageForPresentation, "DX", "CHEST"), False),
    (_ds(DigitalXRayImageStorageForPresentation, "DX", None, "51185008"), False),  # thorax
    (_ds(ComputedRadiographyImageStorage, "MG"), False),
    (_ds(SecondaryCaptureImageStorage, "OT", "SPINE"), False),
    (_ds(Comprehensive3DSRStorage, "SR"), False),
])
def test_default_rules(ds: Dataset, analyse: bool) -> None:
    decision = route(ds, load_settings())
    assert decision.analyse is analyse
    assert (decision.reason == "") is analyse


def test_rules_are_configurable() -> None:
    settings = load_settings(route_modalities="CR,DX,OT", route_body_parts="SPINE,PELVIS")
    assert route(_ds(SecondaryCaptureImageStorage, "OT", "PELVIS"), settings).analyse
    assert not route(_ds(DigitalXRayImageStorageForPresentation, "DX", "LSPINE"),
                     settings).analyse
