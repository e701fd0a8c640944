"""What every object we make shares: who made it, the private codes, the study attributes that
highdicom does not copy."""

from __future__ import annotations

from pathlib import Path

from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.files import fsync_file
from dicom_node.results.identity import MANUFACTURER, MODEL_NAME
from dicom_node.routing import modality_of

__all__ = ["MANUFACTURER", "MODEL_NAME"]

DEVICE_SERIAL_NUMBER = "spinenode-1"
BANNER = "AI result, not for primary diagnosis"
# Private scheme for what SNOMED CT has no verified code for here; declared in each object's
# Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99SPINENODE"

# Patient/study attributes that must agree across a study (dcentvfy) and that highdicom's
# constructors do not copy from the source image.
STUDY_ATTRIBUTES = (
    "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientSize",
    "PatientWeight", "PatientBirthTime", "EthnicGroup", "PatientComments", "StudyDescription",
    "StudyID", "ReferringPhysicianName", "AdmittingDiagnosesDescription",
    "PatientIdentityRemoved", "DeidentificationMethod",
)


# Type 2 patient/study attributes highdicom reads from the source: present (maybe empty) in
# every valid image, but not every sender is valid.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "StudyID", "ReferringPhysicianName", "AccessionNumber")


def evidence_of(source: Dataset) -> Dataset:
    """The source's header, completed with empty type 2 attributes where it lacks them."""
    evidence = Dataset()
    evidence.update({tag: element for tag, element in source.items() if tag != 0x7FE00010})
    for keyword in _TYPE2:
        if keyword not in evidence:
            setattr(evidence, keyword, "")
    if not evidence.get("Modality"):  # VinDr-SpineXR's CRs have none; highdicom needs one
        evidence.Modality = modality_of(source) or "OT"
    return evidence


def copy_study_attributes(source: Dataset, target: Dataset) -> None:
    for keyword in STUDY_ATTRIBUTES:
        if keyword in source and keyword not in target:
            target[keyword] = source[keyword]


def private_code(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning[:64])


def declare_private_scheme(target: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "spinenode spine radiograph findings (VinDr-SpineXR classes)"
    item.CodingSchemeResponsibleOrganization = "spinenode"
    target.CodingSchemeIdentificationSequence = [item]


# The two VinDr-SpineXR classes with a verified SNOMED CT concept; the others are private.
_SNOMED_FINDINGS = {"Surgical implant": codes.SCT.Implant,  # 40388003
                    "Other lesions": codes.SCT.Lesion}  # 52988006


def finding_code(class_name: str) -> CodedConcept:
    code = _SNOMED_FINDINGS.get(class_name)
    if code is not None:
        return CodedConcept(code.value, code.scheme_designator, code.meaning)
    value = class_name.upper().replace(" ", "-")[:16]
    return private_code(value, class_name)


def date_the_series(target: Dataset) -> None:
    """Series Date/Time as PACS worklists show them: when we made the series (its instance's
    creation), not the source's acquisition."""
    target.SeriesDate = target.InstanceCreationDate
    target.SeriesTime = target.InstanceCreationTime


def save_object(data_dir: Path, ds: Dataset) -> Path:
    """Write one of our objects into the data dir's outputs, on disk (fsync) before the outbox
    row that will send it says it is there."""
    folder = data_dir / "outputs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    fsync_file(path)
    return path
