"""Test inputs: synthetic radiographs in every transfer syntax (via DCMTK), real CRs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ComputedRadiographyImageStorage, JPEG2000Lossless, generate_uid

from training.synthetic import make_radiograph

__all__ = ["make_radiograph", "transcode", "with_new_uids", "real_cr", "CR_SOP_CLASS"]


# Transfer syntax name -> how to make it from an uncompressed file.
_DCMTK = {
    "jpeg-lossless": ["dcmcjpeg", "+e1"],
    "jpeg-ls": ["dcmcjpls"],
    "rle": ["dcmcrle"],
    "deflated": ["dcmconv", "+td"],
    "big-endian": ["dcmconv", "+tb"],
    "implicit": ["dcmconv", "+ti"],
}
SYNTAXES = ("explicit", *_DCMTK, "jpeg2000")


def transcode(source: Path, target: Path, syntax: str) -> Path:
    if syntax == "explicit":
        shutil.copy(source, target)
    elif syntax == "jpeg2000":
        ds = dcmread(source)
        ds.compress(JPEG2000Lossless)
        ds.save_as(target)
    else:
        subprocess.run([*_DCMTK[syntax], str(source), str(target)], check=True)
    return target


def with_new_uids(source: Path, target: Path, **changes: object) -> Path:
    """A copy of a file under fresh UIDs (and any attribute changes), keeping its encoding."""
    ds = dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def real_cr(name: str = "RG1_UNCR.dcm") -> Path:
    """A real MONOCHROME1 computed radiograph that the pydicom-data package ships."""
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: is pydicom-data installed?"
    return Path(path)


CR_SOP_CLASS = ComputedRadiographyImageStorage
