"""Synthetic spine radiographs as DICOM files: for the demo, the tests and the benchmarks.

Not a training phantom (``phantoms`` draws those, with lesions and labels): a plain test pattern
with realistic headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

# SNOMED CT codes (CID 4031) for the body parts the tests use.
_REGION_CODES = {
    "SPINE": ("421060004", "SCT", "Spine"),
    "CSPINE": ("122494005", "SCT", "Cervical spine"),
    "TSPINE": ("122495006", "SCT", "Thoracic spine"),
    "LSPINE": ("122496007", "SCT", "Lumbar spine"),
    "CHEST": ("51185008", "SCT", "Thorax"),
}


def radiograph_pixels(rows: int, columns: int, bits_stored: int, seed: int = 0) -> np.ndarray:
    """A spine-like test pattern: a bright vertical column of 'vertebrae' over soft tissue."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    top = 2**bits_stored - 1
    image = 0.2 + 0.3 * np.exp(-(((x - columns / 2) / (columns / 4)) ** 2))
    spine = np.abs(x - columns / 2) < columns / 12
    image += 0.4 * spine * (0.6 + 0.4 * (np.sin(y / rows * 12 * np.pi) > -0.6))
    image += rng.normal(0, 0.01, image.shape)
    return np.clip(image * top, 0, top).astype(np.uint16)


def grey_image(pixels: np.ndarray, bits_stored: int, photometric: str, sop_class: str, *,
               sop_instance_uid: str, study_uid: str, series_uid: str) -> Dataset:
    """The part every synthetic image shares: file meta, UIDs and one grey 16-bit frame.
    Callers add their own headers (the test radiograph's DX modules, the phantom's VinDr-like
    bareness) and save it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def make_radiograph(path: Path, *, rows: int = 256, columns: int = 200, bits_stored: int = 12,
                    sop_class: str = DigitalXRayImageStorageForPresentation,
                    modality: str | None = "DX", body_part: str | None = "LSPINE",
                    photometric: str = "MONOCHROME2", window: tuple[float, float] | None = None,
                    study_uid: str | None = None, seed: int = 0) -> Path:
    ds = grey_image(radiograph_pixels(rows, columns, bits_stored, seed), bits_stored,
                    photometric, sop_class, sop_instance_uid=generate_uid(),
                    study_uid=study_uid or generate_uid(), series_uid=generate_uid())
    ds.PatientID = "TEST-0001"
    ds.PatientName = "Phantom^Spine"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "066Y"
    ds.StudyDate = "20261127"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.StudyDescription = "XR LUMBAR SPINE"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = "ACC1"
    ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.Manufacturer = "spinenode synthetic"
    ds.PatientOrientation = ["L", "F"]
    ds.ConversionType = "WSD"  # used by the Secondary Capture SOP class only
    if sop_class != "1.2.840.10008.5.1.4.1.1.7":
        del ds.ConversionType
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if sop_class == DigitalXRayImageStorageForPresentation:
        # The DX modules' required attributes, so that the file is a valid DX image.
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.AcquisitionContextSequence = []
        ds.AnatomicRegionSequence = []
        region = _REGION_CODES.get(body_part or "")
        if region is not None:
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = region
            ds.AnatomicRegionSequence = [code]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
