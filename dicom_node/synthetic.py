"""Synthetic spine radiographs as DICOM files: for the demo, the tests and the benchmarks.

Not a training phantom (that is ``training``'s job): a plain test pattern with realistic headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid


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


def make_radiograph(path: Path, *, rows: int = 256, columns: int = 200, bits_stored: int = 12,
                    sop_class: str = DigitalXRayImageStorageForPresentation,
                    modality: str | None = "DX", body_part: str | None = "LSPINE",
                    photometric: str = "MONOCHROME2", window: tuple[float, float] | None = None,
                    study_uid: str | None = None, seed: int = 0) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-0001"
    ds.PatientName = "Phantom^Spine"
    ds.StudyDate = "20261127"
    ds.AccessionNumber = "ACC1"
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if sop_class == DigitalXRayImageStorageForPresentation:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = radiograph_pixels(rows, columns, bits_stored, seed).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
