"""SR, SC overlay and GSPS: valid (dciodvfy, dsrdump, dcentvfy), and the SR reads back with
highdicom to the same findings; from DX and MONOCHROME1 CR sources, with 0 and many findings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes

from dicom_node.analysis import AnalysisResult, Classification, FindingBox
from dicom_node.results.gsps import build_gsps
from dicom_node.results.overlay import build_overlay, render_overlay
from dicom_node.results.sr import build_sr
from tests.support.samples import real_cr, with_new_uids
from training.phantoms import generate
from training.synthetic import make_radiograph
from workers.bundle import VINDR_CLASSES
from workers.imaging import decode


def _findings(count: int, width: int, height: int) -> list[FindingBox]:
    rng = np.random.default_rng(count)
    boxes = []
    for index in range(count):
        x0, y0 = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
        boxes.append(FindingBox(VINDR_CLASSES[index % 7], round(float(rng.uniform(0.25, 1)), 4),
                                float(x0), float(y0), float(x0 + width * 0.2),
                                float(y0 + height * 0.1)))
    return boxes


def _result(findings: list[FindingBox], abnormal: bool = True) -> AnalysisResult:
    members = {"densenet121": 0.7, "tf_efficientnetv2_s": 0.85, "resnet50": 0.9}
    classification = Classification(members, {name: (p,) for name, p in members.items()},
                                    0.8123, 0.5, abnormal)
    return AnalysisResult("spinenode-test", "0.0.1-test", False, classification, findings)


def _errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


SOURCES = {
    "dx": lambda tmp: make_radiograph(tmp / "dx.dcm", rows=400, columns=300),
    "cr-monochrome1": lambda tmp: with_new_uids(real_cr("RG1_UNCR.dcm"), tmp / "rg1.dcm",
                                                BodyPartExamined="LSPINE"),
    # VinDr-SpineXR style: CR without Modality, body part or any patient/study type 2 data.
    "cr-vindr": lambda tmp: next((generate(tmp / "vindr", train=0, test=1, height=200,
                                           width=150, seed=3) / "test_images").iterdir()),
}


@pytest.mark.parametrize("source_name", SOURCES)
@pytest.mark.parametrize("count", [0, 12])
def test_objects_are_valid_and_consistent(tmp_path: Path, source_name: str, count: int) -> None:
    source_path = SOURCES[source_name](tmp_path)
    source = dcmread(source_path)
    image = decode(source)
    grey = (image.pixels * 255).round().astype(np.uint8)
    result = _result(_findings(count, image.columns, image.rows), abnormal=count > 0)
    objects: dict[str, Dataset] = {
        "sr": build_sr([(source, result)]),
        "sc": build_overlay(source, grey, result),
        "sc-jpeg": build_overlay(source, grey, result, jpeg=True),
        "gsps": build_gsps(source, result, window=(2048.0, 4096.0)),
    }
    paths = []
    for name, ds in objects.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        assert _errors(path) == [], f"{name}: {_errors(path)}"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
    dsrdump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True,
                             text=True)
    assert dsrdump.returncode == 0, dsrdump.stderr
    assert "Imaging Measurement Report" in dsrdump.stdout
    # dcentvfy: patient/study/series attributes agree between the source and our objects.
    consistency = subprocess.run(["dcentvfy", str(source_path), *map(str, paths)],
                                 capture_output=True, text=True)
    lines = (consistency.stdout + consistency.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    # dicom3tools files Accession Number under the series in its GSPS model, so it notes the
    # entity differs between objects; the values agree (an Error above would say otherwise).
    # A source that lacks type 2 patient/study attributes (VinDr's files do) gets them, empty,
    # in our objects: dcentvfy notes the presence differs; the values cannot disagree.
    import re

    def explained(line: str) -> bool:
        if "Different information entities" in line and "AccessionNumber" in line:
            return True
        absent = re.search(r"present in one instance but not the other - Element=<(\w+)>",
                           line)
        return bool(absent) and absent.group(1) not in source

    warnings = [line for line in lines if line.startswith("Warning")]
    assert all(explained(line) for line in warnings), warnings


def _sr_of(tmp_path: Path, findings: list[FindingBox], abnormal: bool = True
           ) -> tuple[Dataset, Path]:
    source = dcmread(make_radiograph(tmp_path / "dx.dcm", rows=400, columns=300))
    path = tmp_path / "sr.dcm"
    build_sr([(source, _result(findings, abnormal))]).save_as(path, enforce_file_format=True)
    return source, path


def _named(items, meaning: str) -> list[Dataset]:  # noqa: ANN001
    return [item for item in items if item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_sr_reads_back_to_the_same_findings(tmp_path: Path) -> None:
    findings = _findings(9, 300, 400)
    source, path = _sr_of(tmp_path, findings)
    sr = hd.sr.srread(path)
    image_group, *groups = sr.content.get_image_measurement_groups()
    assert image_group.finding_type == codes.SCT.Abnormal
    (probability,) = image_group.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(81.23)
    (border,) = probability.referenced_coordinates
    np.testing.assert_allclose(border.value, [[0, 0], [300, 0], [300, 400], [0, 400], [0, 0]])
    assert len(groups) == len(findings)
    for group, box in zip(groups, findings, strict=True):
        assert group.finding_type.meaning in (box.class_name, "Implant", "Lesion")
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(100 * box.score, abs=0.01)
        assert probability.unit.value == "%"
        (outline,) = probability.referenced_coordinates
        assert outline.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(outline.value, [[box.x0, box.y0], [box.x1, box.y0],
                                                   [box.x1, box.y1], [box.x0, box.y1],
                                                   [box.x0, box.y0]], atol=1e-3)
        (image_ref,) = outline.ContentSequence  # the polyline's selected-from source image
        assert image_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        assert group.tracking_uid
    (evaluations,) = _named(sr.ContentSequence, "Qualitative Evaluations")
    (normality,) = _named(evaluations.ContentSequence, "Normality")
    assert normality.ConceptCodeSequence[0].CodeMeaning == "Abnormal"
    (ensemble,) = _named(evaluations.ContentSequence, "Abnormality probability (ensemble)")
    assert float(ensemble.TextValue) == 0.8123
    summary, image_line = (item.TextValue for item in _named(evaluations.ContentSequence,
                                                             "Comment"))
    assert summary == ("Abnormal: highest abnormality probability 81% (image 1 of 1); "
                       "9 findings; algorithm spinenode-test 0.0.1-test")
    assert image_line == (f"Image 1 ({source.SOPInstanceUID}): Abnormal, abnormality "
                          "probability 81% (threshold 50%; DERNet members densenet121 70%, "
                          "resnet50 90%, tf_efficientnetv2_s 85%); 9 findings")
    schemes = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert "99SPINENODE" in schemes


def test_sr_has_the_layout_ohif_reads(tmp_path: Path) -> None:
    """What OHIF's SR reader (cornerstone-dicom-sr, cornerstone3D adapters) requires: every
    measurement group has its coordinates inside its first NUM, one SCOORD with one image; the
    tracking identifier names the rectangle tool; the Comment is the label. Nothing without
    coordinates in Imaging Measurements (that crashed the viewport)."""
    findings = _findings(3, 300, 400)
    source, path = _sr_of(tmp_path, findings)
    root = dcmread(path).ContentSequence
    (library,) = _named(root, "Image Library")
    (entry,) = library.ContentSequence[0].ContentSequence
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (measurements,) = _named(root, "Imaging Measurements")
    image_group, *groups = measurements.ContentSequence
    assert len(groups) == len(findings)
    labels = [f"{box.class_name} {round(100 * box.score)}%" for box in findings]
    for group, label in zip([image_group, *groups], ["Abnormal (abnormality 81%)", *labels],
                            strict=True):
        (tracking,) = _named(group.ContentSequence, "Tracking Identifier")
        assert tracking.TextValue.startswith("Cornerstone3DTools@^0.1.0:RectangleROI:")
        first_num = next(item for item in group.ContentSequence if item.ValueType == "NUM")
        (scoord,) = first_num.ContentSequence
        assert (scoord.ValueType, scoord.GraphicType, len(scoord.GraphicData)) == \
            ("SCOORD", "POLYLINE", 10)
        (image,) = scoord.ContentSequence
        assert len(image.ReferencedSOPSequence) == 1
        (comment,) = _named(group.ContentSequence, "Comment")
        assert comment.TextValue == label


def test_a_normal_image_has_its_classification_group_only(tmp_path: Path) -> None:
    """OHIF's SR viewport crashed on an SR without any measurement group."""
    _, path = _sr_of(tmp_path, [], abnormal=False)
    root = dcmread(path).ContentSequence
    (measurements,) = _named(root, "Imaging Measurements")
    (group,) = measurements.ContentSequence
    (comment,) = _named(group.ContentSequence, "Comment")
    assert comment.TextValue == "Normal (abnormality 81%)"
    (evaluations,) = _named(root, "Qualitative Evaluations")
    (normality,) = _named(evaluations.ContentSequence, "Normality")
    assert normality.ConceptCodeSequence[0].CodeMeaning == "Normal"


def test_result_series_carry_what_pacs_worklists_show(tmp_path: Path) -> None:
    """From a VinDr-style CR without Modality: each result series says what it is, who made it
    with which bundle, and when."""
    source = dcmread(SOURCES["cr-vindr"](tmp_path))
    assert "Modality" not in source
    image = decode(source)
    grey = (image.pixels * 255).round().astype(np.uint8)
    result = _result(_findings(2, image.columns, image.rows))
    made = {"SR": build_sr([(source, result)]), "OT": build_overlay(source, grey, result),
            "PR": build_gsps(source, result, window=image.window)}
    for (modality, ds), number, kind in zip(made.items(), (9901, 9902, 9903),
                                            ("analysis report", "findings overlay",
                                             "findings GSPS"), strict=True):
        assert ds.Modality == modality and ds.SeriesNumber == number
        assert ds.SeriesDescription == f"AI spine {kind} (spinenode) NOT FOR CLINICAL USE"
        assert ds.Manufacturer == "spinenode" and ds.ManufacturerModelName
        assert list(ds.SoftwareVersions)[1] == "spinenode-test 0.0.1-test"
        assert ds.SeriesDate == ds.InstanceCreationDate and len(str(ds.SeriesDate)) == 8
        assert ds.SeriesTime == ds.InstanceCreationTime
        created = ds.get("ContentDate") or ds.get("PresentationCreationDate")
        assert created == ds.InstanceCreationDate


def test_gsps_carries_the_sources_voi_lut_that_the_analysis_used(tmp_path: Path) -> None:
    path = make_radiograph(tmp_path / "lut.dcm", rows=200, columns=150)
    source = dcmread(path)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    curve = [round(65535 * (i / 4095) ** 0.5) for i in range(4096)]  # a gamma curve
    lut.add_new(0x00283006, "US", curve)  # LUT Data
    lut.LUTExplanation = "SQRT"
    source.VOILUTSequence = [lut]
    source.save_as(path)
    image = decode(dcmread(path))
    assert image.window is None  # the analysis saw the file's LUT, not a window
    gsps = build_gsps(source, _result(_findings(2, 150, 200)), window=image.window)
    gsps.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    assert _errors(tmp_path / "gsps.dcm") == []
    carried = dcmread(tmp_path / "gsps.dcm").SoftcopyVOILUTSequence[0]
    assert "WindowCenter" not in carried
    (copied,) = carried.VOILUTSequence
    assert list(copied.LUTDescriptor) == [4096, 0, 16]
    assert list(np.frombuffer(copied.LUTData, "<u2") if isinstance(copied.LUTData, bytes)
                else copied.LUTData) == curve
    assert copied.LUTExplanation == "SQRT"


def test_overlay_keeps_the_image_and_adds_banner_bands(tmp_path: Path) -> None:
    source = dcmread(make_radiograph(tmp_path / "dx.dcm", rows=400, columns=300))
    grey = (decode(source).pixels * 255).round().astype(np.uint8)
    sc = build_overlay(source, grey, _result([]))
    pixels = sc.pixel_array
    top = render_overlay(grey, _result([])).image_top
    assert pixels.shape == (400 + top, 300, 3) and top > 0
    np.testing.assert_array_equal(pixels[top:, :, 0], grey)  # no box: image untouched
    banner = pixels[:top // 2].reshape(-1, 3)
    assert (banner == [180, 0, 0]).all(axis=1).mean() > 0.5  # the red banner band


def _edge_findings(width: int, height: int) -> list[FindingBox]:
    """Boxes in each corner, along each edge and one as wide as the image."""
    w, h = width / 6, height / 8
    return [FindingBox(name, 0.61 + 0.05 * index, x, y, x + w, y + h)
            for index, (name, x, y) in enumerate([
                ("Disc space narrowing", 0, 0), ("Foraminal stenosis", width - w, 0),
                ("Vertebral collapse", 0, height - h), ("Surgical implant", width - w, height - h),
                ("Spondylolysthesis", width / 2, height / 2)])] + [
        FindingBox("Other lesions", 0.9, 0, height / 3, width, height / 3 + h)]


@pytest.mark.parametrize("width, height", [(288, 1000), (2500, 3000)])
def test_overlay_text_is_whole_and_inside_the_image_on_any_size(width: int, height: int) -> None:
    """The banner and the legend wrap to the image's width (no "...NOT FOR CLINICAL U"), every
    label stays inside the image, and text grows with the image."""
    grey = np.full((height, width), 90, dtype=np.uint8)
    result = _result(_edge_findings(width, height))
    overlay = render_overlay(grey, result)
    total_height = overlay.pixels.shape[0]
    assert overlay.pixels.shape == (height + overlay.image_top, width, 3)
    banner, legend, *labels = overlay.texts
    assert " ".join(banner.lines) == \
        "AI result, not for primary diagnosis - NOT FOR CLINICAL USE"
    assert " ".join(legend.lines).startswith("Abnormal (abnormality 81%, threshold 50%)")
    assert " ".join(legend.lines).endswith("6 finding(s); spinenode-test 0.0.1-test")
    assert [" ".join(label.lines) for label in labels] == [
        f"{box.class_name} {box.score:.0%}" for box in result.findings]
    for block in overlay.texts:
        left, top, right, bottom = block.box
        assert 0 <= left and right <= width and 0 <= top and bottom <= total_height, block
    for label in labels:  # on the image, not in the bands
        assert label.box[1] >= overlay.image_top
    assert banner.box[3] <= legend.box[1] and legend.box[3] <= overlay.image_top
    line_height = (banner.box[3] - banner.box[1]) / len(banner.lines)
    assert line_height >= 0.8 * max(11, width / 45)  # about 1/45 of the width, 11 px at least
    if width == 288:
        assert len(banner.lines) > 1  # wrapped, not cut
