"""JPEG 2000 decoded on several threads (workers/jpeg2000.py): pydicom's own plugin's pixels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder

from tests.support.samples import real_cr
from workers import imaging  # noqa: F401 (installs the plugin, as the workers do)
from workers.jpeg2000 import PLUGIN, SYNTAXES

# Files pydicom-data ships, one for each thing the plugin must get right.
SAMPLES = [
    "RG1_J2KR.dcm",  # 15-bit MONOCHROME1 radiograph, lossless
    "MR2_J2KI.dcm",  # 12-bit, lossy (the irreversible wavelet: floating point)
    "693_J2KR.dcm",  # signed 16-bit
    "J2K_pixelrep_mismatch.dcm",  # signed in the header, unsigned in the codestream
    "US1_J2KR.dcm",  # colour, YBR_RCT
    "US1_J2KI.dcm",  # colour, YBR_ICT, lossy
    "emri_small_jpeg_2k_lossless.dcm",  # 10 frames
]


@pytest.mark.parametrize("name", SAMPLES)
def test_threaded_plugin_decodes_as_pydicoms_plugin(name: str) -> None:
    ds = dcmread(real_cr(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what pydicom says about the mismatch sample, twice
        reference = pixel_array(ds, decoding_plugin="pylibjpeg")
        threaded = pixel_array(ds, decoding_plugin=PLUGIN, j2k_threads=2)
        served = ds.pixel_array  # as workers.imaging.decode reads it: no plugin named
    assert threaded.dtype == reference.dtype
    np.testing.assert_array_equal(threaded, reference)
    np.testing.assert_array_equal(served, reference)


def test_plugin_is_tried_first_and_pydicoms_stays_behind_it() -> None:
    for syntax in SYNTAXES:
        plugins = list(get_decoder(syntax).available_plugins)
        assert plugins[0] == PLUGIN
        assert "pylibjpeg" in plugins[1:]  # pydicom falls back to it where ours fails


@pytest.mark.parametrize("name", ["US1_J2KR.dcm", "RG1_J2KR.dcm"])
def test_jp2_wrapped_frames_decode_as_pydicoms_plugin(name: str) -> None:
    """Some encoders put the JP2 file format (boxes around the codestream) in Pixel Data, which
    PS3.5 A.4.4 does not allow; pydicom's plugin reads it, so ours must give the same pixels."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    ds = dcmread(real_cr(name))
    pixels = ds.pixel_array
    jp2 = imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="JP2",
                                    mct=ds.SamplesPerPixel == 3, bitspersample=ds.BitsStored)
    assert jp2.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n")  # the JP2 signature box
    ds.PixelData = encapsulate([jp2])
    reference = pixel_array(ds, decoding_plugin="pylibjpeg")
    threaded = pixel_array(ds, decoding_plugin=PLUGIN, j2k_threads=2)
    np.testing.assert_array_equal(reference, pixels)  # lossless: what was encoded
    assert threaded.dtype == reference.dtype
    np.testing.assert_array_equal(threaded, reference)
    np.testing.assert_array_equal(ds.pixel_array, reference)  # as the workers read it
